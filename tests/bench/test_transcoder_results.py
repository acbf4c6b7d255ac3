"""A transcoder protocol's results where people read them: `saelab bench` with a plain-transcoder variant
(`batchtopk:skip=false`), then `saelab results` (runs and leaderboard), the CSV/Markdown exports and the HTML
report's leaderboard, all with the transcoder metrics; SAE tables keep exactly their columns."""

from __future__ import annotations

import csv
import json
import re
import statistics

import pytest
import torch

from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.bench.store import ResultsStore
from saelab.synthetic import save_transcoder_world
from tests.bench.conftest import run_cli
from tests.training.transcoder_worlds import small_world

PLAIN = "batchtopk[skip=false]"  # how `batchtopk:skip=false` is registered, stored and shown
SEEDS = 2


@pytest.fixture(scope="module")
def tc_store(tmp_path_factory):
    """`saelab bench --protocol tc-tiny --arch batchtopk batchtopk:skip=false --seeds 2` into a fresh store."""
    root = tmp_path_factory.mktemp("tc-results")
    save_transcoder_world(small_world(), str(root / "world"))
    proto = Protocol(
        name="tc-tiny",
        data=str(root / "world"),
        width=32,
        samples=8_000,
        batch_size=256,
        lr=1e-2,
        l0_sweep=(3,),
        natural_l0=3,
        seeds=SEEDS,
        eval_samples=2000,
        precision="fp32",
        transcoder="skip",
    )
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PROTOCOLS, "tc-tiny", proto)
        with pytest.raises(SystemExit) as exit_info:
            from saelab.cli import main

            main(
                [
                    "bench", "--protocol", "tc-tiny", "--arch", "batchtopk", "--arch", "batchtopk:skip=false",
                    "--seeds", str(SEEDS), "--store", str(root / "results.sqlite"), "--out", str(root / "runs"),
                    "--no-estimate", "--json",
                ]
            )  # fmt: skip
        assert exit_info.value.code == 0
        yield root / "results.sqlite"
    torch.set_num_threads(old_threads)


def _runs(store_path):
    return ResultsStore(store_path, create=False).runs(protocol="tc-tiny", status="complete")


def _metric(run, key):
    return run["metrics"][key]


def test_bench_accepts_an_override_variant_and_stores_it_under_its_own_name(tc_store):
    runs = _runs(tc_store)
    assert sorted((r["arch"], r["seed"]) for r in runs) == sorted(
        (a, s) for a in ("batchtopk", PLAIN) for s in range(SEEDS)
    )
    for run in runs:
        skip = _metric(run, "skip_rel_error")
        assert (skip is None) == (run["arch"] == PLAIN), run["arch"]  # the variant is the plain transcoder
        assert run["config"]["run"]["arch"] == ["batchtopk", PLAIN]


def test_bench_refuses_a_bad_override_before_training(capsys, tmp_path):
    code, _, err = run_cli(
        capsys, "bench", "--protocol", "tc-mini", "--arch", "batchtopk:no_such_option=1", "--no-store",
        "--out", str(tmp_path / "runs"), "--no-estimate",
    )  # fmt: skip
    assert code != 0 and "batchtopk:no_such_option=1" in err and "invalid override" in err
    assert not (tmp_path / "runs").exists()  # nothing trained: the run folder was never made


def _expected(runs, arch, key):
    values = [_metric(r, key) for r in runs if r["arch"] == arch]
    return statistics.fmean(values), statistics.stdev(values), statistics.stdev(values) / len(values) ** 0.5


def test_results_leaderboard_shows_transcoder_columns(tc_store, capsys):
    code, out, _ = run_cli(capsys, "results", "leaderboard", "--store", str(tc_store), "--protocol", "tc-tiny")
    assert code == 0
    header = next(line for line in out.splitlines() if "arch" in line and "F1" in line)
    for label in ("F1", "MCC", "FVU", "skip err", "computing", "L0", "dead"):
        assert label in header, label
    assert "uniqueness" not in header and " EV " not in header  # EV is 1 − FVU for a transcoder
    runs = _runs(tc_store)
    mean, sd, _ = _expected(runs, "batchtopk", "fvu")
    assert f"{mean:.4f} ± {sd:.4f}" in out

    code, out, _ = run_cli(
        capsys, "results", "leaderboard", "--store", str(tc_store), "--protocol", "tc-tiny", "--json"
    )
    rows = {r["arch"]: r for r in map(json.loads, out.splitlines())}
    for key in ("fvu", "skip_rel_error", "computing_features_recovered", "f1", "mcc"):
        mean, _, se = _expected(runs, "batchtopk", key)
        assert rows["batchtopk"][f"{key}_mean"] == pytest.approx(mean, rel=1e-9), key
        assert rows["batchtopk"][f"{key}_se"] == pytest.approx(se, rel=1e-9, abs=1e-12), key
    assert rows[PLAIN]["fvu_mean"] is not None and rows[PLAIN]["skip_rel_error_mean"] is None
    assert rows[PLAIN]["n_seeds"] == SEEDS


def test_results_runs_list_shows_transcoder_metrics(tc_store, capsys):
    code, out, _ = run_cli(capsys, "results", "--store", str(tc_store), "--protocol", "tc-tiny")
    assert code == 0
    header = next(line for line in out.splitlines() if "arch" in line and "F1" in line)
    assert "FVU" in header and "skip err" in header and "computing" in header
    code, out, _ = run_cli(capsys, "results", "--store", str(tc_store), "--protocol", "tc-tiny", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    by_id = {r["run_id"]: r for r in _runs(tc_store)}
    assert len(lines) == 2 * SEEDS
    for line in lines:
        assert line["fvu"] == _metric(by_id[line["run_id"]], "fvu")
        assert "computing_features_recovered" in line


def test_exports_carry_transcoder_statistics(tc_store, capsys, tmp_path):
    out_csv = tmp_path / "board.csv"
    code, _, _ = run_cli(
        capsys, "results", "export", "--leaderboard", "--format", "csv", "--out", str(out_csv),
        "--store", str(tc_store), "--protocol", "tc-tiny",
    )  # fmt: skip
    assert code == 0
    rows = {r["arch"]: r for r in csv.DictReader(out_csv.open())}
    runs = _runs(tc_store)
    for key in ("fvu", "skip_rel_error", "computing_features_recovered"):
        mean, sd, se = _expected(runs, "batchtopk", key)
        assert float(rows["batchtopk"][f"{key}_mean"]) == pytest.approx(mean, rel=1e-9)
        assert float(rows["batchtopk"][f"{key}_sd"]) == pytest.approx(sd, rel=1e-9, abs=1e-12)
        assert float(rows["batchtopk"][f"{key}_se"]) == pytest.approx(se, rel=1e-9, abs=1e-12)
    assert rows[PLAIN]["skip_rel_error_mean"] == ""  # no skip: empty, not 0

    out_md = tmp_path / "board.md"
    run_cli(
        capsys, "results", "export", "--leaderboard", "--format", "md", "--out", str(out_md),
        "--store", str(tc_store), "--protocol", "tc-tiny",
    )  # fmt: skip
    header = [c.strip() for c in out_md.read_text().splitlines()[0].strip("|").split("|")]
    assert header[6:] == ["F1", "F1 95% CI", "MCC", "FVU", "skip err", "computing", "L0", "dead", "best F1"]


def _table(html: str, table_id: str) -> list[list[str]]:
    body = html[html.index(f'id="{table_id}"') :]
    body = body[: body.index("</table>")]
    return [
        [re.sub(r"<[^>]+>", " ", cell).split() for cell in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    ]


def test_report_leaderboard_shows_transcoder_metrics(tc_store):
    from saelab.report.build import _Analysis, _features, _leaderboard
    from saelab.report.data import load_report_source

    analysis = _Analysis(load_report_source(tc_store), eval_samples=1000, seed=0, device="cpu", max_saes=2)
    section = _leaderboard(analysis)
    assert section.omitted is None
    html = "".join(section.body)
    header, *rows = _table(html, "leaderboard-table")
    labels = [" ".join(words) for words in header]
    assert labels[5:12] == ["F1", "MCC", "FVU", "skip err", "computing", "L0", "dead"]
    assert "SynthSAEBench-16k" not in section.lead  # a store of transcoders gets no SAE baselines
    assert {" ".join(r[1]) for r in rows} == {"batchtopk", PLAIN}
    mean, _, _ = _expected(_runs(tc_store), "batchtopk", "fvu")
    fvu_cells = {" ".join(r[1]): r[7][0] for r in rows}
    assert fvu_cells["batchtopk"] == f"{mean:.4f}"
    # The per-feature sections re-evaluate autoencoders on their input: omitted, saying why.
    assert "transcoder" in (_features(analysis).omitted or "")


def test_report_of_a_transcoder_run_folder_shows_transcoder_metrics(tc_store):
    from saelab.report.build import _Analysis, _leaderboard
    from saelab.report.data import load_report_source

    run_dir = next((tc_store.parent / "runs").glob("tc-tiny-*-seed0"))
    source = load_report_source(run_dir)
    assert {r["source"] for r in source.leaderboard} == {"saelab"}  # no SAE baselines beside transcoders
    by_arch = {r["arch"]: r for r in source.leaderboard}
    saved = {r["arch"]: r for r in json.loads((run_dir / "run.json").read_text())["results"]}
    assert by_arch["batchtopk"]["fvu_mean"] == saved["batchtopk"]["fvu"]
    assert by_arch[PLAIN]["skip_rel_error_mean"] is None
    section = _leaderboard(_Analysis(source, eval_samples=1000, seed=0, device="cpu", max_saes=2))
    header = _table("".join(section.body), "leaderboard-table")[0]
    assert [" ".join(w) for w in header][5:12] == ["F1", "MCC", "FVU", "skip err", "computing", "L0", "dead"]


def test_sae_tables_keep_their_columns():
    """Rows without transcoder metrics: every table and export has exactly the columns it always had."""
    from saelab.bench.export import LEADERBOARD_COLUMNS, leaderboard_columns
    from saelab.bench.leaderboard import LEADERBOARD_METRICS, board_metrics
    from saelab.cli.results import BOARD_COLUMNS, RUN_COLUMNS, board_columns, run_columns

    sae_rows = [{"arch": "a", "l0_target": 3.0, "f1_mean": 0.5, "explained_variance_mean": 0.7}]
    assert board_metrics(sae_rows) == LEADERBOARD_METRICS
    assert leaderboard_columns(sae_rows) == list(LEADERBOARD_COLUMNS)
    assert board_columns(LEADERBOARD_METRICS) == BOARD_COLUMNS
    assert run_columns(LEADERBOARD_METRICS) == RUN_COLUMNS
    mixed = [*sae_rows, {"arch": "t", "l0_target": 3.0, "f1_mean": 0.4, "fvu_mean": 0.1}]
    assert board_metrics(mixed)[:4] == LEADERBOARD_METRICS[:4] and "fvu" in board_metrics(mixed)


def test_sae_markdown_export_keeps_its_header(tmp_path):
    from saelab.bench.export import export_leaderboard

    row = {"source": "saelab", "protocol": "mini", "arch": "a", "l0_target": 12.0, "n_seeds": 1, "f1_mean": 0.5}
    export_leaderboard([row], tmp_path / "b.md", "md")
    header = [c.strip() for c in (tmp_path / "b.md").read_text().splitlines()[0].strip("|").split("|")]
    assert header == [
        "source", "protocol", "arch", "L0 target", "samples", "n seeds", "F1", "F1 95% CI", "MCC", "uniqueness",
        "EV", "L0", "dead", "best F1",
    ]  # fmt: skip
