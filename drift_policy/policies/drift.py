"""The drift policy: a one-step generator f(noise, obs) -> action chunk, trained with the drifting field."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..drift import cfg_neg_weight, drift_loss
from ..errors import ConfigError
from .base import Policy, PolicyConfig, register_policy


# The keys a config may leave to the task (TaskFamily.drift_choices), each with the value that means so.
TASK_CHOICE = {"neighbor_positives": -1, "per_dim_scale": None, "neighbor_same_episode": None, "noise_scale": None}
# What those keys (but the neighbour count, which depends on the cameras) become when no task chooses: the policy's
# own rule, which is also what every config written before the keys existed was trained with.
OWN_RULE = {"per_dim_scale": False, "neighbor_same_episode": True, "noise_scale": 1.0}


@dataclass
class DriftConfig(PolicyConfig):
    LEGACY: ClassVar[dict] = {**PolicyConfig.LEGACY, **OWN_RULE, "kernel_scale": "batch", "neighbor_negatives": 0}
    INFERENCE: ClassVar[tuple[str, ...]] = (*PolicyConfig.INFERENCE, "noise_scale")

    type: str = "drift"
    n_noise: int = 2                                   # generated chunks per observation (N in the paper)
    drift_groups: str = "per_step"                     # "per_step": one group per (obs, step), D = action_dim;
                                                       # "chunk": one group per obs over the flat chunk;
                                                       # "both": the mean of the two losses (per-step precision,
                                                       # and a chunk whose steps come from one mode)
    temperatures: tuple[float, ...] = (0.02, 0.05, 0.2)  # the paper's kernel temperatures. Push-T keypoints at
                                                       # 1.2M, last-5 coverage (seeds 0, 1): these 0.962, without
                                                       # 0.2 0.946 (compute_matched/temperatures); a fourth, 0.01,
                                                       # and 0.2 alone lower too (seed 0; compute_matched/lr_6e-4,
                                                       # more_levers)
    kernel_scale: str = "batch"                        # the kernel's distance scale: "batch", one for all groups (the
                                                       # paper's); "step", one per step of the chunk for per-step
                                                       # groups (the later steps spread wider and would set a coarse
                                                       # kernel for the executed first ones). Push-T keypoints at
                                                       # 1.2M: faster early, lower at the end (0.946 against 0.962
                                                       # last-5, seeds 0, 1; compute_matched/kernel_scale): off
    neighbor_positives: int = -1                       # k extra positives per observation: the expert chunks of
                                                       # its k nearest training observations (0: its own only;
                                                       # -1: the task family's choice, robomimic 0; else 8 on
                                                       # low-dim tasks, 0 with cameras, whose index would see
                                                       # only the proprioception)
    neighbor_bandwidth: float = 0.05                   # Gaussian kernel width on the RMS normalised-obs distance;
                                                       # the field's target is the neighbours' chunks blurred by it.
                                                       # Push-T keypoints at 1.2M, last-5 coverage (seeds 0, 1):
                                                       # 0.03 0.947, 0.05 0.962, 0.1 0.823 (compute_matched/
                                                       # neighbour_bandwidth)
    neighbor_negatives: int = 0                        # m batch mates per observation whose GENERATED chunks join its
                                                       # negatives: the batch is drawn as clusters of 1 + m, an
                                                       # observation and m of its neighbours (drawn with probability
                                                       # by kernel weight), and each mate's chunks weigh W / m in all
                                                       # (W: the observation's neighbour-positive weight), so the
                                                       # negatives carry the same neighbour blur as the positives
                                                       # (0: the own G chunks only)
    neighbor_same_episode: bool | None = None          # False: neighbours from the other demonstrations only (not the
                                                       # own episode's windows a few steps away: a time-shifted copy).
                                                       # None: the task's choice (TaskFamily.drift_choices; True
                                                       # without one): False on Push-T keypoints
    neighbor_own_anchor: bool = False                  # with action_anchor: a neighbour's chunk relative to ITS latest
                                                       # observation (a displacement that transfers), not to this
                                                       # one's (a target that transfers). Much worse on Push-T at
                                                       # 1.2M (seed 0: 0.832 final, 32 failed episodes of 250):
                                                       # off (eval/results/compute_matched/neighbour_anchor)
    action_anchor: tuple[int, ...] | None = None       # the task's choice (PolicyConfig): Push-T keypoints' chunks
                                                       # relative to the agent, 0.940 against 0.919 last-5
                                                       # coverage at 1.2M sample-passes, 2 seeds
                                                       # (eval/results/compute_matched/action_anchor)
    obs_origin: tuple[int, ...] | None = None          # the task's choice (PolicyConfig): Push-T keypoints' block
                                                       # keypoints also relative to the agent; the far-from-the-
                                                       # demonstrations failures of issue 12 were the generator not
                                                       # finding the block (eval/results/compute_matched/obs_origin)
    per_dim_scale: bool | None = None                  # the kernel's distances in units of each action dim's spread
                                                       # in the batch (std of the expert chunks), not in the
                                                       # normaliser's [-1, 1]. None: the task's choice
                                                       # (TaskFamily.drift_choices; resolved by Config.from_dict,
                                                       # False without a task): on for Push-T keypoints (0.952
                                                       # against 0.940 last-5 at 1.2M, seeds 0, 1), off elsewhere
                                                       # (Can 0.38 against 0.52, seed 0: a +-1 gripper's weight
                                                       # goes to the noisy rotation deltas; compute_matched/
                                                       # levers_1200k, can_levers)
    noise_scale: float | None = None                   # inference only: the sampling noise is eps * noise_scale (the
                                                       # truncation trick: below 1, samples nearer the middle of
                                                       # the generator's distribution); training always draws unit
                                                       # noise, so it changes no weight. None: the task's choice
                                                       # (TaskFamily.drift_choices; 1 without one): 0.5 on Push-T
                                                       # keypoints
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
        if self.drift_groups not in ("per_step", "chunk", "both"):
            raise ConfigError(f"policy.drift_groups must be 'per_step', 'chunk' or 'both', got {self.drift_groups!r}")
        if self.kernel_scale not in ("batch", "step"):
            raise ConfigError(f"policy.kernel_scale must be 'batch' or 'step', got {self.kernel_scale!r}")
        if self.kernel_scale == "step" and self.drift_groups == "chunk":
            raise ConfigError("policy.kernel_scale='step' needs per-step groups (policy.drift_groups 'per_step' or 'both'); "
                              "a flattened-chunk group spans every step")
        for key, value in OWN_RULE.items():           # left to a task that did not choose (or no task at all)
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.neighbor_positives == -1:              # resolved here, so config.json holds the value used
            self.neighbor_positives = 0 if self.image_keys else 8
        if self.neighbor_positives < 0 or not self.neighbor_bandwidth > 0:
            raise ConfigError(f"policy.neighbor_positives must be >= 0 (or -1: auto) and policy.neighbor_bandwidth > 0, got "
                              f"{self.neighbor_positives} and {self.neighbor_bandwidth}")
        if self.neighbor_negatives < 0 or self.neighbor_negatives > self.neighbor_positives:
            raise ConfigError(f"policy.neighbor_negatives must be in [0, policy.neighbor_positives="
                              f"{self.neighbor_positives}] (its mates are drawn from the neighbours), got "
                              f"{self.neighbor_negatives}")
        if self.neighbor_negatives and self.guidance != 1:
            raise ConfigError("policy.neighbor_negatives and policy.guidance > 1 both fill the extra negatives; "
                              "use one of them")
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
        """The drift loss of the generated chunks x [B, N, Tp, Da] of the batch: one mean per kind of group [K]
        (K = 2 for ``drift_groups="both"``, whose info keys then end in _per_step / _chunk), and its info."""
        kinds = ("per_step", "chunk") if self.config.drift_groups == "both" else (self.config.drift_groups,)
        losses, info = [], {}
        # Per-dim scale [Da], from the batch's expert chunks; the floor keeps a (near) constant dim finite.
        s = act_n.detach().flatten(0, -2).std(0).clamp_min(1e-2) if self.config.per_dim_scale else None
        for kind in kinds:
            gen, pos, w, neg, neg_w = self.drift_groups(x, act_n, batch, kind)
            if s is not None:                                   # D = Da (per step) or Tp * Da, step-major (chunk)
                d = s.repeat(gen.shape[-1] // s.numel())
                gen, pos, neg = gen / d, pos / d, None if neg is None else neg / d
            # Per-step groups are ordered (observation, step): group g is step g % Tp.
            steps = (torch.arange(gen.shape[0], device=gen.device) % self.config.horizon
                     if self.config.kernel_scale == "step" and kind == "per_step" else None)
            loss, i = drift_loss(gen, pos, neg, pos_weight=w, neg_weight=neg_w, temperatures=self.config.temperatures,
                                 scale_groups=steps)
            losses.append(loss.mean())
            info.update(i if len(kinds) == 1 else {f"{k}_{kind}": v for k, v in i.items()})
        return torch.stack(losses), info

    def drift_groups(self, x: Tensor, act_n: Tensor, batch: dict[str, Tensor], kind: str | None = None):
        """The generated chunks x [B, N, Tp, Da] and the data as drift groups: ``(gen, pos, pos_weight, neg, neg_weight)``.

        Positives are the observation's own expert chunk ``act_n`` [B, Tp, Da], or it and its neighbours' chunks
        with kernel weights (``batch["pos_action"]``, ``batch["pos_weight"]``; relative to this observation, or with
        ``neighbor_own_anchor`` each to its own window's latest observation ``batch["pos_obs"]``). With guidance alpha > 1 the negatives
        are the expert chunks of the B - 1 other observations of the batch (samples of the unconditional p(a)),
        each weighted (alpha - 1)(N - 1)/(B - 1); with ``neighbor_negatives`` they are the batch mates' generated
        chunks (``mate_negatives``); otherwise there are none (``neg`` is None). ``kind``:
        "per_step" or "chunk" (default: the config's ``drift_groups``)."""
        c = self.config
        kind = kind or c.drift_groups
        if kind not in ("per_step", "chunk"):
            raise ValueError(f"drift_groups builds 'per_step' or 'chunk' groups, got {kind!r} (drift_loss combines them)")
        B = x.shape[0]
        if "pos_action" in batch:
            if c.neighbor_own_anchor and c.action_anchor:     # each chunk relative to its own window's anchor
                anchor = self.anchor_of(batch["pos_obs"]).unsqueeze(2)                      # [B, P, 1, Da]
                pos_n = self.normalizer.normalize("action", batch["pos_action"] - anchor)  # [B, P, Tp, Da]
            else:
                pos_n = self.normalize_action(batch["pos_action"], batch["obs"])            # [B, P, Tp, Da]
            w = batch["pos_weight"]                                                         # [B, P]
        else:
            pos_n, w = act_n.unsqueeze(1), None
        neg_n = neg_w = None
        if c.neighbor_negatives and "pos_action" in batch:  # without neighbour positives (validation) no mates either
            neg_n, neg_w = self.mate_negatives(x, batch)                                     # [B, m*N, Tp, Da], [B, m*N]
        if c.guidance > 1 and B > 1:
            others = (torch.arange(B, device=x.device).unsqueeze(1) + torch.arange(1, B, device=x.device)) % B
            neg_n = act_n[others]                                                            # [B, B-1, Tp, Da]
            neg_w = cfg_neg_weight(torch.tensor(c.guidance), c.n_noise, B - 1).item()
        P = pos_n.shape[1]
        if kind == "per_step":
            def steps(t: Tensor) -> Tensor:                                                  # [B, K, Tp, Da] -> [B*Tp, K, Da]
                return t.permute(0, 2, 1, 3).reshape(B * c.horizon, t.shape[1], c.action_dim)

            gen, pos = steps(x), steps(pos_n)                                                # [B*Tp, N, Da], [B*Tp, P, Da]
            w = None if w is None else w.repeat_interleave(c.horizon, dim=0)               # [B*Tp, P]
            neg = None if neg_n is None else steps(neg_n)                                    # [B*Tp, M, Da]
            if isinstance(neg_w, Tensor):
                neg_w = neg_w.repeat_interleave(c.horizon, dim=0)                          # [B*Tp, M]
        else:
            gen = x.reshape(B, c.n_noise, c.horizon * c.action_dim)                        # [B, N, Tp*Da]
            pos = pos_n.reshape(B, P, c.horizon * c.action_dim)
            neg = None if neg_n is None else neg_n.reshape(B, neg_n.shape[1], c.horizon * c.action_dim)
        return gen, pos, w, neg, neg_w

    def mate_negatives(self, x: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The generated chunks of each observation's m batch mates as extra negatives: ``(neg [B, m*N, Tp, Da],
        weight [B, m*N])``. The batch is clusters of 1 + m consecutive observations (``WindowDataset.sample`` with
        ``NeighborPositives.mates``); the positives of observation i are its own chunk (weight 1) and its k
        neighbours' (weights w_ik, sum W_i), a mixture p_i + sum_k w_ik p_k. Its own other G - 1 chunks stand for
        q_i with weight 1 each; each mate j was drawn from the k neighbours with probability w_ik / W_i, so its N
        chunks, each weighted W_i (N - 1) / (N m), make the negatives an unbiased sample of q_i + sum_k w_ik q_k:
        the same neighbour blur as the positives, and the field vanishes in expectation when every q_k = p_k.
        A mate's chunks are moved into this observation's frame (``action_anchor``) as its positives are."""
        c = self.config
        B, N = x.shape[:2]
        size = 1 + c.neighbor_negatives
        if B % size:
            raise ValueError(f"neighbour negatives need the batch in clusters of {size} (policy.neighbor_negatives="
                             f"{c.neighbor_negatives}); got a batch of {B}")
        if "pos_weight" not in batch:
            raise ValueError("neighbour negatives need the batch's neighbour positives (batch['pos_weight'])")
        pos = torch.arange(B, device=x.device)
        start = pos - pos % size
        others = (pos % size).unsqueeze(1) + torch.arange(1, size, device=x.device)                # [B, m]
        mates = start.unsqueeze(1) + others % size                                                # [B, m] in the batch
        # Data units, then this observation's frame: the identity without action_anchor.
        absolute = self.unnormalize_action(x.detach(), batch["obs"])                             # [B, N, Tp, Da]
        neg = self.normalize_action(absolute[mates].flatten(1, 2), batch["obs"])                  # [B, m*N, Tp, Da]
        W = batch["pos_weight"][:, 1:].sum(1, keepdim=True)                                       # [B, 1]
        weight = (W * (N - 1) / (N * c.neighbor_negatives)).expand(B, neg.shape[1])
        return neg, weight

    def sample(self, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """As ``Policy.sample``; ``noise``, drawn or passed (the exported module's input), is unit Gaussian and is
        multiplied by ``noise_scale`` here, so every caller samples the same distribution."""
        noise = self._noise(cond.shape[0], generator) if noise is None else noise
        if self.config.noise_scale != 1:
            noise = noise * self.config.noise_scale
        return self.model(noise, cond)                                        # one forward: 1 NFE


register_policy(DriftConfig, DriftPolicy)
