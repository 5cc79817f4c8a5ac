"""Diffusion Policy's Push-T human demonstrations (``pusht_cchi_v7_replay.zarr``) as low-dim training windows.

Observation per step ("keypoints"): the 9 block keypoints (x, y) followed by the agent position: 20 numbers,
the same definition as Diffusion Policy's low-dim Push-T and ``drift_policy.envs.pusht``. The image task
(``load_pusht_image``) observes the 96x96 RGB frame (uint8, CHW) and the agent position.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DatasetError
from ..paths import pusht_zarr_path
from .download import fetch

PUSHT_URL = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"


def download_pusht(root: str | os.PathLike | None = None) -> Path:
    """Download and unpack Diffusion Policy's ``pusht.zip`` into ``<data root>/pusht/``."""
    import zipfile

    target = pusht_zarr_path(root)
    if target.exists():
        return target
    zip_path = fetch(PUSHT_URL, target.parent / "pusht.zip",
                     f"Without network access, copy pusht_cchi_v7_replay.zarr to {target} by hand, or point "
                     f"DRIFT_POLICY_DATA_ROOT at a folder that holds pusht/pusht_cchi_v7_replay.zarr")
    with zipfile.ZipFile(zip_path) as z:
        # the archive holds pusht/pusht_cchi_v7_replay.zarr/...
        z.extractall(target.parent.parent)
    if not target.exists():
        raise RuntimeError(f"{zip_path} did not contain pusht/pusht_cchi_v7_replay.zarr")
    return target


def _read(group, key: str, path: Path) -> np.ndarray:
    if key not in group:
        raise DatasetError(f"{path}: missing array '{key}'")
    return read_zarr(group[key], path)


def _chunk_grid(arr, start: int, stop: int):
    """Index tuples of the chunks of ``arr`` that hold rows ``start..stop-1``."""
    import itertools
    import math

    if arr.ndim == 0 or 0 in arr.shape:
        return []
    first = start // arr.chunks[0]
    last = math.ceil(stop / arr.chunks[0])
    ranges = [range(first, last)] + [range(math.ceil(s / c)) for s, c in zip(arr.shape[1:], arr.chunks[1:])]
    return list(itertools.product(*ranges))


def read_zarr(arr, path: Path, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows ``start..stop-1`` of a zarr array, refusing what zarr would paper over.

    zarr returns the fill value (zeros) for a chunk file that is missing, so a deleted chunk would silently
    become 160 zero actions; every chunk the read needs is therefore checked to be in the store first. A chunk
    that is present but cannot be decoded (truncated, corrupted) raises the codec's own error; it is reported
    as a DatasetError naming the array and the chunk.
    """
    stop = arr.shape[0] if stop is None else stop
    name = arr.path or arr.name
    sep = getattr(arr, "_dimension_separator", None) or "."   # zarr v2 chunk keys: "i.j" (or "i/j")
    grid = _chunk_grid(arr, start, stop)
    missing = [idx for idx in grid if f"{arr.path}/{sep.join(map(str, idx))}" not in arr.store]
    if missing:
        keys = [sep.join(map(str, i)) for i in missing]
        raise DatasetError(f"{path}: array '{name}' is missing {len(missing)} of its {len(grid)} chunks "
                           f"(first: chunk {keys[0]}, rows {missing[0][0] * arr.chunks[0]}.."
                           f"{min(arr.shape[0], (missing[0][0] + 1) * arr.chunks[0]) - 1}); zarr would read them "
                           f"as {arr.fill_value}. The store is incomplete: copy or download it again")
    try:
        return np.asarray(arr[start:stop])
    except Exception:  # the codec's error (blosc, zstd, ...): find and name the chunk that fails
        pass
    c = arr.chunks[0]
    for i in sorted({idx[0] for idx in grid}):
        try:
            arr[i * c: min(arr.shape[0], (i + 1) * c)]
        except Exception as e:
            raise DatasetError(f"{path}: array '{name}' chunk {i} (rows {i * c}..{min(arr.shape[0], (i + 1) * c) - 1}) "
                               f"cannot be decoded ({type(e).__name__}: {e}); the store is corrupted: copy or "
                               f"download it again") from e
    return np.asarray(arr[start:stop])      # a failure that is not one chunk's: let it surface as it is


def _open_store(path: Path):
    import zarr

    if not path.exists():
        raise DatasetError(
            f"{path}: Push-T store not found. Set DRIFT_POLICY_DATA_ROOT (or task.data_root) to the folder holding "
            f"pusht/pusht_cchi_v7_replay.zarr, or run `python -m drift_policy.data.pusht --download`")
    try:
        root = zarr.open(str(path), mode="r")
    except Exception as e:  # zarr raises several types for a folder that is not a store
        raise DatasetError(f"{path}: not a readable zarr store ({e})") from e
    for grp in ("data", "meta"):
        if grp not in root:
            raise DatasetError(f"{path}: missing group '{grp}'")
    return root


def check_arrays(path: Path, n: int, arrays) -> None:
    """DatasetError naming ``path`` and the array unless each (name, array, shape) has that shape and only finite
    values (the check every loader makes before a normaliser is fitted)."""
    for name, arr, shape in arrays:
        if arr.shape != shape:
            raise DatasetError(f"{path}: '{name}' has shape {arr.shape}, expected {shape}")
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr.reshape(n, -1)).all(1))[:, 0]
            raise DatasetError(f"{path}: '{name}' has NaN or inf at {len(bad)} steps (first: {bad[:5].tolist()})")


def _check_episode_ends(path: Path, ends: np.ndarray, n: int) -> None:
    if ends.ndim != 1 or len(ends) == 0:
        raise DatasetError(f"{path}: 'meta/episode_ends' must be a non-empty 1-D array, got shape {ends.shape}")
    if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
        raise DatasetError(f"{path}: 'meta/episode_ends' must be strictly increasing and positive")
    if ends[-1] != n:
        raise DatasetError(f"{path}: 'meta/episode_ends' ends at {ends[-1]} but the data has {n} steps")


def load_pusht_lowdim(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate the store. Returns obs [N, 20], action [N, 2] (float32), episode_ends [E] (int64)."""
    path = Path(path)
    root = _open_store(path)
    state = _read(root["data"], "state", path).astype(np.float32)
    keypoint = _read(root["data"], "keypoint", path).astype(np.float32)
    action = _read(root["data"], "action", path).astype(np.float32)
    ends = _read(root["meta"], "episode_ends", path).astype(np.int64)
    n = len(state)
    check_arrays(path, n, (("data/state", state, (n, 5)), ("data/keypoint", keypoint, (n, 9, 2)),
                            ("data/action", action, (n, 2))))
    _check_episode_ends(path, ends, n)
    obs = np.concatenate([keypoint.reshape(n, 18), state[:, :2]], axis=1)
    return {"obs": obs, "action": action, "episode_ends": ends}


def load_pusht_image(path: str | os.PathLike, *, progress: bool = True,
                     chunk_frames: int | None = None) -> dict[str, np.ndarray]:
    """Read and validate the store for the image task.

    Returns ``obs`` float32 [N, 2] (agent position, ``state[:, :2]``), ``image`` uint8 [N, 3, H, W] (CHW; 96x96
    for Push-T), ``action`` float32 [N, 2], ``episode_ends`` int64 [E] and the side array ``state`` float32
    [N, 20] (the keypoints task's observation: not observed by the policy; ``data/windows.py`` SIDE_KEYS). ``data/img`` is stored as float32
    0..255 (2.8 GB decoded); it is read ``chunk_frames`` frames at a time (default: a whole number of the
    store's chunks, about 70 MB of float32) and converted to uint8 as it goes, so peak memory stays near the
    uint8 result (0.7 GB). Each chunk is checked to be finite and within 0..255. ``progress`` shows a tqdm bar.
    """
    from tqdm.auto import tqdm

    path = Path(path)
    root = _open_store(path)
    state = _read(root["data"], "state", path).astype(np.float32)
    keypoint = _read(root["data"], "keypoint", path).astype(np.float32)
    action = _read(root["data"], "action", path).astype(np.float32)
    ends = _read(root["meta"], "episode_ends", path).astype(np.int64)
    n = len(state)
    check_arrays(path, n, (("data/state", state, (n, 5)), ("data/keypoint", keypoint, (n, 9, 2)),
                            ("data/action", action, (n, 2))))
    _check_episode_ends(path, ends, n)
    if "img" not in root["data"]:
        raise DatasetError(f"{path}: missing array 'img'")
    img = root["data"]["img"]
    if len(img.shape) != 4 or img.shape[0] != n or img.shape[3] != 3 or min(img.shape) < 1:
        raise DatasetError(f"{path}: 'data/img' has shape {tuple(img.shape)}, expected ({n}, H, W, 3)")
    _, h, w, _ = img.shape
    if chunk_frames is None:
        per_chunk = int(img.chunks[0]) if getattr(img, "chunks", None) else 64
        chunk_frames = per_chunk * max(1, (64 << 20) // max(1, per_chunk * h * w * 3 * 4))
    if chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
    out = np.empty((n, 3, h, w), dtype=np.uint8)
    with tqdm(total=n, desc=f"{path.name} img", unit="frame", disable=not progress, leave=False) as bar:
        for a in range(0, n, chunk_frames):
            b = min(n, a + chunk_frames)
            block = read_zarr(img, path, a, b)                            # [b-a, H, W, 3] stored dtype
            if block.dtype != np.uint8:
                if not np.isfinite(block).all():
                    bad = a + np.argwhere(~np.isfinite(block.reshape(b - a, -1)).all(1))[:, 0]
                    raise DatasetError(f"{path}: 'data/img' has NaN or inf at {len(bad)} frames "
                                       f"(first: {bad[:5].tolist()})")
                lo, hi = float(block.min()), float(block.max())
                if lo < 0 or hi > 255:
                    raise DatasetError(f"{path}: 'data/img' frames {a}..{b - 1} have values in [{lo}, {hi}], "
                                       f"expected 0..255")
                block = np.rint(block, out=block) if block.dtype.kind == "f" else block
            out[a:b] = block.transpose(0, 3, 1, 2)                        # HWC -> CHW, cast to uint8
            bar.update(b - a)
    # "state": the keypoints task's observation of the same step (block keypoints, agent), which the image policy
    # never sees; neighbour positives may be found by it (policy.neighbor_key=state). Keypoints, not the stored
    # block angle, so that a turn through 0 / 2 pi is not a jump.
    return {"obs": np.ascontiguousarray(state[:, :2]), "image": out, "action": action, "episode_ends": ends,
            "state": np.concatenate([keypoint.reshape(n, 18), state[:, :2]], axis=1)}


def make_pusht_windows(path: str | os.PathLike, horizon: int, n_obs_steps: int, n_action_steps: int,
                       val_ratio: float = 0.02, seed: int = 42):
    """Low-dim (keypoints) train and validation windows; see ``data/windows.py``."""
    from .windows import make_windows

    return make_windows(load_pusht_lowdim(path), horizon, n_obs_steps, n_action_steps, val_ratio, seed, source=str(path))


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Fetch or inspect the Push-T demonstrations.")
    ap.add_argument("--download", action="store_true", help="download pusht.zip into the data root")
    ap.add_argument("--root", default=None, help="data root (default: $DRIFT_POLICY_DATA_ROOT or ./datasets)")
    args = ap.parse_args()
    p = download_pusht(args.root) if args.download else pusht_zarr_path(args.root)
    d = load_pusht_lowdim(p)
    print(f"{p}: {len(d['episode_ends'])} episodes, {len(d['obs'])} steps, obs {d['obs'].shape[1]}, "
          f"action {d['action'].shape[1]}")
