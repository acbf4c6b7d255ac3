import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import StepContext
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig, jumprelu, step
from saelab.saes.registry import get_sae_class

# Bandwidth 0.05, θ = 0.1: (x − θ)/ε = [8, 0.4, −0.2, −1] -> only 0.12 and 0.09 are inside the window.
X_STE = torch.tensor([[0.5, 0.12, 0.09, 0.05]], dtype=torch.float64)
THETA = torch.full((4,), 0.1, dtype=torch.float64)
EPS = 0.05


def _ste_grads(fn, ste_to_input, batch=1):
    x = X_STE.repeat(batch, 1).requires_grad_(True)
    theta = THETA.clone().requires_grad_(True)
    out = fn(x, theta, EPS, ste_to_input)
    out.sum().backward()
    return out.detach(), (None if x.grad is None else x.grad), theta.grad


def test_registered_under_jumprelu():
    assert get_sae_class("jumprelu") is JumpReLUSAE


def test_jumprelu_ste_deepmind():
    out, x_grad, theta_grad = _ste_grads(jumprelu, ste_to_input=False)
    assert out.tolist() == [[0.5, 0.12, 0.0, 0.0]]
    assert x_grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]  # 1[x > θ]
    # −(θ/ε)·rect((x−θ)/ε) = −2 inside the window only
    torch.testing.assert_close(theta_grad, torch.tensor([0.0, -2.0, -2.0, 0.0], dtype=torch.float64))


def test_jumprelu_ste_to_input_anthropic():
    _, x_grad, theta_grad = _ste_grads(jumprelu, ste_to_input=True)
    # The window term also reaches the input (+θ/ε = +2), even below the threshold (x = 0.09).
    torch.testing.assert_close(x_grad, torch.tensor([[1.0, 3.0, 2.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(theta_grad, torch.tensor([0.0, -2.0, -2.0, 0.0], dtype=torch.float64))


def test_jumprelu_threshold_grad_sums_over_batch():
    _, _, theta_grad = _ste_grads(jumprelu, ste_to_input=False, batch=3)
    torch.testing.assert_close(theta_grad, torch.tensor([0.0, -6.0, -6.0, 0.0], dtype=torch.float64))


def test_step_ste():
    out, x_grad, theta_grad = _ste_grads(step, ste_to_input=False)
    assert out.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    assert x_grad is None  # DeepMind: the L0 estimate reaches θ only
    torch.testing.assert_close(theta_grad, torch.tensor([0.0, -20.0, -20.0, 0.0], dtype=torch.float64))
    _, x_grad, _ = _ste_grads(step, ste_to_input=True)
    torch.testing.assert_close(x_grad, torch.tensor([[0.0, 20.0, 20.0, 0.0]], dtype=torch.float64))


@pytest.mark.interop
def test_ste_matches_sae_lens():
    sae_lens_jumprelu = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    torch.manual_seed(0)
    x = torch.rand(6, 5, dtype=torch.float64) * 0.3
    theta = torch.rand(5, dtype=torch.float64) * 0.2
    for ours, theirs in ((jumprelu, sae_lens_jumprelu.JumpReLU.apply), (step, sae_lens_jumprelu.Step.apply)):
        for ste_to_input in (False, True):
            grads = []
            for fn in (ours, theirs):
                xi, ti = x.clone().requires_grad_(True), theta.clone().requires_grad_(True)
                (fn(xi, ti, 0.1, ste_to_input) * torch.arange(5.0, dtype=torch.float64)).sum().backward()
                grads.append((xi.grad, ti.grad))
            for a, b in zip(grads[0], grads[1]):
                if a is None or b is None:
                    assert a is None and b is None
                else:
                    torch.testing.assert_close(a, b)


def _hand_sae(**cfg) -> JumpReLUSAE:
    # W_enc = I, b_enc = 0, W_dec = diag(2, 1) (norms 2, 1), b_dec = 0, θ = 0.5.
    cfg.setdefault("jumprelu_init_threshold", 0.5)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=2, d_sae=2, **cfg))
    with torch.no_grad():
        sae.W_enc_DL.copy_(torch.eye(2))
        sae.b_enc_L.zero_()
        sae.W_dec_LD.copy_(torch.diag(torch.tensor([2.0, 1.0])))
        sae.b_dec_D.zero_()
    return sae


# h = x; f = [[1, 0], [0, 0.8]]; x̂ = [[2, 0], [0, 0.8]]; MSE = mean(1.04, 0.09); L0 per sample = [1, 1]
X_HAND = torch.tensor([[1.0, 0.2], [0.3, 0.8]])


def test_hand_losses_step():
    out = _hand_sae().train_forward(X_HAND, StepContext(0, 1, {"l0": 0.5}))
    assert out.losses["mse"].item() == pytest.approx(0.565)
    assert out.losses["l0"].item() == pytest.approx(0.5 * 1.0)
    assert out.l0.item() == 1.0
    assert out.fired_L.tolist() == [True, True]
    torch.testing.assert_close(out.loss, out.losses["mse"] + out.losses["l0"])


def test_hand_losses_quadratic():
    sae = _hand_sae(jumprelu_sparsity_loss_mode="quadratic", target_l0=2.0)
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l0": 0.5}))
    assert out.losses["l0"].item() == pytest.approx(0.5 * (2 / 2.0) * (1 - 2.0) ** 2)
    sae = _hand_sae(jumprelu_sparsity_loss_mode="quadratic", target_l0=0.5)
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l0": 1.0}))
    assert out.losses["l0"].item() == pytest.approx((2 / 0.5) * 0.5**2)


def test_hand_losses_tanh():
    sae = _hand_sae(jumprelu_sparsity_loss_mode="tanh", jumprelu_tanh_scale=4.0)
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l0": 0.5}))
    # tanh(c·f·‖W_dec‖): sample 1 -> tanh(4·1·2), sample 2 -> tanh(4·0.8·1)
    assert out.losses["l0"].item() == pytest.approx(0.5 * (math.tanh(8.0) + math.tanh(3.2)) / 2)


def test_hand_pre_act_loss_on_dead_latents_only():
    sae = _hand_sae(pre_act_loss_coefficient=0.1)
    assert sae.coefficient_names() == {"l0": (1.0, 0), "pre_act": (0.1, 0)}
    dead = torch.tensor([False, True])
    out = sae.train_forward(X_HAND, StepContext(0, 1, {"l0": 0.5, "pre_act": 0.1}, dead_mask_L=dead))
    # latent 1 (dead, norm 1): ReLU(0.5 − [0.2, 0.8]) = [0.3, 0] -> mean 0.15
    assert out.losses["pre_act"].item() == pytest.approx(0.1 * 0.15)
    torch.testing.assert_close(out.loss, out.losses["mse"] + out.losses["l0"] + out.losses["pre_act"])
    for no_dead in (None, torch.tensor([False, False])):
        out = sae.train_forward(X_HAND, StepContext(0, 1, {"l0": 0.5, "pre_act": 0.1}, dead_mask_L=no_dead))
        assert out.losses["pre_act"].item() == 0.0


def test_loss_gradients_reach_threshold_only_in_window():
    sae = _hand_sae(jumprelu_bandwidth=0.2)
    # window |h − 0.5| < 0.1: only h = 0.45 (sample 2, latent 0) is inside
    x = torch.tensor([[1.0, 0.2], [0.45, 0.8]])
    out = sae.train_forward(x, StepContext(0, 1, {"l0": 1.0}))
    out.losses["l0"].backward()
    # Step loss: −(1/ε)·(1/B) for the one in-window entry
    torch.testing.assert_close(sae.threshold_L.grad, torch.tensor([-1 / 0.2 / 2, 0.0]))
    assert sae.W_enc_DL.grad is None or torch.count_nonzero(sae.W_enc_DL.grad) == 0
    sae = _hand_sae(jumprelu_bandwidth=0.2, jumprelu_ste_to_input=True)
    out = sae.train_forward(x, StepContext(0, 1, {"l0": 1.0}))
    out.losses["l0"].backward()
    assert sae.W_enc_DL.grad[0, 0].item() == pytest.approx(0.45 * (1 / 0.2) / 2)


def test_threshold_float32_and_clamped():
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=3, d_sae=4, dtype="bfloat16", jumprelu_init_threshold=0.2))
    assert sae.W_enc_DL.dtype == torch.bfloat16
    assert sae.threshold_L.dtype == torch.float32
    torch.testing.assert_close(sae.threshold_L.detach(), torch.full((4,), 0.2))
    sae.to(torch.bfloat16)
    assert sae.threshold_L.dtype == torch.float32
    assert sae.clone().threshold_L.dtype == torch.float32
    with torch.no_grad():
        sae.threshold_L.copy_(torch.tensor([-1.0, 0.5, -0.01, 0.0]))
    sae.after_step()
    assert sae.threshold_L.tolist() == [0.0, 0.5, 0.0, 0.0]
    with torch.no_grad():
        sae.threshold_L.fill_(-0.3)
    out = sae.train_forward(torch.randn(5, 3), StepContext(0, 1))
    assert (sae.threshold_L >= 0).all()
    out.loss.backward()
    assert sae.threshold_L.grad.dtype == torch.float32


def test_inference_encode_matches_training_acts():
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=16, jumprelu_init_threshold=0.05))
    with torch.no_grad():
        sae.b_enc_L.normal_(0, 0.1)
        sae.threshold_L.uniform_(0, 0.1)
    x_BD = torch.randn(32, 4)
    acts_BL = sae.encode(x_BD)
    h_BL = sae.pre_acts(x_BD)
    expected = torch.where(h_BL > sae.threshold_L, h_BL.relu(), torch.zeros_like(h_BL))
    torch.testing.assert_close(acts_BL, expected)
    out = sae.train_forward(x_BD, StepContext(0, 1))
    torch.testing.assert_close(out.x_hat_BD, sae.reconstruct(acts_BL))
    assert out.l0.item() == pytest.approx((acts_BL != 0).sum(1).float().mean().item())


def test_fold_W_dec_norm_keeps_outputs_and_scales_threshold():
    torch.manual_seed(0)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=6, d_sae=24))
    with torch.no_grad():
        norms = torch.rand(24) * 3 + 0.1
        sae.W_dec_LD.mul_((norms / sae.W_dec_LD.norm(dim=1)).unsqueeze(1))
        sae.b_enc_L.normal_(0, 0.05)
        sae.b_dec_D.normal_(0, 0.1)
        sae.threshold_L.uniform_(0, 0.1)
    x_BD = torch.randn(40, 6)
    before, active_before = sae(x_BD), sae.encode(x_BD) != 0
    assert 0 < active_before.float().mean() < 1
    theta_before = sae.threshold_L.detach().clone()
    sae.fold_W_dec_norm()
    torch.testing.assert_close(sae(x_BD), before, atol=1e-5, rtol=0)
    assert torch.equal(sae.encode(x_BD) != 0, active_before)
    torch.testing.assert_close(sae.threshold_L.detach(), theta_before * norms, rtol=1e-5, atol=1e-7)
    assert sae.threshold_L.dtype == torch.float32


def test_to_inference_folds_input_scale():
    torch.manual_seed(2)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=4, d_sae=12, normalize_activations="expected_average_only_in"))
    sae.input_scale.fill_(2.5)
    with torch.no_grad():
        sae.b_dec_D.normal_(0, 0.2)
        sae.threshold_L.uniform_(0, 0.3)
    x_BD = torch.randn(30, 4)
    inf = sae.to_inference()
    torch.testing.assert_close(inf(x_BD), sae(x_BD), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf.encode(x_BD), sae.encode(x_BD), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(inf.threshold_L, sae.threshold_L)


def test_state_dict_and_saelens_names():
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=3, d_sae=5))
    assert "threshold_L" in sae.state_dict()
    assert sae.saelens_names["threshold"] == "threshold_L"
    assert sae.saelens_names["W_enc"] == "W_enc_DL"
    other = sae.clone()
    torch.testing.assert_close(other.threshold_L, sae.threshold_L)


def test_autotune_declaration():
    def make(**kw):
        return JumpReLUSAE(JumpReLUSAEConfig(d_in=2, d_sae=8, **kw))

    assert make().autotuned_coefficient is None
    assert make(target_l0=3.0).autotuned_coefficient == "l0"
    assert make(target_l0=3.0, jumprelu_sparsity_loss_mode="tanh").autotuned_coefficient == "l0"
    # The quadratic loss steers L0 itself; target_l0 is its target there, not the autotuner's.
    assert make(target_l0=3.0, jumprelu_sparsity_loss_mode="quadratic").autotuned_coefficient is None


@pytest.mark.parametrize(
    "field,kwargs",
    [
        ("jumprelu_bandwidth", {"jumprelu_bandwidth": 0.0}),
        ("jumprelu_bandwidth", {"jumprelu_bandwidth": -0.1}),
        ("jumprelu_sparsity_loss_mode", {"jumprelu_sparsity_loss_mode": "l1"}),
        ("target_l0", {"jumprelu_sparsity_loss_mode": "quadratic"}),
        ("target_l0", {"target_l0": -1.0}),
        ("l0_coefficient", {"l0_coefficient": -1.0}),
        ("pre_act_loss_coefficient", {"pre_act_loss_coefficient": -3e-6}),
        ("jumprelu_init_threshold", {"jumprelu_init_threshold": -0.01}),
        ("jumprelu_tanh_scale", {"jumprelu_tanh_scale": 0.0}),
        ("l0_warm_up_steps", {"l0_warm_up_steps": -1}),
        ("autotune_start_fraction", {"autotune_start_fraction": 2.0}),
    ],
)
def test_config_errors_name_the_field(field, kwargs):
    with pytest.raises(ConfigError) as err:
        JumpReLUSAEConfig(d_in=2, d_sae=8, **kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_defaults_match_saelens():
    cfg = JumpReLUSAEConfig(d_in=2, d_sae=8)
    assert (cfg.jumprelu_init_threshold, cfg.jumprelu_bandwidth, cfg.jumprelu_sparsity_loss_mode) == (
        0.01,
        0.05,
        "step",
    )
    assert (cfg.l0_coefficient, cfg.l0_warm_up_steps, cfg.pre_act_loss_coefficient) == (1.0, 0, None)
    assert (cfg.jumprelu_tanh_scale, cfg.jumprelu_ste_to_input, cfg.target_l0) == (4.0, False, None)


def test_two_forwards_then_backward_both():
    # Gradient accumulation: the θ projection in the second forward must not invalidate the first graph.
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=3, d_sae=4))
    first = sae.train_forward(torch.randn(5, 3), StepContext(0, 1))
    second = sae.train_forward(torch.randn(5, 3), StepContext(0, 1))
    (first.loss + second.loss).backward()
    assert sae.threshold_L.grad is not None


def test_config_for_l0_is_synthsaebench():
    cfg = JumpReLUSAE.config_for_l0(d_in=8, d_sae=32, l0=25.0, total_steps=300)
    assert (cfg.jumprelu_sparsity_loss_mode, cfg.jumprelu_bandwidth, cfg.jumprelu_init_threshold) == ("step", 1.0, 1.0)
    assert (cfg.decoder_init_norm, cfg.normalize_activations) == (0.5, "expected_average_only_in")
    assert (cfg.l0_coefficient, cfg.target_l0, cfg.autotune_start_fraction) == (1.0, 25.0, 0.0)
    assert JumpReLUSAE(cfg).autotuned_coefficient == "l0"
