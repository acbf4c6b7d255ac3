"""Training progress for the person waiting: a live bar on a terminal, a plain line every so often elsewhere.

On a terminal (stderr) the trainer shows a rich progress bar. Written to a file or a pipe a bar prints
nothing until the end, so there the trainer prints one plain line instead: at the start, then at most
every `SAELAB_PROGRESS_SECONDS` seconds (default 30; 0 = at every logged step), and at the last step:

    seed 1: step 1,200/5,860 (20%), 48,210 samples/s, ETA 1.6 min | matryoshka-l0_12: loss 0.0123, train L0 12.0, dead 0

Bench workers (`bench --jobs N`) share one stderr, where live bars would overwrite each other: they print
plain lines, labelled with their seed (`progress_label`), whatever stderr is. The L0 and dead count are the
training batches' (what the trainer sees); the final evaluation measures them on fresh samples.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

from saelab.errors import ConfigError
from saelab.formatting import format_duration

PROGRESS_SECONDS_ENV = "SAELAB_PROGRESS_SECONDS"
DEFAULT_PROGRESS_SECONDS = 30.0
SHOWN_SAES = 3  # per-SAE figures for the first few SAEs; a line per SAE would bury the step count

_label: str | None = None  # what the lines and the bar are called ("seed 1"); None: "train"
_force_plain = False


def progress_seconds() -> float:
    """Seconds between plain progress lines: $SAELAB_PROGRESS_SECONDS, else 30."""
    raw = os.environ.get(PROGRESS_SECONDS_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_PROGRESS_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(PROGRESS_SECONDS_ENV, raw, "must be a number of seconds ≥ 0 (0: a line at every logged step)")
    return value


def interval_text(seconds: float) -> str:
    """'every 30 s', or 'at every logged step' for 0."""
    return "at every logged step" if seconds == 0 else f"every {format_duration(seconds)}"


@contextlib.contextmanager
def progress_label(label: str, plain: bool = False) -> Iterator[None]:
    """Within the block, training progress is called `label`; `plain=True` prints plain lines even on a terminal."""
    global _label, _force_plain
    previous = _label, _force_plain
    _label, _force_plain = label, plain or _force_plain
    try:
        yield
    finally:
        _label, _force_plain = previous


def _stderr_is_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal


def sae_summary(name: str, last: Mapping[str, Any]) -> str:
    """'batchtopk-l0_12: loss 0.0123, train L0 12.0, silent 3 (no firing in recent batches), dead 0 (AuxK)' from the
    trainer's latest figures of one SAE. Training-batch figures: the final evaluation measures L0 and dead
    latents (never firing) on fresh samples with the inference SAE; `silent` is the estimate of that count."""
    parts = []
    if "loss" in last:
        parts.append(f"loss {last['loss']:.3g}")
    if "l0" in last:
        parts.append(f"train L0 {last['l0']:.1f}")
    if "silent_latents" in last:  # the training-time estimate of the final "dead" (see trainer.SILENT_WINDOW_SAMPLES)
        parts.append(f"silent {last['silent_latents']:.0f} (no firing in recent batches)")
    if "dead_latents" in last:  # AuxK's: silent for over dead_feature_window steps (0 in a run shorter than that)
        parts.append(f"dead {last['dead_latents']:.0f}" + (" (AuxK)" if "silent_latents" in last else ""))
    return f"{name}: {', '.join(parts)}" if parts else name


def progress_line(
    label: str,
    step: int,
    total: int,
    rate: float,
    eta_seconds: float | None,
    lasts: Mapping[str, Mapping[str, Any]],
) -> str:
    """One plain progress line: step/total, samples/s, ETA and the first SAEs' loss, L0 and dead latents."""
    pct = 100.0 * step / max(total, 1)
    head = f"{label}: step {step:,}/{total:,} ({pct:.0f}%), {rate:,.0f} samples/s"
    if step >= total:
        head += ", done"
    elif eta_seconds is not None:
        head += f", ETA {format_duration(eta_seconds)}"
    saes = [sae_summary(name, last) for name, last in list(lasts.items())[:SHOWN_SAES] if last]
    if len(lasts) > SHOWN_SAES:
        saes.append(f"(+{len(lasts) - SHOWN_SAES} more)")
    return " | ".join([head, *saes])


class TrainingProgress:
    """The trainer's progress display: `start(step)`, `update(step, rate, states)` at logged steps, `stop()`.

    `states` maps SAE names to objects with a `last` dict (the trainer's SAEState). Plain lines go to stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled
        self.label = _label or "train"
        self.plain = enabled and (_force_plain or not _stderr_is_terminal())
        self.interval = progress_seconds() if enabled else DEFAULT_PROGRESS_SECONDS
        self._progress: Any = None
        self._task: Any = None
        self._started_at = 0.0
        self._start_step = 0
        self._last_line = 0.0

    def start(self, step: int) -> None:
        if not self.enabled:
            return
        self._started_at = self._last_line = time.monotonic()
        self._start_step = step
        if self.plain:
            resumed = f" (from step {step:,} of {self.total:,})" if step else ""
            every = interval_text(self.interval)
            self._print(f"{self.label}: {self.total - step:,} steps to train{resumed}; a progress line {every}")
            return
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(
            TextColumn(f"[bold]{escape(self.label)}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.label, total=self.total, completed=step, info="")

    def eta_seconds(self, step: int) -> float | None:
        """Seconds left at this session's pace; None before the first step of the session."""
        done = step - self._start_step
        if done <= 0:
            return None
        return (self.total - step) * (time.monotonic() - self._started_at) / done

    def update(self, step: int, rate: float, states: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        lasts = {name: dict(getattr(s, "last", None) or {}) for name, s in states.items()}
        if self.plain:
            now = time.monotonic()
            if step >= self.total or now - self._last_line >= self.interval:
                self._last_line = now
                self._print(progress_line(self.label, step, self.total, rate, self.eta_seconds(step), lasts))
            return
        if self._progress is None:
            return
        from rich.markup import escape

        parts = [f"{rate:,.0f} samples/s"]
        for name, last in list(lasts.items())[:SHOWN_SAES]:
            if last:
                ev = last.get("explained_variance")
                parts.append(escape(sae_summary(name, last)) + (f", EV {ev:.3f}" if ev is not None else ""))
        if len(lasts) > SHOWN_SAES:
            parts.append(f"(+{len(lasts) - SHOWN_SAES} more)")
        self._progress.update(self._task, completed=step, info=" | ".join(parts))

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    @staticmethod
    def _print(line: str) -> None:
        print(line, file=sys.stderr, flush=True)
