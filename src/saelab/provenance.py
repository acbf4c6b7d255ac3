"""The envelope every result carries: config, saelab version, git commit, hardware and time."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from saelab import __version__


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the saelab source tree ('+dirty' when it has local changes), or 'unknown'."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=5)
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=src, capture_output=True, text=True, timeout=5
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def hardware(device: str | torch.device = "cpu") -> dict[str, Any]:
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def envelope(config: dict[str, Any], device: str | torch.device = "cpu") -> dict[str, Any]:
    return {
        "config": config,
        "config_hash": config_hash(config),
        "saelab_version": __version__,
        "commit": git_commit(),
        "hardware": hardware(device),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
