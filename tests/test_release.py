"""The released policy (pretrained/pusht_keypoints_drift): it loads from a fresh clone, anyone can read it, and its
evaluation reproduces the committed record (eval/results/pusht_keypoints/default/release/eval.json)."""
from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RELEASE = REPO / "pretrained" / "pusht_keypoints_drift"
RECORD = REPO / "eval" / "results" / "pusht_keypoints" / "default" / "release" / "eval.json"


def test_the_released_policy_loads_from_the_package_top_and_acts():
    from drift_policy import DriftPolicy

    for f in RELEASE.iterdir():                     # a clone for another user or container can read every file
        assert f.stat().st_mode & stat.S_IROTH, f
    policy = DriftPolicy.from_pretrained(RELEASE)
    c = policy.config
    assert (c.obs_dim, c.action_dim, c.n_obs_steps, c.horizon, c.n_action_steps) == (20, 2, 2, 16, 8)
    out = policy.predict_action(torch.rand(3, 2, 20) * 512, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (3, 8, 2) and torch.isfinite(out["action"]).all()


@pytest.mark.slow
def test_evaluating_the_released_policy_reproduces_its_record(tmp_path, pusht_zarr):
    """The README's second step: the same command (50 test seeds, sampling seed 0) gives the recorded score."""
    from drift_policy.cli import main

    record = json.loads(RECORD.read_text())
    assert record["checkpoint"] == "pretrained/pusht_keypoints_drift" and record["placement"] == "official"
    out = tmp_path / "eval.json"
    main(["eval", f"checkpoint={RELEASE}", f"out={out}", "workers=0"])
    res = json.loads(out.read_text())
    assert res["n_episodes"] == record["n_episodes"] and res["start_seed"] == record["start_seed"]
    # Same weights, test seeds and noise: equal up to float differences between CPUs, which a closed loop can
    # amplify on an episode or two.
    assert res["mean_score"] == pytest.approx(record["mean_score"], abs=0.02)
