"""Inference thresholds of the BatchTopK family after short runs (issue 15).

The saved JumpReLU threshold used to be a plain EMA started at 0: after 100 steps it was 63% of the
cuts it averaged, and those cuts lagged the growing activations, so the inference SAE fired far more
latents than asked (L0 276 at target 16 on synth-mini after 100k samples)."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.data import SyntheticSource
from saelab.saes import get_sae_class
from saelab.saes.saelens_format import load_sae, save_sae
from saelab.synthetic import load_synthetic_model
from saelab.training.trainer import TrainConfig, Trainer

STEPS, BATCH, WIDTH, K = 100, 256, 64, 4.0
N_EVAL = 50_000
# z for a two-sided tail of 1e-5 (normal approximation; the mean of 50k bounded counts is very
# close to normal): the measured L0 mean is within Z·se of the SAE's true mean L0 but for 1e-5.
Z = 4.42


@pytest.fixture(scope="module")
def trained(tiny_synthetic_model_dir):
    """batchtopk, matryoshka, recipe (its per-step thresholds; leave-one-out off, since it prunes
    below k by design) and multi_l0, trained together for 100 steps on the tiny synthetic model."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; also keeps the float sums the same on any machine
    try:
        model = load_synthetic_model(tiny_synthetic_model_dir)
        saes = {}
        for i, (arch, options) in enumerate(
            [("batchtopk", {}), ("matryoshka", {}), ("recipe", {"leave_one_out": False}), ("multi_l0", {})]
        ):
            torch.manual_seed(i)
            cls = get_sae_class(arch)
            saes[arch] = cls(cls.config_for_l0(model.hidden_dim, WIDTH, K, STEPS, **options))
        cfg = TrainConfig(samples=STEPS * BATCH, batch_size=BATCH, lr=3e-3)
        Trainer(saes, SyntheticSource(model, seed=1), cfg, progress=False).train()
        model.manual_seed(12345)  # fresh samples, never trained on
        x_eval = model.sample(N_EVAL)
    finally:
        torch.set_num_threads(before)
    return saes, x_eval


def _l0_and_se(sae, x):
    l0_B = (sae.encode(x) != 0).sum(-1).double()
    return float(l0_B.mean()), float(l0_B.std()) / math.sqrt(len(l0_B))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "recipe", "multi_l0"])
def test_inference_l0_is_the_target_after_100_steps(trained, arch):
    saes, x_eval = trained
    inference = saes[arch].to_inference()
    l0, se = _l0_and_se(inference, x_eval)
    # Sampling noise is far below the 10% tolerance: Z·se under 2% of K (so a pass or fail is the
    # SAE's doing, not the sample's, but for a 1e-5 chance).
    assert Z * se < 0.02 * K, se
    assert abs(l0 - K) <= 0.1 * K, f"{arch}: inference L0 {l0:.3f} (± {se:.3f}) for target {K}"


def test_saved_threshold_is_the_calibrated_one(trained, tmp_path):
    saes, x_eval = trained
    save_sae(saes["batchtopk"], tmp_path / "s")
    l0, _ = _l0_and_se(load_sae(tmp_path / "s"), x_eval)
    assert abs(l0 - K) <= 0.1 * K


def test_training_ema_is_bias_corrected(trained):
    """Without batches to recalibrate on (a loaded or resumed SAE), the bias-corrected EMA is used:
    after 100 steps at rate 0.01 its weight is 1 − 0.99¹⁰⁰ and θ is the average cut, not 63% of it."""
    saes, _ = trained
    sae = saes["batchtopk"]
    assert float(sae.topk_threshold_weight) == pytest.approx(1 - 0.99**STEPS, rel=1e-9)
    calibrated = float(sae.calibrated_clone().topk_threshold)
    # The EMA lags the growing activations, but is nowhere near the 63% an uncorrected EMA gives.
    assert 0.7 * calibrated < float(sae.topk_threshold) <= calibrated


def test_calibration_does_not_touch_the_training_state(trained):
    saes, _ = trained
    sae = saes["recipe"]
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sae.to_inference()
    for key, value in sae.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)


def test_old_checkpoints_without_the_weight_buffer_still_load():
    cls = get_sae_class("batchtopk")
    sae = cls(cls.config_class(d_in=8, d_sae=16, k=2))
    state = sae.state_dict()
    del state["topk_threshold_weight"]
    state["topk_threshold"] = torch.tensor(0.25, dtype=torch.float64)
    sae.load_state_dict(state)  # strict: the missing weight is filled in, not an error
    assert float(sae.topk_threshold_weight) == 1.0 and float(sae.topk_threshold) == 0.25
