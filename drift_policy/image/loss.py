"""Class-conditional drift loss in feature space, with CFG through weighted unconditional negatives.

For each class label in the batch (a group g) we generate N samples with guidance scale alpha_g, take P
positives from that class's queue and M unconditional real samples from the global queue. The unconditional
samples join the generated ones as negatives inside the same doubly normalised kernel, each with weight

    w_g = (alpha_g - 1) * (N - 1) / M                                   (``cfg_neg_weight``)

so that at alpha = 1 there is no extra repulsion and at alpha > 1 the generator is pushed away from the
unconditional distribution: the effective negative distribution is a mixture that yields
q = alpha * p(.|c) - (alpha - 1) * p(.) at equilibrium, as in the paper's Sec. 3.5 / 4. alpha is an input of
the generator and is sampled per group from p(alpha) ~ alpha^-k on [1, 4] (``sample_alpha``).

Each feature set (see ``encoder.feature_sets``) is [B, K, D]: K independent drift problems of dimension D.
They are folded into the group axis ([G*K, N, D]) and given to ``drift_loss``; per-feature losses are
averaged over groups and summed over feature sets. ``attraction`` (an ablation) is ``drift_loss``'s own.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..drift import drift_loss

__all__ = ["sample_alpha", "feature_drift_loss"]


def sample_alpha(n: int, k: float = 3.0, lo: float = 1.0, hi: float = 4.0, generator=None,
                 p_one: float = 0.0) -> Tensor:
    """n draws of alpha on [lo, hi] with density proportional to alpha^-k (inverse-CDF sampling); with ``p_one`` > 0
    each draw is instead alpha = 1 with that probability (Table 8's L/2 latent recipe: 50% alpha = 1)."""
    if not 0.0 <= p_one <= 1.0:
        raise ValueError(f"p_one must be a probability, got {p_one}")
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    if lo == hi:
        a = torch.full((n,), float(lo), dtype=torch.float64)
    elif abs(k - 1.0) < 1e-9:
        a = lo * (hi / lo) ** u
    else:
        e = 1.0 - k
        a = (lo ** e + u * (hi ** e - lo ** e)) ** (1.0 / e)
    if p_one > 0:                  # drawn only when asked for: the stream of p_one = 0 runs is unchanged
        a = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < p_one, torch.ones_like(a), a)
    return a.float()


def _fold(t: Tensor) -> Tensor:
    """[G, N, K, D] -> [G*K, N, D]."""
    G, N, K, D = t.shape
    return t.permute(0, 2, 1, 3).reshape(G * K, N, D)


def feature_drift_loss(gen: dict[str, Tensor], pos: dict[str, Tensor], unc: dict[str, Tensor] | None,
                       unc_weight: Tensor | None, *, temperatures=(0.02, 0.05, 0.2), attraction: float = 1.0):
    """Sum over feature sets of the mean per-group drift loss.

    gen[name]: [G, N, K, D] (with gradient), pos[name]: [G, P, K, D], unc[name]: [M, K, D] shared by all
    groups, unc_weight: [G] per-group weight of each unconditional negative (``cfg_neg_weight``).
    Returns (total loss scalar, {name: loss}, {name: v2 summed over taus}).
    """
    total, losses, v2s = 0.0, {}, {}
    for name, g in gen.items():
        G, N, K, D = g.shape
        neg = neg_w = None
        if unc is not None and unc_weight is not None:
            u = unc[name]                                                        # [M, K, D]
            M = u.shape[0]
            neg = u.permute(1, 0, 2).unsqueeze(0).expand(G, K, M, D).reshape(G * K, M, D)
            neg_w = unc_weight.to(g.dtype).view(G, 1, 1).expand(G, K, M).reshape(G * K, M)
        loss, info = drift_loss(_fold(g), _fold(pos[name]), neg, neg_weight=neg_w, temperatures=temperatures,
                                attraction=attraction)
        losses[name] = loss.mean()
        v2s[name] = sum(v for k, v in info.items() if k.startswith("v2_"))
        total = total + losses[name]
    return total, losses, v2s
