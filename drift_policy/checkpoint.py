"""Atomic, verified checkpoints.

Each checkpoint is written atomically (``fileio.atomic_write_bytes``: a uniquely named temporary file, fsynced,
then renamed into place), so a crash (even ``kill -9``) leaves either the old file or the complete new one. Its
SHA-256 is stored beside it and checked on load: a truncated or corrupted file is reported as such instead of
failing deep inside ``torch.load``.

What "verified" means here, and where each guarantee lives:

* ``save_checkpoint`` refuses weights with NaN or inf: a checkpoint on disk is never worse than the run's last
  good state, so resume and eval can trust the newest verified one.
* ``load_checkpoint`` reads with ``torch.load(weights_only=True)``: a checkpoint holds tensors and plain Python
  values only (dicts, lists, tuples, numbers, strings), so unpickling cannot run code from a ``.pt`` file.
* ``is_verified`` (a cheap checksum check, no unpickling) is what ``runs.prune_checkpoints`` counts: a corrupt or
  unverifiable file never takes a keep slot, so pruning never deletes the newest good checkpoint.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import torch

from .errors import CheckpointError
from .fileio import atomic_write_bytes

WEIGHT_KEYS = ("model", "ema")   # the state dicts that must be finite in a checkpoint


def non_finite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]


def _check_finite(state: dict, where: str) -> None:
    for key in WEIGHT_KEYS:
        bad = non_finite_tensors(state.get(key) or {})
        if bad:
            raise CheckpointError(f"{where}: '{key}' weights hold NaN or inf ({len(bad)} tensors, first: {bad[0]})")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    _check_finite(state, f"refusing to save {path}")
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": state.get("step")}
    atomic_write_bytes(path.with_name(path.name + ".json"), json.dumps(meta).encode())
    return path


def _verified_bytes(path: Path) -> bytes:
    """The file's bytes after checking them against the checksum file beside it (when there is one)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    meta_path = path.with_name(path.name + ".json")
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            size, digest = int(meta["bytes"]), str(meta["sha256"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: its checksum file {meta_path.name} is corrupted ({e})") from e
        if len(data) != size:
            raise CheckpointError(f"{path}: truncated ({len(data)} of {size} bytes)")
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path}: corrupted (SHA-256 does not match {meta_path.name})")
    return data


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    data = _verified_bytes(path)
    try:
        # weights_only: tensors and plain containers only; any other pickled object is refused, not run.
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: it holds objects other than tensors and plain values "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training checkpoint (holds a {type(state).__name__}, not a dict)")
    _check_finite(state, str(path))
    return state


def is_verified(path: str | os.PathLike) -> bool:
    """True when the checkpoint has its checksum file and the bytes match it (no unpickling: cheap)."""
    path = Path(path)
    if not path.with_name(path.name + ".json").exists():
        return False
    try:
        _verified_bytes(path)
    except (CheckpointError, OSError):
        return False
    return True
