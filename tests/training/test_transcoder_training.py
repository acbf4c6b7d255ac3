"""Transcoders and skip-transcoders through the one trainer, judged against a transcoder world's truth.

Worlds here are small (`small_world`) so each test takes seconds; the numbers behind the bounds are in
the comments where they are asserted.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from saelab.cli import main
from saelab.data import TensorSource
from saelab.errors import ConfigError
from saelab.metrics.transcoder import evaluate_transcoder
from saelab.saes.base import transcoder_fields
from saelab.saes.registry import get_sae_class
from saelab.synthetic import TranscoderWorld, save_transcoder_world
from saelab.training.trainer import TrainConfig, Trainer, read_checkpoint
from tests.training.transcoder_worlds import least_squares_skip, small_world

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def world(single_torch_thread) -> TranscoderWorld:
    return small_world()


def transcoders(d_in: int, d_out: int, total_steps: int, width: int = 32, l0: float = 3.0) -> dict:
    """A skip and a plain transcoder of several architectures (the ones whose state differs in kind)."""
    saes = {}
    for i, (arch, skip) in enumerate([("batchtopk", True), ("matryoshka", True), ("jumprelu", True), ("topk", False)]):
        cls = get_sae_class(arch)
        torch.manual_seed(i)
        saes[f"{arch}-{skip}"] = cls(cls.config_for_l0(d_in, width, l0, total_steps, **transcoder_fields(d_out, skip)))
    return saes


def train_pair(world: TranscoderWorld, seed: int = 0) -> dict:
    """A plain and a skip BatchTopK transcoder (width 32, L0 3) trained together on 40k pairs."""
    world.manual_seed(seed)
    cfg = TrainConfig(
        samples=40_000, batch_size=256, lr=1e-2, lr_decay_fraction=1 / 3, dead_feature_window=50, precision="fp32"
    )
    cls = get_sae_class("batchtopk")
    saes = {}
    for kind in ("plain", "skip"):
        torch.manual_seed(seed)
        fields = transcoder_fields(world.d_out, kind == "skip")
        saes[kind] = cls(cls.config_for_l0(world.d_in, 32, 3.0, cfg.total_steps, **fields))
    source: Any = world  # a PairedSource (its d_in is a read-only property, which the protocol's check misreads)
    Trainer(saes, source, cfg, progress=False).train()
    return {kind: evaluate_transcoder(sae.to_inference(), world, 20_000, seed=1) for kind, sae in saes.items()}


def test_a_skip_transcoder_recovers_the_skip_and_beats_the_plain_one(world):
    """What a skip can recover: y's part linear in x is S x plus the relay outputs' own linear part
    (x = Σ a_i d_i + b, so a relay g·a_i·u is partly linear in x, and a decoder row g·u − Δd_i
    absorbs any skip error Δ for a feature that has a latent). The skip is pinned by what no latent
    takes, and lands where the least-squares map from x to y does.

    Measured (seeds 0, 1, 2 of this setup): relative skip error 0.246 / 0.244 / 0.235 with the
    least-squares map at 0.247 and a zero skip at 1; FVU skip 0.405 / 0.404 / 0.405 vs plain 0.566 /
    0.565 / 0.567; F1 skip 0.173 / 0.203 / 0.155 vs plain 0.052 / 0.035 / 0.035. The bounds leave
    margins several times the seed-to-seed spread; the 20k evaluation samples put FVU's own noise
    below 0.005."""
    results = train_pair(world)
    S_ED = world.skip_ED.double()
    ols_error = float((least_squares_skip(world) - S_ED).norm() / S_ED.norm())
    skip, plain = results["skip"], results["plain"]
    assert skip.skip_rel_error is not None and plain.skip_rel_error is None
    assert skip.skip_rel_error < 0.35
    assert skip.skip_rel_error < ols_error + 0.05  # as close to S as any linear map from x gets
    assert skip.fvu < plain.fvu - 0.08
    assert skip.f1 > plain.f1 + 0.05


def test_without_a_true_skip_the_learned_skip_stays_small(world):
    """On the same world with S = 0, the skip learns only the relays' linear part: measured ‖Ŝ‖_F 1.25 /
    1.26 / 1.30 (seeds 0, 1, 2), below the least-squares map's 1.42, against ‖S‖_F 5.74 where
    skip_scale is 1.5."""
    zero = small_world(skip_scale=0.0)
    skip = train_pair(zero)["skip"]
    assert skip.skip_rel_error is None and skip.skip_norm is not None  # no S to compare with
    assert skip.skip_norm < 0.3 * float(world.skip_ED.norm())
    assert skip.skip_norm < 1.1 * float(least_squares_skip(zero).norm())


def test_dense_input_noise_pins_the_skip_to_S():
    """With ξ (input_noise_std 0.6) a decoder row can no longer take the skip's error (S acts on ξ, which
    no sparse latent reproduces), so the skip moves toward S and, where S = 0, toward 0. Measured
    (seeds 0, 1, 2): relative error 0.164 / 0.158 / 0.172 against 0.246 / 0.244 / 0.235 without ξ
    (the test above); with S = 0, ‖Ŝ‖_F 0.78 / 0.86 / 0.80 against 1.25 / 1.26 / 1.30 without ξ. The
    bounds sit halfway between the two regimes, several seed-to-seed spreads from each."""
    noisy = small_world(input_noise_std=0.6)
    skip = train_pair(noisy)["skip"]
    assert skip.skip_rel_error is not None and skip.skip_rel_error < 0.2
    zero = train_pair(small_world(skip_scale=0.0, input_noise_std=0.6))["skip"]
    assert zero.skip_norm is not None and zero.skip_norm < 1.03


RESUME_CFG: dict[str, Any] = dict(
    samples=128 * 16,
    batch_size=128,
    lr=3e-3,
    log_every=4,
    checkpoint_minutes=0,
    precision="fp32",
    n_batches_for_norm_estimate=4,
    dead_feature_window=4,  # AuxK's dead-latent state is part of what must resume exactly
)


def test_checkpoint_and_resume_of_transcoders_match_an_uninterrupted_run(world, tmp_path):
    """The world's stream position is in the checkpoint: a run killed after its step-10 checkpoint and
    resumed ends with exactly the weights of a run never interrupted (the JumpReLU normalises its
    inputs, so the input scale is checkpointed too)."""
    cfg = TrainConfig(**RESUME_CFG)
    world.manual_seed(0)
    straight = Trainer(transcoders(world.d_in, world.d_out, cfg.total_steps), world, cfg, progress=False)
    straight.train()

    ckpt = tmp_path / "ckpt"
    world.manual_seed(0)
    first = Trainer(
        transcoders(world.d_in, world.d_out, cfg.total_steps),
        world,
        TrainConfig(**{**RESUME_CFG, "checkpoint_every": 10}),
        checkpoint_path=ckpt,
        progress=False,
    )
    original = world.next_pair

    def next_pair(n):  # a crash two steps after the checkpoint of step 10
        if first.step == 12:
            raise RuntimeError("crash")
        return original(n)

    world.next_pair = next_pair  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="crash"):
            first.train()
    finally:
        del world.next_pair
    assert read_checkpoint(ckpt)["step"] == 10
    world.manual_seed(99)  # the checkpoint, not this, decides where the stream continues
    resumed = Trainer(transcoders(world.d_in, world.d_out, cfg.total_steps), world, cfg, progress=False)
    resumed.load_checkpoint(ckpt)
    resumed.train()
    for name, sae in straight.saes.items():
        assert "W_skip_ED" in sae.state_dict() or not sae.cfg.skip
        for key, value in sae.state_dict().items():
            torch.testing.assert_close(resumed.saes[name].state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_transcoders_need_paired_data_of_their_width(world):
    cfg = TrainConfig(**RESUME_CFG)
    saes = transcoders(world.d_in, world.d_out, cfg.total_steps)
    x_ND = torch.randn(64, world.d_in)
    with pytest.raises(ConfigError, match="no targets"):
        Trainer(saes, TensorSource(x_ND), cfg, progress=False)
    with pytest.raises(ConfigError, match="d_out"):
        Trainer(saes, TensorSource(x_ND, torch.randn(64, world.d_out + 1)), cfg, progress=False)


def test_a_tensor_source_with_targets_trains_a_transcoder_and_an_sae_side_by_side():
    """An autoencoder trained beside a transcoder keeps reconstructing x; the transcoder learns y = x A."""
    g = torch.Generator().manual_seed(0)
    feats_KD = torch.linalg.qr(torch.randn(8, 8, generator=g))[0]
    codes_NK = (torch.rand(2048, 8, generator=g) < 0.2) * (torch.rand(2048, 8, generator=g) + 0.5)
    x_ND = codes_NK @ feats_KD
    y_NE = codes_NK @ torch.randn(8, 5, generator=g)
    cls = get_sae_class("topk")
    torch.manual_seed(0)
    saes = {
        "tc": cls(cls.config_for_l0(8, 16, 2.0, 100, **transcoder_fields(5, False))),
        "ae": cls(cls.config_for_l0(8, 16, 2.0, 100)),
    }
    cfg = TrainConfig(
        samples=128 * 150, batch_size=128, lr=1e-2, log_every=50, dead_feature_window=20, precision="fp32"
    )
    result = Trainer(saes, TensorSource(x_ND, y_NE), cfg, progress=False).train()
    # The logged explained variance is the target's for the transcoder and the input's for the SAE (both
    # reach ~0.9 here; x̂ scored against the other one's target would be far below 0).
    assert result.final_stats["tc"]["explained_variance"] > 0.75
    assert result.final_stats["ae"]["explained_variance"] > 0.75
    assert saes["tc"](x_ND[:4]).shape == (4, 5) and saes["ae"](x_ND[:4]).shape == (4, 8)


def test_a_nan_in_the_targets_stops_training_naming_them():
    from saelab.errors import TrainingDivergedError

    y_NE = torch.randn(256, 3)
    y_NE[5, 1] = float("nan")
    cls = get_sae_class("batchtopk")
    sae = cls(cls.config_for_l0(4, 8, 2.0, 10, **transcoder_fields(3, True)))
    cfg = TrainConfig(samples=256, batch_size=256, lr=1e-3, precision="fp32")
    with pytest.raises(TrainingDivergedError, match="targets hold 1 NaN"):
        Trainer({"tc": sae}, TensorSource(torch.randn(256, 4), y_NE), cfg, progress=False).train()


# ----- the command line ----------------------------------------------------------------------------------------
def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


TRANSCODER_KEYS = ("f1", "mcc", "fvu", "skip_rel_error", "computing_features_recovered", "run_dir")


@pytest.fixture(scope="module")
def world_dir(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("tc-world") / "world"
    save_transcoder_world(world, str(path))
    return path


def train_args(world_dir, out, kind):
    return (
        "train",
        "--data",
        str(world_dir),
        "--arch",
        "batchtopk",
        "--transcoder",
        kind,
        "--l0",
        "3",
        "--width",
        "32",
        "--samples",
        "20k",
        "--batch-size",
        "256",
        "--lr",
        "3e-3",
        "--eval-samples",
        "4k",
        "--precision",
        "fp32",
        "--out",
        str(out),
        "--json",
    )


def test_cli_trains_and_evaluates_skip_and_plain_transcoders(world_dir, tmp_path, capsys):
    code, out, err = run_cli(capsys, *train_args(world_dir, tmp_path / "skip", "skip"))
    assert code == 0, err
    (line,) = json_lines(out)
    for key in TRANSCODER_KEYS:
        assert key in line, key
    assert line["skip_rel_error"] is not None and 0 < line["fvu"] < 1 and line["run_dir"] == str(tmp_path / "skip")
    sae_dir = tmp_path / "skip" / "saes" / "batchtopk-l0_3"
    assert json.loads((sae_dir / "cfg.json").read_text())["architecture"] == "jumprelu_skip_transcoder"
    # `saelab eval` scores the saved transcoder on the world and gives the same keys (its own samples).
    code, out, err = run_cli(
        capsys, "eval", "--sae", str(sae_dir), "--data", str(world_dir), "--samples", "4k", "--json"
    )
    assert code == 0, err
    (scored,) = json_lines(out)
    for key in TRANSCODER_KEYS:
        assert key in scored, key
    assert scored["skip_rel_error"] is not None

    code, out, err = run_cli(capsys, *train_args(world_dir, tmp_path / "plain", "plain"))
    assert code == 0, err
    (line,) = json_lines(out)
    assert (
        line["skip_rel_error"] is None and line["fvu"] is not None and line["computing_features_recovered"] is not None
    )


def test_cli_refuses_a_transcoder_on_data_without_targets(tiny_synthetic_model_dir, tmp_path, capsys):
    args = list(train_args(tiny_synthetic_model_dir, tmp_path / "no", "skip"))
    code, out, err = run_cli(capsys, *args)
    assert code != 0 and "transcoder" in err and "paired" in err
    assert not (tmp_path / "no").exists()
