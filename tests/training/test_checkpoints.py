"""Checkpoints: safetensors + JSON (never a pickle), atomic, complete, refused when they differ from the run;
divergence that stays finite; SIGINT/SIGTERM; time-based checkpoints."""

import json
import os
import pickle
import signal

import pytest
import torch

from saelab.data import TensorSource
from saelab.errors import ConfigError, FileFormatError, TrainingDivergedError, TrainingInterrupted
from saelab.training import checkpoint as ckpt_io
from saelab.training.trainer import TrainConfig, Trainer, build_sae, read_checkpoint


def toy_data(n=1024, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.linalg.qr(torch.randn(d, 8, generator=g))[0].t()
    fires = torch.rand(n, 8, generator=g) < 0.15
    return (fires * (torch.rand(n, 8, generator=g) + 0.5)) @ feats


def make_saes():
    torch.manual_seed(5)
    return {
        "a": build_sae("batchtopk", d_in=16, d_sae=12, k=2),
        "s": build_sae("standard", d_in=16, d_sae=12, target_l0=2.0),
    }


CFG = dict(samples=64 * 30, batch_size=64, lr=1e-3, log_every=5, checkpoint_minutes=0)


def trainer(ckpt=None, data=None, saes=None, **overrides):
    cfg = TrainConfig(**{**CFG, **overrides})
    source = TensorSource(toy_data() if data is None else data)
    return Trainer(saes or make_saes(), source, cfg, checkpoint_path=ckpt, progress=False)


def partial_trainer(ckpt, steps):
    t = trainer(ckpt)
    t._estimate_input_norms()
    while t.step < steps:
        x = t.source.next_batch(t.cfg.batch_size)
        for state in t.states.values():
            t._train_step(state, x)
        t.step += 1
    return t


def test_checkpoint_is_safetensors_and_json_and_round_trips_exactly(tmp_path):
    ckpt = tmp_path / "ckpt"
    t = partial_trainer(ckpt, 7)
    t.save_checkpoint()
    names = sorted(p.name for p in ckpt.iterdir())
    assert names[0] == "checkpoint.json" and len(names) == 2 and names[1].startswith("tensors-")
    doc = json.loads((ckpt / "checkpoint.json").read_text())
    assert doc["format"] == "saelab-checkpoint-v2" and doc["step"] == 7
    state = read_checkpoint(ckpt)
    opt = state["saes"]["a"]["optimizer"]
    live = t.states["a"].optimizer.state_dict()
    # torch.optim state: int keys, python scalars, a tuple, tensors — all come back as they were
    assert set(opt["state"]) == set(live["state"]) and all(isinstance(k, int) for k in opt["state"])
    assert opt["param_groups"][0]["betas"] == live["param_groups"][0]["betas"] == (0.9, 0.999)
    assert opt["param_groups"][0]["lr"] == live["param_groups"][0]["lr"]
    for k, st in live["state"].items():
        for name, value in st.items():
            torch.testing.assert_close(opt["state"][k][name], value, rtol=0, atol=0)
    torch.testing.assert_close(state["torch_rng"], torch.get_rng_state(), rtol=0, atol=0)
    # a second save replaces the tensors file; only the one checkpoint.json names is left
    partial_trainer(ckpt, 9).save_checkpoint()
    assert len(list(ckpt.glob("tensors-*.safetensors"))) == 1 and read_checkpoint(ckpt)["step"] == 9


class Payload:
    """Unpickling this creates a marker file: proof that loading ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_old_pickle_checkpoint_is_refused_and_nothing_in_it_runs(tmp_path, writer):
    probe = tmp_path / "probe-ran"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()  # the payload is live: unpickling it does run code

    marker = tmp_path / "marker"
    old = tmp_path / "checkpoint.pt"
    if writer == "torch.save":
        torch.save({"format": "saelab-checkpoint-v1", "x": Payload(marker)}, old)
    else:
        old.write_bytes(pickle.dumps({"x": Payload(marker)}))
    t = trainer()
    with pytest.raises(FileFormatError, match="old checkpoint format.*could run code; retrain") as info:
        t.load_checkpoint(old)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_checkpoint_with_a_missing_key_is_a_one_line_error_naming_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    partial_trainer(ckpt, 3).save_checkpoint()
    doc = json.loads((ckpt / "checkpoint.json").read_text())
    for drop, named in [
        (("state", "saes", "a", "optimizer"), "saes.a.optimizer"),
        (("state", "history"), "history"),
        (("state", "saes", "s", "state_dict", "W_dec_LD"), "saes.s.state_dict.W_dec_LD"),
        (("tensors_sha256",), "tensors_sha256"),
    ]:
        broken = json.loads(json.dumps(doc))
        parent = broken
        for key in drop[:-1]:
            parent = parent[key]
        del parent[drop[-1]]
        (ckpt / "checkpoint.json").write_text(json.dumps(broken))
        with pytest.raises(FileFormatError, match=named.replace(".", r"\.")) as info:
            trainer().load_checkpoint(ckpt)
        assert "\n" not in str(info.value) and "missing" in str(info.value)
    (ckpt / "checkpoint.json").write_text(json.dumps(doc))
    trainer().load_checkpoint(ckpt)  # intact again
    tensors = next(ckpt.glob("tensors-*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(FileFormatError, match="corrupt"):
        trainer().load_checkpoint(ckpt)


def test_checkpoint_json_cannot_point_outside_its_folder(tmp_path):
    ckpt = tmp_path / "ckpt"
    partial_trainer(ckpt, 2).save_checkpoint()
    doc = json.loads((ckpt / "checkpoint.json").read_text())
    doc["tensors_file"] = "../elsewhere.safetensors"
    (ckpt / "checkpoint.json").write_text(json.dumps(doc))
    with pytest.raises(FileFormatError, match="tensors_file"):
        trainer().load_checkpoint(ckpt)


def test_a_kill_at_any_point_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    partial_trainer(ckpt, 4).save_checkpoint()

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    newer = partial_trainer(ckpt, 8)
    # killed after the tensors file is written, before checkpoint.json names it
    monkeypatch.setattr(ckpt_io, "write_text_atomic", killed)
    with pytest.raises(Killed):
        newer.save_checkpoint()
    monkeypatch.undo()
    assert len(list(ckpt.glob("tensors-*.safetensors"))) == 2
    assert read_checkpoint(ckpt)["step"] == 4  # the old one, whole
    ckpt_io.clean(ckpt)  # what a run start does: the unnamed tensors file goes
    assert len(list(ckpt.glob("tensors-*.safetensors"))) == 1 and read_checkpoint(ckpt)["step"] == 4
    # killed while the tensors file is being written
    monkeypatch.setattr(ckpt_io, "write_bytes_atomic", killed)
    with pytest.raises(Killed):
        newer.save_checkpoint()
    monkeypatch.undo()
    assert read_checkpoint(ckpt)["step"] == 4
    newer.save_checkpoint()
    assert read_checkpoint(ckpt)["step"] == 8


def test_resume_refuses_any_setting_that_changes_the_run_and_allows_the_rest(tmp_path):
    ckpt = tmp_path / "ckpt"
    partial_trainer(ckpt, 10).save_checkpoint()
    for field, value in [
        ("dead_feature_window", 10),
        ("grad_clip", None),
        ("adam_beta2", 0.99),
        ("seed", 1),
        ("lr_end_factor", 0.2),
        ("precision", "bf16"),
    ]:
        with pytest.raises(ConfigError, match=f"^{field}="):
            trainer(**{field: value}).load_checkpoint(ckpt)
    resumed = trainer(ckpt, checkpoint_every=3, log_every=2, checkpoint_minutes=5.0)
    resumed.load_checkpoint(ckpt)  # checkpoint and logging settings cannot change the weights
    assert resumed.step == 10


def test_resume_restores_history_and_time_and_is_exact(tmp_path):
    straight = trainer()
    straight.train()
    ckpt = tmp_path / "ckpt"
    first = trainer(ckpt, checkpoint_every=10)
    original = first.source.next_batch

    def next_batch(n):  # a crash two steps after the checkpoint of step 10
        if first.step == 12:
            raise RuntimeError("crash")
        return original(n)

    first.source.next_batch = next_batch
    with pytest.raises(RuntimeError, match="crash"):
        first.train()
    saved = read_checkpoint(ckpt)
    assert saved["step"] == 10 and [h["step"] for h in saved["history"]] == [5, 10]
    resumed = trainer(ckpt)
    resumed.load_checkpoint(ckpt)
    assert resumed.elapsed_before == saved["elapsed_seconds"] > 0
    result = resumed.train()
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    assert result.wall_seconds >= saved["elapsed_seconds"]
    for name in ("a", "s"):
        for key, value in straight.saes[name].state_dict().items():
            torch.testing.assert_close(resumed.saes[name].state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("arch", ["batchtopk", "standard", "jumprelu"])
def test_a_finite_explosion_stops_training(arch):
    torch.manual_seed(0)
    kwargs = {"k": 2} if arch == "batchtopk" else {"target_l0": 2.0}
    sae = build_sae(arch, d_in=16, d_sae=12, **kwargs)
    t = Trainer({"x": sae}, TensorSource(toy_data()), TrainConfig(**{**CFG, "lr": 1e3}), progress=False)
    with pytest.raises(TrainingDivergedError, match="diverged by step .*reconstruction error.*lower learning rate"):
        t.train()
    assert t.step < 5


def test_healthy_runs_never_trip_the_explosion_check():
    # a high but workable learning rate on every architecture family
    for arch, kwargs in [
        ("batchtopk", {"k": 2}),
        ("standard", {"target_l0": 2.0}),
        ("jumprelu", {"target_l0": 2.0}),
        ("topk", {"k": 2}),
        ("matryoshka", {"k": 2, "matryoshka_widths": [4, 8]}),
    ]:
        torch.manual_seed(0)
        t = Trainer(
            {"x": build_sae(arch, d_in=16, d_sae=12, **kwargs)},
            TensorSource(toy_data()),
            TrainConfig(**{**CFG, "lr": 3e-2}),
            progress=False,
        )
        t.train()
        assert t.history[-1]["x/explained_variance"] > 0, arch


def test_an_explosion_right_after_a_checkpoint_is_never_saved(tmp_path):
    ckpt = tmp_path / "ckpt"
    t = trainer(ckpt, checkpoint_every=5)
    sae = t.states["a"].sae
    after_step = sae.after_step
    step_of = {"n": 0}

    def exploding_after_step():
        after_step()
        step_of["n"] += 1
        if step_of["n"] == 10:  # the update of step 9 blows up: the parameters of step 10 are bad
            with torch.no_grad():
                sae.W_dec_LD.mul_(1e4)

    sae.after_step = exploding_after_step
    with pytest.raises(TrainingDivergedError, match=r"step 10.*last good checkpoint .*\(step 5\)"):
        t.train()
    saved = read_checkpoint(ckpt)
    assert saved["step"] == 5 and float(saved["saes"]["a"]["state_dict"]["W_dec_LD"].abs().max()) < 10


def test_time_based_checkpoints(tmp_path):
    ckpt = tmp_path / "ckpt"
    t = trainer(ckpt, checkpoint_minutes=1e-9)  # due after every step
    t.train(final_checkpoint=False)
    assert read_checkpoint(ckpt)["step"] == t.cfg.total_steps - 1
    none = tmp_path / "none"
    trainer(none).train(final_checkpoint=False)  # checkpoint_every 0 and checkpoint_minutes 0
    assert not none.exists()
    with pytest.raises(ConfigError, match="checkpoint_minutes"):
        TrainConfig(checkpoint_minutes=-1)
    assert TrainConfig().checkpoint_minutes == 10.0


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_saves_and_stops(tmp_path, sig, code):
    straight = trainer()
    straight.train()
    before = signal.getsignal(sig)
    ckpt = tmp_path / "ckpt"
    t = trainer(ckpt)
    original = t.source.next_batch

    def next_batch(n):
        if t.step == 7:
            os.kill(os.getpid(), sig)  # arrives mid-step: step 7 still completes
        return original(n)

    t.source.next_batch = next_batch
    with pytest.raises(TrainingInterrupted, match=f"interrupted by {signal.Signals(sig).name} at step 8/30") as info:
        t.train()
    assert info.value.exit_code == code and "\n" not in str(info.value)
    assert signal.getsignal(sig) == before  # the previous handler is back
    assert read_checkpoint(ckpt)["step"] == 8
    resumed = trainer(ckpt)
    resumed.load_checkpoint(ckpt)
    resumed.train()
    for key, value in straight.saes["a"].state_dict().items():
        torch.testing.assert_close(resumed.saes["a"].state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_training_outside_the_main_thread_installs_no_handlers():
    import threading

    errors = []
    thread = threading.Thread(target=lambda: errors.append(trainer().train() and None))
    thread.start()
    thread.join()
    assert errors == [None]
