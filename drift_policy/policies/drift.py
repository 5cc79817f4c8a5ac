"""The drift policy: a one-step generator f(noise, obs) -> action chunk, trained with the drifting field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..drift import cfg_neg_weight, drift_loss
from ..errors import ConfigError
from .base import Policy, PolicyConfig, register_policy

NEIGHBOR_KEYS = ("obs", "state")   # what neighbour positives may be found by (DriftConfig.neighbor_key)


@dataclass
class DriftConfig(PolicyConfig):
    LEGACY: ClassVar[dict] = {**PolicyConfig.LEGACY, "neighbor_positives": 0, "per_dim_scale": False,
                              "neighbor_same_episode": True, "noise_scale": 1.0, "neighbor_key": "obs"}
    # Removed after runs were saved with them, each lost when measured (the records stay in eval/results): what
    # the code now always does. Each changed only training, so a saved policy loads and acts the same.
    REMOVED: ClassVar[dict] = {
        **PolicyConfig.REMOVED,
        "kernel_scale": ("batch", "training"),        # "step": one kernel scale per chunk step (kernel_scale)
        "neighbor_negatives": (0, "training"),        # batch mates' generated chunks as negatives (neighbour_negatives)
        "neighbor_own_anchor": (False, "training"),   # neighbours' chunks relative to their own agent (neighbour_anchor)
    }
    REMOVED_VALUES: ClassVar[dict] = {"drift_groups": {"both": "per_step"}}   # per-step + chunk groups (more_levers)
    INFERENCE: ClassVar[tuple[str, ...]] = (*PolicyConfig.INFERENCE, "noise_scale")

    type: str = "drift"
    n_noise: int = 2                                   # generated chunks per observation (N in the paper)
    drift_groups: str = "per_step"                     # "per_step": one group per (obs, step), D = action_dim;
                                                       # "chunk": one group per obs over the flat chunk
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)  # the paper's kernel temperatures, one field each: fine
                                                       # ones place a chunk among near positives, the coarse one
                                                       # pulls far samples back; dropping 0.2, adding 0.01 or 0.2
                                                       # alone measured lower (pusht_keypoints/levers/temperatures,
                                                       # lr_6e-4, more_levers)
    neighbor_positives: int = -1                       # k extra positives per observation: the expert chunks of
                                                       # its k nearest training observations (0: its own only;
                                                       # -1: 8 on low-dim tasks, 0 with cameras, whose index would
                                                       # see only the proprioception; robomimic's recipes: 0)
    neighbor_bandwidth: float = 0.05                   # Gaussian kernel width on the RMS normalised-obs distance;
                                                       # the field's target is the neighbours' chunks blurred by it,
                                                       # so a wide one blends the chunks of different scenes
                                                       # (pusht_keypoints/levers/neighbour_bandwidth)
    neighbor_same_episode: bool = True                 # False: neighbours from the other demonstrations only (not the
                                                       # own episode's windows a few steps away: a time-shifted copy)
    neighbor_key: str = "obs"                          # what "nearest" is measured on: "obs", the policy's low-dim
                                                       # observation; "state", the simulator state the data store
                                                       # keeps beside a camera frame (Push-T from pixels: agent and
                                                       # block pose), for a policy whose own low-dim observation
                                                       # (the agent alone) cannot tell two scenes apart. Training
                                                       # only: the policy never sees the state
    per_dim_scale: bool = False                        # the kernel's distances in units of each action dim's spread
                                                       # in the batch (std of the expert chunks), not in the
                                                       # normaliser's [-1, 1]
    noise_scale: float = 1.0                           # inference only: the sampling noise is eps * noise_scale (the
                                                       # truncation trick: below 1, samples nearer the middle of
                                                       # the generator's distribution); training always draws unit
                                                       # noise, so it changes no weight
    guidance: float = 1.0                              # CFG scale alpha (paper Sec. 3.5): above 1, the expert chunks of
                                                       # the batch's other observations join as negatives, weighted so
                                                       # that q = alpha p(a|o) - (alpha - 1) p(a) at equilibrium

    @property
    def sample_passes_per_obs(self) -> int:
        return self.n_noise                            # every generated chunk costs a forward and a backward

    @property
    def default_batch_size(self) -> int:
        # 64 generated chunks per step whatever G is, as many as diffusion's 64 observations: at equal sample-passes
        # both take the same number of steps. More, smaller steps won at 300k sample-passes
        # (eval/results/compute_matched/300k/pusht_keypoints.md: 32 x 2 > 64 x 2 > 256 x 2, 32 x 4 > 64 x 4 > 128 x 4).
        return max(1, 64 // self.n_noise)

    @property
    def nfe(self) -> int:
        return 1

    def __post_init__(self):
        super().__post_init__()
        if self.type != "drift":
            raise ConfigError(f"policy.type must be 'drift' for DriftConfig, got {self.type!r}")
        if self.n_noise < 2:
            raise ConfigError(f"policy.n_noise must be >= 2 (the field needs other samples to repel), got {self.n_noise}")
        if self.drift_groups not in ("per_step", "chunk"):
            raise ConfigError(f"policy.drift_groups must be 'per_step' or 'chunk', got {self.drift_groups!r}")
        if self.neighbor_positives == -1:              # resolved here, so config.json holds the value used
            self.neighbor_positives = 0 if self.image_keys else 8
        if self.neighbor_positives < 0 or not self.neighbor_bandwidth > 0:
            raise ConfigError(f"policy.neighbor_positives must be >= 0 (or -1: auto) and policy.neighbor_bandwidth > 0, got "
                              f"{self.neighbor_positives} and {self.neighbor_bandwidth}")
        if self.neighbor_key not in NEIGHBOR_KEYS:
            raise ConfigError(f"policy.neighbor_key must be one of {list(NEIGHBOR_KEYS)}, got {self.neighbor_key!r}")
        if not self.noise_scale >= 0:
            raise ConfigError(f"policy.noise_scale must be >= 0 (1: the training noise), got {self.noise_scale}")
        if not self.guidance >= 1:
            raise ConfigError(f"policy.guidance must be >= 1 (1: no guidance), got {self.guidance}")
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures or min(self.temperatures) <= 0:
            raise ConfigError(f"policy.temperatures must be positive, got {self.temperatures}")


class DriftPolicy(Policy):
    config: DriftConfig

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        c = self.config
        act_n = self.normalize_action(batch["action"], batch["obs"])         # [B, Tp, Da]
        B = act_n.shape[0]
        # Observations (and images) are encoded once; the N generated chunks of an observation share them.
        cond = self.condition(batch).repeat_interleave(c.n_noise, dim=0)      # [B*N, C]
        x = self.model(self._noise(B * c.n_noise, None), cond)                # [B*N, Tp, Da]
        x = x.view(B, c.n_noise, c.horizon, c.action_dim)
        loss, info = self.drift_loss(x, act_n, batch)
        # The loss is ~constant by construction; mse to the expert chunk is a readable progress signal.
        info = {k: float(v) for k, v in info.items()}
        info["mse_to_expert"] = float((x.detach() - act_n.unsqueeze(1)).pow(2).mean())
        info["sample_std"] = float(x.detach().std(dim=1).mean())
        return loss.mean(), info

    def drift_loss(self, x: Tensor, act_n: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        """The drift loss of the generated chunks x [B, N, Tp, Da] of the batch (the mean over its groups), and
        its info."""
        gen, pos, w, neg, neg_w = self.drift_groups(x, act_n, batch)
        if self.config.per_dim_scale:
            # Per-dim scale [Da], from the batch's expert chunks; the floor keeps a (near) constant dim finite.
            s = act_n.detach().flatten(0, -2).std(0).clamp_min(1e-2)
            d = s.repeat(gen.shape[-1] // s.numel())            # D = Da (per step) or Tp * Da, step-major (chunk)
            gen, pos, neg = gen / d, pos / d, None if neg is None else neg / d
        loss, info = drift_loss(gen, pos, neg, pos_weight=w, neg_weight=neg_w, temperatures=self.config.temperatures)
        return loss.mean(), info

    def drift_groups(self, x: Tensor, act_n: Tensor, batch: dict[str, Tensor]):
        """The generated chunks x [B, N, Tp, Da] and the data as drift groups: ``(gen, pos, pos_weight, neg, neg_weight)``.

        Positives are the observation's own expert chunk ``act_n`` [B, Tp, Da], or it and its neighbours' chunks
        with kernel weights (``batch["pos_action"]``, ``batch["pos_weight"]``), relative to this observation. With
        guidance alpha > 1 the negatives are the expert chunks of the B - 1 other observations of the batch
        (samples of the unconditional p(a)), each weighted (alpha - 1)(N - 1)/(B - 1); otherwise there are none
        (``neg`` is None). The groups are the config's ``drift_groups``: one per (observation, step) or one per
        observation over the flattened chunk."""
        c = self.config
        B = x.shape[0]
        if "pos_action" in batch:
            pos_n = self.normalize_action(batch["pos_action"], batch["obs"])                # [B, P, Tp, Da]
            w = batch["pos_weight"]                                                         # [B, P]
        else:
            pos_n, w = act_n.unsqueeze(1), None
        neg_n = neg_w = None
        if c.guidance > 1 and B > 1:
            others = (torch.arange(B, device=x.device).unsqueeze(1) + torch.arange(1, B, device=x.device)) % B
            neg_n = act_n[others]                                                            # [B, B-1, Tp, Da]
            neg_w = cfg_neg_weight(torch.tensor(c.guidance), c.n_noise, B - 1).item()
        P = pos_n.shape[1]
        if c.drift_groups == "per_step":
            def steps(t: Tensor) -> Tensor:                                                  # [B, K, Tp, Da] -> [B*Tp, K, Da]
                return t.permute(0, 2, 1, 3).reshape(B * c.horizon, t.shape[1], c.action_dim)

            gen, pos = steps(x), steps(pos_n)                                                # [B*Tp, N, Da], [B*Tp, P, Da]
            w = None if w is None else w.repeat_interleave(c.horizon, dim=0)               # [B*Tp, P]
            neg = None if neg_n is None else steps(neg_n)                                    # [B*Tp, M, Da]
        else:
            gen = x.reshape(B, c.n_noise, c.horizon * c.action_dim)                        # [B, N, Tp*Da]
            pos = pos_n.reshape(B, P, c.horizon * c.action_dim)
            neg = None if neg_n is None else neg_n.reshape(B, neg_n.shape[1], c.horizon * c.action_dim)
        return gen, pos, w, neg, neg_w

    @classmethod
    def prepare_data(cls, config: DriftConfig, train_set, normalizer) -> None:
        """The neighbour positives (``neighbor_positives`` > 0): an index of the training split's observations (or
        stored states, ``neighbor_key``) in normalised units, so that validation episodes never become positives."""
        if config.neighbor_positives:
            from ..data.windows import NeighborPositives
            from ..normalizer import Normalizer

            key = config.neighbor_key
            if key not in train_set.data:
                raise ConfigError(f"policy.neighbor_key={key}: the task's data has no {key!r} array (it has "
                                  f"{', '.join(sorted(k for k in train_set.data if k != 'action'))})")
            # The state has its own min-max statistics: the policy's normaliser covers only what it observes.
            norm = normalizer if key == "obs" else Normalizer().fit(key, train_set.steps(key))
            train_set.neighbors = NeighborPositives(train_set, lambda o: norm.normalize(key, o),
                                                    config.neighbor_positives, config.neighbor_bandwidth,
                                                    config.neighbor_same_episode, key=key)

    def sample(self, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """As ``Policy.sample``; ``noise``, drawn or passed (the exported module's input), is unit Gaussian and is
        multiplied by ``noise_scale`` here, so every caller samples the same distribution."""
        noise = self._noise(cond.shape[0], generator) if noise is None else noise
        if self.config.noise_scale != 1:
            noise = noise * self.config.noise_scale
        return self.model(noise, cond)                                        # one forward: 1 NFE


register_policy(DriftConfig, DriftPolicy)
