import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from saelab.data import TensorSource
from saelab.errors import ConfigError, FileFormatError, TrainingDivergedError
from saelab.training.trainer import TrainConfig, Trainer, build_sae, lr_multiplier, read_checkpoint


def sparse_toy(n=4096, d=16, f=8, p=0.15, seed=0):
    """f orthonormal features in d dims, each firing independently with prob p, magnitude ~U(0.5,1.5)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.linalg.qr(torch.randn(d, f, generator=g))[0].t()
    fires = torch.rand(n, f, generator=g) < p
    mags = torch.rand(n, f, generator=g) + 0.5
    return (fires * mags) @ feats, feats


def test_lr_schedule_warmup_cosine_and_final_decay():
    cfg = TrainConfig(samples=100 * 10, batch_size=10, lr_warmup_steps=10, lr_decay_fraction=0.2)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(50, cfg) == 1.0
    assert lr_multiplier(80, cfg) == pytest.approx(1.0)  # decay starts at step 80: 20 steps left
    assert lr_multiplier(90, cfg) == pytest.approx(0.5)
    assert lr_multiplier(99, cfg) == pytest.approx(0.05)
    cos = TrainConfig(samples=100 * 10, batch_size=10, lr_schedule="cosine", lr_end_factor=0.1)
    assert lr_multiplier(0, cos) == pytest.approx(1.0)
    assert lr_multiplier(50, cos) == pytest.approx(0.55)
    assert lr_multiplier(99, cos) == pytest.approx(0.1, abs=1e-3)


def test_batchtopk_recovers_orthogonal_toy_features():
    torch.manual_seed(0)
    data, feats = sparse_toy()
    sae = build_sae("batchtopk", d_in=16, d_sae=16, k=8 * 0.15, decoder_init_norm=0.1)
    cfg = TrainConfig(samples=256 * 600, batch_size=256, lr=1e-2, log_every=100)
    Trainer({"a": sae}, TensorSource(data), cfg, progress=False).train()
    dec = sae.W_dec_LD.detach() / sae.W_dec_LD.detach().norm(dim=1, keepdim=True)
    best_per_feature = (dec @ feats.t()).abs().max(dim=0).values
    assert best_per_feature.min() > 0.95, best_per_feature


def test_training_many_saes_together_equals_training_each_alone():
    data, _ = sparse_toy(n=1024)
    cfg = TrainConfig(samples=64 * 30, batch_size=64, lr=1e-3, log_every=10)

    def make():
        torch.manual_seed(1)
        return {"a": build_sae("batchtopk", d_in=16, d_sae=12, k=2), "b": build_sae("topk", d_in=16, d_sae=12, k=2)}

    together = make()
    Trainer(together, TensorSource(data), cfg, progress=False).train()
    for name in ("a", "b"):
        alone = {name: make()[name]}
        Trainer(alone, TensorSource(data), cfg, progress=False).train()
        torch.testing.assert_close(alone[name].W_dec_LD, together[name].W_dec_LD, rtol=0, atol=0)


def test_resume_continues_exactly(tmp_path):
    data, _ = sparse_toy(n=1024)
    cfg = TrainConfig(samples=64 * 40, batch_size=64, lr=1e-3, log_every=5, lr_decay_fraction=0.5)

    def make():
        torch.manual_seed(2)
        return {"m": build_sae("matryoshka", d_in=16, d_sae=16, k=2, matryoshka_widths=[4, 8])}

    straight = make()
    Trainer(straight, TensorSource(data), cfg, progress=False).train()

    ckpt = tmp_path / "ckpt"
    half = TrainConfig(**{**cfg.__dict__})
    first = Trainer(make(), TensorSource(data), half, checkpoint_path=ckpt, progress=False)
    # Stop after 15 steps by training a run whose loop we cut short.
    first.cfg = cfg
    total = cfg.total_steps
    while first.step < 15:
        x = first.source.next_batch(cfg.batch_size)
        for state in first.states.values():
            first._train_step(state, x)
        first.step += 1
    first.save_checkpoint(ckpt)

    resumed = make()
    trainer = Trainer(resumed, TensorSource(data), cfg, checkpoint_path=ckpt, progress=False)
    trainer.load_checkpoint(ckpt)
    assert trainer.step == 15
    trainer.train()
    assert trainer.step == total
    for key, value in straight["m"].state_dict().items():
        torch.testing.assert_close(resumed["m"].state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_resume_with_another_config_names_the_field(tmp_path):
    data, _ = sparse_toy(n=256)
    cfg = TrainConfig(samples=64 * 4, batch_size=64, log_every=2)
    ckpt = tmp_path / "c"
    Trainer(
        {"a": build_sae("topk", d_in=16, d_sae=8, k=2)}, TensorSource(data), cfg, checkpoint_path=ckpt, progress=False
    ).train()
    other = Trainer({"a": build_sae("topk", d_in=16, d_sae=8, k=3)}, TensorSource(data), cfg, progress=False)
    with pytest.raises(ConfigError, match=r"a\.k"):
        other.load_checkpoint(ckpt)
    other_lr = Trainer(
        {"a": build_sae("topk", d_in=16, d_sae=8, k=2)},
        TensorSource(data),
        TrainConfig(samples=64 * 4, batch_size=64, lr=1e-3),
        progress=False,
    )
    with pytest.raises(ConfigError, match="lr"):
        other_lr.load_checkpoint(ckpt)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FileFormatError):
        other.load_checkpoint(tmp_path / "junk.pt")


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    data, _ = sparse_toy(n=64 * 20)
    data[64 * 12 + 3, 0] = float("nan")  # first seen at step 12
    ckpt = tmp_path / "ckpt"
    cfg = TrainConfig(samples=64 * 20, batch_size=64, checkpoint_every=5, log_every=5)
    trainer = Trainer(
        {"a": build_sae("batchtopk", d_in=16, d_sae=8, k=2)},
        TensorSource(data),
        cfg,
        checkpoint_path=ckpt,
        progress=False,
    )
    with pytest.raises(TrainingDivergedError, match="step 12"):
        trainer.train()
    saved = read_checkpoint(ckpt)
    assert saved["step"] == 10
    assert all(torch.isfinite(v).all() for v in saved["saes"]["a"]["state_dict"].values())


def test_mismatched_width_is_a_clear_error():
    with pytest.raises(ConfigError, match="d_in"):
        Trainer(
            {"a": build_sae("topk", d_in=8, d_sae=8, k=2)},
            TensorSource(torch.randn(10, 16)),
            TrainConfig(),
            progress=False,
        )
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=-1.0)


def test_dead_latents_are_tracked_and_only_aux_loss_moves_them():
    data, _ = sparse_toy(n=2048)
    moved = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        sae = build_sae("topk", d_in=16, d_sae=32, k=1, aux_loss_coefficient=coef)
        with torch.no_grad():
            sae.b_enc_L[16:] = -100.0  # half the latents can never win the top-k
        cfg = TrainConfig(samples=128 * 200, batch_size=128, lr=1e-2, dead_feature_window=20, log_every=50)
        trainer = Trainer({"a": sae}, TensorSource(data), cfg, progress=False)
        trainer.train()
        assert trainer.states["a"].last["dead_latents"] >= 16
        moved[coef] = float((sae.b_enc_L[16:].detach() + 100.0).abs().sum())
    assert moved[0.0] == 0.0  # no gradient reaches latents that never fire
    assert moved[1.0] > 0.1  # AuxK trains them on the residual


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, time
    from saelab.data import TensorSource
    from saelab.training.trainer import TrainConfig, Trainer, build_sae
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4096, 16, generator=g)
    torch.manual_seed(3)
    cfg = TrainConfig(samples=64 * 800, batch_size=64, checkpoint_every=20, log_every=20, lr=1e-3)
    trainer = Trainer({"a": build_sae("batchtopk", d_in=16, d_sae=32, k=2)}, TensorSource(data), cfg,
                      checkpoint_path=sys.argv[1], progress=False)
    if sys.argv[2] == "resume":
        trainer.load_checkpoint(sys.argv[1])
    trainer.train()
    torch.save(trainer.saes["a"].state_dict(), sys.argv[3])
    """
)


def test_checkpoint_survives_a_kill_and_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "fresh", str(tmp_path / "killed.pt")], env=env)
    deadline = time.time() + 60
    while not (ckpt / "checkpoint.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (tmp_path / "killed.pt").exists()
    subprocess.run(
        [sys.executable, str(script), str(ckpt), "resume", str(tmp_path / "resumed.pt")], env=env, check=True
    )
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "other"), "fresh", str(tmp_path / "straight.pt")],
        env=env,
        check=True,
    )
    resumed = torch.load(tmp_path / "resumed.pt")
    straight = torch.load(tmp_path / "straight.pt")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
