"""Training-step throughput: saelab vs SAELens on the same shapes, measured in the same run.

A step is forward + backward + gradient clipping + Adam, batch 1024, on the same random inputs.
Also reports how much of this machine's measured dense-matmul FLOP/s a step reaches: the dense
encoder matmul (2·B·D·L FLOPs) is the floor of a TopK-family step; everything else in saelab is
sparse work over the k active latents.

    python benchmarks/bench_training.py [--steps 15] [--shapes 256x1024,768x4096]
"""

from __future__ import annotations

import argparse
import time

import torch


def _time(step, n_steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    return (time.perf_counter() - start) / n_steps


def saelab_step(arch: str, d_in: int, d_sae: int, k: float, x: torch.Tensor):
    from saelab.saes import StepContext
    from saelab.saes.matryoshka import default_matryoshka_widths
    from saelab.training.trainer import build_sae

    extra = {"matryoshka_widths": default_matryoshka_widths(d_sae)} if arch == "matryoshka" else {}
    sae = build_sae(arch, d_in=d_in, d_sae=d_sae, k=k, **extra)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True)
    ctx = StepContext(step=0, total_steps=1, dead_mask_L=torch.zeros(d_sae, dtype=torch.bool))

    def step():
        out = sae.train_forward(x, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return step


def saelens_step(arch: str, d_in: int, d_sae: int, k: float, x: torch.Tensor):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    from saelab.saes.matryoshka import default_matryoshka_widths

    if arch == "matryoshka":
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, k=k, matryoshka_widths=default_matryoshka_widths(d_sae),
            use_matryoshka_aux_loss=True,
        )
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, {}, dead, 0, False))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--shapes", default="256x1024:12,768x4096:25", help="DxL:k,...")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for spec in args.shapes.split(","):
        dims, k = spec.split(":")
        d_in, d_sae = (int(v) for v in dims.split("x"))
        k = float(k)
        x = torch.randn(args.batch_size, d_in)
        W = torch.randn(d_in, d_sae)
        gemm = _time(lambda: x @ W, args.steps)
        gemm_flops = 2 * args.batch_size * d_in * d_sae / gemm
        print(f"\n{d_in} -> {d_sae}, k={k:g}: dense encoder matmul {gemm * 1e3:.1f} ms = {gemm_flops / 1e9:.0f} GFLOP/s")
        for arch in ("batchtopk", "matryoshka"):
            ours = _time(saelab_step(arch, d_in, d_sae, k, x), args.steps)
            try:
                ref = _time(saelens_step(arch, d_in, d_sae, k, x), args.steps)
            except ImportError:
                ref = float("nan")
            print(
                f"  {arch:<11} saelab {args.batch_size / ours:>9,.0f} samples/s ({ours * 1e3:6.1f} ms/step)"
                f" | SAELens {args.batch_size / ref:>9,.0f} samples/s ({ref * 1e3:6.1f} ms/step)"
                f" | speedup {ref / ours:4.2f}x | step reaches {gemm / ours:5.1%} of matmul FLOP/s"
                f" (SAELens {gemm / ref:5.1%})"
            )


if __name__ == "__main__":
    main()
