"""What a task family supplies: the interface every family module implements (``tasks/pusht.py``, ...).

A family is the code shared by the tasks of one simulator and data format: how to read its demonstrations,
the sizes of its observations and actions, how to build its evaluation environment, what its score means and
its control rate. A task (a ``TaskConfig``, one YAML file in ``drift_policy/configs/task/``) picks a family with
``task.env`` and sets the rest; keys only one family understands go in ``task.options`` and are validated by
that family (``options_class``). A family is registered once (``drift_policy.tasks.register_family``); nothing
in training, evaluation, the runner or the benchmarks names a family.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import check_keys


@dataclasses.dataclass
class NoOptions:
    """A family without family-specific keys: ``task.options`` must be empty."""


class TaskFamily:
    """Subclass, set the class attributes, implement the methods, then ``register_family(MyFamily())``.

    Instances are picklable (rollout workers receive the family inside the env spec and call ``make_env``), so
    keep state out of them: everything a worker needs is in the env kwargs.
    """

    name: ClassVar[str] = ""                        # the value of task.env
    control_hz: ClassVar[float] = 10.0              # env steps per second (videos, the runner's sim clock)
    score_label: ClassVar[str] = "score"            # what mean_score measures, for tables and plots
    score_aliases: ClassVar[tuple[str, ...]] = ()   # extra result keys that hold mean_score (Push-T: coverage_score)
    track_max: ClassVar[tuple[str, ...]] = ()       # info keys whose per-episode maximum is reported as max_<key>
    success_key: ClassVar[str] = "success"          # the info key that says an env step reached the goal
    episode_flags: ClassVar[tuple[str, ...]] = ()   # info keys counted per episode as true at any step, reported
                                                    # as fractions of episodes (BlockPush: p1, p2, ...)
    episode_values: ClassVar[tuple[str, ...]] = ()  # info keys whose value at an episode's last step goes into its
                                                    # per-episode record as is (Kitchen: subtasks in order done)
    eval_protocol: ClassVar[dict] = {}             # how its evaluation episodes start, written into every eval
                                                    # record (Push-T: the block placement of the test seeds)
    options_class: ClassVar[type] = NoOptions       # dataclass of task.options (defaults = the family's defaults)
    no_env_hint: ClassVar[str] = ""                 # what to do when eval_family() is None (how to name an env)
    obs_min_range: ClassVar[float] = 0.0            # data units: an observation dimension that moves less in the
                                                    # data is not stretched to [-1, 1] (Normalizer.fit min_range)

    # ---- config --------------------------------------------------------------------------------------------
    def options(self, task) -> Any:
        """``task.options`` validated into ``options_class`` (ConfigError naming ``task.options.<key>``)."""
        opts = dict(task.options or {})
        check_keys(self.options_class, opts, "task.options.")
        return self.options_class(**opts)

    def check(self, task) -> None:
        """Raise ConfigError naming the key when the task's keys do not fit this family (no file access)."""
        self.options(task)

    def spaces(self, task) -> tuple[int, int]:
        """(obs_dim, action_dim): the low-dim observation and action sizes per step."""
        raise NotImplementedError

    def resolve(self, task):
        """The task with every key explicit. A family whose keys come from its data (LeRobot: the dataset's
        features) reads them here; ``Config.from_dict`` calls it once, so a run's config.json records them."""
        return task

    # ---- data and environment ------------------------------------------------------------------------------
    def locate(self, task) -> Path:
        """The local path of ``task.dataset``: absolute, or relative to the data root."""
        from ..paths import data_root

        p = Path(task.dataset).expanduser()
        return p if p.is_absolute() else data_root(task.data_root) / p

    def eval_family(self, task) -> "TaskFamily | None":
        """The family whose environment (``make_env``, success key, control rate) evaluates ``task``: this one,
        another (a data-only family evaluated in a simulator), or None when the task has no environment."""
        return self

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        """The demonstrations at ``path`` as flat per-step arrays (see ``data/windows.py``)."""
        raise NotImplementedError

    def env_kwargs(self, task, path: Path) -> dict:
        """Picklable keyword arguments of ``make_env`` for this task (``max_steps`` is added by evaluation)."""
        raise NotImplementedError

    def make_env(self, *, video: bool = False, **kwargs):
        """The evaluation environment: ``reset(seed)`` -> (obs, info), ``step(a)`` -> (obs, reward, terminated,
        truncated, info), ``render(size)``, ``close()``. ``obs`` is an array [D] or {"obs": [D], <camera>:
        uint8 [3, H, W]}. ``video``: frames will be rendered for a video."""
        raise NotImplementedError

    def render_kwargs(self) -> dict:
        """Extra keyword arguments of ``env.render(size, ...)`` for evaluation videos."""
        return {}

