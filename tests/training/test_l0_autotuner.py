import io
import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.training.l0_autotuner import L0Autotuner

KI = 3e-4


def test_first_update_above_target_raises_multiplier():
    tuner = L0Autotuner(target_l0=10.0)
    assert tuner.multiplier == 1.0
    # L̄ starts at the first observation (20), rate 0 -> gain 1, adj = Ki·tanh(10·10/10)
    m = tuner.update(0, 20.0)
    assert m == pytest.approx(1 + KI * math.tanh(10.0), rel=1e-12)
    assert tuner.smoothed_l0 == 20.0 and tuner.l0_rate == 0.0
    # Same L0 again: ΔL̄ = 0 -> still full gain.
    assert tuner.update(1, 20.0) == pytest.approx((1 + KI * math.tanh(10.0)) ** 2, rel=1e-12)


def test_below_target_lowers_multiplier():
    tuner = L0Autotuner(target_l0=10.0)
    assert tuner.update(0, 5.0) == pytest.approx(1 - KI * math.tanh(5.0), rel=1e-12)
    m1 = tuner.multiplier
    assert tuner.update(1, torch.tensor(5.0)) == pytest.approx(m1 * (1 - KI * math.tanh(5.0)), rel=1e-12)
    for step in range(2, 200):
        tuner.update(step, 5.0)
    assert tuner.multiplier < 0.95


def test_gain_is_damped_when_moving_toward_target():
    tuner = L0Autotuner(target_l0=10.0)
    m1 = tuner.update(0, 20.0)
    # L̄ = 0.99·20 + 0.01·10 = 19.9; rate = 0.05·(−0.1) = −0.005; e = 9.9 > 0 and e·rate < 0 -> gain 0.01
    m2 = tuner.update(1, 10.0)
    assert tuner.smoothed_l0 == pytest.approx(19.9)
    assert tuner.l0_rate == pytest.approx(-0.005)
    assert m2 == pytest.approx(m1 * (1 + KI * 0.01 * math.tanh(10 * 9.9 / 10)), rel=1e-12)
    # Moving away (L0 rising above target) gets the full gain.
    tuner = L0Autotuner(target_l0=10.0)
    m1 = tuner.update(0, 20.0)
    m2 = tuner.update(1, 30.0)
    assert tuner.smoothed_l0 == pytest.approx(20.1)
    assert m2 == pytest.approx(m1 * (1 + KI * math.tanh(10 * 10.1 / 10)), rel=1e-12)


def test_start_step_holds_multiplier_but_tracks_l0():
    tuner = L0Autotuner(target_l0=10.0, start_step=3)
    assert tuner.update(0, 20.0) == 1.0
    assert tuner.update(1, 30.0) == 1.0
    assert tuner.update(2, 30.0) == 1.0
    assert tuner.smoothed_l0 == pytest.approx(0.99 * (0.99 * 20 + 0.3) + 0.3)
    assert tuner.update(3, 30.0) > 1.0


def test_on_target_no_change():
    tuner = L0Autotuner(target_l0=10.0)
    assert tuner.update(0, 10.0) == 1.0
    tuner = L0Autotuner(target_l0=10.0, deadband=1.0)
    assert tuner.update(0, 10.9) == 1.0


def test_clamps():
    up = L0Autotuner(target_l0=1.0, integral_gain=0.5)
    for step in range(100):
        up.update(step, 50.0)
    assert up.multiplier == 100.0
    down = L0Autotuner(target_l0=100.0, integral_gain=0.5)
    for step in range(100):
        down.update(step, 1.0)
    assert down.multiplier == 0.01
    assert down.update(100, 1.0) == 0.01


def test_state_round_trip_resumes_exactly():

    gen = torch.Generator().manual_seed(0)
    l0s = (20 + 5 * torch.randn(300, generator=gen)).tolist()
    a = L0Autotuner(target_l0=15.0, start_step=10)
    for step in range(150):
        a.update(step, l0s[step])
    state = a.state_dict()
    b = L0Autotuner(target_l0=15.0, start_step=10)
    b.load_state_dict(state)
    assert b.state_dict() == state
    # The state survives a torch.save round trip (checkpoints).
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    c = L0Autotuner(target_l0=15.0, start_step=10)
    c.load_state_dict(torch.load(buf, weights_only=True))
    for step in range(150, 300):
        ma, mb, mc = a.update(step, l0s[step]), b.update(step, l0s[step]), c.update(step, l0s[step])
        assert ma == mb == mc
    assert a.multiplier != 1.0


def test_load_state_mismatch_and_missing_keys():
    state = L0Autotuner(target_l0=15.0).state_dict()
    with pytest.raises(ConfigError) as err:
        L0Autotuner(target_l0=12.0).load_state_dict(state)
    assert err.value.field == "target_l0"
    with pytest.raises(ConfigError):
        L0Autotuner(target_l0=15.0).load_state_dict({"multiplier": 2.0})


def test_uninitialised_state_round_trip():
    b = L0Autotuner(target_l0=5.0)
    b.load_state_dict(L0Autotuner(target_l0=5.0).state_dict())
    assert b.update(0, 10.0) == pytest.approx(1 + KI * math.tanh(10.0))


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("target_l0", {"target_l0": 0.0}),
        ("target_l0", {"target_l0": float("nan")}),
        ("start_step", {"target_l0": 5.0, "start_step": -1}),
        ("max_multiplier", {"target_l0": 5.0, "min_multiplier": 2.0, "max_multiplier": 1.0}),
        ("smoothing_factor", {"target_l0": 5.0, "smoothing_factor": 1.0}),
    ],
)
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as err:
        L0Autotuner(**kwargs)
    assert err.value.field == field


def test_non_finite_l0_rejected():
    with pytest.raises(ConfigError):
        L0Autotuner(target_l0=5.0).update(0, float("inf"))
