"""Helpers shared by the CLI commands: counts like '5M', multi-value options, printing results."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable

from rich.console import Console
from rich.table import Table

from saelab.errors import ConfigError

console = Console(stderr=True)
out = Console()

# Options that take several values: `--l0 10 12 14` is read as `--l0 10 --l0 12 --l0 14`.
MULTI_VALUE_OPTIONS = {"--l0", "--arch", "--ablate"}
_SUFFIXES = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000, "g": 1_000_000_000}


def parse_count(text: str | int, field: str = "samples") -> int:
    """'5M' → 5_000_000, '200k' → 200_000, '1e6' → 1_000_000."""
    if isinstance(text, int):
        value = text
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        mult = 1
        if s and s[-1] in _SUFFIXES:
            mult, s = _SUFFIXES[s[-1]], s[:-1]
        try:
            number = float(s)
        except ValueError:
            raise ConfigError(field, text, "must be a count such as 5000000, 5M or 200k") from None
        if not math.isfinite(number):
            raise ConfigError(field, text, "must be finite")
        value = int(round(number * mult))
    if value <= 0:
        raise ConfigError(field, text, "must be positive")
    return value


def expand_multi_value_args(argv: list[str]) -> list[str]:
    """Rewrite `--l0 10 12 14` / `--l0 5..25` into repeated options click understands."""
    result: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in MULTI_VALUE_OPTIONS:
            values = []
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                values.append(argv[i])
                i += 1
            if not values:
                result.append(token)
                continue
            for value in values:
                for item in _expand_range(value) if token == "--l0" else value.split(","):
                    result.extend([token, item])
            continue
        result.append(token)
        i += 1
    return result


def _expand_range(value: str) -> list[str]:
    """'5..25' → 5, 6, ..., 25; '5..25:5' → 5, 10, ..., 25; '10,12' → 10, 12."""
    items = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*([0-9.]+)\.\.([0-9.]+)(?::([0-9.]+))?\s*", part)
        if not m:
            items.append(part)
            continue
        start, stop, step = float(m.group(1)), float(m.group(2)), float(m.group(3) or 1)
        if step <= 0 or stop < start:
            raise ConfigError("l0", value, "a range must be START..STOP[:STEP] with STOP ≥ START and STEP > 0")
        n = int(math.floor((stop - start) / step + 1e-9)) + 1
        items.extend(f"{start + j * step:g}" for j in range(n))
    return items


def parse_l0_values(values: Iterable[str]) -> list[float]:
    out_values = []
    for v in values:
        try:
            number = float(v)
        except ValueError:
            raise ConfigError("l0", v, "must be a number (or a range such as 5..25)") from None
        if not math.isfinite(number) or number <= 0:
            raise ConfigError("l0", v, "must be a positive number")
        out_values.append(number)
    return out_values


def print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default), flush=True)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def results_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> Table:
    """columns: (key, header, format) e.g. ("f1", "F1", "{:.3f}")."""
    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("—" if value is None else (fmt.format(value) if isinstance(value, (int, float)) else str(value)))
        table.add_row(*cells)
    return table


METRIC_COLUMNS = [
    ("name", "SAE", "{}"),
    ("f1", "F1", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("mcc", "MCC", "{:.3f}"),
    ("uniqueness", "uniqueness", "{:.3f}"),
    ("explained_variance", "EV", "{:.3f}"),
    ("l0", "L0", "{:.2f}"),
    ("dead_latents", "dead", "{}"),
]
