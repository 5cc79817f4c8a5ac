"""The headline comparison (drift_policy.headline): bootstrap intervals and pairing by test seed."""
from __future__ import annotations

import numpy as np
import pytest

from drift_policy.headline import bootstrap_ci, per_test_seed, render, summarize


def _eval(scores, train_seed=0, sampling_seed=0, seeds=None):
    seeds = seeds or list(range(100000, 100000 + len(scores)))
    return {"train_seed": train_seed, "sampling_seed": sampling_seed,
            "per_episode": [{"seed": s, "max_reward": float(x), "success": x > 0.95} for s, x in zip(seeds, scores)]}


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_seeds():
    rng = np.random.default_rng(0)
    small, large = rng.uniform(size=50), rng.uniform(size=800)
    lo, hi = bootstrap_ci(small)
    assert lo < small.mean() < hi
    lo2, hi2 = bootstrap_ci(large)
    assert (hi2 - lo2) < (hi - lo)
    # Close to the normal approximation 1.96 sd / sqrt(n) for a large sample.
    assert hi2 - lo2 == pytest.approx(2 * 1.96 * large.std() / np.sqrt(len(large)), rel=0.1)
    assert bootstrap_ci(np.full(10, 0.7)) == pytest.approx((0.7, 0.7))
    with pytest.raises(ValueError):
        bootstrap_ci(np.array([1.0]))


def test_evaluations_on_other_test_seeds_are_not_paired():
    with pytest.raises(ValueError, match="different test seeds"):
        per_test_seed([_eval([1, 0]), _eval([1, 0], seeds=[5, 6])])


def test_paired_difference_sees_a_constant_gap_that_unpaired_noise_would_hide():
    rng = np.random.default_rng(1)
    hard = rng.uniform(0.2, 1.0, size=200)                  # test seeds differ a lot in difficulty
    a = [_eval(np.clip(hard + 0.02, 0, 1), t, k) for t in (0, 1) for k in (0, 1)]
    b = [_eval(hard, t, k) for t in (0, 1) for k in (0, 1)]
    s = summarize({"a": a, "b": b})
    d = s["differences"]["a - b"]
    assert d["ci"][0] > 0                                   # the paired interval excludes 0
    va, vb = s["variants"]["a"], s["variants"]["b"]
    assert va["ci"][0] < vb["ci"][1]                         # the two unpaired intervals overlap
    assert va["n_evals"] == 4 and va["n_test_seeds"] == 200
    assert s["variants"]["a"]["per_eval"][3] == {"train_seed": 1, "sampling_seed": 1, "mean": pytest.approx(va["mean"])}
    md = render(s, {"episodes": 200, "sampling_seeds": [0, 1], "task": "t", "budget": 10, "start_seed": 100000,
                    "command": "cmd", "code_commit": "abc"})
    assert "| a | 0,1 | 4 x 200 episodes |" in md and "Paired by test seed, a - b: +0.0" in md
