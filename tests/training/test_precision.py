"""`--precision auto|fp32|bf16`: bf16 autocast exactly where asked (auto: where the device multiplies bf16
natively), weights and optimiser state in fp32 either way, the precision used reported and recorded."""

import dataclasses
import json

import pytest
import torch

from saelab import devices
from saelab.bench.protocols import PROTOCOLS, Protocol
from saelab.cli import main
from saelab.data.sources import SyntheticSource
from saelab.errors import ConfigError
from saelab.runs import RunConfig
from saelab.runs.run import check_resume_config
from saelab.synthetic import load_source
from saelab.training.trainer import TrainConfig, Trainer, build_sae


def test_auto_is_bf16_exactly_where_the_device_has_bf16_units(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("auto", "cpu") == "fp32"
    assert devices.resolve_precision("bf16", "cpu") == "bf16"  # asked for: honoured, with a warning
    assert devices.emulated_bf16_warning("bf16", "cpu") is not None
    assert devices.emulated_bf16_warning("fp32", "cpu") is None
    with pytest.raises(ConfigError, match="^precision='fp16'"):
        devices.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="^precision='half'"):
        TrainConfig(precision="half")


def test_cpu_flags_decide_native_bf16(monkeypatch):
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "fma"})
    assert devices.cpu_has_native_bf16() is False
    monkeypatch.setattr(devices, "_cpu_flags", lambda: {"avx2", "avx512f", "amx_bf16"})
    assert devices.cpu_has_native_bf16() is True


def test_bf16_training_keeps_weights_and_adam_state_fp32_and_reports_it(tiny_synthetic_model_dir):
    model = load_source(str(tiny_synthetic_model_dir))
    runs = {}
    for precision in ("fp32", "bf16"):
        sae = build_sae("batchtopk", d_in=model.hidden_dim, d_sae=32, k=3)
        cfg = TrainConfig(samples=256 * 30, batch_size=256, lr=3e-3, precision=precision, seed=2)
        with (
            pytest.warns(UserWarning, match="emulated")
            if not devices.has_native_bf16("cpu") and precision == "bf16"
            else _nothing()
        ):
            trainer = Trainer({"s": sae}, SyntheticSource(model, seed=2), cfg, progress=False)
        result = trainer.train()
        assert result.precision == precision
        assert all(p.dtype == torch.float32 for p in sae.parameters())
        for state in trainer.states["s"].optimizer.state.values():
            assert state["exp_avg"].dtype == torch.float32
        runs[precision] = result.final_stats["s"]
    # The same steps in bf16 reconstruct about as well (bf16 keeps 8 bits of mantissa: a percent-level change).
    assert runs["bf16"]["explained_variance"] == pytest.approx(runs["fp32"]["explained_variance"], abs=0.05)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_train_json_reports_compute_precision_and_keeps_the_precision_metric(
    tiny_synthetic_model_dir, tmp_path, capsys
):
    args = ["train", "--data", str(tiny_synthetic_model_dir), "--width", "32", "--l0", "3", "--samples", "10k"]
    with pytest.raises(SystemExit) as done:
        main([*args, "--precision", "fp32", "--eval-samples", "2000", "--json", "--out", str(tmp_path / "r")])
    assert done.value.code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["compute_precision"] == "fp32" and line["samples_per_second"] > 0
    # `precision` stays the ground-truth metric (firing precision), a number in [0, 1].
    assert isinstance(line["precision"], float) and 0 <= line["precision"] <= 1
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert saved["compute_precision"] == "fp32" and saved["config"]["precision"] == "fp32"
    with pytest.raises(SystemExit) as done:
        main([*args, "--precision", "fp8", "--out", str(tmp_path / "s")])
    assert done.value.code == 2 and "precision='fp8'" in capsys.readouterr().err


def test_resume_accepts_a_checkpoint_written_before_precision_existed(tiny_synthetic_model_dir, tmp_path):
    cfg = RunConfig(data=str(tiny_synthetic_model_dir), width=32, l0=[3.0], samples=10_000, precision="auto")
    old = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del old["precision"]
    old["autocast_bf16"] = False
    check_resume_config(old, cfg, tmp_path)  # fp32 then, `auto` (today's default) now: the same run
    old["autocast_bf16"] = True
    with pytest.raises(ConfigError, match="autocast_bf16"):
        check_resume_config(old, cfg, tmp_path)
    old = json.loads(json.dumps(dataclasses.asdict(cfg)))
    del old["precision"]
    with pytest.raises(ConfigError, match="^precision="):
        check_resume_config(old, dataclasses.replace(cfg, precision="bf16"), tmp_path)  # not the default


def test_trainer_refuses_to_resume_in_another_precision(tiny_synthetic_model_dir, tmp_path):
    model = load_source(str(tiny_synthetic_model_dir))

    def trainer(precision):
        sae = build_sae("topk", d_in=model.hidden_dim, d_sae=16, k=2)
        cfg = TrainConfig(samples=256 * 4, batch_size=256, precision=precision)
        return Trainer({"s": sae}, SyntheticSource(model, seed=0), cfg, checkpoint_path=tmp_path / "ck", progress=False)

    trainer("fp32").train()
    with pytest.raises(ConfigError, match="checkpoint's steps ran in fp32"):
        with pytest.warns(UserWarning) if not devices.has_native_bf16("cpu") else _nothing():
            trainer("bf16").load_checkpoint(tmp_path / "ck")


def test_protocols_recorded_with_autocast_bf16_still_load():
    recorded = PROTOCOLS["mini"].to_dict()
    del recorded["precision"]
    assert Protocol.from_dict({**recorded, "autocast_bf16": False}).precision == "fp32"
    assert Protocol.from_dict({**recorded, "autocast_bf16": True}).precision == "auto"
    assert all(p.precision == "auto" for p in PROTOCOLS.values())


def test_synth_sample_in_bf16_keeps_the_firing_statistics(tiny_synthetic_model_dir, capsys):
    with pytest.raises(SystemExit) as done:
        main(["synth", "sample", str(tiny_synthetic_model_dir), "--samples", "2000", "--precision", "bf16", "--json"])
    assert done.value.code == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["compute_precision"] == "bf16"
    model = load_source(str(tiny_synthetic_model_dir))
    n, l0 = 20_000, {}
    for precision in ("fp32", "bf16"):
        low = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
        with model.forked_stream(7) as stream, low:
            l0[precision] = torch.cat([stream.sample_sparse(1000)[1].l0_per_sample().float() for _ in range(n // 1000)])
    # Same seed, so the two means are positively correlated; treating them as independent overstates the
    # se of the difference. 4.9 se bounds a false failure at ≈1e-6.
    se = ((l0["fp32"].var() + l0["bf16"].var()) / n).sqrt()
    assert abs(l0["bf16"].mean() - l0["fp32"].mean()) < 4.9 * se


def test_emulated_bf16_products_round_as_bf16_hardware_does(monkeypatch):
    """Without bf16 units a bf16 product is widened, multiplied in fp32 and rounded to bf16: bf16 hardware's
    numbers (exact products, fp32 accumulation, one rounding), up to the order of the fp32 sums."""
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    gen = torch.Generator().manual_seed(0)
    x_BD = torch.randn(64, 48, generator=gen)
    W_DL = torch.randn(48, 96, generator=gen, requires_grad=True)
    b_L = torch.randn(96, generator=gen, requires_grad=True)
    with devices.precision_autocast("bf16", "cpu"):
        y_BL = torch.nn.functional.linear(x_BD, W_DL.T, b_L)
        z_BL = x_BD @ W_DL
    assert y_BL.dtype == torch.bfloat16 and z_BL.dtype == torch.bfloat16
    x_bf, W_bf, b_bf = x_BD.bfloat16().double(), W_DL.detach().bfloat16().double(), b_L.detach().bfloat16().double()
    exact_BL, with_bias_BL = x_bf @ W_bf, x_bf @ W_bf + b_bf
    # fp32 sums of 48 exact products err by at most e = 48·2⁻²⁴·Σ|terms| (+|b| with the bias); one rounding
    # to bf16 adds at most half a step, 2⁻⁸ of the value. So |result − exact| ≤ 2⁻⁷·|exact| + 2e, rigorously.
    e_BL = 49 * 2.0**-24 * (x_bf.abs() @ W_bf.abs() + b_bf.abs())
    assert ((z_BL.double() - exact_BL).abs() <= 2.0**-7 * exact_BL.abs() + 2 * e_BL).all()
    assert ((y_BL.double() - with_bias_BL).abs() <= 2.0**-7 * with_bias_BL.abs() + 2 * e_BL).all()
    assert (z_BL.double() != (x_BD @ W_DL).detach().double()).any()  # rounded, not fp32
    # The backward multiplies the saved bf16 tensors outside autocast: bf16_emulation reroutes those too.
    with devices.bf16_emulation("bf16", "cpu") as mode:
        y_BL.float().square().mean().backward()
    assert isinstance(mode, devices.EmulatedBf16Matmuls) and mode.calls >= 1
    assert W_DL.grad is not None and W_DL.grad.dtype == torch.float32
    # Only a bf16 run on a CPU without bf16 units is emulated.
    assert not isinstance(devices.bf16_emulation("fp32", "cpu"), devices.EmulatedBf16Matmuls)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert not isinstance(devices.bf16_emulation("bf16", "cpu"), devices.EmulatedBf16Matmuls)
