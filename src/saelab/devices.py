"""Checking a `--device` name before any work starts: one clear error instead of a torch traceback later."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


# ----- numeric precision ------------------------------------------------------------------------
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (AMX or AVX512-BF16).

    Without them torch emulates bf16 matmuls: measured 240× slower than fp32 (15.9 s vs 66 ms for
    1024×768 @ 768×4096, 2 threads, AMD EPYC with AVX2 only), so `auto` must never pick bf16 there."""
    flags = _cpu_flags()
    if flags is not None:
        return "amx_bf16" in flags or "avx512_bf16" in flags
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # not Linux: ask oneDNN
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether `device` runs bf16 matmuls natively (CPU: AMX/AVX512-BF16; CUDA: Ampere or newer)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return cpu_has_native_bf16()
    if dev.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return False


def resolve_precision(precision: str, device: str | torch.device, field: str = "precision") -> str:
    """Returns "fp32" or "bf16": `auto` is bf16 exactly where the device has native bf16 matmuls."""
    if precision not in PRECISIONS:
        raise ConfigError(field, precision, f"must be one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if has_native_bf16(device) else "fp32"
    return precision


def emulated_bf16_warning(precision: str, device: str | torch.device) -> str | None:
    """A one-line warning when bf16 was asked for on a device without bf16 matrix units."""
    if precision == "bf16" and not has_native_bf16(device):
        how = (
            "its bf16 matmuls are emulated: rounded exactly as bf16 hardware rounds them, computed in fp32, so the "
            "numerics are bf16's; the products run at fp32 speed, the other bf16 ops may still be slow"
            if torch.device(device).type == "cpu"
            else "torch emulates bf16 there, far slower than fp32"
        )
        return (
            f"--precision bf16 on {device}: this device has no native bf16 matrix units; {how}. Use --precision auto "
            "(fp32 here) unless you are checking bf16 numerics"
        )
    return None


_ATEN = torch.ops.aten
# The products CPU autocast runs in bf16 (linear and matmul reach the dispatcher as these), and their backwards.
_BF16_GEMMS = frozenset(
    {
        _ATEN.mm.default,
        _ATEN.bmm.default,
        _ATEN.addmm.default,
        _ATEN.baddbmm.default,
        _ATEN.addbmm.default,
        _ATEN.mv.default,
        _ATEN.addmv.default,
        _ATEN.dot.default,
    }
)


class EmulatedBf16Matmuls(TorchDispatchMode):
    """bf16 matmul numerics on a CPU without bf16 units, at fp32 speed.

    Torch's own bf16 GEMM on such a CPU is 50–240× slower than fp32 (measured, AVX2-only EPYC). bf16
    hardware (AMX, tensor cores) multiplies bf16 inputs exactly and accumulates in fp32, then rounds the
    result to bf16. A product of two bf16 values is exact in fp32, so widening the bf16 inputs, running the
    fp32 GEMM and rounding its output gives the same numbers up to summation order. Every other op runs on
    the bf16 tensors as it would under autocast on bf16 hardware. `calls` counts the rerouted products."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _BF16_GEMMS and any(_is_cpu_bf16(a) for a in args):
            self.calls += 1
            wide = [a.float() if _is_cpu_bf16(a) else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def _is_cpu_bf16(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 and value.device.type == "cpu"


def bf16_emulation(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager[Any]:
    """EmulatedBf16Matmuls where a resolved "bf16" runs on a CPU without bf16 units, else a no-op context.

    Wrap the backward pass in it too: autograd multiplies the saved bf16 tensors there, outside autocast."""
    if precision == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        return EmulatedBf16Matmuls()
    return contextlib.nullcontext()


@contextlib.contextmanager
def precision_autocast(precision: str, device: str | torch.device) -> Iterator[None]:
    """The context a resolved precision runs its matmuls in: bf16 autocast for "bf16" (emulated where the CPU
    has no bf16 units, see EmulatedBf16Matmuls), a disabled autocast for "fp32"."""
    with (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"),
        bf16_emulation(precision, device),
    ):
        yield
