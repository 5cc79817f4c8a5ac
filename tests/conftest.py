import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The U-Net's compiled batch-1 kernels (models/cpu_kernel.py; models/aot.py, a minute of compiling per net shape):
# the suite runs the TorchScript fast path, and tests/test_cpu_kernel.py, tests/test_aot.py switch them on.
os.environ.setdefault("DRIFT_POLICY_COMPILE", "0")


def shared_data_root() -> Path:
    env = os.environ.get("DRIFT_POLICY_DATA_ROOT")
    return Path(env).resolve() if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def pusht_zarr() -> Path:
    """The real Push-T store. Missing: a skip on a developer's machine, but an error under CI (env ``CI`` set),
    where a silently skipped third of the suite would look like a pass."""
    p = shared_data_root() / "pusht" / "pusht_cchi_v7_replay.zarr"
    if not p.exists():
        msg = f"Push-T store not found at {p} (set DRIFT_POLICY_DATA_ROOT)"
        if os.environ.get("CI"):
            pytest.fail(f"{msg}; CI must run the tests that need it", pytrace=False)
        pytest.skip(msg)
    return p


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(1)
