"""Training-time figures against the final ones, and the end-of-run warning (runs/warnings.py).

A short run is where they used to contradict each other: the progress line and the training curves said L0 = k
and 0 dead latents (AuxK's count, which needs `dead_feature_window` silent steps), while the final evaluation found
a large part of the dictionary dead. Now the progress line labels each figure, logs `silent_latents` (the training
estimate of the final count), the report's curves carry the final values, and the run ends with a warning.
"""

from __future__ import annotations

import json
import re

import pytest

from saelab.cli import main
from saelab.runs.warnings import DEAD_FRACTION_LIMIT, L0_TOLERANCE, RunBudget, run_warnings

WIDTH = 128  # 128 latents for the tiny model's 96 features: a 78-step run leaves ~40% of them dead


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


# ----------------------------------------------------------------------------------------------- the rule
def test_healthy_record_has_no_warning():
    record = {"name": "m", "l0": 12.0 * (1 + 0.9 * L0_TOLERANCE), "l0_target": 12, "dead_latents": 4}
    assert run_warnings(record, RunBudget(width=1024, samples=6_000_000, batch_size=1024)) == []


def test_l0_far_from_target_is_warned_with_cause_and_fix():
    (line,) = run_warnings(
        {"name": "jumprelu-l0_12", "l0": 30.6, "l0_target": 12, "dead_latents": 0}, RunBudget(width=1024)
    )
    assert line.startswith("jumprelu-l0_12: measured L0 30.6 is 155% above its target 12")
    assert f"±{L0_TOLERANCE:.0%}" in line and "Likely cause" in line and "Fix: more --samples" in line


def test_dead_latents_of_a_run_shorter_than_the_dead_window():
    budget = RunBudget(width=1024, samples=200_000, batch_size=1024, dead_feature_window=1000)
    (line,) = run_warnings(
        {"name": "b", "l0": 11.8, "l0_target": 12, "dead_latents": 900, "n_samples": 100_000}, budget
    )
    assert "900 of 1,024 latents (88%) never fired on the 100,000 evaluation samples" in line
    assert f"warned above {DEAD_FRACTION_LIMIT:.0%}" in line
    assert "195 steps, no more than AuxK's dead-feature window of 1,000 steps" in line
    assert "more --samples" in line and "--dead-feature-window" in line


def test_bench_run_below_its_protocol_budget_is_told_to_train_the_protocols():
    budget = RunBudget(
        width=1024,
        samples=100_000,
        batch_size=1024,
        dead_feature_window=10,
        protocol="mini",
        protocol_samples=6_000_000,
    )
    (line,) = run_warnings({"name": "b", "l0": 12, "l0_target": 12, "dead_latents": 400}, budget)
    assert "100k samples, under the mini protocol's 6M" in line
    assert "drop --samples/--tier: 6M samples" in line


def test_missing_or_non_finite_values_warn_about_nothing():
    budget = RunBudget(width=32)
    assert run_warnings({"name": "x"}, budget) == []
    assert run_warnings({"name": "x", "l0": float("nan"), "l0_target": 3, "dead_latents": None}, budget) == []


# ------------------------------------------------------------------------------------------ real short runs
def train_args(data, out, batch_size=256):
    return [
        *("train", "--data", str(data), "--arch", "batchtopk", "--l0", "3"),
        *("--batch-size", str(batch_size), "--out", str(out)),
    ]


def test_short_run_labels_its_training_figures_and_warns(tiny_synthetic_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAELAB_PROGRESS_SECONDS", "0")  # a plain progress line at every logged step
    run_dir = tmp_path / "short"
    args = train_args(tiny_synthetic_model_dir, run_dir)
    code, out, err = run_cli(capsys, *args, "--width", str(WIDTH), "--samples", "20k", "--eval-samples", "20k")
    assert code in (0, None), err
    record = json.loads((run_dir / "run.json").read_text())
    (result,) = record["results"]
    final_dead, final_l0 = result["dead_latents"], result["l0"]
    last = record["history"][-1]
    silent, auxk_dead = last["batchtopk-l0_3/silent_latents"], last["batchtopk-l0_3/dead_latents"]

    # The progress line names what each figure is: the training batches' L0, the silent count, AuxK's dead count.
    progress = [line for line in err.splitlines() if line.startswith("train: step 78/78")]
    assert progress, err
    assert "train L0 3.0" in progress[-1]
    assert f"silent {silent} (no firing in recent batches)" in progress[-1]
    assert "dead 0 (AuxK)" in progress[-1]

    # 78 steps never reach AuxK's 1,000-step window, so its count is 0 while much of the dictionary is dead; the
    # silent count is on the final count's scale (measured: 41 silent, 50 dead of 128; the bounds leave wide
    # margins for other CPUs' float rounding).
    assert auxk_dead == 0
    assert final_dead > 0.2 * WIDTH and silent > 0.2 * WIDTH
    assert abs(silent - final_dead) < 0.25 * WIDTH

    # The end-of-run warning: what was measured, the likely cause and the fix.
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1, err
    assert (
        f"{final_dead} of {WIDTH} latents" in warnings[0]
        and "never fired on the 20,000 evaluation samples" in warnings[0]
    )
    assert "78 steps, no more than AuxK's dead-feature window of 1,000 steps" in warnings[0]
    assert "Fix: more --samples" in warnings[0]

    # The report's training curves carry the final (inference) values beside the training-batch curves.
    from saelab.report.figures import training_curves_figure

    fig = training_curves_figure(record["history"], ["batchtopk-l0_3"], {"batchtopk-l0_3": result}, 1000)
    titles = {ax.get_title(): ax for ax in fig.axes}
    assert "L0 on training batches" in titles and "Silent and dead latents during training" in titles
    for title, value in (("L0 on training batches", final_l0), ("Silent and dead latents during training", final_dead)):
        (marker,) = titles[title].collections  # the final evaluation's diamond, at the last step
        assert marker.get_offsets().tolist() == [[78, pytest.approx(value)]]
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(re.match(r"final evaluation \(inference SAE on 20,000 samples\)", t) for t in labels), labels
    assert any("AuxK dead (silent > 1,000 steps)" in t for t in labels), labels


def test_healthy_run_ends_without_warning(tiny_synthetic_model_dir, tmp_path, capsys):
    run_dir = tmp_path / "healthy"
    args = train_args(tiny_synthetic_model_dir, run_dir, batch_size=512)
    extra = ("--width", "32", "--samples", "80k", "--lr", "3e-3", "--dead-feature-window", "10")
    code, out, err = run_cli(capsys, *args, *extra, "--eval-samples", "20k", "--json")
    assert code in (0, None), err
    (line,) = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    # measured: L0 3.06 and 0 dead of 32, far inside the limits (±25%, 10%)
    assert line["warnings"] == [] and "warning:" not in err
    assert abs(line["l0"] - 3) < 0.5 and line["dead_latents"] <= 1
