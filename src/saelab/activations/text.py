"""Corpora and tokenising: documents from text files, folders, `datasets` folders or token files.

A corpus is a list of documents; a document is either a string (tokenised here) or a list of
token ids (token files, or a dataset with an `input_ids` column). Documents are dealt to ranks
round-robin (document i goes to rank i mod world_size), and every `holdout_every`-th document is
kept out of training for evaluation, so the held-out set is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.errors import ConfigError, FileFormatError, require

TEXT_SUFFIXES = (".txt", ".text", ".md")
TOKEN_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth")


def _is_saved_dataset(path: Path) -> bool:
    """`datasets`' save_to_disk writes state.json (+ dataset_info.json), or dataset_dict.json for splits."""
    return path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json"))


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{path} is not UTF-8 text: {err}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _load_token_file(path: Path, context_size: int) -> list[list[int]]:
    """[N, S] → N documents; 1-D → consecutive chunks of `context_size` tokens."""
    try:
        if path.suffix == ".npy":
            import numpy as np

            ids = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            ids = tensors.get("input_ids", tensors.get("tokens", next(iter(tensors.values()), None)))
        else:
            ids = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(ids, dict):
                ids = ids.get("input_ids", ids.get("tokens"))
    except Exception as err:  # truncated or foreign files
        raise FileFormatError(f"token file {path} cannot be read: {err}") from None
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.ndim not in (1, 2) or ids.numel() == 0:
        raise FileFormatError(
            f"token file {path} must hold one non-empty integer tensor [N] or [N, S] "
            f"(key 'input_ids' or 'tokens'), got {getattr(ids, 'dtype', type(ids))} "
            f"{tuple(getattr(ids, 'shape', ()))}"
        )
    ids = ids.long()
    if ids.ndim == 1:
        return [ids[i : i + context_size].tolist() for i in range(0, ids.shape[0], context_size)]
    return [row.tolist() for row in ids]


def _load_saved_dataset(path: Path, text_column: str, split: str | None) -> list[Any]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            "dataset", str(path), "is a `datasets` folder; install the `datasets` package to read it"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:
        raise FileFormatError(f"dataset {path} cannot be loaded with datasets.load_from_disk: {err}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds.keys())
        chosen = split or ("train" if "train" in ds else names[0])
        if chosen not in ds:
            raise ConfigError("split", chosen, f"not in the dataset {path}; its splits are {names}")
        ds = ds[chosen]
    columns = list(ds.column_names)
    if text_column in columns:
        return [str(t) for t in ds[text_column] if t is not None and str(t).strip()]
    if "input_ids" in columns:
        return [list(map(int, ids)) for ids in ds["input_ids"] if len(ids)]
    raise ConfigError(
        "text_column",
        text_column,
        f"dataset {path} has no such column and no 'input_ids' column; its columns are {columns}",
    )


def load_documents(
    path: str | Path, text_column: str = "text", context_size: int = 128, split: str | None = None
) -> list[Any]:
    """Every document of a corpus: strings, or token-id lists for pre-tokenised corpora."""
    require(isinstance(path, (str, Path)) and str(path).strip() != "", "dataset", path, "name a file or folder")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(
            "dataset",
            str(path),
            "does not exist (a text file, a folder of text files, a `datasets` "
            "save_to_disk folder or a token file; nothing is downloaded)",
        )
    if p.is_file():
        docs: list[Any] = _load_token_file(p, context_size) if p.suffix.lower() in TOKEN_SUFFIXES else _lines(p)
    elif _is_saved_dataset(p):
        docs = _load_saved_dataset(p, text_column, split)
    else:
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES + TOKEN_SUFFIXES)
        if not files:
            raise ConfigError(
                "dataset",
                str(path),
                f"folder holds no text ({', '.join(TEXT_SUFFIXES)}) or token "
                f"({', '.join(TOKEN_SUFFIXES)}) files and is not a `datasets` save_to_disk folder",
            )
        docs = []
        for f in files:
            docs.extend(_load_token_file(f, context_size) if f.suffix.lower() in TOKEN_SUFFIXES else _lines(f))
    if not docs:
        raise ConfigError("dataset", str(path), "holds no non-empty documents")
    return docs


@dataclass
class TokenBatch:
    """Padded contexts: input_ids_BS, attention_mask_BS (1 = real token)."""

    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor


class ContextStream:
    """Tokenised contexts (one document → one context, truncated to `context_size`), batched.

    Training documents are those with index % holdout_every != holdout_every − 1, dealt to ranks
    round-robin; `split="eval"` gives the held-out ones. The position (epoch, next document) is the
    whole state, so a stream resumes exactly. Each epoch visits documents in a new seeded order."""

    def __init__(
        self,
        documents: Sequence[Any],
        tokenizer: Any,
        context_size: int = 128,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        holdout_every: int = 20,
        split: str = "train",
    ):
        require(
            isinstance(context_size, int) and context_size >= 2, "context_size", context_size, "must be an integer ≥ 2"
        )
        require(split in ("train", "eval", "all"), "split", split, "must be 'train', 'eval' or 'all'")
        require(holdout_every >= 2, "holdout_every", holdout_every, "must be ≥ 2")
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.seed = int(seed)
        indices = range(len(documents))
        if split == "train":
            indices = [i for i in indices if i % holdout_every != holdout_every - 1]
        elif split == "eval":
            indices = [i for i in indices if i % holdout_every == holdout_every - 1] or [len(documents) - 1]
        mine = [documents[i] for j, i in enumerate(indices) if j % world_size == rank]
        if not mine:
            raise ConfigError(
                "dataset",
                f"{len(documents)} documents",
                f"too few for rank {rank} of {world_size} ({split} split); give a larger corpus",
            )
        self.documents = mine
        self.epoch = 0
        self.cursor = 0
        self._order = self._epoch_order()
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:  # GPT-2 style tokenisers have no pad token; padded positions are masked anyway
            pad = getattr(tokenizer, "eos_token_id", None) or 0
        self.pad_id = int(pad)

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        return torch.randperm(len(self.documents), generator=g).tolist()

    def __len__(self) -> int:
        return len(self.documents)

    def _tokenise(self, docs: list[Any]) -> list[list[int]]:
        out: list[list[int]] = [[]] * len(docs)
        texts = [(i, d) for i, d in enumerate(docs) if isinstance(d, str)]
        if texts:
            enc = self.tokenizer(
                [d for _, d in texts], truncation=True, max_length=self.context_size, add_special_tokens=True
            )["input_ids"]
            for (i, _), ids in zip(texts, enc):
                out[i] = list(ids)
        for i, d in enumerate(docs):
            if not isinstance(d, str):
                out[i] = list(d)[: self.context_size]
        return out

    def next_batch(self, n_contexts: int) -> TokenBatch:
        docs = []
        while len(docs) < n_contexts:
            if self.cursor >= len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._epoch_order()
            docs.append(self.documents[self._order[self.cursor]])
            self.cursor += 1
        return pad_batch(self._tokenise(docs), self.pad_id)

    def iter_once(self, n_contexts: int) -> Iterator[TokenBatch]:
        """Every document once, in corpus order (evaluation)."""
        for start in range(0, len(self.documents), n_contexts):
            yield pad_batch(self._tokenise(list(self.documents[start : start + n_contexts])), self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order()


def pad_batch(seqs: list[list[int]], pad_id: int) -> TokenBatch:
    seqs = [s if s else [pad_id] for s in seqs]
    S = max(len(s) for s in seqs)
    ids_BS = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(seqs), S), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids_BS[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BS[b, : len(s)] = 1
    return TokenBatch(ids_BS, mask_BS)
