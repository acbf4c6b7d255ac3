"""The metric registry agrees with what the evaluation returns, and formats as the tables did."""

from __future__ import annotations

import dataclasses

import pytest

from saelab.errors import ConfigError
from saelab.formatting import format_mean_sd, mean_sd_parts
from saelab.metrics.ground_truth import GroundTruthResult
from saelab.metrics.names import (
    GROUND_TRUTH,
    LANGUAGE_MODEL,
    METRICS,
    RECONSTRUCTION,
    ground_truth_keys,
    metric,
    metric_keys,
    table_columns,
)


def test_registry_order_is_the_ground_truth_result_order():
    fields = [f.name for f in dataclasses.fields(GroundTruthResult) if f.name not in ("n_samples", "diagnostics")]
    assert list(metric_keys(GROUND_TRUTH, RECONSTRUCTION)) == fields
    assert metric_keys(LANGUAGE_MODEL) == ("ce_loss_recovered", "kl_div")
    assert list(metric_keys()) == list(METRICS)


def test_ground_truth_keys_include_every_score_that_needs_true_features():
    assert set(ground_truth_keys()) == {"f1", "precision", "recall", "accuracy", "mcc", "uniqueness", "true_l0"}
    assert not any(METRICS[k].needs_ground_truth for k in ("explained_variance", "l0", "dead_latents", "mse"))


def test_labels_formats_and_unknown_keys():
    assert METRICS["explained_variance"].axis_label == "explained variance (0–1)"
    assert METRICS["ce_loss_recovered"].axis_label == "CE loss recovered"  # no unit
    assert METRICS["f1"].format(0.85904) == "0.8590" and METRICS["dead_latents"].format(3) == "3"
    # a mean of counts is fractional: one decimal
    assert METRICS["dead_latents"].format_mean_sd(2.5, 0.5) == "2.5 ± 0.5"
    assert METRICS["l0"].format_mean_sd(12.0, None) == "12.00 ± 0.00"
    assert table_columns(["f1", "l0", "dead_latents"]) == [
        ("f1", "F1", "{:.4f}"),
        ("l0", "L0", "{:.2f}"),
        ("dead_latents", "dead", "{}"),
    ]
    with pytest.raises(ConfigError, match="metric='f2'"):
        metric("f2")


def test_format_mean_sd():
    assert format_mean_sd(0.859, 0.001, 4) == "0.8590 ± 0.0010"
    assert format_mean_sd(0.859, None, 3) == "0.859 ± 0.000"  # one seed: no spread
    assert mean_sd_parts(12.04, 0.3, 1) == ("12.0", "± 0.3")
