"""Atomic file writes: a reader never sees a half-written file, a kill never leaves one behind.

A write that fails because the disk is full or the folder is read-only raises OutputError naming
the path (one line), not the OSError or the library error (torch: `unexpected pos ...`) beneath.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from saelab.errors import FileFormatError, OutputError, SaelabError

# atomic_path's temporary files: ".<name>.<8 random chars from tempfile>.tmp"
TEMP_FILE_PATTERN = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
# A write that fails with another error while less than this is free is blamed on the full disk.
LOW_FREE_BYTES = 16 * 1024 * 1024
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_umask_lock = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return,
    and another thread creating a file between the two calls would get umask 0)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def output_error(err: BaseException, path: str | os.PathLike[str]) -> OutputError | None:
    """The one-line OutputError for a failed write of `path`, or None when the cause is not the disk."""
    if isinstance(err, OutputError):
        return err
    if isinstance(err, SaelabError):  # raised on purpose inside the write; not about the disk
        return None
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in _DISK_FULL:
            return OutputError(f"disk full while writing {path} ({os.strerror(err.errno)})")
        if err.errno in _READ_ONLY:
            return OutputError(f"{path} is read-only: {os.strerror(err.errno)}; choose another output folder")
    if isinstance(err, Exception):
        # Libraries that write through their own native streams report a full disk obscurely
        # (torch.save: "unexpected pos ..."); free space tells whether that was the cause.
        free = _free_bytes(Path(path).parent)
        if free is not None and free < LOW_FREE_BYTES:
            return OutputError(
                f"disk full while writing {path} ({free:,} bytes free; "
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            )
    return None


def _free_bytes(folder: Path) -> int | None:
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed onto `path`.

    The file gets the permissions of any new file (0666 minus the umask), not mkstemp's private 0600."""
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp_path = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        except OSError:
            pass  # a filesystem without permissions (some network mounts): keep mkstemp's mode
        finally:
            os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except Exception as err:
        translated = output_error(err, path)  # before the temp file goes: it shows how full the disk is
        if translated is None or translated is err:
            raise
        raise translated from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file this library wrote; FileFormatError naming the file when it is not JSON (never a traceback)."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise FileFormatError(f"{path} is not a readable JSON file ({type(err).__name__}: {err})") from None


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def ensure_writable_folder(folder: str | os.PathLike[str]) -> Path:
    """Create `folder` and prove a file can be written there, before any work is spent on its contents."""
    folder = Path(folder)
    probe: Path | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".write-probe.", dir=folder)
        probe = Path(name)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        translated = output_error(err, folder)
        if translated is None:
            raise OutputError(f"cannot write to {folder}: {err.strerror or err}") from None
        raise translated from None
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    return folder


def process_start_time() -> float:
    """When this process started (epoch seconds), from /proc where available."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime: field 22, counted from boot in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


_IMPORTED_AT = time.time()


def remove_stale_temp_files(folder: str | os.PathLike[str], before: float | None = None) -> list[Path]:
    """Delete atomic_path's temporary files in `folder` older than `before` (default: this process's
    start), i.e. those left by a killed writer; a live writer's temp file is newer. Returns them."""
    folder = Path(folder)
    cutoff = process_start_time() if before is None else before
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not TEMP_FILE_PATTERN.match(entry.name):
            continue
        try:
            if entry.is_file() and not entry.is_symlink() and entry.stat().st_mtime < cutoff:
                entry.unlink()
                removed.append(entry)
        except OSError:
            continue
    return removed
