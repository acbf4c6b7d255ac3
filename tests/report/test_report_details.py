"""The report's details a newcomer trips on: budgets kept apart, provenance that describes the run (its seeds, its LR
schedule, rounded values, run.json's config hash), dead-latent counts that say their sample counts, legends off the
curves, a leaderboard that fits the page. Sections are built one at a time (no re-evaluation), so this is fast."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from saelab.bench.store import ResultsStore
from saelab.report import build as report_build
from saelab.report.data import load_report_source

SHORT_BUDGET = 8192  # the fixture store's protocol trains 30,000 samples


def analysis(source: Path) -> report_build._Analysis:
    return report_build._Analysis(load_report_source(source), eval_samples=2000, seed=0, device="cpu", max_saes=4)


@pytest.fixture
def two_budget_store(report_store, tmp_path) -> Path:
    """The fixture store plus, for every complete run, one of the same (arch, L0, seed) on a shorter budget, recorded
    later (so a store keyed without the budget would let it replace the protocol run)."""
    path = tmp_path / "two-budgets.sqlite"
    shutil.copy(report_store, path)
    store = ResultsStore(path)
    for run in store.runs(status="complete"):
        config = json.loads(json.dumps(run["config"]))
        config["run"]["samples"] = SHORT_BUDGET
        env = {k: run[k] for k in ("saelab_version", "commit", "hardware")} | {"config": config}
        rid = store.start_run(run["protocol"], run["arch"], run["l0_target"], run["seed"], env)
        metrics = {**run["metrics"], "f1": run["metrics"]["f1"] / 2, "samples": SHORT_BUDGET}
        store.finish_run(rid, metrics, run["wall_seconds"])
    return path


def test_runs_on_another_budget_stay_separate_entries(report_store, two_budget_store):
    before = load_report_source(report_store).entries
    after = load_report_source(two_budget_store).entries
    assert len(after) == 2 * len(before) == 16
    by_key: dict[tuple, set[int | None]] = {}
    for e in after:
        by_key.setdefault((e.arch, e.l0_target, e.seed), set()).add(e.samples)
    assert all(budgets == {30_000, SHORT_BUDGET} for budgets in by_key.values())
    assert {e.protocol_samples for e in after} == {30_000}

    a = analysis(two_budget_store)
    board = report_build._leaderboard(a).body[0]
    # one row per (arch, L0, budget), the budget shown; the short one says it is not the protocol's
    assert board.count(">30k<") == 4 and board.count(">8,192 (protocol: 30k)<") == 4
    # the figures keep the budgets apart too (a short run is no extra seed of the protocol run)
    archs = {e.arch for e in report_build._by_budget(a.src.entries)}
    assert archs == {f"{arch} · {budget}" for arch in ("batchtopk", "matryoshka") for budget in ("30k", "8,192")}


def test_bf16_and_fp32_runs_of_one_arch_stay_apart_in_the_figures():
    from saelab.report.data import SAEEntry

    def entry(arch, samples, precision):
        metrics = {"f1": 0.5} if precision is None else {"f1": 0.5, "compute_precision": precision}
        return SAEEntry(name=arch, arch=arch, l0_target=12, seed=0, metrics=metrics, folder=None, samples=samples)

    entries = [entry("topk", 6000, "fp32"), entry("topk", 6000, "bf16"), entry("topk", 6000, None)]
    entries += [entry("jumprelu", 6000, "fp32"), entry("jumprelu", 3000, "fp32")]
    assert [e.arch for e in report_build._by_budget(entries)] == [
        "topk · 6k · fp32",
        "topk · 6k · bf16",
        "topk · 6k · precision not recorded",
        "jumprelu · 6k",
        "jumprelu · 3k",
    ]
    one = [entry("topk", 6000, "bf16")]
    assert [e.arch for e in report_build._by_budget(one)] == ["topk"]  # nothing to tell apart: the name alone


def test_store_provenance_describes_the_run_shown(report_store):
    a = analysis(report_store)
    html = "".join(report_build._provenance(a).body)
    env = a.src.envelope
    best = next(e for e in a.src.entries if e.metrics.get("run_id") == env["run_id"])
    assert best.run_dir is not None
    run_json = json.loads((best.run_dir / "run.json").read_text())
    # the hash on the page is run.json's; the store's own (it also hashes the protocol) is labelled apart
    assert f"<dt>config hash</dt><dd>{run_json['config_hash']}</dd>" in html
    assert "bench config hash (run config + protocol defaults)" in html and env["bench_config_hash"] in html
    # seeds: how many this (arch, L0, budget) ran, and the protocol's recommendation labelled as such
    assert "<dt>seeds run (this arch, L0 and budget)</dt><dd>2: 0, 1</dd>" in html
    assert "<dt>protocol.seeds</dt>" not in html and "protocol default: seeds (recommended" in html
    # the LR schedule in words (lr_schedule alone said "constant" for a decaying LR), values rounded
    assert "<dt>lr_schedule</dt><dd>constant 0.003, then linear decay to 0 over the final 33.3% of steps</dd>" in html
    assert "0.3333333333333333" not in html and "<dd>0.3333</dd>" in html


def test_run_folder_provenance(report_run_dir):
    html = "".join(report_build._provenance(analysis(report_run_dir)).body)
    run_json = json.loads((report_run_dir / "run.json").read_text())
    assert f"<dt>config hash</dt><dd>{run_json['config_hash']}</dd>" in html
    assert "<dt>lr_schedule</dt><dd>constant 0.003</dd>" in html and "protocol default" not in html


def test_describe_lr_schedule():
    describe = report_build.describe_lr_schedule
    assert describe({"lr": 2e-3, "lr_schedule": "constant", "lr_decay_fraction": 1 / 3}) == (
        "constant 0.002, then linear decay to 0 over the final 33.3% of steps"
    )
    assert describe({"lr": 3e-4, "lr_schedule": "cosine", "lr_end_factor": 0.1, "lr_warmup_steps": 1000}) == (
        "linear warm-up over 1,000 steps, then cosine 0.0003 (down to 0.1 × lr)"
    )


def test_dead_counts_say_on_how_many_samples(report_run_dir):
    a = analysis(report_run_dir)
    lead = report_build._leaderboard(a).lead
    assert "L0 and dead latents (never firing) are measured by each run's final evaluation, on 8,000 fresh" in lead
    entry = a.src.entries[0]
    text = report_build._dead_elsewhere(entry, 50_000)
    dead = entry.metrics["dead_latents"]
    assert (
        f"the leaderboard's count for this SAE, {dead}, comes from its run's final evaluation on 8,000 samples" in text
    )
    assert "fewer samples" in text and "(a latent" in text
    assert "(a latent" not in report_build._dead_elsewhere(entry, 8_000)  # same count of samples: nothing to explain


def test_training_section_labels_training_figures_and_lists_warnings(report_run_dir):
    from saelab.runs.warnings import RunBudget, run_warnings

    a = analysis(report_run_dir)
    s = report_build._training(a)
    assert s.omitted is None and "not the final figures" in s.lead and "diamonds are the final evaluation" in s.lead
    expected = [
        w
        for e in a.src.entries
        for w in run_warnings(
            {**e.metrics, "name": e.name},
            RunBudget(width=32, samples=40_000, batch_size=256, dead_feature_window=1000),
        )
    ]
    html = "".join(s.body)
    for line in expected:  # the one rule (runs/warnings.py), the same lines `saelab train` printed
        assert line.replace("'", "&#x27;") in html
    assert ('id="run-warnings"' in html) == bool(expected)


def test_l0_sweep_legends_do_not_cover_the_curves():
    from saelab.diagnostics.l0_plot import l0_sweep_figure
    from saelab.diagnostics.l0_select import L0Point, recommend_l0
    from saelab.diagnostics.l0_sweep import L0SweepResult

    points = [
        L0Point(
            l0_target=l0,
            s_dec={8: 1 / l0 + 0.1 * l0, 16: 0.5 / l0 + 0.05 * l0},
            decoder_abs_cos=0.2 - 0.002 * l0,
            ground_truth={"mcc": 0.6 + 0.01 * l0, "f1": 0.3 + 0.02 * l0},
        )
        for l0 in (4, 6, 8, 10, 12, 14, 16)
    ]
    sweep = L0SweepResult(
        data="x", arch="batchtopk", width=64, points=points, recommendation=recommend_l0(points, d_sae=64)
    )
    sweep.true_l0_first_width = 10.5
    fig = l0_sweep_figure(sweep)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # pyright: ignore[reportAttributeAccessIssue]
    legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    for ax, legend in legends:
        box = legend.get_window_extent(renderer)
        for other in fig.axes:  # clear of every panel's plotting area (the twin axis included)
            assert not box.overlaps(other.get_window_extent(renderer)), (ax.get_title(), other.get_title())
        assert box.y0 >= 0  # and inside the figure


PROBE = """<script>
window.addEventListener('load', function () {
  var t = document.getElementById('leaderboard-table'), w = t.parentNode;
  document.documentElement.setAttribute('data-probe-fit', w.scrollWidth + '/' + w.clientWidth);
});
</script>"""


@pytest.mark.parametrize("width", [1280, 1400])
def test_leaderboard_fits_the_page_without_a_sideways_scrollbar(two_budget_store, tmp_path, width):
    from saelab.report.html import page
    from tests.report.test_browser import browse

    section = report_build._leaderboard(analysis(two_budget_store))
    text = page("t", "s", [section], [], [], "f")
    assert "best F1" in text and "DeepMind-style JumpReLU" in text  # the widest columns are there
    html = tmp_path / "board.html"
    html.write_text(text.replace("<head>", "<head>" + PROBE, 1))
    dom = browse(html, tmp_path, "--dump-dom", f"--window-size={width},900").stdout
    fit = re.search(r'data-probe-fit="(\d+)/(\d+)"', dom)
    assert fit, dom[:500]
    assert int(fit.group(1)) <= int(fit.group(2)), f"the leaderboard scrolls sideways at {width} px: {fit.group(0)}"
