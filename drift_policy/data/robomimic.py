"""robomimic hdf5 datasets (Lift, Can, Square, Tool Hang) as flat per-step arrays.

Schema (robomimic v0.1 / v1.4.1): ``data`` with attrs ``env_args`` (JSON: env_name, type, env_kwargs) and
``total``; ``data/demo_i`` with attr ``num_samples`` and datasets ``actions`` [T, 7], ``states`` [T, S],
``rewards``, ``dones``, ``obs/<key>`` (low-dim float, images uint8 HWC); ``mask/<filter_key>`` lists demo names
(bytes). robomimic's "object" key is robosuite's ``object-state``.

Absolute actions (``abs_action=True``) follow Diffusion Policy: each delta action is replayed from its recorded
state through the OSC_POSE controller's goal computation, giving the world-frame eef target position (3), the
target rotation as its first two matrix columns (6) and the gripper command (1).

CLI: ``python -m drift_policy.data.robomimic {generate,inspect,download}``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DatasetError
from ..paths import data_root

__all__ = [
    "TASKS",
    "OBJECT_DIMS",
    "OBS_KEY_DIMS",
    "robomimic_spaces",
    "read_env_meta",
    "load_robomimic",
    "convert_to_abs_actions",
    "robomimic_path",
    "robomimic_url",
    "download_robomimic",
]

TASKS = ("lift", "can", "square", "tool_hang")
# size of robosuite's "object-state" (robomimic's "object") per task, checked against robosuite 1.5.2's envs
OBJECT_DIMS = {"lift": 10, "can": 14, "square": 14, "tool_hang": 44}
OBS_KEY_DIMS = {
    "robot0_eef_pos": 3,
    "robot0_eef_quat": 4,
    "robot0_gripper_qpos": 2,
    "robot0_gripper_qvel": 2,
    "robot0_joint_pos": 7,
    "robot0_joint_pos_cos": 7,
    "robot0_joint_pos_sin": 7,
    "robot0_joint_vel": 7,
    "robot0_eef_vel_lin": 3,
    "robot0_eef_vel_ang": 3,
}
DELTA_ACTION_DIM = 7  # dpos 3, drot 3 (axis-angle), gripper
ABS_ACTION_DIM = 10  # pos 3, rot6d 6, gripper
DOWNLOAD_BASE = "http://downloads.cs.stanford.edu/downloads/rt_benchmark"


def robomimic_spaces(task: str, obs_keys: Sequence[str], abs_action: bool) -> tuple[int, int]:
    """(obs_dim, action_dim) for low-dim ``obs_keys`` of ``task``, from a table (no file or env needed)."""
    if task not in OBJECT_DIMS:
        raise ValueError(f"unknown robomimic task {task!r}; expected one of {list(TASKS)}")
    dim = 0
    for k in obs_keys:
        if k == "object":
            dim += OBJECT_DIMS[task]
        elif k in OBS_KEY_DIMS:
            dim += OBS_KEY_DIMS[k]
        else:
            raise ValueError(
                f"unknown robomimic low-dim obs key {k!r}; expected 'object' or one of {sorted(OBS_KEY_DIMS)}")
    return dim, ABS_ACTION_DIM if abs_action else DELTA_ACTION_DIM


def _open(path: Path):
    import h5py

    if not path.exists():
        raise DatasetError(
            f"{path}: robomimic dataset not found. Download it with `python -m drift_policy.data.robomimic download "
            f"--task <task>` or generate one with `python -m drift_policy.data.robomimic generate`")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(f"{path}: not a readable hdf5 file ({e})") from e


def read_env_meta(path: str | os.PathLike) -> dict:
    """robomimic's ``data.attrs["env_args"]``: {"env_name", "type", "env_kwargs"}."""
    path = Path(path)
    with _open(path) as f:
        return _env_meta(f, path)


def _env_meta(f, path: Path) -> dict:
    if "data" not in f:
        raise DatasetError(f"{path}: missing group 'data'")
    raw = f["data"].attrs.get("env_args")
    if raw is None:
        raise DatasetError(f"{path}: missing attribute data.attrs['env_args']")
    try:
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: data.attrs['env_args'] is not JSON ({e})") from e
    for k in ("env_name", "env_kwargs"):
        if k not in meta:
            raise DatasetError(f"{path}: data.attrs['env_args'] lacks {k!r} (has {sorted(meta)})")
    return meta


def _demo_index(name: str) -> int:
    m = re.fullmatch(r"demo_(\d+)", name)
    return int(m.group(1)) if m else -1


def _select_demos(f, path: Path, filter_key: str | None) -> list[str]:
    data = f["data"]
    names = sorted((k for k in data.keys() if _demo_index(k) >= 0), key=_demo_index)
    if filter_key is not None:
        mkey = f"mask/{filter_key}"
        if mkey not in f:
            have = sorted(f["mask"].keys()) if "mask" in f else []
            raise DatasetError(f"{path}: filter key {filter_key!r} not found ({mkey} missing; available: {have})")
        wanted = [n.decode() if isinstance(n, bytes) else str(n) for n in np.asarray(f[mkey][:]).reshape(-1)]
        missing = [n for n in wanted if n not in data]
        if missing:
            raise DatasetError(f"{path}: {mkey} lists demos not in 'data': {missing[:5]}")
        names = sorted(set(wanted), key=_demo_index)
    if not names:
        raise DatasetError(f"{path}: no demos selected" + (f" by filter key {filter_key!r}" if filter_key else ""))
    return names


def _arr(group, key: str, path: Path, demo: str) -> np.ndarray:
    if key not in group:
        raise DatasetError(f"{path}: demo {demo!r} is missing {key!r} (has {sorted(group.keys())})")
    return np.asarray(group[key][:])


def load_robomimic(
    path: str | os.PathLike,
    obs_keys: Sequence[str],
    image_keys: Sequence[str] = (),
    abs_action: bool = False,
    filter_key: str | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Read and validate the selected demos (numeric order). Returns ``obs`` float32 [N, D] (obs_keys
    concatenated in order), ``action`` float32 [N, 7] (or [N, 10] with ``abs_action``), ``episode_ends`` int64
    [E] (exclusive cumulative), and each image key as uint8 [N, 3, H, W]."""
    path = Path(path)
    obs_keys, image_keys = list(obs_keys), list(image_keys)
    if not obs_keys and not image_keys:
        raise ValueError("load_robomimic needs at least one obs key or image key")
    with _open(path) as f:
        if "data" not in f:
            raise DatasetError(f"{path}: missing group 'data'")
        names = _select_demos(f, path, filter_key)
        obs_parts, act_parts, state_parts, img_parts = [], [], [], {k: [] for k in image_keys}
        ends = []
        n = 0
        for name in names:
            g = f["data"][name]
            actions = _arr(g, "actions", path, name)
            if actions.ndim != 2 or actions.shape[1] != DELTA_ACTION_DIM:
                raise DatasetError(f"{path}: demo {name!r} actions have shape {actions.shape}, expected [T, "
                                   f"{DELTA_ACTION_DIM}] (robomimic's delta OSC_POSE actions)")
            T = actions.shape[0]
            if T == 0:
                raise DatasetError(f"{path}: demo {name!r} is empty")
            ns = g.attrs.get("num_samples")
            if ns is not None and int(ns) != T:
                raise DatasetError(f"{path}: demo {name!r} has num_samples={int(ns)} but {T} actions")
            if not np.all(np.isfinite(actions)):
                raise DatasetError(f"{path}: demo {name!r} 'actions' contains NaN or inf")
            if "obs" not in g:
                raise DatasetError(f"{path}: demo {name!r} is missing group 'obs'")
            feats = []
            for k in obs_keys:
                v = _arr(g["obs"], k, path, name).astype(np.float32)
                v = v.reshape(v.shape[0], -1)
                if v.shape[0] != T:
                    raise DatasetError(f"{path}: demo {name!r} obs/{k} has {v.shape[0]} steps but actions have {T}")
                if not np.all(np.isfinite(v)):
                    raise DatasetError(f"{path}: demo {name!r} obs/{k} contains NaN or inf")
                if obs_parts and v.shape[1] != obs_parts[0][len(feats)].shape[1]:
                    raise DatasetError(f"{path}: demo {name!r} obs/{k} has width {v.shape[1]}, "
                                       f"earlier demos {obs_parts[0][len(feats)].shape[1]}")
                feats.append(v)
            obs_parts.append(feats)
            for k in image_keys:
                v = _arr(g["obs"], k, path, name)
                if v.ndim != 4 or v.shape[0] != T or v.shape[-1] != 3:
                    raise DatasetError(f"{path}: demo {name!r} obs/{k} has shape {v.shape}, expected [{T}, H, W, 3]")
                if v.dtype != np.uint8:
                    raise DatasetError(f"{path}: demo {name!r} obs/{k} has dtype {v.dtype}, expected uint8")
                img_parts[k].append(np.ascontiguousarray(v.transpose(0, 3, 1, 2)))
            if abs_action:
                states = _arr(g, "states", path, name)
                if states.shape[0] != T:
                    raise DatasetError(f"{path}: demo {name!r} has {states.shape[0]} states but {T} actions")
                state_parts.append(states)
            act_parts.append(actions)
            n += T
            ends.append(n)
        total = f["data"].attrs.get("total")
        if total is not None:
            all_n = sum(int(f["data"][k]["actions"].shape[0]) for k in f["data"] if _demo_index(k) >= 0)
            if int(total) != all_n:
                raise DatasetError(f"{path}: data.attrs['total']={int(total)} but the demos hold {all_n} steps")
        meta = _env_meta(f, path) if abs_action else None
    out: dict[str, np.ndarray] = {}
    out["obs"] = (np.concatenate([np.concatenate(p, axis=1) for p in obs_parts], axis=0) if obs_keys
                  else np.zeros((n, 0), np.float32))
    actions = np.concatenate(act_parts, axis=0)
    if abs_action:
        actions = convert_to_abs_actions(meta, state_parts, act_parts, progress=progress)
        if not np.all(np.isfinite(actions)):
            raise DatasetError(f"{path}: absolute action conversion produced NaN or inf")
    out["action"] = actions.astype(np.float32)
    out["episode_ends"] = np.asarray(ends, dtype=np.int64)
    for k in image_keys:
        out[k] = np.concatenate(img_parts[k], axis=0)
    return out


def convert_to_abs_actions(env_meta: dict, states: Sequence[np.ndarray], actions: Sequence[np.ndarray],
                           progress: bool = False) -> np.ndarray:
    """Delta actions -> [N, 10] absolute (world pos 3, rot6d 6, gripper 1) by replaying each recorded state.

    For each step: set the MuJoCo state, refresh the arm controller, and compute the goal that robosuite's
    OSC_POSE sets for the delta (``goal_pos = eef_pos + dpos * 0.05``, ``goal_ori = R(drot * 0.5) @ eef_ori`` in
    the world frame, the "achieved" update mode robosuite 1.2 used).
    """
    from robosuite.utils import transform_utils as T

    from ..envs.robomimic import RobomimicEnv, matrix_to_rot6d

    env = RobomimicEnv(env_meta, obs_keys=[])
    try:
        robot = env.unwrapped.robots[0]
        ctrl = robot.part_controllers[robot.arms[0]]
        it = zip(states, actions)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(actions), desc="abs actions", unit="demo")
        out = []
        for st, act in it:
            res = np.zeros((len(act), ABS_ACTION_DIM), dtype=np.float64)
            for t in range(len(act)):
                env.reset_to(st[t])
                ctrl.update(force=True)
                scaled = ctrl.scale_action(np.asarray(act[t][:6], dtype=np.float64))
                pos = np.array(ctrl.ref_pos) + scaled[:3]
                rot = T.quat2mat(T.axisangle2quat(scaled[3:6])) @ np.array(ctrl.ref_ori_mat)
                res[t, :3] = pos
                res[t, 3:9] = matrix_to_rot6d(rot)
                res[t, 9] = act[t][6]
            out.append(res)
    finally:
        env.close()
    return np.concatenate(out, axis=0)


def robomimic_path(task: str, dataset_type: str = "ph", root: str | os.PathLike | None = None,
                   filename: str = "low_dim_v141.hdf5") -> Path:
    """``<data root>/robomimic/<task>/<dataset_type>/<filename>``."""
    return data_root(root) / "robomimic" / task / dataset_type / filename


def robomimic_url(task: str, dataset_type: str = "ph", filename: str = "low_dim_v141.hdf5") -> str:
    """robomimic's download URL (from robomimic's DATASET_REGISTRY as remembered; not verified from here)."""
    return f"{DOWNLOAD_BASE}/{task}/{dataset_type}/{filename}"


def download_robomimic(task: str, dataset_type: str = "ph", root: str | os.PathLike | None = None) -> Path:
    """Download robomimic's low-dim dataset into ``<data root>/robomimic/<task>/<dataset_type>/``."""
    from .download import fetch

    if task not in TASKS:
        raise ValueError(f"unknown robomimic task {task!r}; expected one of {list(TASKS)}")
    target = robomimic_path(task, dataset_type, root)
    if target.exists():
        return target
    return fetch(robomimic_url(task, dataset_type), target,
                 f"Without network access, fetch that file elsewhere (robomimic's v0.1 datasets, e.g. `python -m "
                 f"robomimic.scripts.download_datasets --tasks {task} --dataset_types {dataset_type} --hdf5_types "
                 f"low_dim`) and copy it to {target}, point DRIFT_POLICY_DATA_ROOT at a folder holding "
                 f"robomimic/{task}/{dataset_type}/, or generate scripted demos with "
                 f"`python -m drift_policy.data.robomimic generate --task {task} --out {target}`")


def _inspect(path: Path) -> str:
    import h5py

    lines = [str(path)]
    with _open(path) as f:
        meta = _env_meta(f, path)
        names = _select_demos(f, path, None)
        lengths = [int(f["data"][n]["actions"].shape[0]) for n in names]
        lines.append(f"env: {meta['env_name']} (type {meta.get('type')})")
        ctrl = meta["env_kwargs"].get("controller_configs", {})
        lines.append(f"controller: {ctrl.get('type', ctrl)}")
        lines.append(f"demos: {len(names)}, samples: {sum(lengths)} (total attr {f['data'].attrs.get('total')}), "
                     f"length min/mean/max {min(lengths)}/{np.mean(lengths):.1f}/{max(lengths)}")
        g = f["data"][names[0]]
        for k in sorted(g["obs"].keys()):
            d = g["obs"][k]
            lines.append(f"  obs/{k}: {d.shape[1:]} {d.dtype}")
        for k in sorted(g.keys()):
            if isinstance(g[k], h5py.Dataset):
                lines.append(f"  {k}: {g[k].shape[1:]} {g[k].dtype}")
        if "mask" in f:
            for k in sorted(f["mask"].keys()):
                lines.append(f"mask/{k}: {len(f['mask'][k])} demos")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m drift_policy.data.robomimic", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write scripted demos in robomimic's schema (successful episodes only)")
    g.add_argument("--task", required=True, choices=["lift", "can", "square"])
    g.add_argument("--episodes", type=int, default=200)
    g.add_argument("--out", type=Path, default=None, help="default: <data root>/robomimic/<task>/scripted/low_dim.hdf5")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--images", action="store_true", help="also record agentview and eye-in-hand 84x84 images")
    i = sub.add_parser("inspect", help="summarize a robomimic hdf5 file")
    i.add_argument("path", type=Path)
    d = sub.add_parser("download", help="download robomimic's low-dim 'ph' dataset")
    d.add_argument("--task", required=True, choices=list(TASKS))
    d.add_argument("--dataset-type", default="ph")
    d.add_argument("--root", default=None)
    args = p.parse_args(argv)
    if args.cmd == "generate":
        from .scripted import generate_dataset

        name = "image.hdf5" if args.images else "low_dim.hdf5"
        out = args.out or robomimic_path(args.task, "scripted", filename=name)
        image_keys = ("agentview_image", "robot0_eye_in_hand_image") if args.images else ()
        stats = generate_dataset(args.task, args.episodes, out, seed=args.seed, image_keys=image_keys)
        print(f"demonstrator success rate: {stats['successes']}/{stats['attempted']} "
              f"({100 * stats['success_rate']:.1f}%), {stats['sec_per_episode']:.2f} s/episode; kept "
              f"{stats['successes']} demos ({stats['steps']} steps) in {stats['out_path']}")
    elif args.cmd == "inspect":
        print(_inspect(args.path))
    else:
        print(download_robomimic(args.task, args.dataset_type, args.root))


if __name__ == "__main__":
    main()
