"""Task families behind a registry, and the functions the rest of the package calls with a ``TaskConfig``.

Built-in families: ``pusht`` (``tasks/pusht.py``), ``robomimic`` (``tasks/robomimic.py``), ``blockpush``
(``tasks/blockpush.py``) and ``lerobot`` (``tasks/lerobot.py``: any LeRobotDataset, evaluated in another family's
env or not at all). Adding one
takes a module that defines ``FAMILY = MyFamily()`` (a ``TaskFamily`` subclass) and a task YAML with
``env: <name>``: training, evaluation, the runner and the benchmarks only call the functions below. The module
is found by name: every ``drift_policy/tasks/<name>.py``, or any module listed in ``$DRIFT_POLICY_TASK_MODULES``
(comma-separated), or one that called ``register_family`` itself. Policies read their input and output sizes
from ``task_spaces``, so no YAML repeats them.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import NoOptions, TaskFamily
from .blockpush import FAMILY as BLOCKPUSH
from .pusht import FAMILY as PUSHT
from .robomimic import FAMILY as ROBOMIMIC

__all__ = ["TaskFamily", "NoOptions", "POLICY_KEYS_FROM_TASK", "register_family", "family", "families", "check_task",
           "resolve_task", "task_spaces", "check_policy_fits_task", "dataset_path", "load_data", "has_env", "env_spec",
           "make_env", "control_hz"]

_FAMILIES: dict[str, TaskFamily] = {}
# Policy config keys that come from the task (``task_spaces``), never from a policy's YAML.
POLICY_KEYS_FROM_TASK = ("obs_dim", "action_dim", "image_keys", "image_shape", "crop_shape")


def register_family(fam: TaskFamily) -> TaskFamily:
    """Make ``fam`` available as ``task.env: <fam.name>`` (a later registration under the same name replaces it)."""
    if not isinstance(fam, TaskFamily) or not fam.name:
        raise ValueError(f"register_family needs a TaskFamily instance with a name, got {fam!r}")
    _FAMILIES[fam.name] = fam
    return fam


MODULES_VAR = "DRIFT_POLICY_TASK_MODULES"


def _import_families(name: str | None = None) -> None:
    """Register the FAMILY of each module in $DRIFT_POLICY_TASK_MODULES, and of drift_policy.tasks.<name> (without
    a name: of every module of this package, so that ``families()`` lists them all)."""
    mods = [m.strip() for m in os.environ.get(MODULES_VAR, "").split(",") if m.strip()]
    if name and name.isidentifier():
        mods.append(f"{__name__}.{name}")
    elif name is None:
        mods += [f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__) if m.name != "base"]
    for mod in mods:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:                              # the module exists but one of its imports does not
                raise
            continue
        fam = getattr(module, "FAMILY", None)
        if isinstance(fam, TaskFamily) and fam.name not in _FAMILIES:
            register_family(fam)


def families() -> list[str]:
    _import_families()
    return sorted(_FAMILIES)


def family(task) -> TaskFamily:
    """The family of a TaskConfig (or a family name)."""
    name = task if isinstance(task, str) else task.env
    if name not in _FAMILIES:
        _import_families(name)
    if name not in _FAMILIES:
        raise ConfigError(f"task.env must be one of {families()}, got {name!r}")
    return _FAMILIES[name]


register_family(PUSHT)
register_family(ROBOMIMIC)
register_family(BLOCKPUSH)


def check_task(task) -> None:
    """ConfigError naming the key when the task's keys do not fit its family (no file access)."""
    fam = family(task)
    fam.check(task)
    if task.image_keys and not 0 < task.crop_size <= task.image_size:
        raise ConfigError(f"task.crop_size must be in (0, image_size={task.image_size}], got {task.crop_size}")


def resolve_task(task):
    """The task with every key explicit (``TaskFamily.resolve``)."""
    return family(task).resolve(task)


def task_spaces(task) -> dict:
    """{"obs_dim", "action_dim", "image_keys", "image_shape", "crop_shape"} for the policy config."""
    obs_dim, action_dim = family(task).spaces(task)
    return {"obs_dim": obs_dim, "action_dim": action_dim, "image_keys": tuple(task.image_keys),
            "image_shape": (3, task.image_size, task.image_size), "crop_shape": (task.crop_size, task.crop_size)}


def check_policy_fits_task(policy_config, task) -> None:
    """ConfigError unless the task's environment gives what the policy was trained on (observation size,
    cameras and their image size, action size): checked before an evaluation starts any rollout."""
    def spaces(obs_dim, action_dim, image_keys, image_shape) -> str:
        cams = f"camera(s) {list(image_keys)} of {list(image_shape)}" if image_keys else "no camera"
        return f"obs_dim {obs_dim}, action_dim {action_dim}, {cams}"

    t, c = task_spaces(task), policy_config
    ours = (c.obs_dim, c.action_dim, tuple(c.image_keys), tuple(c.image_shape) if c.image_keys else ())
    theirs = (t["obs_dim"], t["action_dim"], t["image_keys"], t["image_shape"] if t["image_keys"] else ())
    if ours != theirs:
        raise ConfigError(f"task={task.name} does not fit this policy: the task gives {spaces(*theirs)}, the policy "
                          f"takes {spaces(*ours)}; evaluate it on the task it was trained on")


def dataset_path(task) -> Path:
    """The local path of the task's data (``TaskFamily.locate``)."""
    return family(task).locate(task)


def load_data(task) -> dict[str, np.ndarray]:
    """The task's demonstrations as flat per-step arrays (see ``data/windows.py``)."""
    return family(task).load(task, dataset_path(task))


def has_env(task) -> bool:
    """Whether the task has an evaluation environment (a data-only family may have none)."""
    return family(task).eval_family(task) is not None


def control_hz(task) -> float:
    """Env steps per second of the task's evaluation environment."""
    fam = family(task)
    return (fam.eval_family(task) or fam).control_hz


def env_spec(task) -> dict:
    """A picklable description of the evaluation environment: {"family": the TaskFamily that builds it, "name",
    "kwargs"}. ``evaluation`` builds it in rollout workers with ``make_env``."""
    fam = family(task)
    env_fam = fam.eval_family(task)
    if env_fam is None:
        raise ConfigError(f"task {task.name!r} (task.env={task.env}) has no evaluation environment"
                          + (f": {fam.no_env_hint}" if fam.no_env_hint else ""))
    return {"family": env_fam, "name": task.name, "kwargs": fam.env_kwargs(task, dataset_path(task))}


def make_env(spec: dict, **extra):
    """The environment a spec describes (``extra``: e.g. ``max_steps``, ``video``)."""
    return spec["family"].make_env(**{**spec["kwargs"], **extra})
