"""The Push-T family: Diffusion Policy's Push-T from keypoints (20 numbers per step) or from the 96x96 frame.

Data: ``pusht_cchi_v7_replay.zarr`` (``data/pusht.py``); environment: ``envs/pusht.py`` (gym-pusht's pymunk
physics, 10 Hz control). The score is the episode's maximum of clip(coverage / 0.95, 0, 1), also reported as
``coverage_score``; success is coverage > 0.95.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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
        """The low-dim observation dims of the agent's position (x, y)."""
        start = sum(KEY_DIMS[k] for k in task.obs_keys[:task.obs_keys.index("agent_pos")])
        return (start, start + 1)

    def action_anchor(self, task) -> tuple[int, ...]:
        # The action is the agent's target position, observed as agent_pos. Relative chunks are measured on
        # keypoints (eval/results/compute_matched/action_anchor); the image task keeps absolute actions.
        return () if task.image_keys else self.agent_dims(task)

    def obs_origin(self, task) -> tuple[int, ...]:
        # The block's keypoints also as seen from the agent; from pixels the low-dim observation is the agent alone.
        return () if task.image_keys else self.agent_dims(task)

    def drift_choices(self, task) -> dict[str, Any]:
        if task.image_keys:
            return {}
        # Measured on keypoints at 1.2M sample-passes, each over the one before (last-5 coverage / success):
        # - per_dim_scale: x and y of the relative chunk in units of their own spread, 0.952 / 0.46 against
        #   0.940 / 0.47, seeds 0 and 1 (eval/results/compute_matched/levers_1200k);
        # - neighbor_same_episode=False: the neighbour positives come from other demonstrations, not time-shifted
        #   copies of the own one; seed 0 0.964 / 0.38 against 0.956 / 0.49 (compute_matched/noise_scale);
        # - noise_scale=0.5: the same weights sampled nearer the middle: seed 0 0.939 / 0.54 against 0.964 / 0.38;
        #   seeds 0, 1 0.949 / 0.53 (diffusion 0.970 / 0.49): more precise finishes, more outright failures.
        return {"per_dim_scale": True, "neighbor_same_episode": False, "noise_scale": 0.5}

    def train_choices(self, task, policy_type: str) -> dict[str, Any]:
        if task.image_keys or policy_type != "drift":
            return {}
        # Measured on keypoints at 1.2M sample-passes (last-5 coverage / success, seeds 0, 1;
        # eval/results/compute_matched/lr_6e-4): lr 6e-4 with a 500-step warm-up 0.962 / 0.60 against 0.949 / 0.53
        # at TRAIN_OWN_RULE's 3e-4 / 100. The diffusion baseline given the same change (seed 0) scored 0.968 / 0.60
        # against 0.972 / 0.52 for the same seed at 3e-4: level on coverage, so it keeps its own rule (its success
        # at 6e-4, 0.60 on one seed, equals drift's).
        return {"lr": 6e-4, "warmup_steps": 500}

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
