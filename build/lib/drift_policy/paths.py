"""Where the data and configs live.

The configs ship inside the package (``drift_policy/configs/``, package data), so they compose from any working
directory and from an installed wheel. The data root is resolved in this order: an explicit value (from the
config's ``data_root``), the ``DRIFT_POLICY_DATA_ROOT`` environment variable, then the repository's
``datasets/`` folder.
"""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent          # the checkout (an editable install); a wheel's site-packages otherwise
CONFIG_DIR = PACKAGE_DIR / "configs"
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
