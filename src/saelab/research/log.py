"""The experiment log: append-only JSON lines that survive kills and concurrent writers.

Every append takes an exclusive `fcntl.flock` on the file, writes one whole line with a single `O_APPEND`
write (looping only if the kernel wrote part of it), fsyncs, and releases the lock. A writer killed mid-write
can leave at most one torn line, and only at the end: the next writer (holding the lock) first ends that
fragment with a newline, so its own line stays whole. Readers take no lock; they skip a torn last line (a
write in progress, or the remains of a killed one) and any other line that is not a JSON object.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saelab.errors import ConfigError, OutputError


@dataclass
class LogRead:
    entries: list[dict[str, Any]]
    torn_tail: bool = False  # the last line had no newline (a write in progress or killed): ignored
    bad_lines: list[int] = field(default_factory=list)  # 1-based numbers of other unreadable lines, skipped


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the file's own fsync still holds
    finally:
        os.close(fd)


class ExperimentLog:
    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def append(self, entry: dict[str, Any]) -> None:
        """Append `entry` as one JSON line (see the module docstring for the guarantees)."""
        if not isinstance(entry, dict):
            raise ConfigError("entry", type(entry).__name__, "must be a dict")
        try:
            line = json.dumps(entry, sort_keys=True, allow_nan=False, ensure_ascii=False)
        except (TypeError, ValueError) as err:
            raise ConfigError("entry", entry.get("id"), f"is not plain JSON: {err}") from None
        data = (line + "\n").encode("utf-8")
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise OutputError(f"cannot open the experiment log {self.path}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a killed writer's torn line; it stays unreadable, ours stays whole
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError as err:
            raise OutputError(f"cannot append to the experiment log {self.path}: {err.strerror or err}") from None
        finally:
            os.close(fd)  # also releases the lock
        if created:
            _fsync_dir(self.path.parent)  # the new file's name survives a crash too

    def read(self) -> LogRead:
        """Every complete entry, oldest first; a missing log reads as empty."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return LogRead([])
        except OSError as err:
            raise OutputError(f"cannot read the experiment log {self.path}: {err.strerror or err}") from None
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        result = LogRead([], torn_tail=bool(tail.strip()))
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                result.bad_lines.append(number)
                continue
            if isinstance(entry, dict):
                result.entries.append(entry)
            else:
                result.bad_lines.append(number)
        return result

    def entries(self) -> list[dict[str, Any]]:
        return self.read().entries

    def find(self, entry_id: str) -> dict[str, Any]:
        """The entry with this id (the last one, should an id repeat); ConfigError naming it otherwise."""
        found = [e for e in self.entries() if e.get("id") == entry_id]
        if not found:
            raise ConfigError("id", entry_id, f"is not in the experiment log {self.path}")
        return found[-1]
