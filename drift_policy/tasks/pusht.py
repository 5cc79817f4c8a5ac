"""The Push-T family: Diffusion Policy's Push-T from keypoints (20 numbers per step) or from the 96x96 frame.

Data: ``pusht_cchi_v7_replay.zarr`` (``data/pusht.py``); environment: ``envs/pusht.py`` (gym-pusht's pymunk
physics, 10 Hz control). The score is the episode's maximum of clip(coverage / 0.95, 0, 1), also reported as
``coverage_score``; success is coverage > 0.95.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import ConfigError
from .base import TaskFamily

# Observation keys: the 9 block keypoints (x, y) and the agent position. Image policies see "agent_pos" plus
# the frame "image"; keypoint policies see "keypoint" + "agent_pos".
KEY_DIMS = {"keypoint": 18, "agent_pos": 2}
OBS_KEYS = {"keypoints": ("keypoint", "agent_pos"), "image": ("agent_pos",)}
IMAGE_SIZE = 96
ACTION_DIM = 2


class PushT(TaskFamily):
    name = "pusht"
    control_hz = 10.0
    score_label = "coverage"
    score_aliases = ("coverage_score",)
    track_max = ("coverage",)
    success_key = "is_success"
    # Test seeds start where Diffusion Policy's official runner starts them (legacy_test: True; envs/pusht.py).
    eval_protocol = {"placement": "official"}

    def check(self, task) -> None:
        super().check(task)
        allowed = [list(v) for v in OBS_KEYS.values()]
        if list(task.obs_keys) not in allowed:
            raise ConfigError(f"task.obs_keys for Push-T must be one of {allowed}, got {list(task.obs_keys)}")
        image = list(task.obs_keys) == list(OBS_KEYS["image"])
        if list(task.image_keys) != (["image"] if image else []):
            raise ConfigError(f"task.image_keys for Push-T with obs_keys {list(task.obs_keys)} must be "
                              f"{['image'] if image else []}, got {list(task.image_keys)}")
        if image and task.image_size != IMAGE_SIZE:
            raise ConfigError(f"task.image_size must be {IMAGE_SIZE} for Push-T (the data set's frames)")

    def spaces(self, task) -> tuple[int, int]:
        return sum(KEY_DIMS[k] for k in task.obs_keys), ACTION_DIM

    def agent_dims(self, task) -> tuple[int, ...]:
        """The low-dim observation dims of the agent's position (x, y): what the action commands, so the dims
        that the drift recipe (recipe/pusht_keypoints_drift.yaml) predicts chunks and sees keypoints relative to."""
        start = sum(KEY_DIMS[k] for k in task.obs_keys[:task.obs_keys.index("agent_pos")])
        return (start, start + 1)

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        from ..data.pusht import load_pusht_image, load_pusht_lowdim

        return load_pusht_image(path) if task.image_keys else load_pusht_lowdim(path)

    def env_kwargs(self, task, path: Path) -> dict:
        return {"image": bool(task.image_keys)}

    def make_env(self, *, video: bool = False, image: bool = False, **kwargs):
        from ..envs.pusht import PushTImageEnv, PushTKeypointsEnv

        return (PushTImageEnv if image else PushTKeypointsEnv)(**kwargs)

    def render_kwargs(self) -> dict:
        return {"draw_action": True}


FAMILY = PushT()
# The keypoints environment without a TaskConfig (``evaluate_pusht``, scripts).
KEYPOINTS_SPEC = {"family": FAMILY, "name": "pusht", "kwargs": {"image": False}}


def evaluate_pusht(predict: Callable[[np.ndarray], np.ndarray], **kwargs) -> dict:
    """Push-T keypoints: ``predict`` maps float32 windows [B, n_obs_steps, 20] to actions [B, k, 2]; the rest as
    ``evaluation.evaluate``."""
    from ..evaluation import evaluate

    return evaluate(lambda obs: predict(obs["obs"]), KEYPOINTS_SPEC, action_dim=ACTION_DIM, **kwargs)
