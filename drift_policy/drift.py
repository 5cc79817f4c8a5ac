"""The drifting field and its loss (Deng, Li, Li, Du, He, 2026, arXiv 2602.04770).

Symbols follow the paper:
    x      generated samples f(eps), one set per group           [G, N, D]
    y_pos  positive (data) samples                                [G, P, D]
    y_neg  extra negative samples (e.g. unconditional real data)  [G, M, D]
    V      the drift field at x                                   [G, N, D]
    tau    kernel temperature

Training minimises ||f(eps) - stopgrad(f(eps) + V)||^2 (Eq. 6): the gradient pushes x along V, and
V vanishes once the generated and data distributions match, because attraction to y_pos and
repulsion from the other generated samples then cancel (the anti-symmetry of Eq. 8).

The semantics are those of the official implementation, which Algorithm 2 summarises:
one distance scale shared by the whole batch, a doubly normalised kernel (softmax over targets
times softmax over generated samples), cross-weighted attraction and repulsion, and each
temperature's field normalised to unit RMS before the fields are summed.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["drift_loss", "drift_field", "cfg_neg_weight"]

SELF_MASK = 100.0  # added to a sample's kernel distance to itself: it must not repel itself


def _weights(w, shape, like: Tensor) -> Tensor:
    """Broadcast a per-sample weight (None, scalar, [G, K] or [K]) to ``shape`` = (G, K)."""
    if w is None:
        return torch.ones(shape, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(w, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(w, shape)
    except RuntimeError as e:
        raise ValueError(f"weight of shape {tuple(w.shape)} does not broadcast to {tuple(shape)}") from e


def cfg_neg_weight(alpha, n_gen: int, n_unc: int) -> Tensor:
    """Weight of each of n_unc unconditional negatives for guidance scale alpha (Sec. 3.5): (alpha - 1)(N - 1)/M.

    The negatives then form q~ = (1 - gamma) q + gamma p(.) with alpha = 1/(1 - gamma): the N - 1 other generated
    samples of a group weigh 1 each, the unconditional ones (alpha - 1)(N - 1) together, so the field vanishes at
    q = alpha p(.|c) - (alpha - 1) p(.). alpha = 1 means no extra repulsion."""
    if n_unc < 1:
        raise ValueError("need at least one unconditional negative")
    alpha = torch.as_tensor(alpha, dtype=torch.float32)
    if (alpha < 1).any():
        raise ValueError("alpha must be >= 1 (alpha = 1 means no guidance)")
    return (alpha - 1.0) * (n_gen - 1) / n_unc


def drift_field(x: Tensor, y_pos: Tensor, y_neg: Tensor | None = None, *, gen_weight=None,
                pos_weight=None, neg_weight=None, temperatures=(0.02, 0.05, 0.2), attraction: float = 1.0):
    """The normalised drift field V at x, in the batch's scaled coordinates.

    Returns ``(x_scaled, V, info)``: x_scaled = x / s carries the gradient of x; V = sum_tau V_tau has
    no gradient. ``info`` holds ``scale`` (the batch's mean distance) and each tau's un-normalised
    ``mean(V_tau^2)``. ``attraction`` scales the attraction term (an ablation: any value but 1 breaks the
    anti-symmetry V_{p,q} = -V_{q,p}, so V no longer vanishes at p = q).
    """
    if x.dim() != 3 or y_pos.dim() != 3:
        raise ValueError(f"gen and pos must be [G, N, D] and [G, P, D], got {tuple(x.shape)} and {tuple(y_pos.shape)}")
    G, N, D = x.shape
    if y_pos.shape[0] != G or y_pos.shape[2] != D:
        raise ValueError(f"pos {tuple(y_pos.shape)} does not match gen {tuple(x.shape)} in groups or dimension")
    if y_neg is not None and (y_neg.dim() != 3 or y_neg.shape[0] != G or y_neg.shape[2] != D):
        raise ValueError(f"neg must be [G, M, D] matching gen {tuple(x.shape)}, got {tuple(y_neg.shape)}")
    if len(temperatures) == 0 or any(t <= 0 for t in temperatures):
        raise ValueError(f"temperatures must be a non-empty list of positive numbers, got {temperatures}")
    if not attraction >= 0:
        raise ValueError(f"attraction must be >= 0, got {attraction}")

    # Float32 or higher: softmax over 1/tau-scaled distances loses too much precision in half.
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    y_pos = y_pos.detach().to(dtype)
    y_neg = x.new_zeros(G, 0, D) if y_neg is None else y_neg.detach().to(dtype)
    M, P = y_neg.shape[1], y_pos.shape[1]

    # Targets: the generated samples themselves (self-negatives), extra negatives, then positives.
    y = torch.cat([x.detach(), y_neg, y_pos], dim=1)                      # [G, T, D], T = N + M + P
    w = torch.cat([_weights(gen_weight, (G, N), x), _weights(neg_weight, (G, M), x),
                   _weights(pos_weight, (G, P), x)], dim=1)               # [G, T]
    n_neg = N + M

    with torch.no_grad():
        xd = x.detach()
        # Exact pairwise differences (no |a|^2+|b|^2-2ab cancellation), so tiny distances stay exact.
        dist = torch.cdist(xd, y, compute_mode="donot_use_mm_for_euclid_dist")
        dist = dist.pow(2).clamp_min(1e-8).sqrt()                          # L2, not squared  [G, N, T]
        # One scale for the whole batch so that every group shares one kernel bandwidth.
        w_full = w.unsqueeze(1).expand_as(dist)
        scale = (dist * w_full).mean() / w_full.mean().clamp_min(1e-12)
        coord_s = (scale / D ** 0.5).clamp_min(1e-3)                       # per-coordinate scale
        dist_n = dist / scale.clamp_min(1e-3)                              # ~unit mean distance
        eye = torch.eye(N, dtype=dtype, device=x.device)
        dist_n[:, :, :N] += SELF_MASK * eye

        x_s = xd / coord_s
        y_s = y / coord_s
        V_total = torch.zeros_like(x_s)
        info = {"scale": scale}
        for tau in temperatures:
            logits = -dist_n / tau
            # Doubly normalised kernel (Alg. 2): normalise over targets and over generated samples,
            # then take the geometric mean; the floor keeps sqrt differentiable-free and finite.
            A = (logits.softmax(dim=-1) * logits.softmax(dim=-2)).clamp_min(1e-6).sqrt() * w.unsqueeze(1)
            A_neg, A_pos = A[..., :n_neg], A[..., n_neg:]
            # Cross-weighting makes attraction and repulsion balance exactly when p = q (Eq. 8).
            coef = torch.cat([-A_neg * A_pos.sum(-1, keepdim=True),
                              attraction * A_pos * A_neg.sum(-1, keepdim=True)], dim=-1)   # [G, N, T]
            V = coef @ y_s - coef.sum(-1, keepdim=True) * x_s                  # [G, N, D]
            v2 = V.pow(2).mean()
            info[f"v2_tau{tau:g}"] = v2
            # Unit RMS per temperature so that no single bandwidth dominates the summed field.
            V_total = V_total + V / v2.clamp_min(1e-8).sqrt()

    return x / coord_s, V_total, info


def drift_loss(gen: Tensor, pos: Tensor, neg: Tensor | None = None, *, gen_weight=None, pos_weight=None,
               neg_weight=None, temperatures=(0.02, 0.05, 0.2), attraction: float = 1.0):
    """Per-group drifting loss ``||x - stopgrad(x + V)||^2`` in scaled coordinates.

    Args:
        gen: [G, N, D] generated samples; the only input that receives a gradient.
        pos: [G, P, D] data samples.
        neg: [G, M, D] extra negatives, or None.
        *_weight: per-sample weights broadcastable to [G, N] / [G, P] / [G, M]; default 1.
        temperatures: kernel temperatures tau (in units of the batch's mean distance).
        attraction: scale of the attraction term (1: the paper's field; other values only for ablations).
    Returns:
        loss [G] (mean over N and D) and ``info``: ``scale`` and ``v2_tau*`` = mean(V_tau^2) before
        normalisation. Log v2, not the loss: the loss is ~constant by construction (each V_tau has unit RMS).
    """
    x_s, V, info = drift_field(gen, pos, neg, gen_weight=gen_weight, pos_weight=pos_weight,
                               neg_weight=neg_weight, temperatures=temperatures, attraction=attraction)
    goal = (x_s + V).detach()
    loss = (x_s - goal).pow(2).mean(dim=(1, 2))
    return loss, info
