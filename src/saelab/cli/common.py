"""Helpers shared by the CLI commands: counts like '5M', multi-value options, printing results."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

import typer
from rich.table import Table

from saelab.cli.terminal import MediumConsole
from saelab.errors import ConfigError
from saelab.metrics.names import RUN_METRICS, table_columns

# Messages on stderr, results on stdout; on a file or a pipe neither is cut to 80 columns (cli/terminal.py).
console = MediumConsole(stderr=True)
out = MediumConsole()

# Options that take several values: `--l0 10 12 14` is read as `--l0 10 --l0 12 --l0 14`.
MULTI_VALUE_OPTIONS = {"--l0", "--arch", "--ablate", "--saes", "--log-to"}
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
    """One JSON line. NaN and ±inf are not JSON: they print as null, at any depth."""
    print(json.dumps(json_safe(obj), allow_nan=False), flush=True)


def json_safe(o: Any) -> Any:
    """`o` with numpy/torch scalars and arrays made plain, non-finite floats made None, and anything
    else JSON cannot hold made a string."""
    if o is None or isinstance(o, (bool, str)):
        return o
    if isinstance(o, int):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {str(k) if not isinstance(k, (str, int, float, bool)) else k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in o]
    if hasattr(o, "tolist") and callable(o.tolist):  # numpy/torch scalars and arrays
        try:
            return json_safe(o.tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    if hasattr(o, "item") and callable(o.item):
        try:
            return json_safe(o.item())
        except (TypeError, ValueError, RuntimeError):
            pass
    return str(o)


SEED_MAX = 2**32 - 1


def check_seed(seed: int, field: str = "seed") -> int:
    """Seeds are 0 ≤ seed < 2³²: numpy's range, and room for the offsets runs add before torch's int64."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(field, seed, f"must be an integer from 0 to {SEED_MAX}")
    return seed


def results_table(title: str, rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> Table:
    """columns: (key, header, format) e.g. ("f1", "F1", "{:.3f}")."""
    table = Table(title=title)
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append(
                "—" if value is None else (fmt.format(value) if isinstance(value, (int, float)) else str(value))
            )
        table.add_row(*cells)
    return table


# What a synthetic-data run prints per SAE: the ground-truth scores, then reconstruction.
SYNTHETIC_METRICS = RUN_METRICS
METRIC_COLUMNS = [("name", "SAE", "{}"), *table_columns(SYNTHETIC_METRICS)]


# Options shared by every command that loads saved SAEs: importing a user's class is opt-in.
TRUST_CODE_OPTION: Any = typer.Option(
    False,
    "--trust-code",
    help="Import the class a cfg.json names when it is not a registered architecture "
    "(runs code the folder names; only for folders you trust).",
)
USER_ARCHS_OPTION: Any = typer.Option(
    [],
    "--arch",
    metavar="MODULE:CLASS",
    help="Your own architecture(s), module:Class or path/to/file.py:Class, imported (its code runs) "
    "so saved SAEs naming it load.",
)


def arch_names_help() -> str:
    """'Registered: abstopk, batchtopk, ... (and recipe-no_<component> ablations).' for --arch help texts."""
    from saelab.saes.registry import SAE_REGISTRY, load_builtin_architectures

    load_builtin_architectures()
    names = sorted(SAE_REGISTRY)
    ablated = sorted({n.split("-no_")[0] for n in names if "-no_" in n})
    text = "Registered: " + ", ".join(n for n in names if "-no_" not in n)
    if ablated:
        text += " (and the " + ", ".join(f"{n}-no_<component>" for n in ablated) + " ablations)"
    return text + "."


def estimate_printer(json_output: bool, max_minutes: float | None):
    """Prints the wall-time estimate a comparison makes before it trains (a JSON line with --json)."""

    def on_estimate(est: Any) -> None:
        if json_output:
            print_json(est.to_dict())
        else:
            console.print(f"{est.describe()}; this is an estimate")
        if max_minutes is not None and est.seconds > max_minutes * 60:
            console.print(f"warning: the estimate exceeds --max-minutes {max_minutes:g}: expect a partial result")

    return on_estimate
