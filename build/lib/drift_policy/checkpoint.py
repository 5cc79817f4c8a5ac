"""Atomic, verified checkpoints.

Each checkpoint is written to a temporary file, fsynced, then renamed into place, so a crash (even ``kill -9``)
leaves either the old file or the complete new one. Its SHA-256 is stored beside it and checked on load:
a truncated or corrupted file is reported as such instead of failing deep inside ``torch.load``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError


def _fsync_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    _fsync_write(path, data)
    meta = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "step": state.get("step")}
    _fsync_write(path.with_name(path.name + ".json"), json.dumps(meta).encode())
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    data = path.read_bytes()
    meta_path = path.with_name(path.name + ".json")
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: its checksum file {meta_path.name} is corrupted ({e})") from e
        if len(data) != meta["bytes"]:
            raise CheckpointError(f"{path}: truncated ({len(data)} of {meta['bytes']} bytes)")
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupted (SHA-256 does not match {meta_path.name})")
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
