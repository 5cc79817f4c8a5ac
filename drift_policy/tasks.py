"""What each task family fixes: observation keys and sizes, the data loader and the evaluation environment.

Three families: ``pusht`` (Diffusion Policy's Push-T, keypoints or image), ``robomimic`` (robosuite's Lift,
PickPlaceCan, NutAssemblySquare, ToolHang from robomimic hdf5 files) and ``blockpush`` (IBC's multimodal block
pushing in pybullet, from stores the scripted oracle writes: ``drift_policy.data.blockpush``). Policies read their input and output
sizes from here (``task_spaces``), so no YAML repeats them. Everything here takes a ``TaskConfig``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .paths import data_root

# Push-T observation keys: the 9 block keypoints (x, y) and the agent position. Push-T image policies see
# "agent_pos" plus the 96x96 frame "image"; keypoint policies see "keypoint" + "agent_pos" (20 numbers).
PUSHT_KEY_DIMS = {"keypoint": 18, "agent_pos": 2}
PUSHT_OBS_KEYS = {"keypoints": ("keypoint", "agent_pos"), "image": ("agent_pos",)}
PUSHT_IMAGE_SIZE = 96
# BlockPush: one 16-d state vector (block poses, effector, targets; envs/blockpush.py OBS_SLICES), 2-d absolute
# action. Its episodes count p1 / p2 (one / both blocks in a target) and which block reached a target first.
BLOCKPUSH_OBS_KEYS = ("obs",)
BLOCKPUSH_FLAGS = ("p1", "p2", "a_first", "b_first")
ENVS = ("pusht", "robomimic", "blockpush")
CONTROL_HZ = {"pusht": 10, "robomimic": 20, "blockpush": 10}


def dataset_path(task) -> Path:
    p = Path(task.dataset).expanduser()
    return p if p.is_absolute() else data_root(task.data_root) / p


def check_task(task) -> None:
    """Raise ValueError naming the key when the task's keys do not fit its family (no file access)."""
    if task.env == "pusht":
        allowed = [list(v) for v in PUSHT_OBS_KEYS.values()]
        if list(task.obs_keys) not in allowed:
            raise ValueError(f"task.obs_keys for Push-T must be one of {allowed}, got {list(task.obs_keys)}")
        image = list(task.obs_keys) == list(PUSHT_OBS_KEYS["image"])
        if list(task.image_keys) != (["image"] if image else []):
            raise ValueError(f"task.image_keys for Push-T with obs_keys {list(task.obs_keys)} must be "
                             f"{['image'] if image else []}, got {list(task.image_keys)}")
        if image and task.image_size != PUSHT_IMAGE_SIZE:
            raise ValueError(f"task.image_size must be {PUSHT_IMAGE_SIZE} for Push-T (the data set's frames)")
        if task.abs_action:
            raise ValueError("task.abs_action is a robomimic option; Push-T actions are already absolute")
    elif task.env == "robomimic":
        task_spaces(task)  # unknown task or key: ValueError from the table
    elif task.env == "blockpush":
        if tuple(task.obs_keys) != BLOCKPUSH_OBS_KEYS or task.image_keys:
            raise ValueError(f"task.obs_keys for BlockPush must be {list(BLOCKPUSH_OBS_KEYS)} and task.image_keys "
                             f"empty (state only), got {list(task.obs_keys)} / {list(task.image_keys)}")
        if task.abs_action:
            raise ValueError("task.abs_action is a robomimic option; BlockPush actions are already absolute")
    if task.image_keys and not 0 < task.crop_size <= task.image_size:
        raise ValueError(f"task.crop_size must be in (0, image_size={task.image_size}], got {task.crop_size}")


def task_spaces(task) -> dict:
    """{"obs_dim", "action_dim", "image_keys", "image_shape", "crop_shape"} for the policy config."""
    if task.env == "pusht":
        obs_dim, action_dim = sum(PUSHT_KEY_DIMS[k] for k in task.obs_keys), 2
    elif task.env == "blockpush":
        obs_dim, action_dim = 16, 2
    else:
        from .data.robomimic import robomimic_spaces

        obs_dim, action_dim = robomimic_spaces(task.robomimic_task, list(task.obs_keys), task.abs_action)
    return {"obs_dim": obs_dim, "action_dim": action_dim, "image_keys": tuple(task.image_keys),
            "image_shape": (3, task.image_size, task.image_size), "crop_shape": (task.crop_size, task.crop_size)}


def load_data(task) -> dict[str, np.ndarray]:
    """The task's demonstrations as flat per-step arrays (see ``data/windows.py``)."""
    path = dataset_path(task)
    if task.env == "pusht":
        from .data.pusht import load_pusht_image, load_pusht_lowdim

        return load_pusht_image(path) if task.image_keys else load_pusht_lowdim(path)
    if task.env == "blockpush":
        from .data.blockpush import load_blockpush

        return load_blockpush(path)
    from .data.robomimic import load_robomimic

    return load_robomimic(path, list(task.obs_keys), image_keys=list(task.image_keys), abs_action=task.abs_action)


def env_spec(task) -> dict:
    """A picklable description of the evaluation environment, built in rollout workers by ``make_env``."""
    if task.env == "pusht":
        kwargs = {"image": bool(task.image_keys), "max_steps": task.max_steps}
    elif task.env == "blockpush":
        return {"family": "blockpush", "name": task.name, "kwargs": {"max_steps": task.max_steps},
                "fps": CONTROL_HZ["blockpush"], "flags": list(BLOCKPUSH_FLAGS)}
    else:
        from .data.robomimic import read_env_meta

        kwargs = {"env_meta": read_env_meta(dataset_path(task)), "obs_keys": list(task.obs_keys),
                  "image_keys": list(task.image_keys), "image_size": task.image_size, "max_steps": task.max_steps}
    return {"family": task.env, "name": task.name, "kwargs": kwargs, "fps": CONTROL_HZ[task.env]}


def make_env(spec: dict):
    """The environment a spec describes; its reset/step return dict observations ({"obs": [D], image keys})."""
    kw = dict(spec["kwargs"])
    if spec["family"] == "pusht":
        from .envs.pusht import PushTImageEnv, PushTKeypointsEnv

        return (PushTImageEnv if kw.pop("image") else PushTKeypointsEnv)(**kw)
    if spec["family"] == "robomimic":
        from .envs.robomimic import RobomimicEnv

        return RobomimicEnv(**kw)
    if spec["family"] == "blockpush":
        from .envs.blockpush import BlockPushEnv

        return BlockPushEnv(**kw)
    raise ValueError(f"unknown env family {spec['family']!r}; known: {ENVS}")
