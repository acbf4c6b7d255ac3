"""saelab.io: permissions follow the umask; full and read-only disks are one-line errors; stale temp files."""

import errno
import os
import time
from collections import namedtuple

import pytest

import saelab.io as sio
from saelab.errors import ConfigError, OutputError
from saelab.io import (
    atomic_path,
    current_umask,
    ensure_writable_folder,
    remove_stale_temp_files,
    write_json_atomic,
    write_text_atomic,
)


@pytest.fixture
def umask():
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(mask):
        os.umask(mask)

    yield set_umask
    os.umask(saved)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_of_any_new_file(tmp_path, umask, mask, mode):
    umask(mask)
    assert current_umask() == mask
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    write_text_atomic(tmp_path / "b.txt", "hello")
    for name in ("a.json", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert os.umask(mask) == mask  # reading it left it alone


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_is_one_line_naming_the_path_and_the_old_file_survives(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"old": True})
    monkeypatch.setattr(sio.os, "replace", disk_full)
    with pytest.raises(OutputError) as info:
        write_json_atomic(target, {"new": True})
    assert str(info.value) == f"disk full while writing {target} (No space left on device)"
    assert isinstance(info.value, OSError)
    assert '"old": true' in target.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temp file left


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_folder_is_one_line_naming_the_path(tmp_path, monkeypatch, code):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(sio.tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=f"^{tmp_path / 'x.txt'} is read-only: {os.strerror(code)}"):
        write_text_atomic(tmp_path / "x.txt", "x")
    with pytest.raises(OutputError, match="is read-only"):
        ensure_writable_folder(tmp_path / "run")


def test_an_obscure_library_error_on_a_full_disk_is_called_a_full_disk(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    with pytest.raises(RuntimeError, match="unexpected pos"):  # plenty of room: not the disk's fault
        with atomic_path(tmp_path / "w.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(sio.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OutputError, match=r"^disk full while writing .*w\.pt \(1,000 bytes free; RuntimeError: "):
        with atomic_path(tmp_path / "w.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    with pytest.raises(ConfigError):  # saelab's own errors are never re-labelled
        with atomic_path(tmp_path / "w.pt"):
            raise ConfigError("x", 1, "bad")
    assert list(tmp_path.iterdir()) == []


def test_ensure_writable_folder_creates_and_leaves_nothing(tmp_path):
    folder = ensure_writable_folder(tmp_path / "a" / "b")
    assert folder.is_dir() and list(folder.iterdir()) == []


def test_only_old_atomic_write_temp_files_are_removed(tmp_path):
    # Older than this process (a killed writer's), however long the test session has run so far.
    old = sio.process_start_time() - 600
    stale = tmp_path / ".run.json.a1b2c3d4.tmp"
    others = [
        tmp_path / "run.json.a1b2c3d4.tmp",
        tmp_path / ".run.json.tmp",
        tmp_path / ".run.json.A1B2C3D4.tmp",
        tmp_path / "data.tmp",
    ]
    for p in [stale, *others]:
        p.write_text("x")
        os.utime(p, (old, old))
    fresh = tmp_path / ".cfg.json.zzzzzzzz.tmp"
    fresh.write_text("x")
    os.utime(fresh, (time.time() + 600, time.time() + 600))
    assert remove_stale_temp_files(tmp_path) == [stale]
    assert not stale.exists() and all(p.exists() for p in others + [fresh])
    assert sio.process_start_time() <= time.time()
    assert remove_stale_temp_files(tmp_path / "missing") == []
