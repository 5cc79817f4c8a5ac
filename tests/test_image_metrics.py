"""FD, KID, precision/recall on known distributions."""
import pytest
import torch

from drift_policy.image.metrics import frechet_distance, kid, precision_recall


def _g(n, d, seed, mean=0.0, std=1.0):
    return mean + std * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_frechet_distance_matches_closed_form():
    a = _g(20000, 4, 0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    b = _g(20000, 4, 1, mean=torch.tensor([1.0, 0, 0, 0], dtype=torch.float64), std=2.0)
    # N(0, I) vs N(m, 4I): |m|^2 + sum (1 + 4 - 2*2) = 1 + 4
    assert frechet_distance(a, b) == pytest.approx(5.0, rel=0.05)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    a, a2, b = _g(3000, 8, 0), _g(3000, 8, 1), _g(3000, 8, 2, mean=0.5)
    same, _ = kid(a, a2, n_subsets=10, subset=1000)
    diff, _ = kid(a, b, n_subsets=10, subset=1000)
    assert abs(same) < 0.01 and diff > 0.1


def test_precision_recall_separate_fidelity_from_coverage():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    real = centres[torch.arange(1000) % 2] + 0.3 * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    p, r = precision_recall(real, real.clone() + 1e-9)
    assert p == 1.0 and r == 1.0
    one_mode = centres[0] + 0.3 * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    p, r = precision_recall(real, one_mode)
    assert p > 0.9 and 0.4 < r < 0.6        # faithful but covers half the data
    far = one_mode + 100
    assert precision_recall(real, far) == (0.0, 0.0)
