"""Where a task's choices for a policy live must not change what any task trains.

``fixtures/resolved_configs.json`` holds the fully resolved config of every task x policy of the package's YAML
files, written before the choices moved (``fixtures/resolved_configs.py``); every combination must resolve to it
again, but for the keys removed since (issue 38: each lost when measured, its record kept in eval/results).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REMOVED = {"neighbor_own_anchor", "kernel_scale", "neighbor_negatives", "cond_mlp", "obs_noise"}


def _script():
    spec = importlib.util.spec_from_file_location("resolved_configs", FIXTURES / "resolved_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _without_removed(d: dict) -> dict:
    if "policy" in d:
        d = {**d, "policy": {k: v for k, v in d["policy"].items() if k not in REMOVED}}
    return d


@pytest.fixture(scope="module")
def resolved() -> dict:
    return _script().resolve_all()


def test_every_task_and_policy_resolves_as_before(resolved):
    expected = json.loads((FIXTURES / "resolved_configs.json").read_text())
    assert sorted(resolved) == sorted(expected)          # no task or policy YAML appeared or vanished unnoticed
    for name in expected:
        assert _without_removed(resolved[name]) == _without_removed(expected[name]), name


def test_a_resolved_config_resolves_to_itself(resolved):
    """config.json holds the resolved values: read back, it is the same config (a resumed run is the same run)."""
    from drift_policy.config import Config

    for name in ("pusht_keypoints/drift_unet", "can_lowdim/drift_unet", "pusht_image/diffusion_unet"):
        assert json.loads(json.dumps(Config.from_dict(resolved[name]).to_dict())) == resolved[name], name


def test_the_push_t_drift_default_trains_32_x_2_at_6e_4_with_500_warm_up_steps(resolved):
    d = resolved["pusht_keypoints/drift_unet"]
    assert (d["train"]["batch_size"], d["policy"]["n_noise"]) == (32, 2)
    assert (d["train"]["lr"], d["train"]["warmup_steps"]) == (6e-4, 500)
    assert (resolved["pusht_keypoints/diffusion_unet"]["train"]["batch_size"],
            resolved["pusht_keypoints/diffusion_unet"]["train"]["lr"]) == (64, 3e-4)
