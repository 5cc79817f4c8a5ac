"""Training windows over flat per-step arrays, for every task (Push-T, robomimic; low-dim and images).

A loader returns flat arrays ``{"obs": [N, D] float32, "action": [N, Da] float32, <image key>: [N, 3, H, W]
uint8, "episode_ends": [E] int64}``. A window is a row of indices into them (Diffusion Policy's padded
sequence sampler), so images are stored once, as uint8, and a batch is one gather per key: no DataLoader
workers competing with the trainer for the 2 cores.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DatasetError

__all__ = ["WindowDataset", "make_windows", "sequence_indices", "split_episodes"]


def sequence_indices(episode_ends: np.ndarray, episodes: np.ndarray, horizon: int, pad_before: int,
                     pad_after: int) -> np.ndarray:
    """Index array [W, horizon] into the flat data, one row per training window.

    A window may start up to ``pad_before`` steps before an episode and end up to ``pad_after`` steps after it;
    out-of-episode steps repeat the episode's first or last step (Diffusion Policy's SequenceSampler).
    """
    starts = np.concatenate([[0], episode_ends[:-1]])
    rows = []
    for e in episodes:
        s, t = int(starts[e]), int(episode_ends[e])
        first = s - pad_before
        last = t - horizon + pad_after  # inclusive
        if last < first:
            continue
        w0 = np.arange(first, last + 1)[:, None] + np.arange(horizon)[None, :]
        rows.append(np.clip(w0, s, t - 1))
    if not rows:
        raise DatasetError(f"no episode is long enough for horizon {horizon}")
    return np.concatenate(rows, 0)


def split_episodes(n_episodes: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    n_val = int(round(n_episodes * val_ratio))
    if val_ratio > 0:
        n_val = max(1, n_val)
    perm = rng.permutation(n_episodes)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class WindowDataset:
    """Windows of one split: ``index`` [W, Tp] into the shared flat tensors ``data`` (not copied per split)."""

    def __init__(self, data: dict[str, torch.Tensor], index: np.ndarray, n_obs_steps: int):
        self.data = data
        self.index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        self.n_obs_steps = n_obs_steps
        self.keys = [k for k in data if k != "action"]          # "obs" and image keys

    def __len__(self) -> int:
        return self.index.shape[0]

    def steps(self, key: str) -> torch.Tensor:
        """The distinct steps of this split for ``key`` (what a normaliser is fitted on)."""
        return self.data[key][torch.unique(self.index)]

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"obs": [B, To, D], <image key>: [B, To, 3, H, W] uint8, "action": [B, Tp, Da]}."""
        rows = self.index[torch.randint(0, len(self), (batch_size,), generator=generator)]   # [B, Tp]
        out = {k: self.data[k][rows[:, : self.n_obs_steps]] for k in self.keys}
        out["action"] = self.data["action"][rows]
        return out


def make_windows(data: dict[str, np.ndarray], horizon: int, n_obs_steps: int, n_action_steps: int,
                 val_ratio: float = 0.02, seed: int = 42) -> tuple[WindowDataset, WindowDataset | None]:
    """Train and validation windows (split by episode) over a loader's flat arrays."""
    for k in ("obs", "action", "episode_ends"):
        if k not in data:
            raise DatasetError(f"loader output is missing {k!r} (has {sorted(data)})")
    ends = np.asarray(data["episode_ends"], dtype=np.int64)
    n = len(data["action"])
    for k, v in data.items():
        if k != "episode_ends" and len(v) != n:
            raise DatasetError(f"{k!r} has {len(v)} steps but 'action' has {n}")
    if len(ends) == 0 or ends[-1] != n:
        raise DatasetError(f"episode_ends must end at the number of steps ({n}), got {ends[-1:] }")
    flat = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items() if k != "episode_ends"}
    train_eps, val_eps = split_episodes(len(ends), val_ratio, seed)

    def build(episodes):
        idx = sequence_indices(ends, episodes, horizon, pad_before=n_obs_steps - 1, pad_after=n_action_steps - 1)
        return WindowDataset(flat, idx, n_obs_steps)

    return build(train_eps), (build(val_eps) if len(val_eps) else None)
