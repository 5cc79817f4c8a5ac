"""The LeRobot family: any LeRobotDataset (format v3.0), from a local folder or the Hugging Face hub.

Data: ``data/lerobot.py`` (pyarrow + PyAV, the ``[lerobot]`` extra). ``task.dataset`` is a dataset folder (the one
holding ``meta/info.json``; absolute, or relative to the working directory or the data root) or a hub id
``user/name[@revision]``, downloaded with ``huggingface_hub.snapshot_download``.

Keys: ``task.obs_keys`` are low-dim feature keys, concatenated in order; ``task.image_keys`` cameras, by feature
key (``observation.images.top``) or by name (``top``); ``[auto]`` takes them from the features
(``observation.environment_state`` then ``observation.state``; every camera), ``[]`` none. A run's config.json
records the resolved keys, with cameras by name (the policy's image keys). Frames stored at another size are
resized to ``task.image_size`` squared as they are decoded. Windows are frames, so they step at the dataset's fps.

Evaluation: a dataset has no simulator of its own, so there is none unless ``task.options.eval_env`` names a
registered family whose environment produces the same observation (``pusht`` for Push-T data:
environment_state + state = keypoints + agent position, or state + the camera ``image``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DatasetError
from ..paths import data_root
from .base import TaskFamily

AUTO = "auto"
# What an eval env observes, for the families whose envs can score LeRobot data: (obs_dim, camera names).
ENV_OBS = {"pusht": ((20, ()), (2, ("image",)))}


@dataclasses.dataclass
class LeRobotOptions:
    eval_env: str = ""              # a registered family whose env evaluates the policy (e.g. pusht); "": none
    action_key: str = "action"      # the action feature

    def __post_init__(self):
        if not isinstance(self.eval_env, str) or self.eval_env == "lerobot":
            raise ConfigError(f"task.options.eval_env must name a simulator family (e.g. pusht) or be empty, got "
                              f"{self.eval_env!r}")


class LeRobot(TaskFamily):
    name = "lerobot"
    control_hz = 10.0               # unused: evaluation runs in eval_env's family, at its rate
    score_label = "score"
    options_class = LeRobotOptions
    no_env_hint = ("a LeRobotDataset has no simulator of its own; name one whose observation matches the data "
                   "with task.options.eval_env=<family> (e.g. pusht for Push-T data)")

    # ---- config --------------------------------------------------------------------------------------------
    def check(self, task) -> None:
        o = self.options(task)
        for key in ("obs_keys", "image_keys"):
            keys = list(getattr(task, key))
            if AUTO in keys and keys != [AUTO]:
                raise ConfigError(f"task.{key}: {AUTO!r} stands alone (features chosen from the dataset), got {keys}")
        if not task.dataset:
            raise ConfigError("task.dataset must be given: a LeRobotDataset folder (holding meta/info.json) or a hub "
                              "id user/name, e.g. task.dataset=lerobot/pusht")
        if o.eval_env:
            from . import families

            if o.eval_env not in families():
                raise ConfigError(f"task.options.eval_env must be one of {families()} or empty, got {o.eval_env!r}")

    def meta(self, task):
        """The dataset's validated metadata (a hub id is fetched, or found in the hub cache, first). Read again at
        each call (a few ms): no cache that could go stale within a process."""
        from ..data.lerobot import read_meta, resolve_dataset

        return read_meta(resolve_dataset(task.dataset, base=data_root(task.data_root)))

    def features(self, task) -> tuple[list[str], list[str], str]:
        """(low-dim feature keys, camera feature keys, action key), checked against the dataset."""
        from ..data.lerobot import camera_name, select_features

        meta = self.meta(task)
        obs = None if list(task.obs_keys) == [AUTO] else list(task.obs_keys)
        cams = None
        if list(task.image_keys) != [AUTO]:
            by_name = {camera_name(k): k for k in meta.camera_keys()}
            cams = [by_name.get(k, k) for k in task.image_keys]
        try:
            return select_features(meta, obs, cams, self.options(task).action_key)
        except DatasetError as e:
            raise ConfigError(f"task.obs_keys / task.image_keys / task.options.action_key: {e}") from e

    def resolve(self, task):
        from ..data.lerobot import camera_name, local_dataset

        obs, cams, _ = self.features(task)
        # A local folder is recorded as an absolute path (a resumed run finds it from any directory); a hub id stays.
        local = local_dataset(task.dataset, data_root(task.data_root))
        return dataclasses.replace(task, dataset=str(local) if local is not None else task.dataset,
                                   obs_keys=tuple(obs), image_keys=tuple(camera_name(k) for k in cams))

    def spaces(self, task) -> tuple[int, int]:
        obs, _, action = self.features(task)
        meta = self.meta(task)
        return sum(meta.dim(k) for k in obs), meta.dim(action)

    # ---- data and environment ------------------------------------------------------------------------------
    def locate(self, task) -> Path:
        return self.meta(task).root

    def load(self, task, path: Path) -> dict[str, np.ndarray]:
        from ..data.lerobot import load_lerobot

        obs, cams, action = self.features(task)
        size = (task.image_size, task.image_size) if cams else None
        return load_lerobot(path, obs, cams, action, image_size=size)

    def eval_family(self, task):
        o = self.options(task)
        if not o.eval_env:
            return None
        from . import family

        return family(o.eval_env)

    def env_kwargs(self, task, path: Path) -> dict:
        env = self.options(task).eval_env
        task = self.resolve(task)
        obs_dim = self.spaces(task)[0]
        if env in ENV_OBS and (obs_dim, tuple(task.image_keys)) not in ENV_OBS[env]:
            raise ConfigError(f"task.options.eval_env={env} observes (obs size, cameras) in {list(ENV_OBS[env])}; "
                              f"this task reads {obs_dim} numbers and cameras {list(task.image_keys)}")
        return self.eval_family(task).env_kwargs(task, path)


FAMILY = LeRobot()
