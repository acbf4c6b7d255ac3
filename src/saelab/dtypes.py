"""The torch dtypes saelab accepts by name in configs and on the command line, in one map."""

from __future__ import annotations

from collections.abc import Collection

import torch

from saelab.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def dtype_from_name(name: str, field: str = "dtype", allowed: Collection[str] | None = None) -> torch.dtype:
    """The torch dtype called `name` ("float32", ...). `allowed` narrows the choice where a caller
    supports fewer (a synthetic model: float32/float64). Anything else raises ConfigError naming
    `field`, the value and the choices."""
    choices = [n for n in DTYPES if allowed is None or n in allowed]
    if not isinstance(name, str) or name not in choices:
        raise ConfigError(field, name, f"must be one of {', '.join(choices)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name `dtype_from_name` takes for `dtype` (torch.bfloat16 -> "bfloat16")."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ConfigError("dtype", dtype, f"has no saelab name; use one of {', '.join(DTYPES)}")
