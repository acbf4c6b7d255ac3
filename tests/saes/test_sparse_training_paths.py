"""The fast training paths must be the slow paths, computed differently: same loss, same gradients.

Standard and JumpReLU train on only the entries that can matter (positive / active-or-in-band
pre-activations) when those are few; Matching Pursuit tracks its correlations by Gram updates.
Each is checked against the reference path in float64, where the only difference is summation order.
"""

import pytest
import torch

import saelab.saes.jumprelu as jumprelu_module
import saelab.saes.standard as standard_module
from saelab.saes.base import StepContext
from saelab.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from saelab.saes.matching_pursuit import matching_pursuit, use_gram_updates
from saelab.saes.standard import StandardSAE, StandardSAEConfig

D, L, B = 16, 64, 96


def _inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _loss_and_grads(sae, x, ctx, module, density: float):
    """Run one training forward with the sparse path allowed up to `density` (0: always dense)."""
    original = module.SPARSE_MAX_DENSITY
    module.SPARSE_MAX_DENSITY = density
    try:
        sae.zero_grad(set_to_none=True)
        out = sae.train_forward(x, ctx)
        out.loss.backward()
    finally:
        module.SPARSE_MAX_DENSITY = original
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in sae.named_parameters()}
    return out, grads


def _assert_same_step(sae, x, ctx, module):
    dense, dense_grads = _loss_and_grads(sae, x, ctx, module, density=0.0)
    sparse, sparse_grads = _loss_and_grads(sae, x, ctx, module, density=1.0)
    torch.testing.assert_close(sparse.loss, dense.loss, rtol=1e-12, atol=1e-12)
    for name in dense.losses:
        torch.testing.assert_close(sparse.losses[name], dense.losses[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.x_hat_BD, dense.x_hat_BD, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(float(sparse.l0), float(dense.l0))
    assert torch.equal(sparse.fired_L, dense.fired_L)
    for name, grad in dense_grads.items():
        assert grad.abs().sum() > 0 or name == "b_enc_L", f"{name}: the check needs a nonzero gradient"
        # θ is kept in float32 whatever the SAE dtype, so its gradient sums in float32 (order differs).
        rtol, atol = (1e-6, 1e-7) if grad.dtype == torch.float32 else (1e-10, 1e-12)
        torch.testing.assert_close(sparse_grads[name], grad, rtol=rtol, atol=atol, msg=f"gradient of {name}")


def _randomise(sae, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


@pytest.mark.parametrize("bias_shift", [0.0, -1.0])  # about half vs. a few percent of entries positive
def test_standard_sparse_path_matches_dense(bias_shift):
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=L, dtype="float64", l1_coefficient=0.7))
    _randomise(sae, 1)
    with torch.no_grad():
        sae.b_enc_L.add_(bias_shift)
    _assert_same_step(sae, _inputs(), StepContext(step=0, total_steps=10, coefficients={"l1": 0.3}), standard_module)


@pytest.mark.parametrize("mode", ["step", "tanh", "quadratic"])
@pytest.mark.parametrize("ste_to_input", [False, True])
def test_jumprelu_sparse_path_matches_dense(mode, ste_to_input):
    cfg = JumpReLUSAEConfig(
        d_in=D,
        d_sae=L,
        dtype="float64",
        jumprelu_sparsity_loss_mode=mode,
        jumprelu_ste_to_input=ste_to_input,
        jumprelu_bandwidth=0.4,
        target_l0=5.0,
    )
    sae = JumpReLUSAE(cfg)
    _randomise(sae, 2)
    with torch.no_grad():
        # Thresholds spread so that some entries are active, some in the band, most below it.
        sae.threshold_L.copy_(torch.linspace(0.2, 1.5, L, dtype=torch.float64))
    x = _inputs(3) * 2
    entries = sae.pre_acts(x) > sae.threshold_L - 0.2
    assert 0.02 < entries.double().mean() < 0.9  # a genuine subset, not everything
    _assert_same_step(sae, x, StepContext(step=0, total_steps=10, coefficients={"l0": 0.05}), jumprelu_module)


def test_jumprelu_dense_path_kept_for_pre_act_loss():
    """The pre-activation loss reaches every entry of dead latents, so no sparse path applies."""
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=L, dtype="float64", pre_act_loss_coefficient=1e-2))
    _randomise(sae, 4)
    dead = torch.zeros(L, dtype=torch.bool)
    dead[::3] = True
    ctx = StepContext(step=0, total_steps=10, coefficients={"l0": 0.05}, dead_mask_L=dead)
    out, _ = _loss_and_grads(sae, _inputs(), ctx, jumprelu_module, density=1.0)
    assert "pre_act" in out.losses and float(out.losses["pre_act"].detach()) > 0


def test_sparse_paths_engage_when_sparse():
    """At a benchmark-like sparsity the sparse path is taken (it reports L0 as a Python-built tensor)."""
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=L, dtype="float64"))
    _randomise(sae, 5)
    with torch.no_grad():
        sae.b_enc_L.fill_(-3.0)  # only a few positive entries
    density = float((sae.pre_acts(_inputs()) > 0).double().mean())
    assert 0 < density < standard_module.SPARSE_MAX_DENSITY
    calls = []
    original = sae._train_forward_sparse
    sae._train_forward_sparse = lambda *a: calls.append(1) or original(*a)
    sae.train_forward(_inputs(), StepContext(step=0, total_steps=1))
    assert calls == [1]


@pytest.mark.parametrize("iterations", [1, 12, 40])
def test_matching_pursuit_gram_updates_match_recomputed_correlations(iterations):
    """Gram-updated correlations select the same atoms with the same codes (float64: no near-ties flip)."""
    g = torch.Generator().manual_seed(6)
    W = torch.randn(200, 24, generator=g, dtype=torch.float64)
    W = (W / W.norm(dim=1, keepdim=True)).requires_grad_()
    x = torch.randn(128, 24, generator=g, dtype=torch.float64)
    results = {}
    for gram in (False, True):
        W.grad = None
        res = matching_pursuit(
            x, W, residual_threshold=0.0, max_iterations=iterations, stop_on_duplicate_support=False, gram=gram
        )
        res.residual_BD.pow(2).sum().backward()
        results[gram] = (res, W.grad.clone())
    (ref, ref_grad), (fast, fast_grad) = results[False], results[True]
    assert torch.equal(fast.latent_idx, ref.latent_idx)
    torch.testing.assert_close(fast.values, ref.values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.residual_BD, ref.residual_BD, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-10, atol=1e-12)


def test_matching_pursuit_gram_choice():
    assert use_gram_updates(batch_size=1024, d_sae=1024, max_iterations=12)
    assert not use_gram_updates(batch_size=1024, d_sae=1024, max_iterations=1)  # one pass: nothing to save
    assert not use_gram_updates(batch_size=4, d_sae=4096, max_iterations=12)  # G costs more than it saves
    assert not use_gram_updates(batch_size=4096, d_sae=16384, max_iterations=64)  # G would take 1 GiB
