"""Where the data and configs live.

The data root is resolved in this order: an explicit value (from the config's ``data_root``),
the ``DRIFT_POLICY_DATA_ROOT`` environment variable, then the repository's ``datasets/`` folder.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
ENV_VAR = "DRIFT_POLICY_DATA_ROOT"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit not in (None, ""):
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return REPO_ROOT / "datasets"


def pusht_zarr_path(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "pusht" / "pusht_cchi_v7_replay.zarr"
