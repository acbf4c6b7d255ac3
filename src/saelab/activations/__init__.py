"""Real-model activations: a hooked local LM on a corpus, on-disk caches, and users' own arrays.

Every source implements `saelab.training.sources.ActivationSource`, so the trainer, SAEs and
metrics are the same as for synthetic data. `build_real_data(cfg)` turns the data options of a
`RunConfig` (model / layer / hook_module / dataset / cache / activations) into a training source
plus an evaluation function (spliced-LM metrics when a model is given, else reconstruction
metrics on held-out rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from saelab.errors import ConfigError

__all__ = ["RealData", "build_real_data", "build_lm_source", "uses_real_data"]


def uses_real_data(cfg: Any) -> bool:
    return bool(getattr(cfg, "model", None) or getattr(cfg, "cache", None) or getattr(cfg, "activations", None))


@dataclass
class RealData:
    source: Any
    d_in: int
    identity: dict[str, Any]
    evaluate: Callable[[Any], dict[str, Any]]  # inference SAE -> metrics
    hooked: Any = None


def build_lm_source(cfg: Any, hooked: Any = None, split: str = "train") -> Any:
    """An LMActivationSource over cfg.dataset (this rank's documents)."""
    from saelab.activations.hooked_lm import HookedLM
    from saelab.activations.sources import LMActivationSource, dist_rank_world
    from saelab.activations.text import ContextStream, load_documents

    if not cfg.dataset:
        raise ConfigError("dataset", cfg.dataset, "--model needs --dataset (a text file, folder, `datasets` folder or token file)")
    if hooked is None:
        hooked = HookedLM.from_pretrained(cfg.model, layer=cfg.layer, hook_module=cfg.hook_module,
                                          device=cfg.device, dtype=cfg.model_dtype)
    docs = load_documents(cfg.dataset, text_column=cfg.text_column, context_size=cfg.context_size)
    rank, world = dist_rank_world() if split == "train" else (0, 1)
    contexts = ContextStream(docs, hooked.tokenizer, context_size=cfg.context_size, seed=cfg.seed, rank=rank,
                             world_size=world, split=split)
    return LMActivationSource(hooked, contexts, model_batch_size=cfg.model_batch_size,
                              buffer_size=cfg.buffer_size, seed=cfg.seed * 31 + rank)


def _lm_evaluator(cfg: Any, hooked: Any) -> Callable[[Any], dict[str, Any]]:
    from saelab.activations.llm_metrics import evaluate_sae_on_lm
    from saelab.activations.text import ContextStream, load_documents

    docs = load_documents(cfg.dataset, text_column=cfg.text_column, context_size=cfg.context_size)
    held_out = ContextStream(docs, hooked.tokenizer, context_size=cfg.context_size, split="eval")

    def batches():
        seen = 0
        for batch in held_out.iter_once(cfg.model_batch_size):
            yield batch
            seen += int(hooked.token_mask(batch.input_ids_BS, batch.attention_mask_BS).sum())
            if seen >= cfg.eval_samples:
                return

    return lambda sae: evaluate_sae_on_lm(sae, hooked, batches())


def build_real_data(cfg: Any) -> RealData:
    """Source + evaluator for a run on real activations (see the module docstring)."""
    from saelab.activations.llm_metrics import evaluate_sae_on_rows

    if cfg.cache and cfg.activations:
        raise ConfigError("activations", cfg.activations, "give either --cache or --activations, not both")
    hooked = None
    if cfg.model:
        from saelab.activations.hooked_lm import HookedLM

        hooked = HookedLM.from_pretrained(cfg.model, layer=cfg.layer, hook_module=cfg.hook_module,
                                          device=cfg.device, dtype=cfg.model_dtype)
    lm_eval = hooked is not None and bool(cfg.dataset)  # spliced-LM metrics need text to run the LM on
    if cfg.cache or cfg.activations:
        from saelab.activations.cache import cache_source
        from saelab.activations.sources import RowFileSource, file_segments

        if cfg.cache:
            expected = hooked.identity() if hooked is not None else None
            source = cache_source(cfg.cache, expected, eval_rows=0 if lm_eval else cfg.eval_samples)
            held = None if lm_eval else cache_source(cfg.cache, expected, eval_rows=cfg.eval_samples, split="eval")
            from saelab.activations.cache import read_manifest

            identity = {k: read_manifest(cfg.cache).get(k) for k in ("model", "model_fingerprint", "layer", "hook_module", "d_in")}
        else:
            segments = file_segments(cfg.activations)
            total = sum(s.n for s in segments)
            n_eval = 0 if lm_eval else min(cfg.eval_samples, total // 10)
            source = RowFileSource(segments, stop=total - n_eval)
            held = RowFileSource(segments, start=total - n_eval, rank=0, world_size=1) if n_eval else None
            identity = {"activations": list(map(str, cfg.activations)), "d_in": source.d_in}
        if hooked is not None and hooked.d_in != source.d_in:
            raise ConfigError("activations", cfg.cache or cfg.activations,
                              f"have width {source.d_in}, but {hooked.hook_module} of {cfg.model} has width {hooked.d_in}")
        if lm_eval:
            evaluate = _lm_evaluator(cfg, hooked)
        elif held is not None:
            rows_ND = held.read_rows(held.start, held.stop)
            evaluate = lambda sae: evaluate_sae_on_rows(sae, rows_ND)  # noqa: E731
        else:
            evaluate = lambda sae: {}  # noqa: E731
        return RealData(source=source, d_in=source.d_in, identity=identity, evaluate=evaluate, hooked=hooked)
    if hooked is None:
        raise ConfigError("model", cfg.model, "give --model (with --dataset), --cache or --activations")
    source = build_lm_source(cfg, hooked)
    if cfg.prefetch:
        from saelab.activations.buffer import PrefetchSource
        from saelab.training.distributed import split_batch

        source = PrefetchSource(source, split_batch(cfg.batch_size))
    return RealData(source=source, d_in=source.d_in, identity=hooked.identity(),
                    evaluate=_lm_evaluator(cfg, hooked), hooked=hooked)
