import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes import StepContext, get_sae_class
from saelab.saes.topk_family import select_batch_topk, select_topk


def _dense_reference_loss(sae, x, batch_idx, latent_idx, widths=None):
    """SAELens-style dense computation with the same selected entries (autograd everywhere)."""
    x_tilde = x - sae.b_dec_D
    hidden = x_tilde @ sae.W_enc_DL + sae.b_enc_L
    norms = sae.W_dec_LD.norm(dim=1)
    scaled = hidden * norms
    mask = torch.zeros_like(scaled, dtype=torch.bool)
    mask[batch_idx, latent_idx] = True
    acts = torch.where(mask, scaled, torch.zeros_like(scaled))
    decoded = (acts / norms) @ sae.W_dec_LD + sae.b_dec_D
    loss = (decoded - x).pow(2).sum(-1).mean()
    if widths:
        for w in widths[:-1]:
            inner = (acts[:, :w] / norms[:w]) @ sae.W_dec_LD[:w] + sae.b_dec_D
            loss = loss + (inner - x).pow(2).sum(-1).mean()
    return loss


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_sparse_backward_matches_dense_autograd(arch):
    torch.manual_seed(0)
    cls = get_sae_class(arch)
    extra = {"matryoshka_widths": [4, 16, 48]} if arch == "matryoshka" else {}
    sae = cls(cls.config_class(d_in=12, d_sae=48, k=5, aux_loss_coefficient=0.0, **extra))
    with torch.no_grad():
        sae.b_dec_D.normal_()
        sae.b_enc_L.normal_(std=0.1)
        sae.W_dec_LD.mul_(torch.rand(48, 1) + 0.5)  # unequal decoder norms
    x = torch.randn(32, 12)
    out = sae.train_forward(x, StepContext(step=0, total_steps=1))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    with torch.no_grad():
        scores = (sae.pre_acts(x)) * sae.W_dec_LD.norm(dim=1)
    b_idx, l_idx = sae.select(scores, None)
    ref = _dense_reference_loss(sae, x, b_idx, l_idx, extra.get("matryoshka_widths"))
    ref.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_select_topk_keeps_k_largest_positive_per_row():
    scores = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-1.0, -2.0, 0.0, 4.0]])
    b, l = select_topk(scores, 2)
    got = sorted(zip(b.tolist(), l.tolist()))
    assert got == [(0, 0), (0, 2), (1, 3)]  # row 1 has only one positive entry


@pytest.mark.parametrize("shape,k", [((1024, 4096), 25.0), ((64, 300), 3.5), ((256, 1024), 12.0)])
def test_select_batch_topk_is_exact(shape, k):
    torch.manual_seed(1)
    scores = torch.randn(*shape).relu()
    b, l = select_batch_topk(scores, k)
    m = int(k * shape[0])
    flat_top = scores.flatten().topk(m).values
    got = scores[b, l]
    assert got.numel() == m
    torch.testing.assert_close(got.sort().values, flat_top.sort().values)


def test_batchtopk_threshold_tracks_min_positive_activation():
    torch.manual_seed(0)
    cls = get_sae_class("batchtopk")
    sae = cls(cls.config_class(d_in=8, d_sae=32, k=2, topk_threshold_lr=0.5))
    x = torch.randn(16, 8)
    out = sae.train_forward(x, StepContext(step=0, total_steps=1))
    acts = sae.encode(x)  # same weights: same selection
    # Bias-corrected EMA: the first observation is taken as is (a plain EMA from 0 gives half of it).
    first = float(acts[acts > 0].min())
    assert float(sae.topk_threshold) == pytest.approx(first, rel=1e-6)
    assert out.l0.item() == pytest.approx(2.0)
    x2 = torch.randn(16, 8)
    sae.train_forward(x2, StepContext(step=1, total_steps=2))
    acts2 = sae.encode(x2)
    second = float(acts2[acts2 > 0].min())
    # Raw EMA 0.25·first + 0.5·second over its weight 1 − 0.5² = 0.75.
    assert float(sae.topk_threshold) == pytest.approx((0.25 * first + 0.5 * second) / 0.75, rel=1e-6)


def test_aux_loss_only_with_dead_latents_and_trains_them():
    torch.manual_seed(0)
    cls = get_sae_class("topk")
    sae = cls(cls.config_class(d_in=16, d_sae=64, k=4))
    x = torch.randn(32, 16)
    out = sae.train_forward(x, StepContext(step=0, total_steps=1, dead_mask_L=torch.zeros(64, dtype=torch.bool)))
    assert "aux" in out.losses and out.losses["aux"].item() == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[40:] = True
    out = sae.train_forward(x, StepContext(step=0, total_steps=1, dead_mask_L=dead))
    assert out.losses["aux"].item() > 0
    out.losses["aux"].backward()
    # Only dead latents' encoder columns receive aux gradient.
    col_grad = sae.W_enc_DL.grad.abs().sum(0)
    assert torch.all(col_grad[:40] == 0) and col_grad[40:].sum() > 0


def test_topk_config_errors_name_the_field():
    cls = get_sae_class("topk")
    with pytest.raises(ConfigError, match="k=100"):
        cls.config_class(d_in=8, d_sae=16, k=100)
    with pytest.raises(ConfigError, match="d_sae"):
        cls.config_class(d_in=8, d_sae=0, k=1)
    mcls = get_sae_class("matryoshka")
    with pytest.raises(ConfigError, match="matryoshka_widths"):
        mcls.config_class(d_in=8, d_sae=64, k=2, matryoshka_widths=[16, 8, 64])


def test_topk_inference_conversion_preserves_outputs():
    torch.manual_seed(0)
    cls = get_sae_class("topk")
    sae = cls(cls.config_class(d_in=8, d_sae=32, k=3))
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(32, 1) * 3 + 0.2)
        sae.b_dec_D.normal_()
    x = torch.randn(20, 8)
    inf = sae.to_inference()
    torch.testing.assert_close(sae(x), inf(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inf.W_dec_LD.norm(dim=1), torch.ones(32))
