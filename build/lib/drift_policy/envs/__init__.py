"""Simulators. Submodules import lazily, so ``python -m drift_policy.envs.pusht`` runs cleanly."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PushTKeypointsEnv": "pusht",
    "PushTImageEnv": "pusht",
    "PUSHT_LOCAL_KEYPOINTS": "pusht",
    "keypoints_from_state": "pusht",
    "keypoint_obs_from_state": "pusht",
    "fit_local_keypoints": "pusht",
    "legacy_initial_state": "pusht",
    "coverage_from_block_pose": "pusht",
    "replay_episode": "pusht",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
