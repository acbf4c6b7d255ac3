"""Activation-cache throughput and where the time goes, plus the background-prefetch speed-up.

Builds a random GPT-2-shaped model from a config (no download) with a word-level tokenizer over
the test corpus, hooks one block, and measures in one run:

1. writing a cache: tokens/s end to end, split into tokenise / LM forward (stopped at the layer)
   / shuffle-buffer / safetensors write;
2. reading it back (memory-mapped shards): tokens/s;
3. an SAE training step on cached rows;
4. training straight from the LM with and without the background prefetch thread (same data,
   same steps): the speed-up from overlapping the LM forward pass with the SAE step.

    python benchmarks/bench_activation_cache.py [--d-model 256] [--layers 4] [--tokens 200k] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "activations" / "data" / "corpus.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--layer", type=int, default=2, help="hooked block")
    ap.add_argument("--tokens", default="200k", help="rows written to the cache")
    ap.add_argument("--width", type=int, default=2048, help="SAE width")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--model-batch-size", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from saelab.activations.buffer import PrefetchSource
    from saelab.activations.cache import cache_source, write_cache
    from saelab.activations.hooked_lm import HookedLM
    from saelab.activations.sources import LMActivationSource
    from saelab.activations.text import ContextStream, load_documents
    from saelab.activations.tiny import build_tiny_causal_lm
    from saelab.cli.common import parse_count
    from saelab.data import TensorSource
    from saelab.training.trainer import TrainConfig, Trainer, build_sae

    n_tokens = parse_count(args.tokens, "tokens")
    lines = load_documents(CORPUS)
    tmp = Path(tempfile.mkdtemp(prefix="saelab-bench-cache-"))
    model_dir = build_tiny_causal_lm(
        tmp / "model",
        lines,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=max(1, args.d_model // 64),
        context_size=128,
    )
    hooked = HookedLM.from_pretrained(model_dir, layer=args.layer)
    n_params = sum(p.numel() for p in hooked.model.parameters())
    print(
        f"model: GPT-2 shape, d_model {args.d_model}, {args.layers} blocks ({n_params / 1e6:.1f}M params), "
        f"hook {hooked.hook_module}; torch threads {args.threads}"
    )

    def lm_source(seed: int = 0) -> LMActivationSource:
        return LMActivationSource(
            hooked,
            ContextStream(lines, hooked.tokenizer, context_size=128, seed=seed),
            model_batch_size=args.model_batch_size,
            buffer_size=16384,
            seed=seed,
        )

    # 1. write
    src = lm_source()
    t0 = time.perf_counter()
    manifest = write_cache(src, tmp / "cache", n_tokens, hooked.identity(), shard_tokens=65536)
    wall_write = time.perf_counter() - t0
    produced = manifest["produce_seconds"]
    tok, fwd = src.timings["tokenise"], src.timings["forward"]
    shuffle = produced - tok - fwd
    print(
        f"\ncache write: {n_tokens:,} tokens in {wall_write:.2f} s = {n_tokens / wall_write:,.0f} tokens/s "
        f"({len(manifest['shards'])} shards, {sum(s['bytes'] for s in manifest['shards']) / 2**20:.0f} MiB)"
    )
    for name, sec in [
        ("tokenise", tok),
        ("LM forward to the layer", fwd),
        ("shuffle buffer", shuffle),
        ("safetensors write (+fsync, manifest)", manifest["write_seconds"]),
    ]:
        print(f"  {name:<38} {sec:7.2f} s  {100 * sec / wall_write:5.1f}%")

    # 2. read (memory-mapped), twice: the second pass is from the page cache
    for attempt in ("first", "second"):
        reader = cache_source(tmp / "cache")
        t0 = time.perf_counter()
        for _ in range(n_tokens // args.batch_size):
            reader.next_batch(args.batch_size)
        wall_read = time.perf_counter() - t0
        read_tokens = (n_tokens // args.batch_size) * args.batch_size
        print(f"cache read ({attempt} pass): {read_tokens / wall_read:,.0f} tokens/s")

    # 3. SAE step on cached rows
    def train(source, steps: int) -> float:
        torch.manual_seed(0)
        sae = build_sae("topk", d_in=hooked.d_in, d_sae=args.width, k=args.k)
        cfg = TrainConfig(samples=steps * args.batch_size, batch_size=args.batch_size, lr=3e-4, log_every=10_000)
        trainer = Trainer({"sae": sae}, source, cfg, progress=False)
        t0 = time.perf_counter()
        trainer.train()
        return time.perf_counter() - t0

    rows_ND = cache_source(tmp / "cache").next_batch(min(n_tokens, 16 * args.batch_size))
    sae_wall = train(TensorSource(rows_ND), args.train_steps)
    per_step = sae_wall / args.train_steps
    print(
        f"SAE step (topk {hooked.d_in}→{args.width}, k {args.k}, batch {args.batch_size}): "
        f"{1000 * per_step:.1f} ms = {args.batch_size / per_step:,.0f} tokens/s"
    )

    # 4. live LM training: without and with the prefetch thread, same data and steps
    steps = args.train_steps
    direct = lm_source(seed=1)
    wall_direct = train(direct, steps)
    prefetched = PrefetchSource(lm_source(seed=1), batch_size=args.batch_size, depth=2)
    wall_prefetch = train(prefetched, steps)
    prefetched.close()
    lm_per_batch = (direct.timings["tokenise"] + direct.timings["forward"]) / max(direct.tokens, 1) * args.batch_size
    print(f"\ntraining from the live LM, {steps} steps of {args.batch_size}:")
    print(
        f"  LM tokens per batch cost {1000 * lm_per_batch:.1f} ms (tokenise + forward), SAE step {1000 * per_step:.1f} ms"
    )
    print(f"  no prefetch:   {wall_direct:.2f} s = {steps * args.batch_size / wall_direct:,.0f} tokens/s")
    print(f"  with prefetch: {wall_prefetch:.2f} s = {steps * args.batch_size / wall_prefetch:,.0f} tokens/s")
    print(
        f"  speed-up from overlapping forward and SAE step: {wall_direct / wall_prefetch:.2f}x "
        f"(ideal: {(lm_per_batch + per_step) / max(lm_per_batch, per_step):.2f}x)"
    )


if __name__ == "__main__":
    main()
