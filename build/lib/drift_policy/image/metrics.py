"""Sample-quality metrics on features from a pluggable network (any ``f: [B, ...] -> [B, D]``).

    frechet_distance   ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)   (FID's formula)
    kid                unbiased MMD^2 with the cubic polynomial kernel (x.y/D + 1)^3, mean over subsets
    precision_recall   k-NN manifold precision / recall (Kynkaenniemi et al., 2019)
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["extract", "frechet_distance", "kid", "precision_recall"]


@torch.no_grad()
def extract(fn, x: Tensor, batch: int = 500) -> Tensor:
    return torch.cat([fn(x[i:i + batch]).flatten(1).double() for i in range(0, len(x), batch)])


def _sqrtm_psd(S: Tensor) -> Tensor:
    w, V = torch.linalg.eigh(S)
    return (V * w.clamp_min(0).sqrt()) @ V.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, D] and b [m, D]."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    Sa, Sb = torch.cov(a.T), torch.cov(b.T)
    ra = _sqrtm_psd(Sa)
    cross = torch.linalg.eigvalsh(ra @ Sb @ ra).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + Sa.trace() + Sb.trace() - 2 * cross)


def kid(a: Tensor, b: Tensor, n_subsets: int = 20, subset: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over subsets) on given features."""
    a, b = a.double(), b.double()
    D = a.shape[1]
    g = torch.Generator().manual_seed(seed)
    m = min(subset, len(a), len(b))
    vals = []
    for _ in range(n_subsets):
        x = a[torch.randperm(len(a), generator=g)[:m]]
        y = b[torch.randperm(len(b), generator=g)[:m]]
        kxx, kyy, kxy = (x @ x.T / D + 1) ** 3, (y @ y.T / D + 1) ** 3, (x @ y.T / D + 1) ** 3
        off = 1 - torch.eye(m, dtype=torch.float64)
        vals.append(((kxx * off).sum() + (kyy * off).sum()) / (m * (m - 1)) - 2 * kxy.mean())
    v = torch.stack(vals)
    return float(v.mean()), float(v.std()) if len(v) > 1 else 0.0


def _knn_radius(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values          # +1: the point itself is at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: fraction of fake inside the real k-NN manifold; recall: real inside the fake manifold."""
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radius(real, k), _knn_radius(fake, k)
    prec = (torch.cdist(fake, real) <= r_real[None]).any(1).double().mean()
    rec = (torch.cdist(real, fake) <= r_fake[None]).any(1).double().mean()
    return float(prec), float(rec)
