"""The errors every module shares, in one place, so that callers catch one class per kind of mistake.

Each message names what is wrong and where (the config key, the file): the command line prints it without a
traceback and exits with status 2 (``USER_ERRORS``).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing

__all__ = ["ConfigError", "DatasetError", "CheckpointError", "RunFolderError", "RunDirError", "DivergenceError",
           "USER_ERRORS",
           "check_keys", "check_types", "closest", "unknown_key_error"]


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


class DatasetError(ValueError):
    """A data file is missing, malformed or inconsistent; the message names the file and the problem."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or corrupted; the message names the file."""


class RunFolderError(FileNotFoundError):
    """A path is not a run folder (no config.json), or holds nothing the command needs; the message names it."""


class RunDirError(RuntimeError):
    """A run folder is in use by another training, or holds a run that would be overwritten; the message says
    what to do."""


class DivergenceError(FloatingPointError):
    """Training diverged (non-finite losses, gradients or weights) and stopped; the message names the step, where
    the last good weights are, and what to change."""


# What the command line reports as a user's mistake (exit status 2, one line, no traceback): a bad key or value,
# a bad data file, a missing/corrupt/mismatched checkpoint or pretrained folder (safetensors and state-dict errors
# are raised as CheckpointError by the loaders), a run folder in use, a training that diverged (a learning rate
# too high), a file that is not valid JSON (e.g. a run's config.json), and a path that cannot be read or written.
# Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DatasetError, CheckpointError, RunDirError,
                                            RunFolderError, DivergenceError, json.JSONDecodeError, OSError)


def closest(word: str, choices) -> str | None:
    """The choice that ``word`` is most likely a typo of, or None."""
    near = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return near[0] if near else None


def check_keys(cls, d: dict, prefix: str) -> None:
    """ConfigError naming every key of ``d`` that is not a field of the dataclass ``cls`` (and the real key it is
    most likely a typo of)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        named = [prefix + k + (f" (did you mean {prefix}{near}?)" if (near := closest(k, known)) else "")
                 for k in unknown]
        raise ConfigError(f"unknown key(s) {', '.join(named)}; known: {sorted(known)}")


def unknown_key_error(key: str, value: str | None, tree: dict) -> ConfigError:
    """ConfigError for an override ``key=value`` of a key that the composed config ``tree`` (plain dicts) does
    not have, naming the closest real key with the value: ``train.lrr=0.1`` -> "did you mean train.lr=0.1?".
    Never a ``+key`` hint: an added key is refused by ``check_keys``."""
    parts, node = key.split("."), tree
    for i, part in enumerate(parts):
        if not isinstance(node, dict):
            return ConfigError(f"unknown key {key}: {'.'.join(parts[:i])} is a value, not a group of keys")
        if part not in node:
            break
        node = node[part]
    else:
        return ConfigError(f"unknown key {key}")
    where, known = ".".join(parts[:i]), sorted(map(str, node))
    listed = f"(keys of {where or 'the config'}: {', '.join(known)})"
    near = closest(part, known)
    if near is None:
        return ConfigError(f"unknown key {key} {listed}")
    fix = ".".join([*parts[:i], near, *parts[i + 1:]]) + ("" if value is None else f"={value}")
    return ConfigError(f"unknown key {key}; did you mean {fix}? {listed}")


def check_types(obj, prefix: str) -> None:
    """Check (and normalise) every field of a config dataclass against its annotation, in place.

    One generic check instead of a ``try/except`` per key: ``train.lr=abc`` or ``train.batch_size=2.5`` is a
    ConfigError that names the key and the expected type, before any range check compares a string with a
    number. Floats must be finite (``train.lr=inf`` would train NaN weights). Lists become tuples, numeric
    strings become numbers, whole floats become ints.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, _coerce(getattr(obj, f.name), hints[f.name], prefix + f.name))


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        inner = f"{_type_name(args[0])}, ..." if len(args) == 2 and args[1] is Ellipsis else \
            ", ".join(_type_name(a) for a in args)
        return f"a list [{inner}]"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(v, tp, key: str):
    def bad(why: str = ""):
        return ConfigError(f"{key} must be {_type_name(tp)}, got {v!r}{why}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in typing.get_args(tp):
            return None
        for a in typing.get_args(tp):
            if a is not type(None):
                try:
                    return _coerce(v, a, key)
                except ConfigError:
                    pass
        raise bad()
    if origin is tuple:
        if not isinstance(v, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(v)
        elif len(v) != len(args):
            raise bad(f" ({len(v)} items, expected {len(args)})")
        return tuple(_coerce(x, a, f"{key}[{i}]") for i, (x, a) in enumerate(zip(v, args)))
    if tp is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        raise bad()
    if tp is int:
        if isinstance(v, str):
            try:
                v = float(v) if any(c in v for c in ".eE") else int(v)
            except ValueError:
                raise bad() from None
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            return int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        raise bad()
    if tp is float:
        x = v
        if isinstance(x, str):
            try:
                x = float(x)
            except ValueError:
                raise bad() from None
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise bad()
        if not math.isfinite(x):
            raise bad(" (NaN and inf are not allowed)")
        return float(x)
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return str(v)        # Hydra reads run_dir=2024 as a number
        raise bad()
    return v
