"""Errors that name the offending field and value, so bad input never fails obscurely."""

from __future__ import annotations

from typing import Any


class SaelabError(Exception):
    """Base class for every error saelab raises on purpose."""


class ConfigError(SaelabError, ValueError):
    """An invalid configuration value. The message names the field and the value."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class FileFormatError(SaelabError, ValueError):
    """A file that is missing, corrupt, truncated or of the wrong kind."""


class TrainingDivergedError(SaelabError, RuntimeError):
    """The loss became NaN or infinite, or exploded; training stopped and the last good checkpoint was kept."""


class TrainingInterrupted(SaelabError):
    """SIGINT or SIGTERM stopped training after a checkpoint was saved; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int = 130):
        self.exit_code = exit_code
        super().__init__(message)


class OutputError(SaelabError, OSError):
    """An output could not be written: the disk is full or the folder read-only. Names the path."""


def require(condition: bool, field: str, value: Any, reason: str) -> None:
    """Raise ConfigError(field, value, reason) unless condition holds."""
    if not condition:
        raise ConfigError(field, value, reason)
