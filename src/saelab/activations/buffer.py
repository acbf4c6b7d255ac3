"""A shuffling buffer (batches mix many contexts) and a background prefetcher.

Consecutive tokens of one context are strongly correlated, so activations go through a buffer of
`capacity` rows: it is filled, shuffled, and its first half is handed out while the second half
waits to be mixed with the next fill (the SAELens scheme, O(1) amortised work per row).

`PrefetchSource` runs any source's `next_batch` in a background thread, so the LM's forward pass
for the next batches overlaps the SAE step on the current one (torch releases the GIL inside ops).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from saelab.errors import require


class ShuffleBuffer:
    """Rows in, shuffled rows out. `fill()` must return a fresh [n, D] tensor each call."""

    def __init__(self, fill: Callable[[], torch.Tensor], d_in: int, capacity: int, seed: int = 0):
        require(isinstance(capacity, int) and capacity >= 2, "buffer_size", capacity, "must be an integer ≥ 2")
        self.fill = fill
        self.d_in = d_in
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(int(seed))
        self.kept_ND = torch.empty(0, d_in)  # the half waiting to be mixed with the next fill
        self.ready_ND = torch.empty(0, d_in)  # shuffled rows being handed out
        self.ready_pos = 0

    def _refill(self) -> None:
        parts = [self.kept_ND]
        n = self.kept_ND.shape[0]
        while n < self.capacity:
            rows_ND = self.fill().float().cpu()
            parts.append(rows_ND)
            n += rows_ND.shape[0]
        all_ND = torch.cat(parts)
        all_ND = all_ND[torch.randperm(all_ND.shape[0], generator=self.generator)]
        half = all_ND.shape[0] // 2
        self.ready_ND, self.kept_ND, self.ready_pos = all_ND[:half], all_ND[half:], 0

    def take(self, n: int) -> torch.Tensor:
        out = []
        while n > 0:
            if self.ready_pos >= self.ready_ND.shape[0]:
                self._refill()
            chunk_ND = self.ready_ND[self.ready_pos : self.ready_pos + n]
            self.ready_pos += chunk_ND.shape[0]
            n -= chunk_ND.shape[0]
            out.append(chunk_ND)
        return out[0] if len(out) == 1 else torch.cat(out)

    def state_dict(self) -> dict[str, Any]:
        # The buffered rows themselves: resuming from the producer's position alone would skip them.
        return {
            "kept": self.kept_ND.clone(),
            "ready": self.ready_ND[self.ready_pos :].clone(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept_ND, self.ready_ND, self.ready_pos = state["kept"].float(), state["ready"].float(), 0
        self.generator.set_state(state["generator"])


class PrefetchSource:
    """Wraps an ActivationSource; a thread keeps `depth` batches of `batch_size` ready.

    The wrapped source is only touched under `_lock`, and a produced batch joins the ready list
    before that lock is released, so `state_dict` (inner position + ready batches) is always
    consistent: checkpoints resume exactly as without prefetching."""

    def __init__(self, source: Any, batch_size: int, depth: int = 2):
        require(isinstance(depth, int) and depth >= 1, "prefetch_depth", depth, "must be an integer ≥ 1")
        self.source = source
        self.d_in = source.d_in
        self.batch_size = batch_size
        self.depth = depth
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._ready: list[torch.Tensor] = []
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _worker(self) -> None:
        try:
            while not self._stop.is_set():
                with self._cond:
                    while len(self._ready) >= self.depth and not self._stop.is_set():
                        self._cond.wait(0.1)
                if self._stop.is_set():
                    return
                with self._lock:
                    batch = self.source.next_batch(self.batch_size)
                    with self._cond:
                        self._ready.append(batch)
                        self._cond.notify_all()
        except BaseException as err:  # surfaced in the trainer's thread by next_batch
            with self._cond:
                self._error = err
                self._cond.notify_all()

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if batch_size != self.batch_size:
            # Other sizes (the trainer's input-norm estimate) read directly, ready rows first.
            self.close()
            rows = self._ready + [self.source.next_batch(batch_size)]
            flat = torch.cat(rows)
            rest = flat[batch_size:]
            self._ready = [rest[i : i + self.batch_size] for i in range(0, rest.shape[0], self.batch_size)]
            if self._ready and self._ready[-1].shape[0] < self.batch_size:  # keep only whole batches
                self._ready[-1] = torch.cat(
                    [self._ready[-1], self.source.next_batch(self.batch_size - self._ready[-1].shape[0])]
                )
            return flat[:batch_size]
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, name="saelab-prefetch", daemon=True)
            self._thread.start()
        with self._cond:
            while not self._ready and self._error is None:
                self._cond.wait(0.1)
            if self._error is not None and not self._ready:
                err, self._error = self._error, None
                self._thread = None
                raise err
            batch = self._ready.pop(0)
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        """Stop the thread (batches already made stay ready)."""
        if self._thread is not None:
            self._stop.set()
            with self._cond:
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def state_dict(self) -> dict[str, Any]:
        with self._lock, self._cond:
            return {"inner": self.source.state_dict(), "prefetched": [b.clone() for b in self._ready]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.close()
        self.source.load_state_dict(state["inner"])
        self._ready = list(state["prefetched"])
