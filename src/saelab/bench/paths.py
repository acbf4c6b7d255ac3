"""Output paths checked before any work starts: a bad --out or --store must fail in a second, not after training."""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

from saelab.errors import ConfigError


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, field: str, value: str) -> None:
    # A real file creation, not os.access: root passes access() checks that a read-only mount or chattr +i still refuses.
    try:
        fd, probe = tempfile.mkstemp(prefix=".saelab-probe-", dir=folder)
    except OSError as err:
        raise ConfigError(field, value, f"folder {folder} is not writable: {err.strerror or err}") from None
    os.close(fd)
    os.unlink(probe)


def check_writable_dir(path: str | os.PathLike[str], field: str = "out") -> Path:
    """Fail unless `path` is, or could be created as, a writable folder. Creates nothing."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(field, str(path), "is a file; give a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise ConfigError(field, str(path), f"cannot be created: {existing} is a file, not a folder")
    _probe_writable(existing, field, str(path))
    return path


def check_output_file(path: str | os.PathLike[str], field: str = "out") -> Path:
    """Fail unless `path` can be written as a file (an existing file is overwritten; missing folders are created)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(field, str(path), "is a folder; give a file name inside it")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise ConfigError(field, str(path), f"cannot be created: {existing} is a file, not a folder")
    _probe_writable(existing, field, str(path))
    return path


def make_unique_run_dirs(out_dir: str | os.PathLike[str], prefix: str, suffixes: list[str], attempts: int = 20) -> str:
    """Create `out_dir/{prefix}-{stamp}{suffix}` for every suffix and return the stamp.

    The stamp is the time to the second plus a random tag, and every folder is made with exist_ok=False, so two
    benches started in the same second (or on two hosts sharing the folder) never share a run folder."""
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError("out", str(out_dir), f"cannot create the folder: {err.strerror or err}") from None
    for _ in range(attempts):
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        made: list[Path] = []
        try:
            for suffix in suffixes:
                folder = out_dir / f"{prefix}-{stamp}{suffix}"
                folder.mkdir(exist_ok=False)
                made.append(folder)
            return stamp
        except FileExistsError:
            for folder in made:  # give back the ones this attempt took; they are still empty
                folder.rmdir()
        except OSError as err:
            for folder in made:
                folder.rmdir()
            raise ConfigError("out", str(out_dir), f"cannot create a run folder: {err.strerror or err}") from None
    raise ConfigError("out", str(out_dir), f"no free run folder name after {attempts} attempts")
