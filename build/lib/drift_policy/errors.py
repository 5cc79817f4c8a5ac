"""The errors every module shares, in one place, so that callers catch one class per kind of mistake.

Each message names what is wrong and where (the config key, the file): the command line prints it without a
traceback and exits with status 2 (``USER_ERRORS``).
"""
from __future__ import annotations

import dataclasses

__all__ = ["ConfigError", "DatasetError", "CheckpointError", "USER_ERRORS", "check_keys"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


class DatasetError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file and the problem."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


# What the command line reports as a user's mistake (exit status 2, no traceback).
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError)


def check_keys(cls, d: dict, prefix: str) -> None:
    """ConfigError naming every key of ``d`` that is not a field of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}")
