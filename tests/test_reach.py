"""Compute to reach a score (drift_policy.reach): first and held budgets of the seeds' mean curve."""
from __future__ import annotations

import json

import numpy as np
import pytest

from drift_policy.reach import compute_to_target, mean_curve, plot_reach, reach


def _run(label, seed, scores, step=100):
    return {"label": label, "seed": seed,
            "evals": [{"sample_passes": step * (i + 1), "mean_score": s} for i, s in enumerate(scores)]}


def test_first_and_held_differ_when_the_curve_dips_back_below():
    sp = np.array([1, 2, 3, 4, 5])
    r = reach(sp, np.array([0.5, 0.96, 0.94, 0.95, 0.97]), 0.95)
    assert r == {"first": 2, "held": 4}


def test_never_reached_and_reached_only_at_the_end():
    sp = np.array([1, 2, 3])
    assert reach(sp, np.array([0.1, 0.2, 0.3]), 0.95) == {"first": None, "held": None}
    assert reach(sp, np.array([0.1, 0.2, 0.99]), 0.95) == {"first": 3, "held": 3}


def test_the_curve_is_the_mean_over_seeds_at_shared_points():
    a = _run("x", 0, [0.9, 1.0, 0.9])
    b = _run("x", 1, [0.7, 0.9])                      # one evaluation fewer: only the shared points count
    sp, score, seeds = mean_curve([a, b])
    assert sp.tolist() == [100, 200] and seeds == [0, 1]
    np.testing.assert_allclose(score, [0.8, 0.95])


def test_compute_to_target_reads_records_and_names_missing_labels(tmp_path):
    rec = {"runs": [_run("drift", 0, [0.5, 0.96, 0.97]), _run("drift", 1, [0.6, 0.94, 0.99]),
                    _run("diffusion", 0, [0.3, 0.8, 0.96])]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    out = compute_to_target([path, path], 0.95, ["drift", "diffusion"])   # the same record twice: runs kept once
    assert out["drift"]["seeds"] == [0, 1]
    assert out["drift"]["first"] == out["drift"]["held"] == 200                # mean 0.95 at 200
    assert out["diffusion"]["held"] == 300
    with pytest.raises(ValueError, match="no runs labelled"):
        compute_to_target([path], 0.95, ["nope"])
    png = plot_reach(out, 0.95, tmp_path / "reach.png")
    assert png.stat().st_size > 0
