import json
import math

import pytest
import torch

import saelab.saes.kernels
from saelab.errors import ConfigError
from saelab.saes import StepContext, get_sae_class
from saelab.saes.kernels import SparseActs, gather_matmul, least_squares_values
from saelab.saes.multi_l0 import MultiL0SAE
from saelab.saes.recipe import RecipeSAE, RecipeSAEConfig, term_mean
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.saes.topk_family import select_batch_topk

CTX = StepContext(step=0, total_steps=1)


def _recipe(dtype="float64", seed=0, **overrides) -> RecipeSAE:
    torch.manual_seed(seed)
    cfg = {
        "d_in": 12,
        "d_sae": 48,
        "k": 5,
        "matryoshka_widths": [4, 16],
        "aux_loss_coefficient": 0.0,
        "dtype": dtype,
        **overrides,
    }
    sae = RecipeSAE(RecipeSAEConfig(**cfg))
    with torch.no_grad():
        sae.b_dec_D.normal_(std=0.3)
        sae.b_enc_L.normal_(std=0.1)
        sae.W_dec_LD.mul_(torch.rand(cfg["d_sae"], 1, dtype=sae.W_dec_LD.dtype) + 0.5)  # unequal decoder norms
    return sae


def _dense_reference(sae: RecipeSAE, x, selections, rank_L):
    """The recipe's loss written densely with autograd everywhere, given the per-step selections."""
    cfg = sae.cfg
    x_tilde = x - sae.b_dec_D
    norms = sae.W_dec_LD.norm(dim=1)
    U = sae.W_dec_LD / norms[:, None]
    scores = (x_tilde @ sae.W_enc_DL + sae.b_enc_L) * norms
    for t, (b, l) in enumerate(selections):
        torch.testing.assert_close(  # the dense computation picks the same entries
            torch.stack(select_batch_topk(scores.detach(), sae.current_k(CTX))), torch.stack([b, l]), rtol=0, atol=0
        )
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[b, l] = True
        z = torch.where(mask, scores, torch.zeros_like(scores))
        if t < cfg.ista_steps:
            r = x_tilde - z @ U
            scores = scores + sae.ista_eta_T[t] * (r @ sae.W_enc_DL) * norms

    def term(err):
        ell = err.pow(2).sum(-1)
        w = torch.softmax(cfg.tilt * ell.detach() / ell.detach().mean(), 0)
        return (w * ell).sum()

    loss = term(z @ U + sae.b_dec_D - x)
    widths = sae.level_widths()
    position = torch.arange(48) if rank_L is None else rank_L
    level_L = torch.bucketize(position, torch.tensor(widths), right=True)
    partial = None
    for level in range(len(widths) - 1):
        delta = (z * (level_L == level)) @ U
        if partial is None:
            partial = sae.b_dec_D + delta
        else:
            partial = (partial.detach() if cfg.detach_inner else partial) + delta
        loss = loss + term(partial - x)
    return loss


@pytest.mark.parametrize(
    "ista_steps,learn_eta,detach",
    [(1, False, True), (1, True, True), (2, False, False), (2, True, True), (0, False, True)],
)
def test_ista_sparse_backward_matches_dense_autograd(ista_steps, learn_eta, detach):
    sae = _recipe(ista_steps=ista_steps, learn_eta=learn_eta, detach_inner=detach, tilt=0.5)
    with torch.no_grad():
        if learn_eta:
            sae.ista_eta_T.copy_(torch.tensor([0.3, 0.45][:ista_steps], dtype=torch.float64))
        sae.latent_freq_L.copy_(torch.rand(48, dtype=torch.float64))  # non-trivial level order
        sae.latent_freq_initialized.fill_(True)
    x = torch.randn(32, 12, dtype=torch.float64)
    captured = {}
    original = sae.ista

    def spy(*args, **kwargs):
        trace = original(*args, **kwargs)
        captured["sel"] = [(a.batch_idx, a.latent_idx) for a in trace.steps]
        return trace

    sae.ista = spy
    out = sae.train_forward(x, CTX)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = _dense_reference(sae, x, captured["sel"], sae.level_order())
    ref.backward()
    assert set(grads) == {n for n, _ in sae.named_parameters()}
    assert ("ista_eta_T" in grads) == learn_eta
    torch.testing.assert_close(out.loss, ref, rtol=1e-10, atol=1e-10)
    for name, p in sae.named_parameters():
        assert p.grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)


def test_gather_matmul_gradients_match_dense():
    torch.manual_seed(0)
    A = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0, 0, 2, 3, 3, 3, 5])
    l = torch.tensor([1, 8, 1, 0, 4, 8, 2])
    g = torch.randn(7, dtype=torch.float64)
    (gather_matmul(A, W, (A @ W).detach(), b, l) * g).sum().backward()
    ga, gw = A.grad.clone(), W.grad.clone()
    A.grad = W.grad = None
    ((A @ W)[b, l] * g).sum().backward()
    torch.testing.assert_close(ga, A.grad)
    torch.testing.assert_close(gw, W.grad)


def test_k_annealing_schedule_values():
    lin = _recipe(k=25, k_initial=60, k_anneal_fraction=0.5, d_sae=64, matryoshka_widths=[8])
    cos = _recipe(k=25, k_initial=60, k_anneal_fraction=0.5, k_anneal_shape="cosine", d_sae=64, matryoshka_widths=[8])
    at = lambda sae, step: sae.current_k(StepContext(step=step, total_steps=100))
    assert [at(lin, s) for s in (0, 10, 25, 50, 99)] == pytest.approx([60, 53, 42.5, 25, 25])
    assert at(cos, 10) == pytest.approx(25 + 17.5 * (1 + math.cos(0.2 * math.pi)))
    assert [at(cos, s) for s in (0, 25, 50, 80)] == pytest.approx([60, 42.5, 25, 25])
    assert lin.current_k(None) == 25 and _recipe().current_k(StepContext(step=0, total_steps=10)) == 5
    with torch.no_grad():
        lin.b_enc_L.add_(10.0)  # all scores positive, so BatchTopK fills its quota
    # The training step uses it (fractional k: int(k·B) entries in the batch).
    out = lin.train_forward(torch.randn(40, 12, dtype=torch.float64), StepContext(step=10, total_steps=100))
    assert out.l0.item() == pytest.approx(int(53 * 40) / 40) and out.metrics["k"] == pytest.approx(53)


def test_frequency_ema_and_ordering_changes_level_membership():
    sae = _recipe(ista_steps=0, frequency_ema=0.9, tilt=0.0)
    x = torch.randn(32, 12, dtype=torch.float64)
    sae.train_forward(x, CTX)
    first = sae.latent_freq_L.clone()
    assert first.sum() == pytest.approx(5.0) and bool(sae.latent_freq_initialized)  # first batch copied
    sae.train_forward(x, CTX)
    torch.testing.assert_close(sae.latent_freq_L, 0.9 * first + 0.1 * first)  # same batch: fixed point
    # Hand-set frequencies: the 4 most frequent latents are 44..47, so they form the first level.
    with torch.no_grad():
        sae.latent_freq_L.copy_(torch.arange(48, dtype=torch.float64) / 48)
    rank = sae.level_order()
    assert rank[47] == 0 and rank[0] == 47
    sae.zero_grad()
    with torch.no_grad():
        sae.b_enc_L[44:].add_(5.0)  # make them fire
    out = sae.train_forward(x, CTX)
    out.losses["mse_4"].backward()
    rows = sae.W_dec_LD.grad.abs().sum(1)
    assert torch.all(rows[:44] == 0) and torch.all(rows[44:] > 0)
    unsorted = _recipe(ista_steps=0, frequency_sort=False, tilt=0.0)
    assert unsorted.level_order() is None
    with torch.no_grad():
        unsorted.b_enc_L[:4].add_(5.0)
    unsorted.train_forward(x, CTX).losses["mse_4"].backward()
    rows = unsorted.W_dec_LD.grad.abs().sum(1)
    assert torch.all(rows[4:] == 0) and torch.all(rows[:4] > 0)


@pytest.mark.parametrize("detach", [True, False])
def test_detach_inner_blocks_inner_loss_gradient_into_earlier_levels(detach):
    sae = _recipe(ista_steps=0, frequency_sort=False, detach_inner=detach, tilt=0.0, k=10)
    with torch.no_grad():
        sae.b_enc_L.add_(1.0)  # every level fires
    out = sae.train_forward(torch.randn(32, 12, dtype=torch.float64), CTX)
    fired = out.fired_L
    assert fired[:4].any() and fired[4:16].any()
    out.losses["mse_16"].backward()  # level 1 = latents 4..15
    dec, enc = sae.W_dec_LD.grad.abs().sum(1), sae.W_enc_DL.grad.abs().sum(0)
    got_grad = dec > 0
    assert torch.equal(got_grad[4:16], fired[4:16]) and torch.equal(enc[4:16] > 0, fired[4:16])
    assert torch.all(dec[16:] == 0) and torch.all(enc[16:] == 0)
    if detach:
        # (b_dec still gets gradient: it enters the level-1 codes through the encoder input x − b_dec.)
        assert torch.all(dec[:4] == 0) and torch.all(enc[:4] == 0)
    else:
        assert torch.equal(got_grad[:4], fired[:4]) and sae.b_dec_D.grad.abs().sum() > 0
    # The full-width MSE is never detached: it reaches every level.
    sae.zero_grad()
    out = sae.train_forward(torch.randn(32, 12, dtype=torch.float64), CTX)
    out.losses["mse"].backward()
    assert torch.equal(sae.W_dec_LD.grad.abs().sum(1) > 0, out.fired_L)


def test_term_weights_hand_computed():
    ell = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    t = 0.5
    e = [math.exp(t * v / 2.0) for v in (1.0, 2.0, 3.0)]
    w = [v / sum(e) for v in e]
    loss = term_mean(ell, t)
    assert loss.item() == pytest.approx(sum(wi * li for wi, li in zip(w, (1, 2, 3))))
    loss.backward()
    torch.testing.assert_close(ell.grad, torch.tensor(w, dtype=torch.float64))  # weights are detached
    assert term_mean(ell, 0.0).item() == pytest.approx(2.0)
    assert term_mean(torch.zeros(3), 0.002).item() == 0.0  # no 0/0


@pytest.mark.parametrize("ista_steps", [0, 1, 2])
def test_inference_equals_training_selection_when_thresholds_are_the_batch_cut(ista_steps):
    sae = _recipe(ista_steps=ista_steps)
    x = torch.randn(32, 12, dtype=torch.float64)
    select = lambda s, t: sae.select(s, None)
    trace = sae.ista(x, select, grad=False, keep_scores=True)
    m = int(sae.cfg.k * 32)
    with torch.no_grad():
        for t, scores in enumerate(trace.all_scores):
            top = scores.flatten().topk(m + 1).values
            sae.ista_thresholds[t] = float((top[m - 1] + top[m]) / 2)  # between the m-th and (m+1)-th
    dense = torch.zeros(32, 48, dtype=torch.float64)
    final = trace.steps[-1]
    dense[final.batch_idx, final.latent_idx] = final.values
    torch.testing.assert_close(sae.encode(x), dense, rtol=0, atol=0)
    # ... and the inference SAE (folded) agrees up to rounding.
    torch.testing.assert_close(sae.to_inference()(x), sae.decode(dense), rtol=1e-9, atol=1e-9)


def test_training_thresholds_track_each_steps_minimum():
    sae = _recipe(ista_steps=2, topk_threshold_lr=0.5)
    x1, x2 = torch.randn(32, 12, dtype=torch.float64), torch.randn(32, 12, dtype=torch.float64)
    mins = [
        torch.stack([a.values.min() for a in sae.ista(x, lambda s, t: sae.select(s, None), grad=False).steps])
        for x in (x1, x2)
    ]
    sae.train_forward(x1, CTX)
    # Bias-corrected EMA: the first observation is taken as is (a plain EMA from 0 would give half of it).
    torch.testing.assert_close(sae.ista_thresholds, mins[0])
    sae.train_forward(x2, CTX)
    # Raw EMA 0.25·m1 + 0.5·m2 divided by its weight 1 − 0.5² = 0.75.
    torch.testing.assert_close(sae.ista_thresholds, (0.25 * mins[0] + 0.5 * mins[1]) / 0.75)
    assert float(sae.topk_threshold) == float(sae.ista_thresholds[-1])


def _set_redundant_toy(sae: RecipeSAE) -> None:
    """Unit decoders e0, e1, (e0+e1)/√2 with encoders giving x = e0 + e1 the codes 1, 1, 0.5; θ = 0.1."""
    s = 1 / math.sqrt(2)
    with torch.no_grad():
        sae.W_dec_LD.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s]]))
        sae.W_enc_DL.copy_(torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 0.25]]))
        sae.b_dec_D.zero_()
        sae.b_enc_L.zero_()
        sae.ista_thresholds.fill_(0.1)


def test_leave_one_out_removes_a_redundant_latent():
    # Unit decoders e0, e1 and (e0+e1)/√2; x = e0 + e1 activates all three with codes 1, 1, 0.5.
    cfg = dict(d_in=2, d_sae=3, k=2, matryoshka_widths=[1], ista_steps=0, dtype="float64")
    sae = RecipeSAE(RecipeSAEConfig(**cfg, leave_one_out=True, loo_scale=1.0))
    plain = RecipeSAE(RecipeSAEConfig(**cfg))
    for m in (sae, plain):
        _set_redundant_toy(m)
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(plain.encode(x), torch.tensor([[1.0, 1.0, 0.5]], dtype=torch.float64))
    # r = −0.5·(e0+e1)/√2: latent 2's leave-one-out coefficient is 0.5 − 0.5 = 0 ≤ τ = 0.1 → pruned;
    # latents 0, 1 score 1 − 0.5/√2 ≈ 0.65 → kept, and the reconstruction becomes exact.
    torch.testing.assert_close(sae.encode(x), torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(sae(x), x)
    sae.cfg.loo_scale = 7.0  # τ = 0.7: above the kept latents' scores (≈ 0.65) too
    assert sae.encode(x).count_nonzero() == 0


def test_config_errors_name_the_field():
    base = dict(d_in=8, d_sae=32, k=4)
    for field, value in [
        ("ista_eta", 0.0),
        ("ista_eta", -1.0),
        ("ista_steps", -1),
        ("k_initial", 3.0),
        ("k_initial", 64.0),
        ("k_anneal_fraction", 0.0),
        ("k_anneal_fraction", 1.5),
        ("k_anneal_shape", "exp"),
        ("frequency_ema", 1.0),
        ("tilt", -0.1),
        ("loo_scale", -1.0),
        ("ista_residual", "omp"),
        ("ls_ridge", 0.0),
        ("ksvd_every", -1),
        ("ksvd_every", 1.5),
        ("ksvd_rate", 0.0),
        ("ksvd_rate", 1.5),
    ]:
        with pytest.raises(ConfigError, match=field):
            RecipeSAEConfig(**base, **{field: value})
    with pytest.raises(ConfigError, match="k_low"):
        MultiL0SAE.config_class(**base, k_low=4)
    with pytest.raises(ConfigError, match="inference_level"):
        MultiL0SAE.config_class(**base, inference_level="mid")


def test_config_for_l0_is_the_full_recipe():
    cfg = get_sae_class("recipe").config_for_l0(768, 4096, 25, 1000)
    assert (cfg.k, cfg.k_initial, cfg.matryoshka_widths) == (25, 60.0, [128, 512, 2048, 4096])
    assert cfg.ista_steps == 1 and cfg.ista_eta == 0.3 and cfg.frequency_sort and cfg.detach_inner
    assert cfg.tilt == 0.002 and cfg.use_matryoshka and cfg.leave_one_out
    assert get_sae_class("recipe").config_for_l0(8, 32, 20, 10).k_initial == 32  # clamped to d_sae


def test_use_matryoshka_false_is_plain_batchtopk_levels():
    sae = _recipe(use_matryoshka=False, ista_steps=0, tilt=0.0)
    out = sae.train_forward(torch.randn(16, 12, dtype=torch.float64), CTX)
    assert set(out.losses) == {"mse"} and sae.level_widths() == [48]


@pytest.mark.parametrize("ista_steps", [1, 2])
def test_aux_loss_on_refined_preacts_matches_dense_autograd(ista_steps):
    sae = _recipe(
        aux_loss_coefficient=0.8,
        ista_steps=ista_steps,
        learn_eta=True,
        use_matryoshka_aux_loss=False,
        tilt=0.0,
        use_matryoshka=False,
    )
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::3] = True  # 16 dead latents, k_aux = d_in // 2 = 6
    x = torch.randn(32, 12, dtype=torch.float64)
    out = sae.train_forward(x, StepContext(0, 1, dead_mask_L=dead))
    out.losses["aux"].backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    # Dense: refined scores h^T (grad through every ISTA step), top-6 dead latents per sample.
    x_tilde = x - sae.b_dec_D
    norms = sae.W_dec_LD.norm(dim=1)
    U = sae.W_dec_LD / norms[:, None]
    scores = (x_tilde @ sae.W_enc_DL + sae.b_enc_L) * norms
    for t in range(ista_steps + 1):
        b, l = select_batch_topk(scores.detach(), 5)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[b, l] = True
        z = torch.where(mask, scores, torch.zeros_like(scores))
        if t < ista_steps:
            scores = scores + sae.ista_eta_T[t] * ((x_tilde - z @ U) @ sae.W_enc_DL) * norms
    residual = (x - (z @ U + sae.b_dec_D)).detach()
    dead_idx = dead.nonzero().squeeze(1)
    pos = scores.detach()[:, dead_idx].topk(6, dim=1).indices
    aux_mask = torch.zeros_like(mask)
    aux_mask.scatter_(1, dead_idx[pos], True)
    recon = torch.where(aux_mask, scores, torch.zeros_like(scores)) @ U
    ref = 0.8 * (recon - residual).pow(2).sum(-1).mean()
    ref.backward()
    torch.testing.assert_close(out.losses["aux"], ref, rtol=1e-10, atol=1e-10)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-9, atol=1e-10, msg=name)
    assert grads["ista_eta_T"].abs().sum() > 0


def test_aux_loss_uses_refined_preacts_and_trains_dead_latents():
    sae = _recipe(aux_loss_coefficient=1.0, ista_steps=1, use_matryoshka_aux_loss=False)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[30:] = True
    out = sae.train_forward(torch.randn(32, 12, dtype=torch.float64), StepContext(0, 1, dead_mask_L=dead))
    assert out.losses["aux"].item() > 0
    out.losses["aux"].backward()
    assert sae.W_enc_DL.grad[:, 30:].abs().sum() > 0
    per_level = _recipe(aux_loss_coefficient=1.0, use_matryoshka_aux_loss=True)
    out = per_level.train_forward(torch.randn(32, 12, dtype=torch.float64), StepContext(0, 1, dead_mask_L=dead))
    assert out.losses["aux"].item() > 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"ista_steps": 1, "normalize_activations": "expected_average_only_in"},
        {"ista_steps": 2, "learn_eta": True},
        {"ista_steps": 0, "leave_one_out": True, "normalize_activations": "expected_average_only_in"},
        {"ista_steps": 1, "leave_one_out": True, "loo_scale": 0.5},
        {"ista_steps": 1, "ista_residual": "least_squares", "ksvd_every": 2},
    ],
)
def test_save_load_roundtrip(tmp_path, overrides):
    sae = _recipe(dtype="float32", **overrides)
    x = torch.randn(64, 12) * 3
    with torch.no_grad():
        sae.input_scale.fill_(2.0)
        if overrides.get("learn_eta"):
            sae.ista_eta_T.copy_(torch.tensor([0.2, 0.4]))
        for _ in range(3):  # realistic thresholds
            sae.train_forward(x, CTX)
    inference = sae.to_inference()
    assert type(inference) is RecipeSAE and not inference.cfg.rescale_acts_by_decoder_norm
    # Fresh inputs: the thresholds are cuts of x's own scores, so on x one entry per step sits exactly at θ.
    x = torch.randn(64, 12) * 3
    expected = inference(x)
    torch.testing.assert_close(sae(x), expected, rtol=1e-4, atol=1e-4)
    assert sae.encode(x).count_nonzero() > 0
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "recipe" and cfg["ista_steps"] == overrides["ista_steps"]
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is RecipeSAE
    torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.ista_thresholds, inference.ista_thresholds)


def test_plain_recipe_saves_as_jumprelu(tmp_path):
    sae = _recipe(dtype="float32", ista_steps=0)
    x = torch.randn(64, 12)
    sae.train_forward(x, CTX)
    save_sae(sae, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["architecture"] == "jumprelu"
    x = torch.randn(64, 12)  # fresh: θ is a cut of the training batch's own scores
    torch.testing.assert_close(load_sae(tmp_path / "s")(x), sae(x), rtol=1e-5, atol=1e-5)


def test_bf16_autocast_step_runs():
    sae = _recipe(dtype="float32", ista_steps=1, aux_loss_coefficient=1.0)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[40:] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sae.train_forward(torch.randn(32, 12), StepContext(0, 1, dead_mask_L=dead))
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in sae.parameters())


# ----- multi_l0 -----------------------------------------------------------------------------------
def _multi(**overrides) -> MultiL0SAE:
    torch.manual_seed(0)
    sae = MultiL0SAE(
        MultiL0SAE.config_class(
            **{
                "d_in": 12,
                "d_sae": 48,
                "k_high": 6,
                "k_low": 2,
                "aux_loss_coefficient": 0.0,
                "dtype": "float64",
                **overrides,
            }
        )
    )
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(48, 1, dtype=torch.float64) + 0.5)
        sae.b_dec_D.normal_(std=0.3)
    return sae


def test_multi_l0_loss_and_gradients_match_dense_nested_selections():
    sae = _multi(low_loss_coefficient=0.7)
    assert sae.cfg.k == 6 and get_sae_class("multi_l0") is MultiL0SAE
    x = torch.randn(32, 12, dtype=torch.float64)
    out = sae.train_forward(x, CTX)
    assert out.l0.item() == pytest.approx(6.0)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    x_tilde = x - sae.b_dec_D
    norms = sae.W_dec_LD.norm(dim=1)
    scores = (x_tilde @ sae.W_enc_DL + sae.b_enc_L) * norms
    loss = 0
    for k, coef in ((6, 1.0), (2, 0.7)):
        b, l = select_batch_topk(scores.detach(), k)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[b, l] = True
        recon = torch.where(mask, scores, 0 * scores) @ (sae.W_dec_LD / norms[:, None]) + sae.b_dec_D
        loss = loss + coef * (recon - x).pow(2).sum(-1).mean()
    loss.backward()
    torch.testing.assert_close(out.loss, loss)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, msg=name)
    assert 0 < float(sae.low_threshold) and float(sae.low_threshold) > float(sae.topk_threshold)


@pytest.mark.parametrize("level", ["high", "low"])
def test_multi_l0_inference_threshold(level):
    sae = _multi(inference_level=level)
    with torch.no_grad():
        sae.topk_threshold.fill_(0.05)
        sae.low_threshold.fill_(0.2)
    inf = sae.to_inference()
    assert inf.architecture == "jumprelu"
    torch.testing.assert_close(inf.threshold_L, torch.full((48,), 0.05 if level == "high" else 0.2))
    assert get_sae_class("multi_l0").config_for_l0(8, 32, 20, 10).k_low == 10


@pytest.mark.interop
def test_saelens_loads_the_plain_recipe_as_jumprelu(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _recipe(dtype="float32", ista_steps=0)
    x = torch.randn(64, 12)
    for _ in range(3):
        sae.train_forward(x, CTX)
    save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_ablation_variants_remove_exactly_one_component(tmp_path):
    from saelab.saes.registry import ablation_names

    names = ablation_names("recipe")
    assert names == [f"recipe-no_{c}" for c in RecipeSAE.ablations]
    full = get_sae_class("recipe").config_for_l0(16, 64, 4, 100)
    for name, (component, overrides) in zip(names, RecipeSAE.ablations.items()):
        cls = get_sae_class(name)
        assert issubclass(cls, RecipeSAE) and cls.architecture == name
        cfg = cls.config_for_l0(16, 64, 4, 100)
        changed = {f for f in vars(full) if getattr(cfg, f) != getattr(full, f)}
        assert changed == set(overrides), (component, changed)
        assert get_sae_class(name).config_for_l0(16, 64, 4, 100, tilt=0.5).tilt == 0.5  # caller overrides win
    # a variant saves and loads under its own name
    sae = get_sae_class("recipe-no_tilt")(get_sae_class("recipe-no_tilt").config_for_l0(16, 64, 4, 100))
    save_sae(sae, tmp_path / "v")
    loaded = load_sae(tmp_path / "v")
    assert loaded.cfg.tilt == 0.0
    with pytest.raises(ConfigError, match="ablate='batchtopk'.*recipe"):
        ablation_names("batchtopk")


def test_recipe_brings_its_own_lr_decay_to_the_trainer():
    from saelab.data import TensorSource
    from saelab.training.trainer import TrainConfig, Trainer

    cls = get_sae_class("recipe")
    saes = {
        "full": cls(cls.config_for_l0(8, 16, 2, 10)),
        "no_decay": get_sae_class("recipe-no_lr_decay")(
            get_sae_class("recipe-no_lr_decay").config_for_l0(8, 16, 2, 10)
        ),
    }
    trainer = Trainer(
        saes,
        TensorSource(torch.randn(64, 8)),
        TrainConfig(samples=160, batch_size=16, lr=1e-3, log_every=1),
        progress=False,
    )
    trainer.train()
    lrs = {n: [h[f"{n}/lr"] for h in trainer.history] for n in saes}
    assert lrs["no_decay"] == [1e-3] * 10
    assert lrs["full"][:7] == [1e-3] * 7 and lrs["full"][-1] == pytest.approx(1e-3 / 3, rel=1e-6)
    with pytest.raises(ConfigError, match="lr_decay_fraction"):
        RecipeSAEConfig(d_in=4, d_sae=8, k=2, matryoshka_widths=[4, 8], lr_decay_fraction=1.5)


@pytest.mark.parametrize("arch", ["matryoshka", "recipe"])
def test_inner_loss_multipliers_scale_each_inner_level_only(arch):
    """Multipliers (innermost first) scale each inner prefix MSE; the full-width MSE is unchanged."""
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = {}
    for multipliers in (None, [0.25, 3.0]):
        torch.manual_seed(0)
        cls = get_sae_class(arch)
        sae = cls(
            cls.config_class(
                d_in=12,
                d_sae=48,
                k=5,
                matryoshka_widths=[4, 16],
                aux_loss_coefficient=0.0,
                dtype="float64",
                inner_loss_multipliers=multipliers,
            )
        )
        outs[str(multipliers)] = sae.train_forward(x, CTX).losses
    plain, weighted = outs["None"], outs["[0.25, 3.0]"]
    torch.testing.assert_close(weighted["mse"], plain["mse"])
    torch.testing.assert_close(weighted["mse_4"], 0.25 * plain["mse_4"])
    torch.testing.assert_close(weighted["mse_16"], 3.0 * plain["mse_16"])


@pytest.mark.parametrize("bad", [[1.0], [1.0, -1.0], [1.0, float("nan")], "2"])
def test_inner_loss_multipliers_validated(bad):
    with pytest.raises(ConfigError, match="inner_loss_multipliers"):
        RecipeSAEConfig(d_in=12, d_sae=48, k=5, matryoshka_widths=[4, 16], inner_loss_multipliers=bad).validate()


@pytest.mark.parametrize("loo_in_training", [False, True])
def test_leave_one_out_in_training_prunes_the_step_codes(loo_in_training):
    """The redundant-latent toy above, trained on: with loo_in_training the step decodes from the
    pruned codes (L0 2, exact reconstruction); without, from all three BatchTopK selections."""
    cfg = dict(
        d_in=2,
        d_sae=3,
        k=3,
        matryoshka_widths=[1],
        ista_steps=0,
        dtype="float64",
        tilt=0.0,
        aux_loss_coefficient=0.0,
        loo_in_training=loo_in_training,
    )
    sae = RecipeSAE(RecipeSAEConfig(**cfg))
    _set_redundant_toy(sae)
    out = sae.train_forward(torch.tensor([[1.0, 1.0]], dtype=torch.float64), CTX)
    if loo_in_training:
        assert float(out.l0) == 2.0
        torch.testing.assert_close(out.losses["mse"], torch.tensor(0.0, dtype=torch.float64))
        out.loss.backward()  # gradients flow through the kept codes
        assert sae.W_enc_DL.grad is not None
    else:
        assert float(out.l0) == 3.0
        torch.testing.assert_close(out.losses["mse"], torch.tensor(0.25, dtype=torch.float64))


def _random_support(B, L, max_per_sample, seed):
    g = torch.Generator().manual_seed(seed)
    batch, latent = [], []
    for b in range(B):
        count = int(torch.randint(0, max_per_sample + 1, (1,), generator=g))  # includes empty samples
        chosen = torch.randperm(L, generator=g)[:count].sort().values
        batch += [b] * count
        latent += chosen.tolist()
    return torch.tensor(batch, dtype=torch.long), torch.tensor(latent, dtype=torch.long)


@pytest.mark.parametrize("max_elements", [2**24, 50])  # one batch, or split down to single samples
def test_least_squares_values_solve_each_samples_normal_equations(monkeypatch, max_elements):
    monkeypatch.setattr(saelab.saes.kernels, "LS_MAX_SYSTEM_ELEMENTS", max_elements)
    torch.manual_seed(0)
    B, L, D, ridge = 9, 20, 8, 1e-3
    U = torch.nn.functional.normalize(torch.randn(L, D, dtype=torch.float64), dim=1).requires_grad_()
    x = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    batch, latent = _random_support(B, L, 6, seed=1)
    acts = SparseActs(batch, latent, torch.zeros(len(batch), dtype=torch.float64), B, L)
    coef = least_squares_values(x, acts, U, ridge)
    for b in range(B):  # each sample's coefficients: (U_S U_Sᵀ + ridge·I)⁻¹ U_S x_b
        rows = U[latent[batch == b]].detach()
        expected = torch.linalg.solve(
            rows @ rows.T + ridge * torch.eye(len(rows), dtype=torch.float64), rows @ x[b].detach()
        )
        torch.testing.assert_close(coef[batch == b].detach(), expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x_, U_: least_squares_values(x_, acts, U_, ridge), (x, U))


def test_least_squares_residual_is_orthogonal_to_the_support_and_scores_match_dense():
    """ista_residual="least_squares": the step-1 scores are h⁰ + η((x̃ − c_LS U) W_enc) ⊙ n, with c_LS the
    (ridge-free in the limit) least-squares fit, whose residual is orthogonal to every selected atom."""
    sae = _recipe(ista_residual="least_squares", ls_ridge=1e-12, ista_steps=1)
    x = torch.randn(16, 12, dtype=torch.float64)
    trace = sae.ista(x, lambda s, t: sae.select(s, None), grad=True, keep_scores=True)
    first = trace.steps[0]
    U = (sae.W_dec_LD / sae.W_dec_LD.norm(dim=1, keepdim=True)).detach()
    x_tilde = (x - sae.b_dec_D).detach()
    fit = SparseActs(first.batch_idx, first.latent_idx, least_squares_values(x_tilde, first, U, 1e-12).detach(), 16, 48)
    r = x_tilde - fit.decode_rows(U)
    assert (r @ U.T)[first.batch_idx, first.latent_idx].abs().max() < 1e-9
    norms = sae.W_dec_LD.norm(dim=1).detach()
    expected = trace.all_scores[0] + sae.ista_eta_T[0] * (r @ sae.W_enc_DL.detach()) * norms
    torch.testing.assert_close(trace.all_scores[1], expected, rtol=1e-10, atol=1e-10)
    final = trace.steps[1]  # the gathered values (with grad) equal the dense scores at the selection
    torch.testing.assert_close(final.values.detach(), expected[final.batch_idx, final.latent_idx])
    final.values.sum().backward()
    # Dense reference with c_LS held constant: every parameter's gradient agrees.
    W_dec, W_enc, b_enc, b_dec = (
        p.detach().clone().requires_grad_() for p in (sae.W_dec_LD, sae.W_enc_DL, sae.b_enc_L, sae.b_dec_D)
    )
    n = W_dec.norm(dim=1)
    xt = x - b_dec
    r_dense = xt - fit.to_dense() @ (W_dec / n[:, None])
    h1 = (xt @ W_enc + b_enc) * n + sae.ista_eta_T[0] * (r_dense @ W_enc) * n
    h1[final.batch_idx, final.latent_idx].sum().backward()
    for param, ref in [(sae.W_dec_LD, W_dec), (sae.W_enc_DL, W_enc), (sae.b_enc_L, b_enc), (sae.b_dec_D, b_dec)]:
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-9, atol=1e-10)


def test_ksvd_update_recovers_the_atoms_of_one_sparse_data_and_keeps_norms():
    """One atom per sample, x_b = z_b·d_j(b): the leave-j-out residual is exactly z_j d_jᵀ, so one
    approximate-K-SVD step puts every fired direction on its true atom; unfired rows stay as they were."""
    torch.manual_seed(0)
    L, D, B = 6, 5, 40
    sae = RecipeSAE(
        RecipeSAEConfig(d_in=D, d_sae=L, k=1, matryoshka_widths=[L], ista_steps=0, dtype="float64", ksvd_every=1)
    )
    true = torch.nn.functional.normalize(torch.randn(L, D, dtype=torch.float64), dim=1)
    with torch.no_grad():
        sae.b_dec_D.zero_()
        sae.W_dec_LD.copy_((true + 0.3 * torch.randn(L, D, dtype=torch.float64)) * torch.linspace(0.5, 2, L)[:, None])
    before = sae.W_dec_LD.detach().clone()
    latent = torch.randint(0, L - 1, (B,))  # atom L-1 never fires
    z = torch.rand(B, dtype=torch.float64) + 0.5
    x = z[:, None] * true[latent]
    fired = sae.ksvd_update(x, SparseActs(torch.arange(B), latent, z, B, L))
    W = sae.W_dec_LD.detach()
    torch.testing.assert_close(W.norm(dim=1), before.norm(dim=1))
    for j in range(L):
        if j in latent.tolist():
            assert fired[j]
            torch.testing.assert_close(W[j] / W[j].norm(), true[j], rtol=1e-10, atol=1e-10)
        else:
            assert not fired[j]
            torch.testing.assert_close(W[j], before[j], rtol=0, atol=0)


def test_ksvd_runs_after_the_optimiser_step_only_on_its_schedule():
    sae = _recipe(ksvd_every=2, ista_steps=1)
    x = torch.randn(16, 12, dtype=torch.float64)
    for step, expect_change in [(1, False), (2, True)]:
        before = sae.W_dec_LD.detach().clone()
        sae.train_forward(x, StepContext(step=step, total_steps=10))
        sae.after_step()
        assert (not torch.equal(sae.W_dec_LD.detach(), before)) == expect_change
        assert sae._ksvd_batch is None  # consumed, never kept to a later step
