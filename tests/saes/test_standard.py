import math
import statistics

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import StepContext
from saelab.saes.registry import get_sae_class
from saelab.saes.standard import StandardSAE, StandardSAEConfig
from saelab.training.l0_autotuner import L0Autotuner


def _hand_sae(**cfg) -> StandardSAE:
    # W_enc = I, b_enc = [0, -0.5], W_dec = diag(2, 1) (decoder norms 2 and 1), b_dec = 0.
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=2, **cfg))
    with torch.no_grad():
        sae.W_enc_DL.copy_(torch.eye(2))
        sae.b_enc_L.copy_(torch.tensor([0.0, -0.5]))
        sae.W_dec_LD.copy_(torch.diag(torch.tensor([2.0, 1.0])))
        sae.b_dec_D.zero_()
    return sae


X_HAND = torch.tensor([[1.0, 0.2], [0.3, 0.8]])


def test_registered_under_standard():
    assert get_sae_class("standard") is StandardSAE


def test_forward_backward_shapes():
    sae = StandardSAE(StandardSAEConfig(d_in=5, d_sae=7))
    x_BD = torch.randn(3, 5)
    assert sae.encode(x_BD).shape == (3, 7)
    assert sae(x_BD).shape == (3, 5)
    out = sae.train_forward(x_BD, StepContext(step=0, total_steps=1, coefficients={"l1": 0.5}))
    assert out.x_hat_BD.shape == (3, 5)
    assert out.fired_L.shape == (7,) and out.fired_L.dtype == torch.bool
    assert out.l0.shape == ()
    assert set(out.losses) == {"mse", "l1"}
    torch.testing.assert_close(out.loss, out.losses["mse"] + out.losses["l1"])
    out.loss.backward()
    for p in sae.parameters():
        assert p.grad is not None and p.grad.shape == p.shape


def test_hand_computed_losses_l1():
    sae = _hand_sae()
    # h = [[1, -0.3], [0.3, 0.3]] -> f = [[1, 0], [0.3, 0.3]], x̂ = [[2, 0], [0.6, 0.3]]
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l1": 0.1}))
    assert out.losses["mse"].item() == pytest.approx((1.04 + 0.34) / 2)
    # ‖f ⊙ ‖W_dec‖‖_1 = [2, 0.6 + 0.3] -> mean 1.45
    assert out.losses["l1"].item() == pytest.approx(0.1 * 1.45)
    assert out.l0.item() == pytest.approx(1.5)
    assert out.fired_L.tolist() == [True, True]


def test_hand_computed_losses_lp2():
    sae = _hand_sae(lp_norm=2.0)
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l1": 1.0}))
    assert out.losses["l1"].item() == pytest.approx((2.0 + math.sqrt(0.36 + 0.09)) / 2)


def test_missing_coefficient_uses_config_value():
    sae = _hand_sae(l1_coefficient=0.1)
    out = sae.train_forward(X_HAND, StepContext(0, 1))
    assert out.losses["l1"].item() == pytest.approx(0.1 * 1.45)


def test_coefficients_and_autotune_declaration():
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=4, l1_coefficient=2.0, l1_warm_up_steps=10))
    assert sae.coefficient_names() == {"l1": (2.0, 10)}
    assert sae.autotuned_coefficient is None
    tuned = StandardSAE(StandardSAEConfig(d_in=2, d_sae=4, target_l0=2.0, autotune_start_fraction=1 / 3))
    assert tuned.autotuned_coefficient == "l1"


def test_losses_in_scaled_units():
    sae = _hand_sae(normalize_activations="expected_average_only_in")
    sae.input_scale.fill_(2.0)
    out = sae.train_forward(X_HAND / 2.0, StepContext(0, 1, {"l1": 0.1}))
    assert out.losses["mse"].item() == pytest.approx((1.04 + 0.34) / 2)


def test_fold_W_dec_norm_keeps_outputs():
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=6, d_sae=12))
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(12, 1) * 3 + 0.1)
        sae.b_enc_L.normal_(0, 0.1)
        sae.b_dec_D.normal_(0, 0.1)
    x_BD = torch.randn(20, 6)
    before = sae(x_BD)
    acts_before = sae.encode(x_BD)
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x_BD), before, atol=1e-5, rtol=0)
    torch.testing.assert_close(sae.W_dec_LD.norm(dim=1), torch.ones(12))
    # Codes are rescaled by the norms, so the active set is unchanged.
    assert torch.equal(sae.encode(x_BD) != 0, acts_before != 0)


def test_to_inference_folds_input_scale():
    torch.manual_seed(1)
    sae = StandardSAE(StandardSAEConfig(d_in=4, d_sae=8, normalize_activations="expected_average_only_in"))
    sae.input_scale.fill_(3.0)
    with torch.no_grad():
        sae.b_dec_D.normal_()
    x_BD = torch.randn(10, 4)
    inf = sae.to_inference()
    assert inf.cfg.normalize_activations == "none"
    torch.testing.assert_close(inf(x_BD), sae(x_BD), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf.encode(x_BD), sae.encode(x_BD), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "field,value",
    [
        ("l1_coefficient", -1.0),
        ("lp_norm", 0.0),
        ("l1_warm_up_steps", -5),
        ("target_l0", 0.0),
        ("target_l0", 100.0),
        ("autotune_start_fraction", 1.0),
        ("autotune_start_fraction", -0.1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        StandardSAEConfig(d_in=2, d_sae=4, **{field: value})
    assert err.value.field == field
    assert field in str(err.value)


def _train_toy(target_l0: float, l1: float, autotune: bool, steps: int = 400) -> tuple[float, float]:
    """2 features along e1, e2 firing w.p. 0.5 with magnitude U(0.5, 1.5), plus N(0, 0.1²) noise;
    a 4-latent standard SAE; returns (mean L0 over the last 50 steps, final multiplier)."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=2, d_sae=4, l1_coefficient=l1, target_l0=target_l0))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    # Integral gain 0.05 instead of 3e-4 so that the controller acts within a few hundred steps.
    tuner = L0Autotuner(target_l0, integral_gain=0.05)
    l0s = []
    for step in range(steps):
        fires_BF = (torch.rand(128, 2, generator=gen) < 0.5).float()
        x_BD = fires_BF * (0.5 + torch.rand(128, 2, generator=gen)) + 0.1 * torch.randn(128, 2, generator=gen)
        coefficient = l1 * (tuner.multiplier if autotune else 1.0)
        out = sae.train_forward(x_BD, StepContext(step, steps, {sae.autotuned_coefficient: coefficient}))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sae.after_step()
        if autotune:
            tuner.update(step, out.l0)
        l0s.append(float(out.l0))
    return statistics.mean(l0s[-50:]), tuner.multiplier


@pytest.fixture
def one_thread():
    # Tiny tensors gain nothing from threads, and on a shared 2-core machine idle workers spin.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("target_l0,l1", [(1.2, 0.01), (2.5, 0.3)])
def test_autotuner_drives_l0_to_target(target_l0, l1, one_thread):
    base_l0, _ = _train_toy(target_l0, l1, autotune=False)
    tuned_l0, multiplier = _train_toy(target_l0, l1, autotune=True)
    # Untuned, λ=0.01 leaves L0 ≈ 3.5 (noise fires latents) and λ=0.3 gives L0 ≈ 1.8.
    assert abs(base_l0 - target_l0) > 0.6
    assert abs(tuned_l0 - target_l0) < 0.3
    if base_l0 > target_l0:
        assert multiplier > 5  # had to strengthen the penalty
    else:
        assert multiplier < 0.5  # had to weaken it


def test_config_for_l0_is_synthsaebench():
    cfg = StandardSAE.config_for_l0(d_in=8, d_sae=32, l0=25.0, total_steps=300)
    assert (cfg.l1_coefficient, cfg.l1_warm_up_steps, cfg.target_l0) == (2.0, 100, 25.0)
    assert cfg.autotune_start_fraction == pytest.approx(1 / 3)
    assert StandardSAE.config_for_l0(8, 32, 5.0, 300, l1_coefficient=1.0).l1_coefficient == 1.0
