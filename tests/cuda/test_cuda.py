"""Checks that need a CUDA GPU: they skip cleanly without one, and `benchmarks/gpu_check.sh` runs them
(`pytest -m cuda tests/cuda`) wherever a GPU is lent."""

import json

import pytest
import torch

from saelab.cli import main
from saelab.data.sources import SyntheticSource
from saelab.devices import has_native_bf16
from saelab.runs import RunConfig, run_training
from saelab.saes.registry import BUILTIN_ARCHITECTURE_MODULES, load_builtin_architectures
from saelab.saes.saelens_format import load_sae
from saelab.synthetic import load_source

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ARCHS = ["standard", "jumprelu", "topk", "batchtopk", "matryoshka", "matching_pursuit", "recipe", "gated", "abstopk"]


def _run(model_dir, out, arch, device, precision, samples=60_000):
    cfg = RunConfig(
        data=str(model_dir),
        arch=[arch],
        l0=[3.0],
        width=32,
        samples=samples,
        batch_size=256,
        lr=3e-3,
        eval_samples=20_000,
        device=device,
        precision=precision,
    )
    return run_training(cfg, out, progress=False).results[0]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_architecture_trains_on_the_gpu_as_on_the_cpu(tiny_synthetic_model_dir, tmp_path, arch, precision):
    load_builtin_architectures()
    assert BUILTIN_ARCHITECTURE_MODULES  # the registry is loaded
    gpu = _run(tiny_synthetic_model_dir, tmp_path / "gpu", arch, "cuda", precision)
    cpu = _run(tiny_synthetic_model_dir, tmp_path / "cpu", arch, "cpu", "fp32")
    assert gpu["compute_precision"] == precision
    # Different kernels and streams: not the same numbers, but the same quality. 0.1 F1 is far outside the
    # seed-to-seed spread of this world at this budget (sd ≈ 0.02) and far inside a broken path's loss.
    assert gpu["f1"] == pytest.approx(cpu["f1"], abs=0.1), (gpu, cpu)
    assert gpu["explained_variance"] > cpu["explained_variance"] - 0.05
    # What the GPU run saved loads on a CPU and gives the codes it gives on the GPU.
    saved = next((tmp_path / "gpu" / "saes").iterdir())
    on_cpu, on_gpu = load_sae(saved, device="cpu"), load_sae(saved, device="cuda")
    x = torch.randn(64, on_cpu.cfg.d_in)
    torch.testing.assert_close(on_gpu.encode(x.cuda()).cpu(), on_cpu.encode(x), atol=1e-4, rtol=1e-4)


def test_synthetic_sampling_on_the_gpu_has_the_cpu_statistics(tiny_synthetic_model_dir):
    n = 200_000
    l0 = {}
    for device in ("cpu", "cuda"):
        model = load_source(str(tiny_synthetic_model_dir), device=device)
        _, acts = model.sample_with_features(n)
        l0[device] = (acts != 0).float().sum(1).cpu()
    # Mean L0 of n independent samples: its se is sd/√n; 4.9 se bounds a false failure at ≈1e-6 (two streams).
    se = (l0["cpu"].var() / n + l0["cuda"].var() / n).sqrt()
    assert abs(l0["cpu"].mean() - l0["cuda"].mean()) < 4.9 * se


def test_resume_on_the_gpu_matches_the_uninterrupted_run(tiny_synthetic_model_dir, tmp_path):
    from saelab.training.trainer import TrainConfig, Trainer, build_sae

    def trainer(path=None, every=0):
        model = load_source(str(tiny_synthetic_model_dir), device="cuda")
        sae = build_sae("batchtopk", d_in=model.hidden_dim, d_sae=32, k=3, device="cuda")
        cfg = TrainConfig(
            samples=256 * 40, batch_size=256, lr=3e-3, device="cuda", precision="bf16", seed=1, checkpoint_every=every
        )
        return Trainer({"s": sae}, SyntheticSource(model, seed=1), cfg, checkpoint_path=path, progress=False)

    straight = trainer()
    straight.train(final_checkpoint=False)
    first = trainer(tmp_path / "ck", every=10)
    original = first.source.next_batch

    def next_batch(n):  # a crash two steps after the checkpoint of step 20
        if first.step == 22:
            raise RuntimeError("crash")
        return original(n)

    first.source.next_batch = next_batch
    with pytest.raises(RuntimeError, match="crash"):
        first.train()
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "ck")
    resumed.train(final_checkpoint=False)
    # GPU reductions need not be bitwise reproducible; a resume that lost state would differ by O(lr).
    torch.testing.assert_close(resumed.saes["s"].W_dec_LD, straight.saes["s"].W_dec_LD, atol=1e-3, rtol=1e-3)


def test_train_cli_on_the_gpu_reports_the_precision_it_used(tiny_synthetic_model_dir, tmp_path, capsys):
    args = ["train", "--data", str(tiny_synthetic_model_dir), "--width", "32", "--l0", "3", "--samples", "20k"]
    args += ["--device", "cuda", "--precision", "auto", "--json", "--out", str(tmp_path / "r")]
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["compute_precision"] == ("bf16" if has_native_bf16("cuda") else "fp32")
    assert line["samples_per_second"] > 0
