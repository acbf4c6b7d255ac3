"""Benchmark: saelab's synth-16k (SynthSAEBench-16k v2) against SAELens's SyntheticModel.

    python benchmarks/bench_synthetic.py [--threads 1,2] [--batches 10] [--stats-samples 100000]

Measures, in one process and on the same machine:
  * saelab build time of synth-16k (100 orthogonalisation steps included);
  * SAELens build time with its orthogonalisation skipped, plus a few of its orthogonalisation
    steps, timed and extrapolated to 100 (its full build takes ~30 min here);
  * sampling throughput at batch 1024 for both, interleaved batch by batch so machine load hits
    both alike, for each requested torch thread count;
  * saelab's true L0, L0 of the first 4096 features and mean-max |cos| next to the references.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _saelens_model(build_ortho_steps: int):
    from sae_lens.synthetic import FoldedNormalMagnitudeConfig, LinearMagnitudeConfig, ZipfianFiringProbabilityConfig
    from sae_lens.synthetic.hierarchy import HierarchyConfig
    from sae_lens.synthetic.synthetic_model import LowRankCorrelationConfig, SyntheticModel, SyntheticModelConfig

    cfg = SyntheticModelConfig(
        num_features=16_384,
        hidden_dim=768,
        firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.4, min_prob=5e-4),
        hierarchy=HierarchyConfig(
            total_root_nodes=128,
            branching_factor=4,
            max_depth=3,
            mutually_exclusive_portion=1.0,
            mutually_exclusive_min_depth=0,
            compensate_probabilities=True,
            scale_children_by_parent=True,
        ),
        orthogonalization=None,  # timed separately below: the full 100 steps take ~30 min on this CPU
        correlation=LowRankCorrelationConfig(rank=25, correlation_scale=0.1),
        mean_firing_magnitudes=LinearMagnitudeConfig(start=5.0, end=4.0),
        std_firing_magnitudes=FoldedNormalMagnitudeConfig(mean=0.5, std=0.5),
        bias=0.5,
        seed=42,
    )
    t0 = time.perf_counter()
    model = SyntheticModel(cfg)
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--threads",
        default=f"1,{torch.get_num_threads()}",
        help="comma-separated torch thread counts for the sampling comparison",
    )
    ap.add_argument("--build-threads", type=int, default=None, help="torch threads while building (default: torch's)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=10, help="timed batches per library and thread count")
    ap.add_argument(
        "--saelens-ortho-steps", type=int, default=2, help="SAELens orthogonalisation steps to time (0 = skip)"
    )
    ap.add_argument("--stats-samples", type=int, default=100_000)
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",") if t]

    from saelab.synthetic import REFERENCE_STATS, build_preset, l0_stats, mean_max_abs_cos
    from saelab.synthetic.orthogonalize import orthogonalize
    from saelab.synthetic.threads import torch_threads

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} default threads; build threads = {args.build_threads or torch.get_num_threads()}"
    )

    # ---------------------------------------------------------------- builds
    with torch_threads(args.build_threads):
        ours = build_preset("synth-16k")
        print(f"saelab synth-16k build: {ours.build_seconds:.1f} s (100 orthogonalisation steps included)")
        t0 = time.perf_counter()
        orthogonalize(ours.feature_vectors_FD, num_steps=3, lr=3e-4)
        ours_step = (time.perf_counter() - t0) / 3
        print(f"saelab orthogonalisation: {ours_step:.2f} s/step -> {100 * ours_step:.1f} s per 100 steps")

        theirs, sl_build = _saelens_model(0)
        print(f"SAELens SyntheticModel build WITHOUT orthogonalisation: {sl_build:.1f} s")
        if args.saelens_ortho_steps > 0:
            from sae_lens.synthetic.feature_dictionary import orthogonalize_embeddings

            k = args.saelens_ortho_steps
            t0 = time.perf_counter()
            sl_vecs = orthogonalize_embeddings(
                theirs.feature_dict.feature_vectors.data, num_steps=k, lr=3e-4, chunk_size=1024
            )
            sl_step = (time.perf_counter() - t0) / k
            our_vecs = orthogonalize(theirs.feature_dict.feature_vectors.data, num_steps=k, lr=3e-4)
            delta = (sl_vecs - our_vecs).abs()
            print(
                f"SAELens orthogonalisation: {sl_step:.1f} s/step (timed {k} steps) -> "
                f"~{100 * sl_step / 60:.1f} min extrapolated to 100 steps "
                f"(saelab is {sl_step / ours_step:.0f}x faster per step)"
            )
            print(
                f"saelab vs SAELens vectors after {k} steps: max |Δ| = {delta.max().item():.1e}, "
                f"entries with |Δ| > 1e-5: {(delta > 1e-5).float().mean().item():.2e} "
                "(Adam moves each entry by ±lr; entries whose gradient is at float32 noise level can go either way)"
            )
            print(
                f"SAELens full build, extrapolated: ~{(sl_build + 100 * sl_step) / 60:.1f} min "
                f"vs saelab {ours.build_seconds:.1f} s"
            )

    # ---------------------------------------------------------------- sampling
    # saelab samples with its default (SyntheticModel.sample_threads = 1 on CPU); SAELens is run
    # at each requested torch thread count and the comparison uses SAELens's best.
    B = args.batch_size
    best_theirs = float("inf")
    all_ours: list[float] = []
    for nt in thread_counts:
        with torch_threads(nt):
            for _ in range(2):  # warm up both
                ours.sample(B)
                theirs.sample(B)
            t_ours, t_theirs = [], []
            for _ in range(args.batches):  # interleaved, so load changes hit both alike
                t_ours.append(_median_time(lambda: ours.sample(B), 1))
                t_theirs.append(_median_time(lambda: theirs.sample(B), 1))
        mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
        all_ours += t_ours
        best_theirs = min(best_theirs, mt)
        print(
            f"[SAELens torch threads={nt}] batch {B}: saelab {mo * 1e3:.1f} ms/batch = {B / mo:,.0f} samples/s "
            f"(min {min(t_ours) * 1e3:.1f} ms); SAELens {mt * 1e3:.1f} ms/batch = {B / mt:,.0f} samples/s "
            f"(min {min(t_theirs) * 1e3:.1f} ms); ratio {mt / mo:.1f}x"
        )
    mo = statistics.median(all_ours)
    print(
        f"sampling speedup vs SAELens: {best_theirs / mo:.1f}x "
        f"(saelab median {B / mo:,.0f} samples/s vs SAELens at its best thread count {B / best_theirs:,.0f} samples/s, batch {B})"
    )

    # ---------------------------------------------------------------- statistics
    with torch_threads(max(thread_counts)):
        ref = REFERENCE_STATS["synth-16k"]
        st = l0_stats(ours, n_samples=args.stats_samples, widths=(4096,), batch_size=8192)
        mmc = mean_max_abs_cos(ours.feature_vectors_FD)
        torch.manual_seed(0)
        sl_l0 = []
        sl_first = []
        for _ in range(10):
            acts = theirs.activation_generator.sample(B)
            sl_l0.append((acts > 0).sum(1).float().mean().item())
            sl_first.append((acts[:, :4096] > 0).sum(1).float().mean().item())
    print(
        f"saelab synth-16k true L0 = {st['true_l0']:.2f} ± {st['true_l0_stderr']:.2f} ({st['n_samples']} samples; "
        f"reference {ref['true_l0']})"
    )
    print(
        f"saelab synth-16k L0 of first 4096 features = {st['l0_first'][4096]:.2f} (reference {ref['l0_first_width']})"
    )
    print(
        f"SAELens same config, {10 * B} samples: true L0 = {statistics.mean(sl_l0):.2f}, first 4096 = {statistics.mean(sl_first):.2f}"
    )
    print(
        f"saelab synth-16k mean-max |cos| = {mmc:.4f} (reference {ref['mean_max_abs_cos']}, quoted for the un-orthogonalised vectors)"
    )


if __name__ == "__main__":
    main()
