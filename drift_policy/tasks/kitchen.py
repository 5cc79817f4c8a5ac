"""The Kitchen family: Franka Kitchen (Relay Policy Learning / D4RL), Diffusion Policy's ``kitchen_lowdim``.

Data: zarr stores written by the scripted demonstrator (``data/kitchen.py``); environment: ``envs/kitchen.py``
(gymnasium-robotics' FrankaKitchen-v1 on MuJoCo 3, headless, 12.5 Hz; needs the ``kitchen`` extra). The
observation is one 60-d state vector per step (robot and object joint positions, and D4RL's masked goal: zeros),
the action 9 joint velocities in [-1, 1]. The score is Diffusion Policy's: per episode the number of subtasks
completed / 7; the episode flags ``p1``..``p4`` are the shares of episodes that completed at least 1..4 subtasks
(the paper's Table 7), ``done_<subtask>`` which subtasks, and each episode's record lists its subtasks in the order
they were completed (``completed``). ``success_rate`` counts episodes with at least 4, what every demonstration
does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..envs.kitchen import ACTION_DIM, CONTROL_HZ, OBS_DIM, P_LEVELS, TASK_FLAGS, TASKS  # constants only
from ..errors import ConfigError
from .base import TaskFamily

OBS_KEYS = ("obs",)          # the env's 60-d vector, stored as data/obs


class Kitchen(TaskFamily):
    name = "kitchen"
    control_hz = CONTROL_HZ
    score_label = "score"
    success_key = "is_success"
    episode_flags = (*(f"p{k}" for k in P_LEVELS), *(TASK_FLAGS[t] for t in TASKS))
    episode_values = ("completed",)
    # The object joints no demonstration moves (the hinge cabinet, and the burners' second joints) carry only
    # the simulator's jitter, ranges of 1e-4 to 2e-2 in the data; min-max would give that noise the same [-1, 1]
    # as the joints the subtasks move (0.2 to 2 rad or m). Below 0.1 a dimension is scaled as if it moved 0.1.
    obs_min_range = 0.1

    def check(self, task) -> None:
        super().check(task)
        if tuple(task.obs_keys) != OBS_KEYS or task.image_keys:
            raise ConfigError(f"task.obs_keys for Kitchen must be {list(OBS_KEYS)} and task.image_keys empty "
                              f"(state only), got {list(task.obs_keys)} / {list(task.image_keys)}")

    def spaces(self, task) -> tuple[int, int]:
        return OBS_DIM, ACTION_DIM

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        from ..data.kitchen import load_kitchen

        return load_kitchen(path)

    def env_kwargs(self, task, path: Path) -> dict:
        return {}

    def make_env(self, *, video: bool = False, **kwargs):
        from ..envs.kitchen import KitchenEnv

        return KitchenEnv(**kwargs)      # renders with mujoco.Renderer (MUJOCO_GL=egl) only when asked for frames


FAMILY = Kitchen()
