"""The robomimic family: robosuite's Lift, PickPlaceCan, NutAssemblySquare and ToolHang from robomimic hdf5 files.

Data: ``data/robomimic.py`` (robomimic's schema, read with h5py); environment: ``envs/robomimic.py`` (robosuite
1.5, 20 Hz control), rebuilt from the data file's env metadata. The score is the episode's maximum reward
(robosuite's sparse task reward: 1 at success), so it equals the success rate. Family options
(``task.options``): ``robomimic_task`` (lift | can | square | tool_hang) and ``abs_action`` (Diffusion Policy's
absolute actions: eef position + 6-D rotation + gripper).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import TaskFamily

TASKS = ("lift", "can", "square", "tool_hang")


@dataclasses.dataclass
class RobomimicOptions:
    robomimic_task: str = ""        # lift | can | square | tool_hang
    abs_action: bool = False        # Diffusion Policy's absolute actions (pos + rot6d + gripper) instead of deltas

    def __post_init__(self):
        if self.robomimic_task not in TASKS:
            raise ConfigError(f"task.options.robomimic_task must be one of {list(TASKS)}, got {self.robomimic_task!r}")
        if not isinstance(self.abs_action, bool):
            raise ConfigError(f"task.options.abs_action must be true or false, got {self.abs_action!r}")


class Robomimic(TaskFamily):
    name = "robomimic"
    control_hz = 20.0
    score_label = "success"
    success_key = "success"
    options_class = RobomimicOptions

    def check(self, task) -> None:
        self.spaces(task)                  # options, then the obs keys against the table: ConfigError naming them

    def spaces(self, task) -> tuple[int, int]:
        from ..data.robomimic import robomimic_spaces

        o = self.options(task)
        try:
            return robomimic_spaces(o.robomimic_task, list(task.obs_keys), o.abs_action)
        except ValueError as e:
            raise ConfigError(f"task.obs_keys: {e}") from e

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        from ..data.robomimic import load_robomimic

        return load_robomimic(path, list(task.obs_keys), image_keys=list(task.image_keys),
                              abs_action=self.options(task).abs_action)

    def env_kwargs(self, task, path: Path) -> dict:
        from ..data.robomimic import read_env_meta

        return {"env_meta": read_env_meta(path), "obs_keys": list(task.obs_keys), "image_keys": list(task.image_keys),
                "image_size": task.image_size, "abs_action": self.options(task).abs_action}

    def make_env(self, *, video: bool = False, **kwargs):
        from ..envs.robomimic import RobomimicEnv

        return RobomimicEnv(**kwargs, render=video)    # robosuite needs its offscreen renderer for video frames


FAMILY = Robomimic()
