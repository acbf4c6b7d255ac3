"""Superposition geometry: the closed form reproduces the reference table, its inverse, the simulation."""

from __future__ import annotations

import math

import pytest

from saelab.diagnostics.superposition import (
    approximation,
    cap_bound,
    expected_mean_max_abs_cos,
    parse_big_count,
    simulate_mean_max_abs_cos,
    superposition_report,
    vectors_for_interference,
)
from saelab.errors import ConfigError


@pytest.mark.parametrize(
    "d, n, expected, tol",
    [
        (768, 16_384, 0.1485, 5e-5),  # SynthSAEBench-16k (spec §3)
        (4096, 10**13, 0.117, 5e-4),  # "trillions of concepts in 4k dims"
        (256, 4096, 0.235, 5e-4),
        (512, 10**5, 0.199, 5e-4),
        (1024, 10**9, 0.192, 5e-4),
        (8192, 10**13, 0.083, 5e-4),
    ],
)
def test_reference_table(d, n, expected, tol):
    assert abs(expected_mean_max_abs_cos(d, n) - expected) < tol


def test_approximation_and_cap_bound_values():
    assert approximation(768, 16_384) == pytest.approx(0.159, abs=5e-4)
    assert cap_bound(768, 16_384) == pytest.approx(0.158, abs=5e-4)
    # leading order: the closed form approaches √(2 ln N / d) from below as d grows
    assert expected_mean_max_abs_cos(768, 16_384) < approximation(768, 16_384)


def test_monotone_in_n_and_d():
    assert expected_mean_max_abs_cos(768, 10**5) > expected_mean_max_abs_cos(768, 16_384)
    assert expected_mean_max_abs_cos(1024, 16_384) < expected_mean_max_abs_cos(768, 16_384)


@pytest.mark.parametrize("d, eps, log10_n", [(768, 0.15, 4.3), (768, 0.20, 7.4), (4096, 0.10, 9.6), (2304, 0.15, 12.1)])
def test_inverse_reference(d, eps, log10_n):
    assert math.log10(vectors_for_interference(d, eps)) == pytest.approx(log10_n, abs=0.05)


def test_inverse_round_trip():
    n = vectors_for_interference(768, expected_mean_max_abs_cos(768, 16_384))
    assert n == pytest.approx(16_384, rel=1e-3)


def test_simulation_matches_closed_form():
    est, stderr = simulate_mean_max_abs_cos(64, 1024, queries=1024, seed=1)
    expected = expected_mean_max_abs_cos(64, 1024)
    assert abs(est - expected) < max(4 * stderr, 0.01)


def test_report_and_json_fields():
    rep = superposition_report(128, 2048, simulate=True, queries=256)
    d = rep.to_dict()
    assert {"expected_mean_max_abs_cos", "approximation", "simulated", "inverse", "ladder"} <= set(d)
    assert d["n"] == 2048 and any(r["n"] == 2048 for r in d["ladder"])
    assert "simulated" not in superposition_report(128, 2048).to_dict()


@pytest.mark.parametrize(
    "text, value", [("16384", 16384), ("16k", 16000), ("1e13", 1e13), ("10^13", 1e13), ("10**5", 1e5)]
)
def test_parse_big_count(text, value):
    assert parse_big_count(text) == pytest.approx(value)


@pytest.mark.parametrize("bad", ["abc", "1", "0", "-5", "2.5", "nan", "10^400"])
def test_bad_n(bad):
    with pytest.raises(ConfigError, match="n="):
        parse_big_count(bad)


def test_bad_d_and_interference():
    with pytest.raises(ConfigError, match="d="):
        expected_mean_max_abs_cos(1, 100)
    with pytest.raises(ConfigError, match="d="):
        expected_mean_max_abs_cos(7.5, 100)
    with pytest.raises(ConfigError, match="interference"):
        vectors_for_interference(768, 1.5)
    with pytest.raises(ConfigError, match="too large to simulate"):
        simulate_mean_max_abs_cos(768, 10**9)
