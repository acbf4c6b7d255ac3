"""Checking a `--device` name before any work starts: one clear error instead of a torch traceback later."""

from __future__ import annotations

import torch

from saelab.errors import ConfigError


def resolve_device(name: str | torch.device, field: str = "device") -> str:
    """The device string for `name` ("cpu", "cuda", "cuda:1", "mps"), checked to exist on this machine.

    Raises ConfigError(field, name, reason) for a name torch does not parse, a CUDA device when this
    torch has no CUDA or no GPU is visible, an index past the last GPU, or an unavailable MPS."""
    text = str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(field, name, "is not a device name; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConfigError(field, name, f"CUDA is not available ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(field, name, f"this machine has {count} CUDA device(s): cuda:0..cuda:{count - 1}")
        return str(device)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(field, name, "MPS is not available on this machine; use --device cpu")
        return str(device)
    raise ConfigError(field, name, f"device type {device.type!r} is not supported; use cpu, cuda, cuda:N or mps")
