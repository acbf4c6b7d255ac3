"""`open_data(spec)`: the one way in for data. Every command (train, eval, bench, l0, diagnose,
report, cache) turns its `DataSpec` into an `OpenedData` here, and nowhere else.

An `OpenedData` holds the training stream of this rank, the ground-truth model when there is one,
the held-out rows or held-out LM contexts for evaluation, and the data's identity (recorded in
results and checked on resume).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from saelab.data.protocol import ActivationSource, is_paired
from saelab.data.sources import synthetic_stream
from saelab.data.spec import DataSpec
from saelab.errors import ConfigError
from saelab.parallel import rank_and_world, split_batch

if TYPE_CHECKING:
    from saelab.activations.hooked_lm import HookedLM

SYNTHETIC_STREAM_RANK_STRIDE = 1_000_003  # each rank's synthetic stream gets its own seed


@dataclass
class OpenedData:
    spec: DataSpec
    d_in: int
    source: ActivationSource
    identity: dict[str, Any]
    ground_truth: Any | None = None  # the SyntheticModel (features, firing) for `synthetic` data
    held_out_ND: torch.Tensor | None = None  # rows kept out of training, for row-reconstruction metrics
    held_out_target_NE: torch.Tensor | None = None  # their targets, for a paired cache (transcoders)
    hooked: HookedLM | None = None  # the HookedLM when a model is given
    _closers: list[Any] = field(default_factory=list, repr=False)

    @property
    def has_ground_truth(self) -> bool:
        return self.ground_truth is not None

    def eval_contexts(self, max_tokens: int) -> Iterator[Any]:
        """Held-out token batches (never trained on) until `max_tokens` non-special tokens were seen."""
        spec, hooked = self.spec, self.hooked
        if hooked is None or not spec.dataset:
            raise ConfigError("dataset", spec.dataset, "LM evaluation needs --model and --dataset")
        from saelab.activations.text import ContextStream, load_documents

        docs = load_documents(spec.dataset, text_column=spec.text_column, context_size=spec.context_size)
        held_out = ContextStream(docs, hooked.tokenizer, context_size=spec.context_size, split="eval")
        seen = 0
        for batch in held_out.iter_once(spec.model_batch_size):
            yield batch
            seen += int(hooked.token_mask(batch.input_ids_BS, batch.attention_mask_BS).sum())
            if seen >= max_tokens:
                return

    def eval_batch(self, n: int, seed: int) -> torch.Tensor:
        """n held-out rows: fresh samples of a forked synthetic stream, held-out file rows, or LM rows."""
        if self.ground_truth is not None:
            with self.ground_truth.forked_stream(seed):
                if is_paired(self.ground_truth):  # a transcoder world: its inputs
                    return self.ground_truth.next_batch(n)
                return self.ground_truth.sample(n)
        if self.held_out_ND is not None:
            return self.held_out_ND[:n]
        if self.hooked is not None:
            rows, count = [], 0
            for batch in self.eval_contexts(n):
                acts_ND = self.hooked.activations(batch.input_ids_BS, batch.attention_mask_BS).float()
                rows.append(acts_ND)
                count += acts_ND.shape[0]
            return torch.cat(rows)[:n]
        raise ConfigError("data", self.spec.describe(), "keeps no held-out rows to evaluate on")

    def close(self) -> None:
        for source in self._closers:
            source.close()
        self._closers.clear()


def open_data(
    spec: DataSpec,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    eval_rows: int = 0,
    batch_size: int = 1024,
    hooked: HookedLM | None = None,
    split: str = "train",
) -> OpenedData:
    """Open `spec` for training on `device` with stream seed `seed`.

    eval_rows: rows of files/caches kept out of training for row metrics (at most a tenth of the
    files, half of a cache). batch_size: the global batch, for the LM prefetch thread.
    hooked: an already loaded HookedLM to reuse. split: "eval" streams the held-out LM documents."""
    device = str(device)
    rank, world = rank_and_world()
    if spec.kind == "synthetic":
        from saelab.synthetic import load_source

        model = load_source(spec.data, device=device)  # a transcoder world is its own paired stream
        source = synthetic_stream(model, seed=seed + SYNTHETIC_STREAM_RANK_STRIDE * rank)
        return OpenedData(spec=spec, d_in=source.d_in, source=source, identity={"data": spec.data}, ground_truth=model)

    if hooked is None and spec.model:
        from saelab.activations.hooked_lm import HookedLM

        hooked = HookedLM.from_pretrained(
            spec.model,
            layer=spec.layer,
            hook_module=spec.hook_module,
            device=device,
            dtype=spec.model_dtype,
            out_hook_module=spec.out_hook_module,
        )
    if spec.kind in ("cache", "files"):
        return _open_rows(spec, hooked, eval_rows)

    from saelab.activations.sources import LMActivationSource
    from saelab.activations.text import ContextStream, load_documents

    if not spec.dataset:
        raise ConfigError(
            "dataset", spec.dataset, "--model needs --dataset (a text file, folder, `datasets` folder or token file)"
        )
    assert hooked is not None  # spec.kind == "lm": spec.model is set, so it was loaded above if not given
    docs = load_documents(spec.dataset, text_column=spec.text_column, context_size=spec.context_size)
    r, w = (rank, world) if split == "train" else (0, 1)
    contexts = ContextStream(
        docs, hooked.tokenizer, context_size=spec.context_size, seed=seed, rank=r, world_size=w, split=split
    )
    lm_source: Any = LMActivationSource(
        hooked, contexts, model_batch_size=spec.model_batch_size, buffer_size=spec.buffer_size, seed=seed * 31 + r
    )
    opened = OpenedData(spec=spec, d_in=hooked.d_in, source=lm_source, identity=hooked.identity(), hooked=hooked)
    if spec.prefetch and split == "train":
        from saelab.activations.buffer import PrefetchSource

        opened.source = PrefetchSource(lm_source, split_batch(batch_size))
        opened._closers.append(opened.source)
    if hooked.d_out is not None:  # rows are [x | y]: hand them out as pairs
        from saelab.activations.sources import PairedRows

        opened.source = PairedRows(opened.source, hooked.d_in, hooked.d_out)
    return opened


def _open_rows(spec: DataSpec, hooked: HookedLM | None, eval_rows: int) -> OpenedData:
    from saelab.activations.files import PairedRowFileSource, RowFileSource, file_segments

    lm_eval = hooked is not None and bool(spec.dataset)  # spliced-LM metrics replace row metrics
    targets = None
    if spec.cache:
        from saelab.activations.cache import open_cache_pairs

        manifest, segments, targets = open_cache_pairs(spec.cache, hooked.identity() if hooked is not None else None)
        if hooked is not None and targets is not None and not hooked.paired:
            raise ConfigError(
                "out_hook_module",
                None,
                f"cache {spec.cache} holds (input, target) pairs for the output module "
                f"{manifest['out_hook_module']!r}: with --model, pass --out-hook-module {manifest['out_hook_module']}",
            )
        total = sum(s.n for s in segments)
        n_eval = 0 if lm_eval else min(eval_rows, total // 2)
        identity = {k: manifest.get(k) for k in ("model", "model_fingerprint", "layer", "hook_module", "d_in")}
        if targets is not None:
            identity.update(out_hook_module=manifest["out_hook_module"], d_out=manifest["d_out"])
    else:
        segments = file_segments(spec.activations)
        total = sum(s.n for s in segments)
        n_eval = 0 if lm_eval else min(eval_rows, total // 10)
        identity = {"activations": list(spec.activations), "d_in": segments[0].d_in}
    source = (
        RowFileSource(segments, stop=total - n_eval)
        if targets is None
        else PairedRowFileSource(segments, targets, stop=total - n_eval)
    )
    if hooked is not None and hooked.d_in != source.d_in:
        raise ConfigError(
            "activations",
            spec.cache or spec.activations,
            f"have width {source.d_in}, but {hooked.hook_module} of {spec.model} has width {hooked.d_in}",
        )
    held_out_ND = source.read_rows(total - n_eval, total) if n_eval else None
    held_out_target_NE = None
    if n_eval and isinstance(source, PairedRowFileSource):
        held_out_target_NE = source.read_target_rows(total - n_eval, total)
    return OpenedData(
        spec=spec,
        d_in=source.d_in,
        source=source,
        identity=identity,
        held_out_ND=held_out_ND,
        held_out_target_NE=held_out_target_NE,
        hooked=hooked,
    )
