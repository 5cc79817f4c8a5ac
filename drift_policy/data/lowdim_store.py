"""Reading and checking a low-dimensional demonstration store (the zarr layout ``generate`` of the scripted
tasks writes: ``data/obs`` [N, obs_dim], ``data/action`` [N, action_dim], ``meta/episode_ends`` [E]).

One reader for every scripted task (BlockPush, Kitchen), so a broken file gives the same one-line
``DatasetError`` naming the file and the key whichever task reads it."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DatasetError

__all__ = ["load_obs_action_store"]


def _read(group, key: str, path: Path, where: str) -> np.ndarray:
    if key not in group:
        raise DatasetError(f"{path}: missing array '{where}/{key}'")
    return np.asarray(group[key][:])


def load_obs_action_store(path: str | os.PathLike, obs_dim: int, action_dim: int, not_found: str) -> dict[str, np.ndarray]:
    """Read and validate a store. Returns obs float32 [N, obs_dim], action float32 [N, action_dim], episode_ends
    int64 [E]. ``not_found``: what the error says after the path when there is no file (how to write one)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: {not_found}")
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a folder that is not a store
        raise DatasetError(f"{path}: not a readable zarr store ({e})") from e
    if not isinstance(root, zarr.hierarchy.Group):
        raise DatasetError(f"{path}: expected a zarr group with 'data' and 'meta', found an array")
    for grp in ("data", "meta"):
        if grp not in root:
            raise DatasetError(f"{path}: missing group '{grp}'")
    obs = _read(root["data"], "obs", path, "data")
    action = _read(root["data"], "action", path, "data")
    ends = _read(root["meta"], "episode_ends", path, "meta")
    n = len(obs)
    for key, arr, dim in (("data/obs", obs, obs_dim), ("data/action", action, action_dim)):
        if arr.ndim != 2 or arr.shape != (n, dim):
            raise DatasetError(f"{path}: '{key}' has shape {arr.shape}, expected ({n}, {dim})")
        if arr.dtype.kind != "f":
            raise DatasetError(f"{path}: '{key}' has dtype {arr.dtype}, expected a float type")
        if not np.isfinite(arr).all():
            bad = np.flatnonzero(~np.isfinite(arr).all(1))
            raise DatasetError(f"{path}: '{key}' has NaN or inf at {len(bad)} steps (first: {bad[:5].tolist()})")
    if ends.ndim != 1 or len(ends) == 0 or ends.dtype.kind not in "iu":
        raise DatasetError(f"{path}: 'meta/episode_ends' must be a non-empty 1-D integer array, got "
                           f"shape {ends.shape} dtype {ends.dtype}")
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise DatasetError(f"{path}: 'meta/episode_ends' must be strictly increasing and positive")
    if ends[-1] != n:
        raise DatasetError(f"{path}: 'meta/episode_ends' ends at {ends[-1]} but 'data/obs' has {n} steps")
    return {"obs": obs.astype(np.float32), "action": action.astype(np.float32), "episode_ends": ends.astype(np.int64)}
