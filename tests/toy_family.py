"""A toy task family, written the way a user would add one: this module and one task YAML, nothing else.

A point on a line must reach a goal (obs = [position, goal], action = a step, clipped to +-0.2); the
demonstrations are generated in memory by the obvious expert. Only numpy, gymnasium and
``drift_policy.tasks.base`` are imported, so rollout workers (which unpickle the family) stay free of torch.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import gymnasium as gym
import numpy as np

from drift_policy.errors import ConfigError
from drift_policy.tasks.base import TaskFamily

STEP = 0.2


class PointEnv(gym.Env):
    def __init__(self, max_steps: int = 20):
        self.max_steps = max_steps
        self.observation_space = gym.spaces.Box(-2.0, 2.0, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-STEP, STEP, shape=(1,), dtype=np.float32)

    def _obs(self):
        return np.array([self.pos, self.goal], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        rng = np.random.default_rng(seed)
        self.pos, self.goal, self.t = float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)), 0
        self.start_gap = abs(self.goal - self.pos)
        return self._obs(), {"gap": self.start_gap, "reached": False}

    def step(self, action):
        self.pos += float(np.clip(np.asarray(action).reshape(-1)[0], -STEP, STEP))
        self.t += 1
        gap = abs(self.goal - self.pos)
        reached = gap < 0.05
        reward = 1.0 - gap / max(self.start_gap, 1e-6) if not reached else 1.0
        return self._obs(), float(np.clip(reward, 0, 1)), reached, self.t >= self.max_steps, {"gap": gap,
                                                                                               "reached": reached}

    def render(self, size: int = 64):
        return np.zeros((size, size, 3), dtype=np.uint8)


@dataclasses.dataclass
class PointOptions:
    n_demos: int = 24

    def __post_init__(self):
        if self.n_demos < 2:
            raise ConfigError(f"task.options.n_demos must be >= 2, got {self.n_demos}")


class PointFamily(TaskFamily):
    name = "toy_point"
    control_hz = 5.0
    score_label = "progress"
    score_aliases = ("progress_score",)
    track_max = ("gap",)
    success_key = "reached"
    options_class = PointOptions

    def check(self, task) -> None:
        super().check(task)
        if list(task.obs_keys) != ["state"] or task.image_keys:
            raise ConfigError(f"task.obs_keys for toy_point must be ['state'] and no image_keys, got "
                              f"{list(task.obs_keys)}, {list(task.image_keys)}")

    def spaces(self, task) -> tuple[int, int]:
        return 2, 1

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        obs, act, ends = [], [], []
        for seed in range(self.options(task).n_demos):
            env = PointEnv(task.max_steps)
            o, _ = env.reset(seed=seed)
            for _ in range(task.max_steps):                # whole episodes: the expert then holds still
                a = np.clip([o[1] - o[0]], -STEP, STEP).astype(np.float32)
                obs.append(o)
                act.append(a)
                o, *_ = env.step(a)
            ends.append(len(obs))
        return {"obs": np.stack(obs), "action": np.stack(act), "episode_ends": np.asarray(ends, np.int64)}

    def env_kwargs(self, task, path: Path) -> dict:
        return {}

    def make_env(self, *, video: bool = False, max_steps: int = 20):
        return PointEnv(max_steps)


FAMILY = PointFamily()
