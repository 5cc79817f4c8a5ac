"""LeRobotDataset (format v3.0) as flat per-step arrays, read with pyarrow and PyAV (extra ``[lerobot]``).

A v3.0 dataset folder holds ``meta/info.json`` (``fps``, ``features``, ``data_path`` and ``video_path``
templates), ``meta/stats.json``, ``meta/episodes/chunk-*/file-*.parquet`` (one row per episode: ``length``,
``dataset_from_index`` / ``dataset_to_index`` into the frames, the data file, and per camera the video file and
the episode's ``from_timestamp`` / ``to_timestamp`` inside it), ``data/chunk-*/file-*.parquet`` (one row per
frame) and ``videos/<camera>/chunk-*/file-*.mp4`` (many episodes concatenated in one file).

``load_lerobot`` returns what every loader returns (see ``data/windows.py``): ``obs`` float32 [N, D] (the low-dim
observation features concatenated in order), ``action`` float32 [N, Da], one uint8 [N, 3, H, W] array per
camera and ``episode_ends`` int64 [E]. Cameras are named by the last part of their feature key
(``observation.images.top`` -> ``top``, ``observation.image`` -> ``image``): policies keep one encoder per camera
in a module dict, whose names cannot contain dots, and a Push-T camera then has the name Push-T's env uses.

The ``lerobot`` package itself is not a dependency: its pins (torch, opencv-python-headless) clash with this
project's. The format is read directly; ``tests/fixtures/lerobot/make_fixture.py`` writes the test fixture with
the official writer.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from .pusht import check_arrays

__all__ = ["DatasetError", "LeRobotMeta", "read_meta", "select_features", "camera_name", "load_lerobot",
           "resolve_dataset", "local_dataset", "is_hub_id", "CODEBASE_VERSIONS"]

CODEBASE_VERSIONS = ("v3.0",)
STATE_KEYS = ("observation.environment_state", "observation.state")   # default low-dim order (see select_features)
CAMERA_PREFIXES = ("observation.images.", "observation.image")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
INSTALL_HINT = "install the reader's extra: pip install -e '.[lerobot]' (pyarrow, av, huggingface_hub)"


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading LeRobot datasets needs {module!r}: {INSTALL_HINT}") from e


# ---- metadata ---------------------------------------------------------------------------------------------------
class LeRobotMeta:
    """``meta/info.json`` and the episodes table of one dataset folder, validated."""

    def __init__(self, root: Path, info: dict, episodes: dict[str, np.ndarray]):
        self.root, self.info, self.episodes = root, info, episodes
        self.fps = info["fps"]
        self.features: dict[str, dict] = info["features"]

    @property
    def n_episodes(self) -> int:
        return len(self.episodes["episode_index"])

    def dim(self, key: str) -> int:
        """Width of a numeric feature (the product of its shape)."""
        return int(np.prod(self.features[key]["shape"]))

    def camera_keys(self) -> list[str]:
        return [k for k, f in self.features.items() if f.get("dtype") in ("video", "image")]

    def image_shape(self, key: str) -> tuple[int, int, int]:
        """(3, H, W) of a camera, from its feature's shape and axis names (stored HWC or CHW)."""
        f = self.features[key]
        shape, names = list(f["shape"]), list(f.get("names") or [])
        if len(shape) != 3:
            raise DatasetError(f"{self.root / 'meta/info.json'}: camera {key!r} has shape {shape}, expected 3 axes")
        if names[:1] == ["channels"] or (not names and shape[0] == 3 and shape[2] != 3):
            c, h, w = shape
        else:
            h, w, c = shape
        if c != 3:
            raise DatasetError(f"{self.root / 'meta/info.json'}: camera {key!r} has {c} channels, expected 3 (RGB)")
        return 3, int(h), int(w)

    def stats(self) -> dict[str, dict[str, np.ndarray]]:
        """``meta/stats.json`` as arrays ({} when the file is absent)."""
        p = self.root / "meta" / "stats.json"
        if not p.exists():
            return {}
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise DatasetError(f"{p}: not valid JSON ({e})") from e
        return {k: {s: np.asarray(v, dtype=np.float64) for s, v in d.items()} for k, d in raw.items()}


def _read_parquet(path: Path, columns: Sequence[str] | None = None):
    pq = _require("pyarrow.parquet")
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a truncated or garbled file
        raise DatasetError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from e
    if columns is not None:
        missing = [c for c in columns if c not in table.column_names]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {missing} (has {table.column_names})")
        table = table.select(list(columns))
    return table


def read_meta(root: str | os.PathLike) -> LeRobotMeta:
    """Read and validate ``meta/info.json`` and ``meta/episodes/*/*.parquet`` of a dataset folder."""
    root = Path(root)
    info_path = root / "meta" / "info.json"
    if not info_path.exists():
        raise DatasetError(f"{info_path}: not found; {root} is not a LeRobotDataset folder (it must hold "
                           f"meta/info.json, meta/episodes/, data/)")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{info_path}: not valid JSON ({e})") from e
    for k in ("codebase_version", "fps", "features", "data_path"):
        if k not in info:
            raise DatasetError(f"{info_path}: missing key {k!r} (has {sorted(info)})")
    if info["codebase_version"] not in CODEBASE_VERSIONS:
        raise DatasetError(f"{info_path}: codebase_version {info['codebase_version']!r} is not supported (reads "
                           f"{list(CODEBASE_VERSIONS)}; convert older datasets with LeRobot's "
                           f"convert_dataset_v21_to_v30 script)")
    if not (isinstance(info["fps"], (int, float)) and info["fps"] > 0):
        raise DatasetError(f"{info_path}: 'fps' must be a positive number, got {info['fps']!r}")
    for k, f in info["features"].items():
        if "dtype" not in f or "shape" not in f:
            raise DatasetError(f"{info_path}: feature {k!r} lacks 'dtype' or 'shape'")
    files = sorted((root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DatasetError(f"{root / 'meta' / 'episodes'}: no chunk-*/file-*.parquet episode files")
    pa = _require("pyarrow")
    need = ["episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
            "data/file_index"]
    for cam, f in info["features"].items():
        if f["dtype"] == "video":
            need += [f"videos/{cam}/{c}" for c in ("chunk_index", "file_index", "from_timestamp", "to_timestamp")]
    table = pa.concat_tables([_read_parquet(p, need) for p in files])
    episodes = {c: table.column(c).to_numpy() for c in need}
    order = np.argsort(episodes["episode_index"], kind="stable")
    episodes = {c: v[order] for c, v in episodes.items()}
    idx = episodes["episode_index"]
    if not np.array_equal(idx, np.arange(len(idx))):
        raise DatasetError(f"{root / 'meta' / 'episodes'}: episode_index must be 0..{len(idx) - 1} without gaps")
    lengths = episodes["dataset_to_index"] - episodes["dataset_from_index"]
    if np.any(lengths != episodes["length"]) or np.any(lengths <= 0):
        bad = int(np.argmax((lengths != episodes["length"]) | (lengths <= 0)))
        raise DatasetError(f"{root / 'meta' / 'episodes'}: episode {bad} has length {episodes['length'][bad]} but "
                           f"frames {episodes['dataset_from_index'][bad]}..{episodes['dataset_to_index'][bad]}")
    return LeRobotMeta(root, info, episodes)


# ---- feature mapping --------------------------------------------------------------------------------------------
def camera_name(key: str) -> str:
    """The policy's name for a camera feature: its last dotted part (``observation.images.top`` -> ``top``)."""
    return key.rsplit(".", 1)[-1]


def select_features(meta: LeRobotMeta, obs_keys: Sequence[str] | None = None,
                    image_keys: Sequence[str] | None = None,
                    action_key: str = "action") -> tuple[list[str], list[str], str]:
    """(low-dim observation keys, camera keys, action key) to read; ``None`` picks them from the features.

    Defaults: ``observation.environment_state`` then ``observation.state`` (those present; the order of
    Diffusion Policy's Push-T keypoints + agent position), and every camera (``observation.images.*`` or
    ``observation.image``, stored as video). Explicit lists are checked against the features.
    """
    feats, info_path = meta.features, meta.root / "meta" / "info.json"
    if obs_keys is None:
        obs_keys = [k for k in STATE_KEYS if k in feats]
    if image_keys is None:
        image_keys = [k for k in meta.camera_keys() if k.startswith(CAMERA_PREFIXES)]
    obs_keys, image_keys = list(obs_keys), list(image_keys)
    if not obs_keys and not image_keys:
        raise DatasetError(f"{info_path}: no observation features to train on (none of {list(STATE_KEYS)} nor a "
                           f"camera); name them with task.obs_keys / task.image_keys (features: {sorted(feats)})")
    for k in [*obs_keys, action_key]:
        if k not in feats:
            raise DatasetError(f"{info_path}: feature {k!r} not in the dataset (features: {sorted(feats)})")
        if feats[k]["dtype"] not in ("float32", "float64", "int64", "int32", "bool"):
            raise DatasetError(f"{info_path}: feature {k!r} has dtype {feats[k]['dtype']!r}, expected a number")
    for k in image_keys:
        if k not in feats:
            raise DatasetError(f"{info_path}: camera {k!r} not in the dataset (cameras: {meta.camera_keys()})")
        if feats[k]["dtype"] != "video":
            raise DatasetError(f"{info_path}: camera {k!r} has dtype {feats[k]['dtype']!r}; only cameras stored as "
                               f"video are read (LeRobot's default)")
    names = [camera_name(k) for k in image_keys]
    if len(set(names)) != len(names) or "obs" in names or "action" in names:
        raise DatasetError(f"{info_path}: cameras {image_keys} do not have distinct names ({names})")
    return obs_keys, image_keys, action_key


# ---- frames -----------------------------------------------------------------------------------------------------
def _column(table, key: str, width: int, path: Path) -> np.ndarray:
    """A numeric feature column (scalar or fixed-length list) as float32 [n, width]."""
    pa = _require("pyarrow")
    col = table.column(key).combine_chunks()
    if col.null_count:
        raise DatasetError(f"{path}: column {key!r} has {col.null_count} missing values")
    while pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type) or pa.types.is_large_list(col.type):
        col = col.flatten()
    values = col.to_numpy(zero_copy_only=False).astype(np.float32)
    if values.size != len(table) * width:
        raise DatasetError(f"{path}: column {key!r} holds {values.size} numbers for {len(table)} frames, expected "
                           f"{width} per frame (info.json shape)")
    return values.reshape(len(table), width)


def _row_ranges(rows: np.ndarray, most: int = 4) -> str:
    """[1, 2, 3, 7] -> "1-3, 7" (the first ``most`` runs of consecutive rows)."""
    runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1)
    text = ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs[:most])
    return text + (", ..." if len(runs) > most else "")


def _check_range(path: Path, key: str, values: np.ndarray, stats: dict) -> None:
    """DatasetError when values of ``key`` lie outside the dataset's own ``meta/stats.json`` min/max.

    Parquet pages carry no checksum: flipped bytes inside compressed values can still decode, into numbers that
    would be trained on silently. The statistics were computed from the same frames, so every value lies in
    [min, max]; the tolerance (1 % of the range) only absorbs rounding. Keys without usable statistics are not
    checked."""
    s = stats.get(key, {})
    lo, hi = s.get("min"), s.get("max")
    width = values.shape[1]
    if lo is None or hi is None or lo.size != width or hi.size != width:
        return
    lo, hi = lo.reshape(width), hi.reshape(width)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all() and (lo <= hi).all()):
        return
    tol = 0.01 * (hi - lo) + 1e-6 * np.maximum(np.abs(lo), np.abs(hi)) + 1e-6
    bad = np.flatnonzero(((values < lo - tol) | (values > hi + tol)).any(1))
    if len(bad):
        fmt = lambda a: "[" + ", ".join(f"{x:.4g}" for x in a) + "]"  # noqa: E731
        raise DatasetError(f"{path}: {key!r} lies outside meta/stats.json's [min, max] at {len(bad)} rows "
                           f"(rows {_row_ranges(bad)} of the file; row {bad[0]} holds {fmt(values[bad[0]])}, "
                           f"min {fmt(lo)}, max {fmt(hi)}): the file is damaged, or meta/stats.json does not "
                           f"describe it")


def _read_frames(meta: LeRobotMeta, keys: Sequence[str], episodes: np.ndarray) -> dict[str, np.ndarray]:
    """The numeric ``keys`` and the frame bookkeeping of the selected episodes, in episode order. Values are
    checked against the dataset's statistics (``_check_range``)."""
    ep = meta.episodes
    stats = meta.stats()
    files = sorted({(int(ep["data/chunk_index"][e]), int(ep["data/file_index"][e])) for e in episodes})
    cols = ["index", "episode_index", "frame_index", "timestamp", *keys]
    parts = []
    for c, f in files:
        path = meta.root / meta.info["data_path"].format(chunk_index=c, file_index=f)
        t = _read_parquet(path, cols)
        part = {k: (_column(t, k, meta.dim(k), path) if k in keys else t.column(k).to_numpy()) for k in cols}
        check_arrays(path, len(t), [(k, part[k], (len(t), meta.dim(k))) for k in keys])   # finite, as every loader
        for k in keys:
            _check_range(path, k, part[k], stats)
        parts.append(part | {"_file": np.full(len(t), len(parts))})
    frames = {k: np.concatenate([p[k] for p in parts]) for k in [*cols, "_file"]}
    paths = [meta.root / meta.info["data_path"].format(chunk_index=c, file_index=f) for c, f in files]
    pos = {int(i): n for n, i in enumerate(frames["index"])}
    rows = []
    for e in episodes:
        a, b = int(ep["dataset_from_index"][e]), int(ep["dataset_to_index"][e])
        r = np.array([pos.get(i, -1) for i in range(a, b)])
        if np.any(r < 0):
            raise DatasetError(f"{meta.root / 'data'}: episode {e} needs frames {a}..{b - 1} (column 'index'), "
                               f"{int((r < 0).sum())} of them are missing from {[str(p) for p in paths]}")
        where = paths[int(frames['_file'][r[0]])]
        if np.any(frames["episode_index"][r] != e) or np.any(frames["frame_index"][r] != np.arange(b - a)):
            raise DatasetError(f"{where}: frames {a}..{b - 1} do not hold episode {e}'s frames 0..{b - a - 1} in "
                               f"order (columns 'episode_index', 'frame_index')")
        rows.append(r)
    rows = np.concatenate(rows)
    return {k: v[rows] for k, v in frames.items() if k != "_file"}


def _decode_video(path: Path, key: str, wanted: np.ndarray, shape: tuple[int, int, int], fps: float,
                  out: np.ndarray, out_rows: np.ndarray) -> None:
    """Decode ``path`` once and write, for each wanted time (s, sorted), the frame nearest to it into ``out``
    (resized to ``out``'s H x W when the stored ``shape`` differs).

    A frame more than half a frame period away from its wanted time means the video and the episodes metadata
    disagree (a cut or re-encoded file): that is an error, never a silently shifted frame.
    """
    av = _require("av")
    if not path.exists():
        raise DatasetError(f"{path}: video file not found (camera {key!r}); the dataset is incomplete (for a hub "
                           f"dataset, download it again with its videos)")
    tol = 0.5 / fps
    got = np.full(len(wanted), np.inf)
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            prev_t, prev = None, None
            j = 0

            def put(j, t, frame):
                if (frame.height, frame.width) != shape[1:]:
                    raise DatasetError(f"{path}: frames are {frame.width}x{frame.height}, but info.json gives "
                                       f"camera {key!r} {shape[2]}x{shape[1]}")
                img = frame.to_ndarray(format="rgb24", height=out.shape[2], width=out.shape[3])   # [H, W, 3]
                out[out_rows[j]] = img.transpose(2, 0, 1)
                got[j] = t

            for frame in container.decode(stream):
                if frame.pts is None:
                    continue
                t = float(frame.pts * stream.time_base)
                while j < len(wanted) and t >= wanted[j]:
                    if prev is not None and wanted[j] - prev_t < t - wanted[j]:
                        put(j, prev_t, prev)
                    else:
                        put(j, t, frame)
                    j += 1
                if j == len(wanted):
                    break
                prev_t, prev = t, frame
            while j < len(wanted) and prev is not None:                  # after the last frame
                put(j, prev_t, prev)
                j += 1
    except DatasetError:
        raise
    except Exception as e:  # av.error.InvalidDataError and friends for a damaged file
        raise DatasetError(f"{path}: cannot decode video of camera {key!r} ({type(e).__name__}: {e})") from e
    err = np.abs(got - wanted)
    if np.any(err > tol):
        bad = int(np.argmax(err > tol))
        raise DatasetError(f"{path}: camera {key!r} has no frame within {tol:.4f} s of t={wanted[bad]:.4f} s "
                           f"(nearest: {got[bad]:.4f} s); the video is shorter than or shifted from what "
                           f"meta/episodes says")


def _read_camera(meta: LeRobotMeta, key: str, episodes: np.ndarray, timestamps: np.ndarray,
                 ends: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    shape = meta.image_shape(key)
    out = np.empty((len(timestamps), 3, *(size or shape[1:])), dtype=np.uint8)
    ep = meta.episodes
    starts = np.concatenate([[0], ends[:-1]])
    by_file: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for n, e in enumerate(episodes):
        c, f = int(ep[f"videos/{key}/chunk_index"][e]), int(ep[f"videos/{key}/file_index"][e])
        rows = np.arange(starts[n], ends[n])
        by_file.setdefault((c, f), []).append((rows, ep[f"videos/{key}/from_timestamp"][e] + timestamps[rows]))
    template = meta.info.get("video_path")
    if not template:
        raise DatasetError(f"{meta.root / 'meta/info.json'}: camera {key!r} is a video but 'video_path' is not set")
    for (c, f), parts in by_file.items():
        rows = np.concatenate([p[0] for p in parts])
        wanted = np.concatenate([p[1] for p in parts]).astype(np.float64)
        order = np.argsort(wanted, kind="stable")
        path = meta.root / template.format(video_key=key, chunk_index=c, file_index=f)
        _decode_video(path, key, wanted[order], shape, meta.fps, out, rows[order])
    return out


def load_lerobot(root: str | os.PathLike, obs_keys: Sequence[str] | None = None,
                 image_keys: Sequence[str] | None = None, action_key: str = "action",
                 episodes: Sequence[int] | None = None,
                 image_size: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Read and validate a v3.0 dataset folder into flat arrays (see the module docstring).

    ``obs_keys`` / ``image_keys`` are feature keys (``None``: chosen by ``select_features``); ``episodes`` a
    subset of episode indices (default: all, in order); ``image_size`` (H, W) resizes frames stored at another
    size as they are decoded (every frame is held in memory as uint8: a 640x480 camera takes 0.9 MB a frame).
    """
    meta = read_meta(root)
    obs_keys, image_keys, action_key = select_features(meta, obs_keys, image_keys, action_key)
    eps = np.arange(meta.n_episodes) if episodes is None else np.asarray(list(episodes), dtype=np.int64)
    if len(eps) == 0 or eps.min() < 0 or eps.max() >= meta.n_episodes:
        raise DatasetError(f"{meta.root}: episodes must be a non-empty subset of 0..{meta.n_episodes - 1}")
    frames = _read_frames(meta, [*obs_keys, action_key], eps)
    n = len(frames["index"])
    ends = np.cumsum(meta.episodes["length"][eps]).astype(np.int64)
    out: dict[str, np.ndarray] = {
        "obs": (np.concatenate([frames[k] for k in obs_keys], axis=1) if obs_keys else np.zeros((n, 0), np.float32)),
        "action": frames[action_key],
        "episode_ends": ends,
    }
    ts = frames["timestamp"].astype(np.float64)
    for k in image_keys:
        out[camera_name(k)] = _read_camera(meta, k, eps, ts, ends, image_size)
    return out


# ---- local folder or hub --------------------------------------------------------------------------------------
def is_hub_id(spec: str) -> bool:
    """``user/name`` (optionally ``@revision``): a dataset repository on the Hugging Face hub."""
    return bool(HUB_ID.match(spec)) and not spec.startswith((".", "/", "~"))


def _candidates(spec: str, base) -> list[Path]:
    p = Path(spec).expanduser()
    return [p] if p.is_absolute() else [p, *([Path(base) / p] if base is not None else [])]


def local_dataset(spec: str, base: str | os.PathLike | None = None) -> Path | None:
    """The existing folder ``spec`` names (absolute, relative to the working directory, or to ``base``), if any."""
    for c in _candidates(spec, base):
        if c.is_dir():
            return c.resolve()
    return None


def resolve_dataset(spec: str, base: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Path:
    """The local folder of ``spec``: an existing path (absolute, or relative to ``base``), else a hub id
    ``user/name[@revision]`` fetched with ``huggingface_hub.snapshot_download`` (the local cache first).

    Without network access the error says how to point at a local copy instead.
    """
    local = local_dataset(spec, base)
    if local is not None:
        return local
    candidates = _candidates(spec, base)
    if not is_hub_id(spec):
        raise DatasetError(f"{spec}: no such dataset folder (looked in {[str(c) for c in candidates]}) and not a hub "
                           f"id of the form user/name")
    repo_id, _, revision = spec.partition("@")
    hub = _require("huggingface_hub")
    kw = dict(repo_id=repo_id, repo_type="dataset", revision=revision or None, cache_dir=cache_dir)
    try:
        return Path(hub.snapshot_download(local_files_only=True, **kw))
    except Exception:  # not in the cache: download
        pass
    try:
        return Path(hub.snapshot_download(**kw))
    except Exception as e:  # offline: LocalEntryNotFoundError, connection errors, HfHubHTTPError, ...
        raise DatasetError(
            f"could not download the dataset {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Without network access, copy the dataset folder (the one holding meta/info.json) to this machine, "
            f"e.g. `hf download {repo_id} --repo-type dataset --local-dir DIR` where there is internet, and set "
            f"task.dataset=/abs/path/to/DIR (no local folder {[str(c) for c in candidates]} exists)") from e
