"""Experiment tracking: mirror the trainer's logged metrics and a run's final scores to wandb or TensorBoard.

Optional sinks (`saelab train --log-to wandb|tensorboard`): neither package is needed to import or
use saelab; asking for a sink whose package is missing is a one-line ConfigError naming the extra to
install (`pip install 'saelab[tensorboard]'`, `'saelab[wandb]'`). Both write offline, inside the
run folder, and never touch the network: TensorBoard event files in RUN/tensorboard/ (`tensorboard
--logdir RUN/tensorboard`), a wandb offline run in RUN/wandb/offline-run-*/ (upload it later with
`wandb sync`).

Scalar names, one namespace per SAE of the run: `<sae name>/loss`, `<sae name>/l0`,
`<sae name>/explained_variance`, `<sae name>/dead_latents`, `<sae name>/lr`, `<sae name>/loss/<part>`,
`<sae name>/coef/<name>`; evaluations during training `<sae name>/eval/<metric>`; the final scores
`<sae name>/final/<metric>` (at the last step; wandb also puts them in the run summary); and
`train/samples_per_second`. The step is the trainer's optimiser step.

A sink is anything with `log(step, metrics)`, `summary(final)` and `close()` (`Tracker`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from saelab.errors import ConfigError

SINKS = ("wandb", "tensorboard")
# sink -> (the module it imports, the saelab extra that installs it)
_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("tensorboard", "tensorboard")}
TENSORBOARD_DIR = "tensorboard"
# Final-record fields that are labels, not scores.
_NOT_SCORES = {"seed", "l0_target", "samples_per_second"}


class Tracker(Protocol):
    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One trainer log entry: `{"<sae>/<metric>": value, ...}` (a history entry of the trainer)."""
        ...

    def summary(self, final: Mapping[str, Mapping[str, Any]]) -> None:
        """The final scores, `{sae name: {metric: value}}`."""
        ...

    def close(self) -> None: ...


def parse_sinks(values: str | Iterable[str] | None) -> list[str]:
    """`["wandb,tensorboard"]`, `["tensorboard", "wandb"]` or "wandb" → unique sink names in order."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ConfigError("log_to", item, f"must be one of {', '.join(SINKS)}")
        for part in item.split(","):
            name = part.strip().lower()
            if not name:
                continue
            if name not in SINKS:
                raise ConfigError("log_to", part.strip(), f"must be one of {', '.join(SINKS)}")
            if name not in out:
                out.append(name)
    return out


def _installed(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: the import is blocked
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing(sink: str) -> ConfigError:
    module, extra = _PACKAGES[sink]
    return ConfigError(
        "log_to", sink, f"needs the {module} package, which is not installed: pip install 'saelab[{extra}]'"
    )


def check_available(sinks: Iterable[str]) -> None:
    """Before any work: a sink whose package is missing is one line naming the extra to install."""
    for sink in parse_sinks(list(sinks)):
        if not _installed(_PACKAGES[sink][0]):
            raise _missing(sink)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def flatten_log(entry: Mapping[str, Any]) -> dict[str, float]:
    """A trainer history entry as scalar names (see the module docstring); non-numbers are left out."""
    out: dict[str, float] = {}
    for key, value in entry.items():
        if key == "step":
            continue
        if key == "eval" and isinstance(value, Mapping):
            for name, scores in value.items():
                if isinstance(scores, Mapping):
                    for metric, v in scores.items():
                        if (x := _number(v)) is not None:
                            out[f"{name}/eval/{metric}"] = x
            continue
        x = _number(value)
        if x is not None:
            out["train/samples_per_second" if key == "samples_per_second" else key] = x
    return out


def flatten_final(final: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, record in final.items():
        for metric, value in record.items():
            if metric in _NOT_SCORES:
                continue
            x = _number(value)
            if x is not None:
                out[f"{name}/final/{metric}"] = x
    return out


class TensorBoardTracker:
    """Scalars to TensorBoard event files in `log_dir` (flushed at every log, so a killed run keeps them)."""

    def __init__(self, log_dir: str | Path, config: Mapping[str, Any] | None = None):
        if not _installed("tensorboard"):
            raise _missing("tensorboard")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))
        self.step = 0
        if config is not None:
            text = json.dumps(dict(config), indent=1, sort_keys=True, default=str)
            self.writer.add_text("config", "    " + text.replace("\n", "\n    "))  # indented: shown verbatim
        self.writer.flush()

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for key, value in flatten_log(metrics).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()
        self.step = max(self.step, step)

    def summary(self, final: Mapping[str, Mapping[str, Any]]) -> None:
        for key, value in flatten_final(final).items():
            self.writer.add_scalar(key, value, global_step=self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """An offline wandb run in `run_dir`/wandb (never online: upload it with `wandb sync`)."""

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any] | None = None, name: str | None = None):
        if not _installed("wandb"):
            raise _missing("wandb")
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError:
            raise _missing("wandb") from None
        run_dir = Path(run_dir)
        try:
            self.run = wandb.init(
                project="saelab",
                name=name or run_dir.name,
                dir=str(run_dir),
                mode="offline",
                config=dict(config or {}),
                reinit="create_new",  # several runs in one process (a bench, tests) each get their own
                settings=wandb.Settings(
                    silent=True, console="off", disable_git=True, save_code=False, x_disable_stats=True
                ),
            )
        except Exception as err:  # noqa: BLE001 (wandb's own errors, or a version without these settings)
            text = str(err).strip()
            first = text.splitlines()[0] if text else type(err).__name__
            version = getattr(wandb, "__version__", "?")
            raise ConfigError("log_to", "wandb", f"wandb {version} could not start an offline run: {first}") from None
        self.step = 0
        self._closed = False

    @property
    def folder(self) -> Path:
        """The offline run's folder (RUN/wandb/offline-run-<time>-<id>)."""
        return Path(self.run.dir).parent

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = flatten_log(metrics)
        if values:
            self.run.log(values, step=step)
        self.step = max(self.step, step)

    def summary(self, final: Mapping[str, Mapping[str, Any]]) -> None:
        values = flatten_final(final)
        if values:
            self.run.log(values, step=self.step)
            self.run.summary.update(values)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.finish()


class Trackers:
    """Several sinks behind one `Tracker`; closing closes each once."""

    def __init__(self, trackers: list[Any]):
        self.trackers = trackers

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        for t in self.trackers:
            t.log(step, metrics)

    def summary(self, final: Mapping[str, Mapping[str, Any]]) -> None:
        for t in self.trackers:
            t.summary(final)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()


def open_trackers(
    sinks: Iterable[str], run_dir: str | Path, config: Mapping[str, Any] | None = None, name: str | None = None
) -> Trackers | None:
    """The sinks named (None for none), writing inside `run_dir`."""
    names = parse_sinks(list(sinks))
    if not names:
        return None
    check_available(names)
    run_dir = Path(run_dir)
    opened: list[Any] = []
    try:
        for sink in names:
            if sink == "tensorboard":
                opened.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR, config))
            else:
                opened.append(WandbTracker(run_dir, config, name))
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
