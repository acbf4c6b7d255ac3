import warnings

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes.base import StepContext, mse_per_sample
from saelab.saes.matching_pursuit import MatchingPursuitSAE, MatchingPursuitSAEConfig
from saelab.saes.registry import get_sae_class


def _sae(W_dec_LD: torch.Tensor, b_dec_D: torch.Tensor | None = None, **cfg) -> MatchingPursuitSAE:
    L, D = W_dec_LD.shape
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D, d_sae=L, dtype=_dtype_name(W_dec_LD), **cfg))
    with torch.no_grad():
        sae.W_dec_LD.copy_(W_dec_LD)
        sae.b_dec_D.copy_(torch.zeros(D) if b_dec_D is None else b_dec_D)
    return sae


def _dtype_name(t: torch.Tensor) -> str:
    return {torch.float32: "float32", torch.float64: "float64"}[t.dtype]


def _orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # rows orthonormal


def test_registered_and_tied():
    assert get_sae_class("matching_pursuit") is MatchingPursuitSAE
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=4, d_sae=9))
    assert {n for n, _ in sae.named_parameters()} == {"W_dec_LD", "b_dec_D"}
    assert set(sae.state_dict()) == {"W_dec_LD", "b_dec_D", "input_scale"}
    assert set(sae.saelens_names) == {"W_dec", "b_dec"}  # SAELens's MP loader rejects a W_enc key
    assert torch.equal(sae.W_enc_DL, sae.W_dec_LD.t())
    assert sae.W_enc_DL.data_ptr() == sae.W_dec_LD.data_ptr()
    assert torch.equal(sae.b_enc_L, torch.zeros(9))
    torch.testing.assert_close(sae.W_dec_LD.norm(dim=1), torch.ones(9))
    other = sae.clone()
    assert torch.equal(other.W_dec_LD, sae.W_dec_LD)


def test_decoder_init_norm_forced_to_one():
    with pytest.warns(UserWarning, match="decoder_init_norm"):
        cfg = MatchingPursuitSAEConfig(d_in=4, d_sae=8, decoder_init_norm=0.1)
    assert cfg.decoder_init_norm == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MatchingPursuitSAEConfig(d_in=4, d_sae=8).decoder_init_norm == 1.0


def test_recovers_k_sparse_signal_over_orthonormal_dictionary_in_k_iterations():
    Q = _orthonormal(8)
    codes_BL = torch.zeros(3, 8, dtype=torch.float64)
    codes_BL[0, [1, 4, 6]] = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    codes_BL[1, [0, 2, 7]] = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)
    codes_BL[2, [3, 5, 6]] = torch.tensor([1.0, 1.2, 0.7], dtype=torch.float64)
    x_BD = codes_BL @ Q
    sae = _sae(Q, residual_threshold=1e-6)
    res = sae.pursue(x_BD)
    assert res.iterations == 3
    torch.testing.assert_close(sae.encode(x_BD), codes_BL)
    torch.testing.assert_close(sae(x_BD), x_BD)
    # Greedy order: the largest coefficient is picked first.
    assert res.latent_idx[:3].tolist() == [1, 7, 5]


def test_samples_stop_independently():
    Q = _orthonormal(6, seed=1)
    codes_BL = torch.zeros(2, 6, dtype=torch.float64)
    codes_BL[0, 2] = 2.0  # done after 1 iteration
    codes_BL[1, [0, 3, 5]] = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    sae = _sae(Q, residual_threshold=1e-6)
    res = sae.pursue(codes_BL @ Q)
    assert res.iterations == 3
    # The finished sample's later picks carry zero value.
    assert res.values[res.batch_idx == 0].tolist()[1:] == [0.0, 0.0]
    torch.testing.assert_close(sae.encode(codes_BL @ Q), codes_BL)


def test_max_iterations_stops_early():
    Q = _orthonormal(8)
    codes_L = torch.zeros(8, dtype=torch.float64)
    codes_L[[1, 4, 6]] = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    x_BD = (codes_L @ Q).unsqueeze(0)
    sae = _sae(Q, residual_threshold=0.0, stop_on_duplicate_support=False, max_iterations=2)
    assert sae.pursue(x_BD).iterations == 2
    expected = codes_L.clone()
    expected[6] = 0.0
    torch.testing.assert_close(sae.encode(x_BD)[0], expected)
    # max_iterations=None means d_in iterations when nothing else stops it.
    assert _sae(Q, residual_threshold=0.0, stop_on_duplicate_support=False).pursue(x_BD).iterations == 8


def test_residual_threshold_stops():
    Q = _orthonormal(5, seed=2)
    x_BD = (3.0 * Q[0] + 0.5 * Q[1]).unsqueeze(0)
    loose = _sae(Q, residual_threshold=1.0, stop_on_duplicate_support=False)
    res = loose.pursue(x_BD)
    assert res.iterations == 1  # ‖r‖ = 0.5 < 1 after one atom
    assert (loose.encode(x_BD) != 0).sum().item() == 1
    tight = _sae(Q, residual_threshold=0.1, stop_on_duplicate_support=False)
    assert tight.pursue(x_BD).iterations == 2
    out = loose.train_forward(x_BD, StepContext(0, 1))
    assert out.metrics["residual_norm"] == pytest.approx(0.5)
    assert out.metrics["converged_portion"] == 1.0
    assert out.metrics["iterations"] == 1.0
    assert out.l0.item() == 1.0


# Two atoms 127° apart: d1 = (1, 0), d2 = (−0.6, 0.8); x = (1, 1).
# it 1: d1 (r·d1 = 1 > 0.2) α = 1, r = (0, 1); it 2: d2, α = 0.8, r = (0.48, 0.36);
# it 3: d1 again, α = 0.48 -> support unchanged -> stop; f = (1.48, 0.8), r = (0, 0.36).
# it 4 (if it continues): d2, α = 0.288.
D_HAND = torch.tensor([[1.0, 0.0], [-0.6, 0.8]], dtype=torch.float64)
X_HAND = torch.tensor([[1.0, 1.0]], dtype=torch.float64)


def test_duplicate_support_stop_hand_case():
    sae = _sae(D_HAND, residual_threshold=0.0, stop_on_duplicate_support=True, max_iterations=10)
    res = sae.pursue(X_HAND)
    assert res.iterations == 3
    assert res.latent_idx.tolist() == [0, 1, 0]
    torch.testing.assert_close(res.residual_BD, torch.tensor([[0.0, 0.36]], dtype=torch.float64))
    torch.testing.assert_close(sae.encode(X_HAND), torch.tensor([[1.48, 0.8]], dtype=torch.float64))
    sparse = sae.encode_sparse(X_HAND)
    assert sparse.latent_idx.tolist() == [0, 1]
    torch.testing.assert_close(sparse.values, torch.tensor([1.48, 0.8], dtype=torch.float64))


def test_without_duplicate_support_stop_it_keeps_going():
    sae = _sae(D_HAND, residual_threshold=0.0, stop_on_duplicate_support=False, max_iterations=4)
    assert sae.pursue(X_HAND).iterations == 4
    torch.testing.assert_close(sae.encode(X_HAND), torch.tensor([[1.48, 0.8 + 0.288]], dtype=torch.float64))


def test_no_positive_correlation_stops_on_unchanged_support():
    sae = _sae(D_HAND, residual_threshold=0.0, stop_on_duplicate_support=True, max_iterations=10)
    x = torch.tensor([[-1.0, -1.0]], dtype=torch.float64)  # every r·d_j ≤ 0
    assert sae.pursue(x).iterations == 1
    assert torch.count_nonzero(sae.encode(x)) == 0


def _naive_mp_loss(W_dec_LD, b_dec_D, x_BD, residual_threshold, max_iterations, stop_on_duplicate_support):
    """Reference: dense [B, L] codes updated out of place every iteration (memory-hungry but plain)."""
    r = x_BD - b_dec_D
    B, L = x_BD.shape[0], W_dec_LD.shape[0]
    acts = torch.zeros(B, L, dtype=x_BD.dtype)
    done = torch.zeros(B, dtype=torch.bool)
    for _ in range(max_iterations):
        j = (r @ W_dec_LD.t()).relu().argmax(dim=1)
        atoms = W_dec_LD[j]
        alpha = (r * atoms).sum(-1).relu() * (~done).to(x_BD.dtype)
        prev_support = acts != 0
        acts = acts + torch.nn.functional.one_hot(j, L).to(x_BD.dtype) * alpha.unsqueeze(1)
        r = r - alpha.unsqueeze(1) * atoms
        with torch.no_grad():
            if stop_on_duplicate_support:
                done = done | ((acts != 0) == prev_support).all(dim=1)
            if residual_threshold > 0:
                done = done | (r.norm(dim=-1) < residual_threshold)
            if done.all():
                break
    x_hat = acts @ W_dec_LD + b_dec_D
    return mse_per_sample(x_hat, x_BD).mean(), acts


@pytest.mark.parametrize("threshold,stop_dup", [(0.0, False), (0.5, True), (0.0, True)])
def test_gradients_match_naive_implementation(threshold, stop_dup):
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True) * (1 + 0.3 * torch.rand(12, 1, generator=gen, dtype=torch.float64))
    b = 0.1 * torch.randn(5, generator=gen, dtype=torch.float64)
    x = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    sae = _sae(W, b, residual_threshold=threshold, stop_on_duplicate_support=stop_dup, max_iterations=6)
    out = sae.train_forward(x, StepContext(0, 1))
    out.loss.backward()

    W_ref, b_ref = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss_ref, acts_ref = _naive_mp_loss(W_ref, b_ref, x, threshold, 6, stop_dup)
    loss_ref.backward()
    torch.testing.assert_close(out.loss, loss_ref)
    torch.testing.assert_close(sae.encode(x), acts_ref.detach())
    torch.testing.assert_close(sae.W_dec_LD.grad, W_ref.grad)
    torch.testing.assert_close(sae.b_dec_D.grad, b_ref.grad)
    assert out.l0.item() == pytest.approx((acts_ref != 0).sum(1).double().mean().item())
    assert torch.equal(out.fired_L, (acts_ref != 0).any(0))


def _saved_shapes(fn) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def test_autograd_graph_holds_no_batch_by_latent_tensor():
    B, L, D = 7, 200, 6
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(B, D, generator=gen)
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=D, d_sae=L, residual_threshold=0.0, max_iterations=5))
    shapes = _saved_shapes(lambda: sae.train_forward(x, StepContext(0, 1)).loss.backward())
    assert shapes  # the hook saw the graph
    assert not [s for s in shapes if B in s and L in s], shapes
    # The check does catch dense codes: the naive version saves [B, L] tensors.
    W = sae.W_dec_LD.detach().clone().requires_grad_(True)
    naive = _saved_shapes(lambda: _naive_mp_loss(W, torch.zeros(D), x, 0.0, 5, True)[0].backward())
    assert [s for s in naive if s == (B, L)]


def test_train_forward_consistent_with_encode_decode():
    torch.manual_seed(5)
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=6, d_sae=20, max_iterations=4))
    with torch.no_grad():
        sae.b_dec_D.normal_(0, 0.2)
    x = torch.randn(11, 6)
    out = sae.train_forward(x, StepContext(0, 1))
    acts = sae.encode(x)
    torch.testing.assert_close(out.x_hat_BD, sae.decode(acts), atol=1e-5, rtol=1e-5)
    assert set(out.losses) == {"mse"}
    assert {"residual_norm", "converged_portion"} <= set(out.metrics)
    assert out.fired_L.shape == (20,)
    assert out.l0.item() == pytest.approx((acts != 0).sum(1).float().mean().item())
    assert sae.encode(x.reshape(1, 11, 6)).shape == (1, 11, 20)
    torch.testing.assert_close(sae.decode_sparse(sae.encode_sparse(x)), sae.decode(acts), atol=1e-5, rtol=1e-5)


def test_without_b_dec_on_input_b_dec_is_not_added():
    torch.manual_seed(6)
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=4, d_sae=8, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.b_dec_D.fill_(5.0)
    x = torch.randn(3, 4)
    acts = sae.encode(x)
    torch.testing.assert_close(sae.decode(acts), acts @ sae.W_dec_LD)
    torch.testing.assert_close(
        sae.train_forward(x, StepContext(0, 1)).x_hat_BD, acts @ sae.W_dec_LD, atol=1e-5, rtol=1e-5
    )


def test_to_inference_folds_input_scale_and_threshold():
    torch.manual_seed(7)
    sae = MatchingPursuitSAE(
        MatchingPursuitSAEConfig(
            d_in=5, d_sae=15, residual_threshold=0.2, normalize_activations="expected_average_only_in"
        )
    )
    sae.input_scale.fill_(4.0)
    with torch.no_grad():
        sae.b_dec_D.normal_(0, 0.3)
    x = torch.randn(10, 5)
    inf = sae.to_inference()
    assert inf.cfg.normalize_activations == "none"
    assert inf.cfg.residual_threshold == pytest.approx(0.05)
    torch.testing.assert_close(inf(x), sae(x), atol=1e-5, rtol=1e-5)
    # The tied encoder cannot absorb s, so codes come out in input units (÷ s), as in SAELens.
    torch.testing.assert_close(inf.encode(x), sae.encode(x) / 4.0, atol=1e-5, rtol=1e-5)


def test_fold_W_dec_norm_refuses():
    sae = MatchingPursuitSAE(MatchingPursuitSAEConfig(d_in=3, d_sae=4))
    with pytest.raises(NotImplementedError):
        sae.fold_W_dec_norm()


@pytest.mark.parametrize("field,value", [("residual_threshold", -0.1), ("max_iterations", 0), ("max_iterations", 2.5)])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError) as err:
        MatchingPursuitSAEConfig(d_in=3, d_sae=4, **{field: value})
    assert err.value.field == field


@pytest.mark.interop
def test_matches_sae_lens_encoder():
    mp = pytest.importorskip("sae_lens.saes.matching_pursuit_sae")
    gen = torch.Generator().manual_seed(8)
    W = torch.randn(30, 6, generator=gen, dtype=torch.float64)
    W = W / W.norm(dim=1, keepdim=True)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    for threshold, stop_dup, iters in [(0.3, True, None), (0.0, False, 5), (0.0, True, 8)]:
        sae = _sae(W, residual_threshold=threshold, stop_on_duplicate_support=stop_dup, max_iterations=iters)
        theirs = mp._encode_matching_pursuit(x, W, threshold, iters, stop_dup)
        torch.testing.assert_close(sae.encode(x), theirs)


def test_config_for_l0_is_synthsaebench():
    cfg = MatchingPursuitSAE.config_for_l0(d_in=8, d_sae=32, l0=25.0, total_steps=300)
    assert (cfg.residual_threshold, cfg.max_iterations, cfg.stop_on_duplicate_support) == (0.0, 25, False)
    assert cfg.decoder_init_norm == 1.0
