"""Training-step throughput: saelab vs SAELens on the same shapes, measured in the same run.

A step is forward + backward + gradient clipping + Adam, batch 1024, on the same random inputs.
Also reports how much of this machine's measured dense-matmul FLOP/s a step reaches: the dense
encoder matmul (2·B·D·L FLOPs) is the floor of a TopK-family step; everything else in saelab is
sparse work over the k active latents.

Standard and JumpReLU are put at a trained-like sparsity first (both libraries identically: the
encoder bias, or the thresholds, set so about k latents fire per sample; JumpReLU with the
SynthSAEBench bandwidth 1.0), since their cost depends on how many latents are active. Matching
Pursuit runs k pursuit steps ("serial TopK", the SynthSAEBench setting).

    python benchmarks/bench_training.py [--steps 15] [--shapes 256x1024:12,768x4096:25]
                                        [--archs batchtopk,matryoshka,jumprelu,standard,matching_pursuit]
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


JUMPRELU_BANDWIDTH = 1.0  # SynthSAEBench's JumpReLU setting (saes/jumprelu.py config_for_l0)


@torch.no_grad()
def firing_cut(W_enc_DL: torch.Tensor, b_enc_L: torch.Tensor, x: torch.Tensor, k: float) -> torch.Tensor:
    """The pre-activation value above which about k latents per sample fire."""
    h = (x @ W_enc_DL + b_enc_L).flatten()
    return h.kthvalue(max(1, int(h.numel() * (1 - k / W_enc_DL.shape[1])))).values


@torch.no_grad()
def make_sparse(sae_W_enc, b_enc, threshold, x, k):
    """Standard: shift b_enc so ~k pre-activations per sample are positive. JumpReLU: θ at that cut."""
    cut = firing_cut(sae_W_enc, b_enc, x, k)
    if threshold is None:
        b_enc.sub_(cut)
    else:
        threshold.fill_(float(cut.clamp_min(0)))


def saelab_step(arch: str, d_in: int, d_sae: int, k: float, x: torch.Tensor):
    from saelab.saes import StepContext, get_sae_class
    from saelab.saes.matryoshka import default_matryoshka_widths
    from saelab.training.trainer import build_sae

    coefficients = {}
    if arch in ("batchtopk", "matryoshka"):
        extra = {"matryoshka_widths": default_matryoshka_widths(d_sae)} if arch == "matryoshka" else {}
        sae = build_sae(arch, d_in=d_in, d_sae=d_sae, k=k, **extra)
    else:
        cls = get_sae_class(arch)
        overrides = {"normalize_activations": "none"} if arch == "jumprelu" else {}
        sae = cls(cls.config_for_l0(d_in, d_sae, k, total_steps=1000, **overrides))
        if arch in ("standard", "jumprelu"):
            make_sparse(sae.W_enc_DL, sae.b_enc_L, getattr(sae, "threshold_L", None), x, k)
            coefficients = {"l1": 1.0, "l0": 1.0}
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=True)
    ctx = StepContext(
        step=0, total_steps=1, coefficients=coefficients, dead_mask_L=torch.zeros(d_sae, dtype=torch.bool)
    )

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

    coefficients = {}
    if arch == "matryoshka":
        cfg = MatryoshkaBatchTopKTrainingSAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            k=k,
            matryoshka_widths=default_matryoshka_widths(d_sae),
            use_matryoshka_aux_loss=True,
        )
        sae = MatryoshkaBatchTopKTrainingSAE(cfg)
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    elif arch == "standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae))
        make_sparse(sae.W_enc, sae.b_enc, None, x, k)
        coefficients = {"l1": 1.0}
    elif arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, jumprelu_sparsity_loss_mode="step", jumprelu_bandwidth=JUMPRELU_BANDWIDTH
            )
        )
        make_sparse(sae.W_enc, sae.b_enc, sae.threshold, x, k)
        coefficients = {"l0": 1.0}
    elif arch == "matching_pursuit":
        from sae_lens.saes.matching_pursuit_sae import MatchingPursuitTrainingSAE, MatchingPursuitTrainingSAEConfig

        sae = MatchingPursuitTrainingSAE(
            MatchingPursuitTrainingSAEConfig(
                d_in=d_in,
                d_sae=d_sae,
                residual_threshold=0.0,
                max_iterations=int(round(k)),
                stop_on_duplicate_support=False,
            )
        )
    else:
        raise SystemExit(f"no SAELens counterpart for {arch!r}")
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool)

    def step():
        out = sae.training_forward_pass(TrainStepInput(x, coefficients, dead, 0, False))
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
    parser.add_argument("--archs", default="batchtopk,matryoshka,jumprelu,standard,matching_pursuit")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for spec in args.shapes.split(","):
        dims, k = spec.split(":")
        d_in, d_sae = (int(v) for v in dims.split("x"))
        k = float(k)
        x = torch.randn(args.batch_size, d_in)
        W = torch.randn(d_in, d_sae)
        gemm = _time(lambda x=x, W=W: x @ W, args.steps)
        gemm_flops = 2 * args.batch_size * d_in * d_sae / gemm
        print(
            f"\n{d_in} -> {d_sae}, k={k:g}: dense encoder matmul {gemm * 1e3:.1f} ms = {gemm_flops / 1e9:.0f} GFLOP/s"
        )
        for arch in args.archs.split(","):
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
