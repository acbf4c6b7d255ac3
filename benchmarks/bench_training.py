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
                                        [--archs batchtopk,matryoshka,jumprelu,standard,matching_pursuit,recipe]
                                        [--device cpu|cuda] [--precision fp32,bf16] [--json]

`--precision bf16` runs both libraries' steps under bf16 autocast (parameters and Adam state fp32), as
SynthSAEBench trains. On a CPU without bf16 units (no AMX/AVX512-BF16) torch emulates bf16 matmuls, so
the bf16 figures there measure the emulation, not the method; the script says so.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step, n_steps: int, warmup: int = 3, device: torch.device = torch.device("cpu")) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / n_steps


def _autocast(device: torch.device, precision: str):
    from saelab.devices import precision_autocast  # emulated bf16 GEMMs where the CPU has no bf16 units

    return precision_autocast(precision, device)


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


def saelab_step(
    arch: str, d_in: int, d_sae: int, k: float, x: torch.Tensor, device: torch.device = torch.device("cpu")
):
    from saelab.saes import StepContext, get_sae_class
    from saelab.saes.matryoshka import default_matryoshka_widths
    from saelab.training.trainer import build_sae

    coefficients = {}
    if arch in ("batchtopk", "matryoshka"):
        extra = {"matryoshka_widths": default_matryoshka_widths(d_sae)} if arch == "matryoshka" else {}
        sae = build_sae(arch, d_in=d_in, d_sae=d_sae, k=k, **extra).to(device)
    else:
        cls = get_sae_class(arch)
        overrides = {"normalize_activations": "none"} if arch == "jumprelu" else {}
        sae = cls(cls.config_for_l0(d_in, d_sae, k, total_steps=1000, **overrides)).to(device)
        if arch in ("standard", "jumprelu"):
            make_sparse(sae.W_enc_DL, sae.b_enc_L, getattr(sae, "threshold_L", None), x, k)
            coefficients = {"l1": 1.0, "l0": 1.0}
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, fused=device.type in ("cpu", "cuda"))
    ctx = StepContext(
        step=0,
        total_steps=1,
        coefficients=coefficients,
        dead_mask_L=torch.zeros(d_sae, dtype=torch.bool, device=device),
    )

    def step():
        out = sae.train_forward(x, ctx)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return step


def saelens_step(
    arch: str, d_in: int, d_sae: int, k: float, x: torch.Tensor, device: torch.device = torch.device("cpu")
):
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
        sae = MatryoshkaBatchTopKTrainingSAE(cfg).to(device)
    elif arch == "batchtopk":
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)).to(device)
    elif arch == "standard":
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig

        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae)).to(device)
        make_sparse(sae.W_enc, sae.b_enc, None, x, k)
        coefficients = {"l1": 1.0}
    elif arch == "jumprelu":
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig

        sae = JumpReLUTrainingSAE(
            JumpReLUTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, jumprelu_sparsity_loss_mode="step", jumprelu_bandwidth=JUMPRELU_BANDWIDTH
            )
        ).to(device)
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
        ).to(device)
    else:
        raise SystemExit(f"no SAELens counterpart for {arch!r}")
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=device)

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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", help="comma list of fp32, bf16")
    parser.add_argument("--no-saelens", action="store_true", help="skip the SAELens reference")
    parser.add_argument("--json", action="store_true", help="one JSON line per (shape, arch, precision)")
    args = parser.parse_args()
    from saelab.devices import has_native_bf16, resolve_device

    device = torch.device(resolve_device(args.device))
    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    for p in precisions:
        if p not in ("fp32", "bf16"):
            raise SystemExit(f"error: precision={p!r}: must be fp32 or bf16")
    native = has_native_bf16(device)
    torch.manual_seed(0)
    say = (lambda *a, **k: None) if args.json else print
    say(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, device {device}")
    if "bf16" in precisions and not native:
        say(
            f"note: {device} has no native bf16 matmul units: its bf16 GEMMs are emulated in fp32 (bf16 numerics), "
            "so bf16 figures show the cost of bf16's other ops and casts, not a bf16 speed-up"
        )
    for spec in args.shapes.split(","):
        dims, k = spec.split(":")
        d_in, d_sae = (int(v) for v in dims.split("x"))
        k = float(k)
        x = torch.randn(args.batch_size, d_in, device=device)
        W = torch.randn(d_in, d_sae, device=device)
        for precision in precisions:
            with _autocast(device, precision):
                gemm = _time(lambda x=x, W=W: x @ W, args.steps, device=device)
            gemm_flops = 2 * args.batch_size * d_in * d_sae / gemm
            say(
                f"\n{d_in} -> {d_sae}, k={k:g}, {precision}: dense encoder matmul {gemm * 1e3:.1f} ms"
                f" = {gemm_flops / 1e9:.0f} GFLOP/s"
            )
            for arch in args.archs.split(","):
                ours_step = saelab_step(arch, d_in, d_sae, k, x, device)
                with _autocast(device, precision):
                    ours = _time(ours_step, args.steps, device=device)
                ref = float("nan")
                if not args.no_saelens:
                    try:
                        ref_step = saelens_step(arch, d_in, d_sae, k, x, device)
                        with _autocast(device, precision):
                            ref = _time(ref_step, args.steps, device=device)
                    except (ImportError, SystemExit):
                        ref = float("nan")
                row = {
                    "shape": f"{d_in}x{d_sae}",
                    "k": k,
                    "arch": arch,
                    "compute_precision": precision,
                    "device": str(device),
                    "native_bf16": native,
                    "saelab_samples_per_second": args.batch_size / ours,
                    "saelens_samples_per_second": None if math.isnan(ref) else args.batch_size / ref,
                    "speedup_vs_saelens": None if math.isnan(ref) else ref / ours,
                    "matmul_fraction": gemm / ours,
                }
                if args.json:
                    print(json.dumps(row), flush=True)
                    continue
                print(
                    f"  {arch:<16} saelab {args.batch_size / ours:>9,.0f} samples/s ({ours * 1e3:6.1f} ms/step)"
                    f" | SAELens {args.batch_size / ref:>9,.0f} samples/s ({ref * 1e3:6.1f} ms/step)"
                    f" | speedup {ref / ours:4.2f}x | step reaches {gemm / ours:5.1%} of matmul FLOP/s"
                    f" (SAELens {gemm / ref:5.1%})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
