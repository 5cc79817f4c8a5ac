"""CFG through weighted unconditional negatives, the alpha sampler, and the attraction ablation."""

import pytest
import torch

from drift_policy.drift import drift_field, drift_loss
from drift_policy.image.loss import cfg_neg_weight, drift_loss_asym, sample_alpha


def test_cfg_weight_formula():
    w = cfg_neg_weight(torch.tensor([1.0, 2.0, 4.0]), n_gen=64, n_unc=32)
    torch.testing.assert_close(w, torch.tensor([0.0, 63 / 32, 3 * 63 / 32]))
    with pytest.raises(ValueError):
        cfg_neg_weight(torch.tensor([0.5]), 8, 8)
    with pytest.raises(ValueError):
        cfg_neg_weight(torch.tensor([2.0]), 8, 0)


@pytest.mark.parametrize("k", [0.0, 1.0, 3.0])
def test_alpha_sampler_follows_power_law_density(k):
    a = sample_alpha(200000, k=k, lo=1.0, hi=4.0, generator=torch.Generator().manual_seed(0)).double()
    assert a.min() >= 1.0 and a.max() <= 4.0
    xs = torch.linspace(1, 4, 30001, dtype=torch.float64)
    dens = xs.pow(-k)
    dx = xs[1] - xs[0]
    z = (dens.sum() * dx)
    mean = (xs * dens).sum() * dx / z
    p_below_2 = dens[xs <= 2].sum() * dx / z
    assert a.mean().item() == pytest.approx(mean.item(), abs=0.01)
    assert (a <= 2).double().mean().item() == pytest.approx(p_below_2.item(), abs=0.01)


def _two_class_world(seed=0):
    g = torch.Generator().manual_seed(seed)
    c0, c1 = torch.tensor([0.0, 0.0]), torch.tensor([3.0, 0.0])
    gen = c0 + 0.5 * torch.randn(1, 64, 2, generator=g)                                  # near class 0
    pos = c0 + 0.5 * torch.randn(1, 64, 2, generator=g)                                  # class 0 data
    unc = torch.cat([c0 + 0.5 * torch.randn(32, 2, generator=g), c1 + 0.5 * torch.randn(32, 2, generator=g)])
    return gen, pos, unc.unsqueeze(0)


def test_guidance_pushes_away_from_the_unconditional_data():
    gen, pos, unc = _two_class_world()
    x_away = []
    for alpha in (1.0, 2.0, 4.0):
        w = cfg_neg_weight(torch.tensor(alpha), 64, 64)
        _, V, _ = drift_field(gen, pos, unc, neg_weight=w)
        x_away.append(-V[..., 0].mean().item())          # class 1 sits at +x: guidance pushes toward -x
    assert x_away[0] < x_away[1] < x_away[2], x_away
    assert x_away[2] > 0.3


def test_attraction_ablation_is_exact_at_one_and_breaks_equilibrium_otherwise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, 3, generator=g, requires_grad=True)
    same = torch.randn(8, 64, 3, generator=g)            # same distribution as x: equilibrium
    unc = torch.randn(8, 16, 3, generator=g)
    l1, i1 = drift_loss(x, same, unc, neg_weight=0.5)
    l1b, i1b = drift_loss_asym(x, same, unc, neg_weight=0.5, attraction=1.0)
    torch.testing.assert_close(l1, l1b)
    # the mirrored implementation with attraction=1+1e-12 equals drift.py's field
    _, ia = drift_loss_asym(x, same, unc, neg_weight=0.5, attraction=1.0 + 1e-12)
    for k in i1:
        torch.testing.assert_close(ia[k], i1[k], rtol=1e-5, atol=1e-7)
    _, i15 = drift_loss_asym(x, same, unc, neg_weight=0.5, attraction=1.5)
    for t in (0.02, 0.05, 0.2):   # at p = q the symmetric field nearly cancels; 1.5x attraction does not
        assert i15[f"v2_tau{t:g}"] > 1.5 * i1[f"v2_tau{t:g}"], t

    def inward(attraction):
        """Mean cosine between the update direction and (x - centroid): < 0 means the samples contract."""
        x.grad = None
        drift_loss_asym(x, same, unc, neg_weight=0.5, attraction=attraction)[0].sum().backward()
        d = x.detach() - x.detach().mean(1, keepdim=True)
        return torch.nn.functional.cosine_similarity(-x.grad, d, dim=-1).mean().item()

    # measured: -0.05 at 1.0, -0.31 at 1.5: extra attraction pulls everything toward the data's centre (collapse)
    assert abs(inward(1.0)) < 0.1 and inward(1.5) < -0.2
