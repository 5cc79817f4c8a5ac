"""CFG through weighted unconditional negatives, the alpha sampler, and the attraction ablation."""

import pytest
import torch

from drift_policy.drift import cfg_neg_weight, drift_field, drift_loss
from drift_policy.image.loss import sample_alpha


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
    l1b, i1b = drift_loss(x, same, unc, neg_weight=0.5, attraction=1.0)
    torch.testing.assert_close(l1, l1b, rtol=0, atol=0)
    # the field is continuous in the attraction weight
    _, ia = drift_loss(x, same, unc, neg_weight=0.5, attraction=1.0 + 1e-12)
    for k in i1:
        torch.testing.assert_close(ia[k], i1[k], rtol=1e-5, atol=1e-7)
    _, i15 = drift_loss(x, same, unc, neg_weight=0.5, attraction=1.5)
    for t in (0.02, 0.05, 0.2):   # at p = q the symmetric field nearly cancels; 1.5x attraction does not
        assert i15[f"v2_tau{t:g}"] > 1.5 * i1[f"v2_tau{t:g}"], t

    def inward(attraction):
        """Mean cosine between the update direction and (x - centroid): < 0 means the samples contract."""
        x.grad = None
        drift_loss(x, same, unc, neg_weight=0.5, attraction=attraction)[0].sum().backward()
        d = x.detach() - x.detach().mean(1, keepdim=True)
        return torch.nn.functional.cosine_similarity(-x.grad, d, dim=-1).mean().item()

    # measured: -0.05 at 1.0, -0.31 at 1.5: extra attraction pulls everything toward the data's centre (collapse)
    assert abs(inward(1.0)) < 0.1 and inward(1.5) < -0.2


def _old_drift_loss_asym(gen, pos, neg=None, *, gen_weight=None, pos_weight=None, neg_weight=None,
                         temperatures=(0.02, 0.05, 0.2), attraction=1.0):
    """The image track's former fork of the field (image/loss.py's drift_loss_asym before drift_field took an
    ``attraction``), kept verbatim as the reference the shared field must reproduce."""
    def weights(w, shape, like):
        if w is None:
            return torch.ones(shape, dtype=like.dtype, device=like.device)
        return torch.broadcast_to(torch.as_tensor(w, dtype=like.dtype, device=like.device), shape)

    G, N, D = gen.shape
    x = gen.float()
    y_neg = x.new_zeros(G, 0, D) if neg is None else neg.detach().float()
    y_pos = pos.detach().float()
    y = torch.cat([x.detach(), y_neg, y_pos], dim=1)
    M, P = y_neg.shape[1], y_pos.shape[1]
    w = torch.cat([weights(gen_weight, (G, N), x), weights(neg_weight, (G, M), x),
                   weights(pos_weight, (G, P), x)], dim=1)
    n_neg = N + M
    with torch.no_grad():
        xd = x.detach()
        dist = torch.cdist(xd, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2).clamp_min(1e-8).sqrt()
        w_full = w.unsqueeze(1).expand_as(dist)
        scale = (dist * w_full).mean() / w_full.mean().clamp_min(1e-12)
        coord_s = (scale / D ** 0.5).clamp_min(1e-3)
        dist_n = dist / scale.clamp_min(1e-3)
        dist_n[:, :, :N] += 100.0 * torch.eye(N, dtype=x.dtype)
        x_s, y_s = xd / coord_s, y / coord_s
        V_total = torch.zeros_like(x_s)
        info = {"scale": scale}
        for tau in temperatures:
            logits = -dist_n / tau
            A = (logits.softmax(-1) * logits.softmax(-2)).clamp_min(1e-6).sqrt() * w.unsqueeze(1)
            A_neg, A_pos = A[..., :n_neg], A[..., n_neg:]
            coef = torch.cat([-A_neg * A_pos.sum(-1, keepdim=True),
                              attraction * A_pos * A_neg.sum(-1, keepdim=True)], dim=-1)
            V = coef @ y_s - coef.sum(-1, keepdim=True) * x_s
            v2 = V.pow(2).mean()
            info[f"v2_tau{tau:g}"] = v2
            V_total = V_total + V / v2.clamp_min(1e-8).sqrt()
    xs = x / coord_s
    return (xs - (xs + V_total).detach()).pow(2).mean(dim=(1, 2)), info


@pytest.mark.parametrize("attraction", [0.5, 1.0, 1.5, 2.0])
def test_shared_field_with_attraction_reproduces_the_former_image_fork(attraction):
    g = torch.Generator().manual_seed(int(attraction * 10))
    for G, N, P, M, D in ((4, 16, 8, 6, 3), (3, 9, 5, 0, 7)):
        x = torch.randn(G, N, D, generator=g, requires_grad=True)
        pos = torch.randn(G, P, D, generator=g) + 0.3
        neg = torch.randn(G, M, D, generator=g) if M else None
        w = torch.rand(G, M, generator=g) if M else None
        new, i_new = drift_loss(x, pos, neg, neg_weight=w, attraction=attraction)
        grad_new, = torch.autograd.grad(new.sum(), x)
        old, i_old = _old_drift_loss_asym(x, pos, neg, neg_weight=w, attraction=attraction)
        grad_old, = torch.autograd.grad(old.sum(), x)
        torch.testing.assert_close(new, old, rtol=0, atol=0)
        torch.testing.assert_close(grad_new, grad_old, rtol=0, atol=0)
        for k in i_old:
            torch.testing.assert_close(i_new[k], i_old[k], rtol=0, atol=0)


def test_alpha_mixture_puts_the_asked_share_at_exactly_one():
    g = torch.Generator().manual_seed(0)
    a = sample_alpha(100000, k=3.0, generator=g, p_one=0.5)
    assert (a == 1.0).double().mean().item() == pytest.approx(0.5, abs=0.01)
    rest = a[a != 1.0]
    assert rest.min() > 1.0 and rest.max() <= 4.0
    same = sample_alpha(50, k=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same, sample_alpha(50, k=3.0, generator=torch.Generator().manual_seed(1), p_one=0.0))
    with pytest.raises(ValueError, match="probability"):
        sample_alpha(3, p_one=1.5)
