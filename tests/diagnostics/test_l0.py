"""The L0 recommendation rule on constructed curves, input checks, the sweep API and the
ground-truth-initialisation mechanism on sbw-toy."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.diagnostics.l0_mechanism import feature_mixing, ground_truth_init_drift
from saelab.diagnostics.l0_select import L0Point, default_ns, n_cap, n_window, recommend_l0, validate_l0_values
from saelab.diagnostics.l0_sweep import load_sweep, run_l0_sweep
from saelab.errors import ConfigError

D_SAE = 50


def make_points(shape, l0s=range(5, 26), ns=range(1, 23), noise=0.0, seed=0):
    """s_n(k) = shape(k) · 0.9^(n − 10): every n sees the same valley, scaled down with n."""
    g = torch.Generator().manual_seed(seed)
    pts = []
    for k in l0s:
        s = {n: shape(k) * 0.9 ** (n - 10) + noise * float(torch.rand((), generator=g)) for n in ns}
        pts.append(L0Point(l0_target=float(k), s_dec=s, decoder_abs_cos=abs(k - 11) / 100))
    return pts


def test_v_shaped_valley():
    rec = recommend_l0(make_points(lambda k: 0.01 + 0.05 * abs(k - 11)), d_sae=D_SAE)
    assert rec.recommended_l0 == 11 and rec.argmin_l0 == 11
    assert rec.argmin_decoder_cos_l0 == 11
    assert min(rec.ns) > 11 and max(rec.ns) <= n_cap(D_SAE)
    assert not rec.warnings


def test_flat_right_side_takes_left_edge():
    # steep fall to the true L0, then flat within noise: the arg-min wanders, the left edge does not
    shape = lambda k: 0.3 * max(0, 11 - k) + 0.002 * ((k * 7919) % 5)  # noqa: E731
    rec = recommend_l0(make_points(shape), d_sae=D_SAE)
    assert rec.recommended_l0 == 11
    assert rec.argmin_l0 != 11 and 11 in rec.floor_l0s


def test_tolerance_widens_floor():
    shape = lambda k: abs(k - 13) * (0.1 if k > 13 else 0.3)  # noqa: E731
    tight = recommend_l0(make_points(shape), d_sae=D_SAE, tolerance=0.0)
    loose = recommend_l0(make_points(shape), d_sae=D_SAE, tolerance=0.2)
    assert tight.recommended_l0 == 13 and loose.recommended_l0 < 13


def test_edge_warnings():
    rec = recommend_l0(make_points(lambda k: k), d_sae=D_SAE)  # minimum at the smallest L0
    assert rec.recommended_l0 == 5 and any("extend the sweep down" in w for w in rec.warnings)
    rec = recommend_l0(make_points(lambda k: (30 - k) ** 3), d_sae=D_SAE)  # still falling at the top
    assert rec.argmin_l0 == 25 and any("extend the sweep up" in w for w in rec.warnings)
    assert rec.method == "knee"
    rec = recommend_l0(make_points(lambda k: 1.0 + 0.001 * abs(k - 11)), d_sae=D_SAE)
    assert any("shallow valley" in w for w in rec.warnings)
    rec = recommend_l0(make_points(lambda k: abs(k - 11), l0s=[10, 12]), d_sae=D_SAE)
    assert any("at least 3" in w for w in rec.warnings)


def test_no_valley_falls_back_to_knee():
    # synth-mini-like: a steep fall to the true L0 (12), then a slow fall to the end of the sweep
    shape = lambda k: (3.0 * (12 - k) if k < 12 else 0.0) + 0.04 * (30 - k)  # noqa: E731
    rec = recommend_l0(make_points(shape, l0s=range(6, 31, 2)), d_sae=1024)
    assert rec.method == "knee" and rec.recommended_l0 == 12 and rec.knee_l0 == 12
    assert rec.floor_l0s[-1] == 30 and any("no valley" in w for w in rec.warnings)
    # with a valley the knee is only reported
    v = recommend_l0(make_points(lambda k: 0.01 + 0.05 * abs(k - 11)), d_sae=D_SAE)
    assert v.method == "valley" and v.knee_l0 == 11


def test_knee_l0():
    from saelab.diagnostics.l0_select import knee_l0

    xs = [4, 6, 8, 10, 12, 14, 16]
    assert knee_l0(xs, [12, 8, 4, 0, -0.2, -0.4, -0.6]) == 10
    assert knee_l0(xs, [1, 2, 3, 4, 5, 6, 7]) is None  # rising: no knee
    assert knee_l0(xs[:3], [3, 2, 1]) is None  # too few points


def test_fixed_ns_and_missing_ns():
    pts = make_points(lambda k: abs(k - 11))
    rec = recommend_l0(pts, ns=[15, 18])
    assert rec.ns == [15, 18] and rec.recommended_l0 == 11
    with pytest.raises(ConfigError, match="not scored"):
        recommend_l0(pts, ns=[40])
    with pytest.raises(ConfigError, match="only once"):
        recommend_l0(pts + pts[:1], d_sae=D_SAE)


def test_n_window():
    assert n_window(11, 50) == list(range(14, 23))
    assert n_window(20, 50) == [n_cap(50)]  # the window lies above the cap: fall back to the cap
    assert n_cap(50) == 22 and n_cap(1024) == 460
    assert default_ns([5, 25], 50) == list(range(1, 23))
    assert default_ns([5, 10], 1024) == list(range(1, 21))


@pytest.mark.parametrize(
    "values, width, match",
    [
        ([5.5], 50, "integer"),
        ([0], 50, "positive"),
        ([-3, 4], 50, "positive"),
        (["x"], 50, "number"),
        ([float("nan")], 50, "finite"),
        ([10, 50], 50, "smaller than the SAE width 50"),
        ([], 50, "at least one"),
    ],
)
def test_bad_l0_values(values, width, match):
    with pytest.raises(ConfigError, match=match):
        validate_l0_values(values, width)


def test_l0_values_sorted_unique():
    assert validate_l0_values(["12", 5, 5.0, 8], 50) == [5, 8, 12]
    assert validate_l0_values([2.5, 1.5], 50, integer=False) == [1.5, 2.5]


def test_feature_mixing():
    f = torch.eye(4, 8)
    assert feature_mixing(f, f) == {
        "self_cos": pytest.approx(1.0),
        "mixing": pytest.approx(0.0),
        "off_target_abs_cos": pytest.approx(0.0),
    }
    mixed = f.clone()
    mixed[1:, 0] = 1.0  # every other latent mixes in feature 0 (hedging toward the frequent feature)
    m = feature_mixing(mixed, f)
    assert m["self_cos"] == pytest.approx((1 + 3 * 2**-0.5) / 4)
    assert m["mixing"] == pytest.approx(3 * 0.5 / 4)


@pytest.fixture(scope="module")
def sbw():
    from saelab.synthetic import build_preset

    return build_preset("sbw-toy")


def test_ground_truth_init_drifts_only_below_true_l0(sbw):
    """Sparse-but-Wrong mechanism: initialised at the true features, too low an L0 drifts away
    (mixing grows), the true L0 (≈11) stays."""
    torch.set_num_threads(1)
    hist = ground_truth_init_drift(sbw, l0s=(5, 11), samples=120 * 1024, eval_every=40, lr=3e-3)
    low, true = hist[5.0], hist[11.0]
    assert low[0]["mixing"] < 1e-5 and true[0]["mixing"] < 1e-5
    assert low[-1]["mixing"] > 0.1 and low[-1]["self_cos"] < 0.95
    assert true[-1]["mixing"] < 0.01 and true[-1]["self_cos"] > 0.99
    assert low[-1]["mixing"] >= low[1]["mixing"]  # keeps drifting


def test_sweep_api_without_out_dir_and_reload(sbw, tmp_path):
    torch.set_num_threads(1)
    from saelab.data import SyntheticSource
    from saelab.diagnostics.data import DataHandle, sample_model

    handle = DataHandle(
        spec="sbw-toy",
        d_in=100,
        model=sbw,
        make_source=lambda s: SyntheticSource(sbw, s),
        eval_batch=lambda n, s: sample_model(sbw, n, s),
    )
    seen = []
    res = run_l0_sweep(handle, [6, 11], samples=8192, gt_eval_samples=1000, on_point=seen.append)
    assert res.run_dir is None and len(seen) == 2
    assert res.true_l0 == pytest.approx(11, abs=0.3)
    assert set(res.summary_json()["s_dec"]) == {str(n) for n in res.recommendation.ns}
    assert all(math.isfinite(p.decoder_abs_cos) for p in res.points)

    res2 = run_l0_sweep(handle, [6, 11], samples=4096, gt_eval_samples=1000, out_dir=tmp_path / "s", plot=False)
    back = load_sweep(tmp_path / "s" / "l0_sweep.json")
    assert back.recommended_l0 == res2.recommended_l0 and [p.s_dec for p in back.points] == [
        p.s_dec for p in res2.points
    ]
    with pytest.raises(ConfigError, match="width"):
        run_l0_sweep(handle, [6], width=1, samples=1024)


def test_undertraining_warnings_flag_dead_latents_and_rising_explained_variance():
    from saelab.diagnostics.l0_sweep import undertraining_warnings

    def records(dead):
        return [{"name": f"bt-{i}", "l0_target": i, "train_stats": {"dead_latents": d}} for i, d in enumerate(dead)]

    def history(gains):  # EV flat at 0.8 up to the middle, then rising linearly by `gain` to the end
        return [
            {"step": s, **{f"bt-{i}/explained_variance": 0.8 + g * max(0, s - 10) / 9 for i, g in enumerate(gains)}}
            for s in range(20)
        ]

    flat = history([0.0] * 8)
    (warning,) = undertraining_warnings(records([0, 3, 40, 0, 30, 0, 0, 0]), flat, width=1000)
    assert warning.startswith("2 of 8 SAEs") and "L0 2: 40" in warning and "L0 1" not in warning  # 3 ≤ 1%
    assert undertraining_warnings(records([0, 0, 40, 0, 0, 0, 0, 0]), flat, width=1000) == []  # one SAE alone
    # the median SAE still improving (a few low-L0 SAEs improving alone is normal in a good sweep)
    (warning,) = undertraining_warnings(records([0] * 8), history([0.2, 0.1, 0.09, 0.08, 0.05, 0.0, 0.0, 0.0]), 1000)
    assert "median +0.0" in warning and "L0 0: +0.1" in warning
    assert undertraining_warnings(records([0] * 8), history([0.2, 0.1, 0.09, 0.0, 0.0, 0.0, 0.0, 0.0]), 1000) == []
    assert undertraining_warnings(records([0] * 8), history([0.5] * 8)[:5], 1000) == []  # too short to judge
