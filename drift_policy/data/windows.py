"""Training windows over flat per-step arrays, for every task (Push-T, robomimic; low-dim and images).

A loader returns flat arrays ``{"obs": [N, D] float32, "action": [N, Da] float32, <image key>: [N, 3, H, W]
uint8, "episode_ends": [E] int64}``, and may add side arrays no policy observes (``SIDE_KEYS``: the simulator
state behind a camera frame, which neighbour positives may be found by). A window is a row of indices into them (Diffusion Policy's padded
sequence sampler), so images are stored once, as uint8, and a batch is one gather per key: no DataLoader
workers competing with the trainer for the 2 cores.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import DatasetError

__all__ = ["WindowDataset", "NeighborPositives", "make_windows", "sequence_indices", "split_episodes",
           "check_ranges", "SIDE_KEYS"]

SIDE_KEYS = ("state",)     # per-step arrays a loader may keep that are not the policy's observation


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

    def __init__(self, data: dict[str, torch.Tensor], index: np.ndarray, n_obs_steps: int,
                 episode: np.ndarray | None = None):
        self.data = data
        self.index = torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64))
        self.n_obs_steps = n_obs_steps
        # The episode of each window [W] (None: unknown); lets neighbour positives skip a window's own episode.
        self.episode = None if episode is None else torch.as_tensor(np.asarray(episode, dtype=np.int64))
        if self.episode is not None and self.episode.shape != (self.index.shape[0],):
            raise ValueError(f"episode must hold one id per window ({self.index.shape[0]}), got {tuple(self.episode.shape)}")
        self.keys = [k for k in data if k != "action" and k not in SIDE_KEYS]     # "obs" and image keys
        self.neighbors: NeighborPositives | None = None

    def __len__(self) -> int:
        return self.index.shape[0]

    def steps(self, key: str) -> torch.Tensor:
        """The distinct steps of this split for ``key`` (what a normaliser is fitted on)."""
        return self.data[key][torch.unique(self.index)]

    def action_targets(self, anchor: tuple[int, ...] = ()) -> torch.Tensor:
        """What the action normaliser is fitted on: the distinct action steps [S, Da], or with ``anchor`` (obs
        dims, one per action dim) every window's chunk relative to its latest observation [W * Tp, Da]."""
        if not anchor:
            return self.steps("action")
        chunks = self.data["action"][self.index]                                              # [W, Tp, Da]
        latest = self.data["obs"][self.index[:, self.n_obs_steps - 1]][:, list(anchor)]        # [W, Da]
        return (chunks - latest.unsqueeze(1)).flatten(0, 1)

    def sample(self, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """{"obs": [B, To, D], <image key>: [B, To, 3, H, W] uint8, "action": [B, Tp, Da]}, plus
        "pos_action" [B, 1 + k, Tp, Da] and "pos_weight" [B, 1 + k] when neighbour positives are attached."""
        ids = torch.randint(0, len(self), (batch_size,), generator=generator)
        rows = self.index[ids]                                                                 # [B, Tp]
        out = {k: self.data[k][rows[:, : self.n_obs_steps]] for k in self.keys}
        out["action"] = self.data["action"][rows]
        if self.neighbors is not None:
            nb, out["pos_weight"] = self.neighbors.lookup(ids)                                # [B, 1+k]
            out["pos_action"] = self.data["action"][self.index[nb]]                            # [B, 1+k, Tp, Da]
        return out


class NeighborPositives:
    """More than one positive per observation: the expert chunks of the k training windows whose observations
    are nearest (in normalised units), weighted by a Gaussian kernel on that distance.

    With one demonstration per observation, the conditional field's only positive is that demonstration's
    chunk; neighbours give the field an estimate of the local action distribution (Implicit Drifting Policy,
    arXiv 2606.01098, reports that such neighbour information makes the conditional field well-posed). The
    index holds the windows of ONE split (the training split), so validation episodes never become positives.
    A window's own chunk is always its first positive, with weight 1.

    ``key`` names the per-step array the distance is measured on: the observation, or a side array (``SIDE_KEYS``)
    such as the state behind a camera frame. ``same_episode=False`` takes the neighbours from the OTHER
    demonstrations only. On Push-T three quarters of a window's 8 nearest observations are its own episode's windows
    1-4 steps away, whose chunks are the same demonstration shifted in time: a temporal blur of the one positive,
    not the other demonstrations' actions in that state, which are what tells the field the local action
    distribution.
    """

    def __init__(self, windows: WindowDataset, normalize, k: int, bandwidth: float, same_episode: bool = True,
                 key: str = "obs"):
        if k < 1 or not bandwidth > 0:
            raise ValueError(f"neighbour positives need k >= 1 and bandwidth > 0, got k={k}, bandwidth={bandwidth}")
        if k >= len(windows):
            raise ValueError(f"k={k} neighbour positives need more than {len(windows)} training windows")
        self.episode = None
        if not same_episode:
            if windows.episode is None:
                raise ValueError("neighbours from other episodes need the windows' episode ids (WindowDataset.episode)")
            counts = torch.bincount(windows.episode)
            if len(windows) - int(counts.max()) < k:
                raise ValueError(f"k={k} neighbour positives from other episodes need more than "
                                 f"{len(windows) - int(counts.max())} windows outside the largest episode")
            self.episode = windows.episode
        obs = windows.data[key][windows.index[:, : windows.n_obs_steps]]                      # [W, To, D]
        with torch.no_grad():
            self.keys = normalize(obs.float()).flatten(1).contiguous()                         # [W, To*D]
        self.sq_norms = self.keys.square().sum(1)                                              # [W]
        self.k, self.bandwidth = k, bandwidth

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Window ids [B] -> (positive window ids [B, 1+k], kernel weights [B, 1+k]); column 0 is the window itself."""
        q = self.keys[ids]                                                                     # [B, To*D]
        # Ranking by |k|^2 - 2 q.k (the squared distance less |q|^2, which a row's ranking does not need) is one
        # matrix product: a quarter of torch.cdist's time over a Kitchen-sized set (200k windows), where this
        # search was half of a drift step. The chosen neighbours' distances are then computed exactly.
        score = torch.addmm(self.sq_norms.unsqueeze(0), q, self.keys.T, alpha=-2.0)            # [B, W]
        if self.episode is not None:                          # other demonstrations only
            score.masked_fill_(self.episode[ids].unsqueeze(1) == self.episode.unsqueeze(0), float("inf"))
        score[torch.arange(len(ids)), ids] = -float("inf")    # the window itself first, even among exact ties
        nb = score.topk(self.k + 1, dim=1, largest=False).indices                              # [B, 1+k]
        # RMS distance per coordinate, so the bandwidth means the same for any observation size.
        dist = (self.keys[nb] - q.unsqueeze(1)).square().mean(2).sqrt()                        # [B, 1+k]
        dist, order = dist.sort(dim=1, stable=True)           # ascending; the window itself (0) stays first
        nb = nb.gather(1, order)
        return nb, torch.exp(-0.5 * (dist / self.bandwidth) ** 2)


# A value is "far outside" the data when it lies more than OUTLIER_SPREADS robust spreads beyond the 1st..99th
# percentile range of its dimension (spread = that range, at least OUTLIER_MIN_SPREAD data units, so a nearly
# constant dimension is not flagged for small legitimate moves). Generous on purpose: it catches a corrupt or
# mis-scaled record (one action of 1e30 would collapse the min-max normaliser's scale for its dimension), not
# rare but real values.
OUTLIER_SPREADS = 10.0
OUTLIER_MIN_SPREAD = 1.0


def check_ranges(data: dict[str, np.ndarray], source: str = "data") -> None:
    """DatasetError naming the file, key, dimension and step (with its episode) of the first value far outside
    the robust range of its dimension; run on every loader's output before a normaliser is fitted on it."""
    ends = np.asarray(data["episode_ends"], dtype=np.int64)
    for key, v in data.items():
        if key == "episode_ends" or not np.issubdtype(np.asarray(v).dtype, np.floating) or len(v) == 0:
            continue
        x = np.asarray(v, dtype=np.float64).reshape(len(v), -1)
        lo, hi = np.percentile(x, [1, 99], axis=0)
        tol = OUTLIER_SPREADS * np.maximum(hi - lo, OUTLIER_MIN_SPREAD)
        bad = (x < lo - tol) | (x > hi + tol)
        if bad.any():
            steps, dims = np.nonzero(bad)
            i, d = int(steps[0]), int(dims[0])
            episode = int(np.searchsorted(ends, i, side="right"))
            raise DatasetError(f"{source}: {key!r} has {int(bad.sum())} value(s) far outside the range of the data "
                               f"(first: {x[i, d]:g} at step {i} (episode {episode}), dimension {d}, where 98% of "
                               f"the steps lie in [{lo[d]:g}, {hi[d]:g}]); a corrupt or mis-scaled record would "
                               f"wreck the normaliser, so it is refused")


def make_windows(data: dict[str, np.ndarray], horizon: int, n_obs_steps: int, n_action_steps: int,
                 val_ratio: float = 0.02, seed: int = 42, source: str = "data") -> tuple[WindowDataset, WindowDataset | None]:
    """Train and validation windows (split by episode) over a loader's flat arrays (read from ``source``, the
    file named in errors). The data are range-checked first (``check_ranges``)."""
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
    check_ranges(data, source)
    flat = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in data.items() if k != "episode_ends"}
    train_eps, val_eps = split_episodes(len(ends), val_ratio, seed)

    def build(episodes):
        idx = sequence_indices(ends, episodes, horizon, pad_before=n_obs_steps - 1, pad_after=n_action_steps - 1)
        # Padded steps repeat their own episode's first or last step, so any column names the window's episode.
        return WindowDataset(flat, idx, n_obs_steps, episode=np.searchsorted(ends, idx[:, 0], side="right"))

    return build(train_eps), (build(val_eps) if len(val_eps) else None)
