"""AbsTopK SAE (SAELens `abstopk`): per-sample top-k by |pre-activation| with signed codes, its
sparse training path and AuxK, saving, and SAELens interop both ways."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.errors import ConfigError
from saelab.saes import StepContext, get_sae_class
from saelab.saes.abstopk import AbsTopKSAE, AbsTopKSAEConfig
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.saes.topk import TopKSAE, TopKSAEConfig

TENSORS = {"W_enc": "W_enc_DL", "b_enc": "b_enc_L", "W_dec": "W_dec_LD", "b_dec": "b_dec_D"}  # SAELens → saelab


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _random_sae(d_in=8, d_sae=24, k=3, seed=0, dtype=torch.float32, **cfg) -> AbsTopKSAE:
    torch.manual_seed(seed)
    sae = AbsTopKSAE(AbsTopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, dtype=str(dtype).removeprefix("torch."), **cfg))
    with torch.no_grad():
        sae.W_dec_LD.mul_(torch.rand(d_sae, 1, dtype=dtype) * 3 + 0.5)  # unequal decoder norms
        sae.b_enc_L.normal_(std=0.1)
        sae.b_dec_D.normal_(std=0.3)
    return sae


def test_registered_under_abstopk():
    assert get_sae_class("abstopk") is AbsTopKSAE
    cfg = AbsTopKSAE.config_for_l0(8, 32, 4.0, 100)
    assert isinstance(cfg, AbsTopKSAEConfig) and cfg.k == 4


def test_codes_are_the_k_largest_magnitudes_with_their_signs():
    sae = _random_sae(d_in=16, d_sae=64, k=5)
    x_BD = torch.randn(50, 16) * 3
    acts_BL = sae.encode(x_BD)
    assert acts_BL.shape == (50, 64) and sae(x_BD).shape == (50, 16)
    assert torch.equal((acts_BL != 0).sum(-1), torch.full((50,), 5))  # exactly k per sample
    with torch.no_grad():
        scores_BL = sae.pre_acts(x_BD) * sae.W_dec_LD.norm(dim=1)
    # Every kept entry is its signed score, and no dropped entry is larger in magnitude.
    kept_BL = acts_BL != 0
    torch.testing.assert_close(acts_BL[kept_BL], scores_BL[kept_BL])
    smallest_kept_B = torch.where(kept_BL, scores_BL.abs(), torch.inf).min(-1).values
    largest_dropped_B = torch.where(kept_BL, -torch.inf, scores_BL.abs()).max(-1).values
    assert torch.all(smallest_kept_B >= largest_dropped_B)
    # Negative codes exist wherever a selected pre-activation was negative.
    assert (acts_BL < 0).any() and torch.equal(acts_BL < 0, kept_BL & (scores_BL < 0))


def test_a_negative_only_input_gives_negative_codes():
    """Plain TopK would give no code at all here (no positive pre-activation); AbsTopK keeps k negatives."""
    sae = AbsTopKSAE(AbsTopKSAEConfig(d_in=2, d_sae=3, k=2, decoder_init_norm=None))
    with torch.no_grad():
        sae.W_enc_DL.copy_(torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]]))
        sae.W_dec_LD.copy_(sae.W_enc_DL.t() / sae.W_enc_DL.t().norm(dim=1, keepdim=True))
        sae.b_enc_L.zero_()
        sae.b_dec_D.zero_()
    x_BD = torch.tensor([[-2.0, -0.5]])
    # h ⊙ ‖W_dec‖ = h = [−2, −0.5, −1.25]: the two largest |h| are latents 0 and 2.
    torch.testing.assert_close(sae.encode(x_BD), torch.tensor([[-2.0, 0.0, -1.25]]))
    topk = TopKSAE(TopKSAEConfig(d_in=2, d_sae=3, k=2))
    topk.load_state_dict(sae.state_dict())
    assert topk.encode(x_BD).count_nonzero() == 0  # TopK keeps positive pre-activations only


def test_training_forward_matches_a_dense_reference_and_has_exactly_k():
    """The sparse path's loss and gradients equal autograd through the dense SAELens-style formula."""
    sae = _random_sae(d_in=12, d_sae=48, k=5, dtype=torch.float64, aux_loss_coefficient=0.0)
    x_BD = torch.randn(32, 12, dtype=torch.float64)
    out = sae.train_forward(x_BD, StepContext(0, 1))
    assert out.l0.item() == 5.0
    out.loss.backward()
    grads = {n: _grad(p).clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    norms_L = sae.W_dec_LD.norm(dim=1)
    scores_BL = ((x_BD - sae.b_dec_D) @ sae.W_enc_DL + sae.b_enc_L) * norms_L
    idx_BK = scores_BL.detach().abs().topk(5, dim=-1).indices
    acts_BL = torch.zeros_like(scores_BL).scatter(-1, idx_BK, scores_BL.gather(-1, idx_BK))
    reference = ((acts_BL / norms_L) @ sae.W_dec_LD + sae.b_dec_D - x_BD).pow(2).sum(-1).mean()
    reference.backward()
    torch.testing.assert_close(out.loss, reference, rtol=1e-12, atol=1e-12)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.interop
def test_training_losses_and_gradients_match_saelens():
    """Main and AuxK losses (dead latents ranked by |h|, signed) and all gradients equal SAELens's
    AbsTopKTrainingSAE on the same weights, in float64."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.abstopk_sae import AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = _random_sae(d_in=10, d_sae=40, k=4, dtype=torch.float64)
    theirs = AbsTopKTrainingSAE(AbsTopKTrainingSAEConfig(d_in=10, d_sae=40, k=4, dtype="float64"))
    with torch.no_grad():
        for disk_name, attr in TENSORS.items():
            getattr(theirs, disk_name).copy_(getattr(ours, attr))
    dead_L = torch.zeros(40, dtype=torch.bool)
    dead_L[25:] = True  # 15 dead latents > k_aux = 5: AuxK picks 5 of them per sample, scale 1
    x_BD = torch.randn(24, 10, dtype=torch.float64) * 2
    out = ours.train_forward(x_BD, StepContext(0, 1, dead_mask_L=dead_L))
    their_out = theirs.training_forward_pass(
        TrainStepInput(sae_in=x_BD, coefficients={}, dead_neuron_mask=dead_L, n_training_steps=0, is_logging_step=False)
    )
    torch.testing.assert_close(out.losses["mse"], their_out.losses["mse_loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        out.losses["aux"], their_out.losses["auxiliary_reconstruction_loss"], rtol=1e-10, atol=1e-12
    )
    assert out.losses["aux"].item() > 0
    out.loss.backward()
    their_out.loss.backward()
    for disk_name, attr in TENSORS.items():
        torch.testing.assert_close(
            getattr(ours, attr).grad, getattr(theirs, disk_name).grad, rtol=1e-9, atol=1e-11, msg=disk_name
        )


def test_aux_loss_ranks_dead_latents_by_magnitude():
    """With one dead latent strongly negative on every sample, AuxK must train it (TopK's ranking
    by signed value would pick the others)."""
    sae = _random_sae(d_in=8, d_sae=24, k=2)
    with torch.no_grad():
        sae.b_enc_L[20] = -50.0  # latent 20: large negative pre-activation everywhere
    dead_L = torch.zeros(24, dtype=torch.bool)
    dead_L[16:] = True  # 8 dead latents, k_aux = d_in // 2 = 4 of them per sample
    x_BD = torch.randn(16, 8)
    out = sae.train_forward(x_BD, StepContext(0, 1, dead_mask_L=dead_L))
    out.losses["aux"].backward()
    col_grad_L = _grad(sae.W_enc_DL).abs().sum(0)
    assert col_grad_L[20] > 0


def test_to_inference_folds_norms_and_input_scale():
    sae = _random_sae(normalize_activations="expected_average_only_in")
    sae.input_scale.fill_(2.5)
    x_BD = torch.randn(40, 8) * 3
    inf = sae.to_inference()
    assert isinstance(inf, AbsTopKSAE)
    assert inf.cfg.normalize_activations == "none" and not inf.cfg.rescale_acts_by_decoder_norm
    torch.testing.assert_close(inf.W_dec_LD.norm(dim=1), torch.ones(24))
    torch.testing.assert_close(inf(x_BD), sae(x_BD), rtol=1e-5, atol=1e-5)
    # Codes h·‖W_dec‖ follow the decoder into input units (W_dec/s), as for TopK: same entries, signs kept.
    torch.testing.assert_close(inf.encode(x_BD), sae.encode(x_BD) / 2.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normalize", ["none", "expected_average_only_in"])
def test_save_load_roundtrip(tmp_path, normalize):
    sae = _random_sae(normalize_activations=normalize)
    sae.input_scale.fill_(2.0)
    x_BD = torch.randn(64, 8) * 3
    save_sae(sae, tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "abstopk" and cfg["k"] == 3 and cfg["rescale_acts_by_decoder_norm"] is False
    loaded = load_sae(tmp_path / "s")
    assert isinstance(loaded, AbsTopKSAE)
    torch.testing.assert_close(loaded(x_BD), sae(x_BD), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.encode(x_BD), sae.to_inference().encode(x_BD), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_saelens_loads_what_saelab_saves(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _random_sae(normalize_activations="expected_average_only_in")
    sae.input_scale.fill_(2.0)
    save_sae(sae, tmp_path / "s")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    assert type(theirs).__name__ == "AbsTopKSAE"
    x_BD = torch.randn(64, 8) * 3
    inference = sae.to_inference()
    acts_BL = inference.encode(x_BD)
    assert (acts_BL < 0).any()
    torch.testing.assert_close(theirs.encode(x_BD), acts_BL, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs.decode(acts_BL), inference.decode(acts_BL), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs(x_BD), sae(x_BD), rtol=1e-5, atol=1e-5)


@pytest.mark.interop
def test_saelab_loads_what_saelens_saves(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens.saes.abstopk_sae import AbsTopKTrainingSAE, AbsTopKTrainingSAEConfig

    torch.manual_seed(1)
    theirs = AbsTopKTrainingSAE(AbsTopKTrainingSAEConfig(d_in=8, d_sae=24, k=3))
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_inference_model(str(tmp_path / "s"))
    reloaded = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    ours = load_sae(tmp_path / "s")
    assert isinstance(ours, AbsTopKSAE) and ours.cfg.k == 3
    x_BD = torch.randn(64, 8) * 3
    acts_BL = ours.encode(x_BD)
    assert (acts_BL < 0).any()
    torch.testing.assert_close(acts_BL, reloaded.encode(x_BD), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.decode(acts_BL), reloaded.decode(acts_BL), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours(x_BD), reloaded(x_BD), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [({"k": 0}, "k"), ({"k": 25}, "k"), ({"k": 2.5}, "k"), ({"aux_loss_coefficient": -1.0}, "aux_loss_coefficient")],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as err:
        AbsTopKSAEConfig(d_in=8, d_sae=24, **{"k": 3, **kwargs})
    assert err.value.field == field


def test_short_training_reduces_error_with_exactly_k(tiny_synthetic_model_dir):
    """100 steps on the tiny synthetic model from `config_for_l0` (k = 4): the error falls and every
    fresh sample has exactly k codes, at training time and after conversion to inference."""
    from saelab.data import SyntheticSource
    from saelab.synthetic import load_synthetic_model
    from saelab.training.trainer import TrainConfig, Trainer

    steps, batch = 100, 256
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also keeps the float sums the same on any machine
    try:
        model = load_synthetic_model(tiny_synthetic_model_dir)
        torch.manual_seed(0)
        sae = AbsTopKSAE(AbsTopKSAE.config_for_l0(model.hidden_dim, 48, 4.0, steps))
        untrained = sae.clone()
        cfg = TrainConfig(samples=steps * batch, batch_size=batch, lr=3e-3, dead_feature_window=50)
        trainer = Trainer({"abstopk": sae}, SyntheticSource(model, seed=1), cfg, progress=False)
        trainer.train()
        model.manual_seed(12345)  # fresh samples, never trained on
        x_BD = model.sample(5000)
    finally:
        torch.set_num_threads(before)
    assert trainer.history[-1]["abstopk/l0"] == 4.0
    with torch.no_grad():
        inference = sae.to_inference()
        acts_BL = inference.encode(x_BD)
        mse_after = float((inference.decode(acts_BL) - x_BD).pow(2).sum(-1).mean())
        mse_before = float((untrained(x_BD) - x_BD).pow(2).sum(-1).mean())
    assert torch.equal((acts_BL != 0).sum(-1), torch.full((5000,), 4))
    assert mse_after < 0.3 * mse_before  # measured: 9.5 → 1.8
