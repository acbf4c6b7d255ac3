"""Memory estimates checked before allocating: a huge --width or --batch-size is refused in a second,
with the field named, instead of a torch allocator traceback or the kernel's OOM killer later."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from saelab.errors import ConfigError

FLOAT_BYTES = 4


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_headroom() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without one."""
    limit = _read_int("/sys/fs/cgroup/memory.max")  # "max" (no limit) is not a number: None
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is None or used is None:
        return None
    return max(0, limit - used)


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new allocation on `device` can use now, or None where it cannot be told."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    if dev.type != "cpu":
        return None
    avail = None
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        avail = fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        try:  # not Linux: total physical memory is the best bound there is
            avail = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            return None
    cgroup = _cgroup_headroom()
    return avail if cgroup is None else min(avail, cgroup)


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def require_memory(field: str, value: object, nbytes: int, device: str | torch.device, what: str) -> None:
    """ConfigError(field, value) when `nbytes` (a lower bound of what `what` needs) exceeds what is free."""
    avail = available_bytes(device)
    if avail is not None and nbytes > avail:
        raise ConfigError(
            field,
            value,
            f"{what} needs at least {format_bytes(nbytes)} of memory, but "
            f"{format_bytes(avail)} is available on {device}",
        )


def check_training_memory(d_in: int, width: int, batch_size: int, n_saes: int, device: str | torch.device) -> None:
    """Refuse a run whose SAEs or batches cannot fit, naming the option to lower.

    Lower bounds only (float32): W_enc and W_dec of every SAE with their gradients and two Adam
    moments; a batch of inputs with its reconstruction, residual and gradient; the dense [batch, width]
    pre-activations of one SAE's step and their gradient."""
    params = 4 * 2 * n_saes * width * d_in * FLOAT_BYTES
    require_memory(
        "width",
        width,
        params,
        device,
        f"{n_saes} SAE(s) of width {width} on {d_in}-dim inputs (weights, gradients and Adam moments)",
    )
    batch = 4 * batch_size * d_in * FLOAT_BYTES
    require_memory("batch_size", batch_size, batch, device, f"a batch of {batch_size} {d_in}-dim inputs")
    step = params + batch + 2 * batch_size * width * FLOAT_BYTES
    require_memory(
        "batch_size",
        batch_size,
        step,
        device,
        f"a training step at width {width} "
        f"([batch_size, width] pre-activations and their gradient); lower --batch-size or --width",
    )
