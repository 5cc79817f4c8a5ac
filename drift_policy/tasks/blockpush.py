"""The BlockPush family: IBC's multimodal block pushing (Diffusion Policy's ``blockpush_lowdim_seed_abs``).

Data: zarr stores written by the scripted multimodal oracle (``data/blockpush.py``); environment:
``envs/blockpush.py`` (pybullet, headless, 10 Hz control; needs the ``blockpush`` extra). The observation is one
16-d state vector per step (block poses, effector and its target, target poses) and the action the absolute
effector target xy. The score is Diffusion Policy's: per episode 0.49 once a block reached a target, 1 when
both are in different targets (success); the episode flags ``p1`` / ``p2`` give the paper's phase-1 / phase-2
rates, and the mode flags (``envs.blockpush.MODE_FLAGS``) which block reached a target first, which target each
block was in, and whether a rollout went from one block to the other before finishing the first (mode averaging).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..envs.blockpush import ACTION_DIM, MODE_FLAGS, OBS_DIM  # constants only: pybullet is imported when an env is made
from ..errors import ConfigError
from .base import TaskFamily

OBS_KEYS = ("obs",)          # the env's 16-d vector, stored as data/obs


class BlockPush(TaskFamily):
    name = "blockpush"
    control_hz = 10.0
    score_label = "score"
    success_key = "is_success"
    episode_flags = ("p1", "p2", *MODE_FLAGS)

    def check(self, task) -> None:
        super().check(task)
        if tuple(task.obs_keys) != OBS_KEYS or task.image_keys:
            raise ConfigError(f"task.obs_keys for BlockPush must be {list(OBS_KEYS)} and task.image_keys empty "
                              f"(state only), got {list(task.obs_keys)} / {list(task.image_keys)}")

    def spaces(self, task) -> tuple[int, int]:
        return OBS_DIM, ACTION_DIM

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        from ..data.blockpush import load_blockpush

        return load_blockpush(path)

    def env_kwargs(self, task, path: Path) -> dict:
        return {}

    def make_env(self, *, video: bool = False, **kwargs):
        from ..envs.blockpush import BlockPushEnv

        return BlockPushEnv(**kwargs)      # renders with pybullet's CPU renderer: nothing to set up for videos


FAMILY = BlockPush()
