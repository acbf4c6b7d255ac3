"""JSON-safe values shared by the results store, the leaderboard and the exports."""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from typing import Any


def now_utc() -> str:
    # One fixed UTC format, so stored time strings sort (and compare with `since`) as times.
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def clean(value: Any) -> Any:
    """JSON-safe copy: tensor/numpy scalars become numbers, NaN/inf become None (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        try:
            return clean(value.item())
        except (ValueError, RuntimeError):  # a tensor/array with several elements
            pass
    if hasattr(value, "tolist"):
        return clean(value.tolist())
    return str(value)


def number(value: Any) -> float | int | None:
    """A finite int or float, else None (bools are not numbers here)."""
    value = clean(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def dumps(value: Any) -> str:
    return json.dumps(clean(value), sort_keys=True, allow_nan=False)
