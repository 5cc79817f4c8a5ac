"""Diffusion Policy's baseline (Chi et al. 2023) on the same backbone: DDPM training, DDPM or DDIM sampling."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Policy, PolicyConfig, register_policy


@dataclass
class DiffusionConfig(PolicyConfig):
    INFERENCE: ClassVar[tuple[str, ...]] = (*PolicyConfig.INFERENCE, "scheduler", "num_inference_steps")

    type: str = "diffusion"
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    scheduler: str = "ddpm"              # sampler at inference: "ddpm" or "ddim"
    num_inference_steps: int = 100       # 100 for DDPM (Diffusion Policy's sim setting); 10 for DDIM (its real robot)
    timestep_dim: int = 256

    @property
    def nfe(self) -> int:
        return self.num_inference_steps

    def __post_init__(self):
        super().__post_init__()
        if self.type != "diffusion":
            raise ConfigError(f"policy.type must be 'diffusion' for DiffusionConfig, got {self.type!r}")
        if self.scheduler not in ("ddpm", "ddim"):
            raise ConfigError(f"policy.scheduler must be 'ddpm' or 'ddim', got {self.scheduler!r}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ConfigError(f"policy.num_inference_steps must be in [1, {self.num_train_timesteps}], "
                              f"got {self.num_inference_steps}")
        if self.timestep_dim < 2 or self.timestep_dim % 2:
            raise ConfigError(f"policy.timestep_dim must be an even number >= 2, got {self.timestep_dim}")


def _schedulers():
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError as e:
        raise ImportError("the diffusion baseline needs diffusers: pip install 'drift-policy[diffusion]'") from e
    return DDPMScheduler, DDIMScheduler


class DiffusionPolicy(Policy):
    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig, normalizer=None):
        self.timestep_dim = config.timestep_dim
        super().__init__(config, normalizer)
        DDPM, DDIM = _schedulers()
        kw = dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                  clip_sample=True, prediction_type="epsilon")
        self.noise_scheduler = DDPM(**kw)
        self.sampler = (DDPM if config.scheduler == "ddpm" else DDIM)(**kw)

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        act_n = self.normalize_action(batch["action"], batch["obs"])         # [B, Tp, Da]
        noise = torch.randn_like(act_n)
        t = torch.randint(0, self.config.num_train_timesteps, (act_n.shape[0],), device=act_n.device)
        noisy = self.noise_scheduler.add_noise(act_n, noise, t)
        pred = self.model(noisy, self.condition(batch), t)
        loss = (pred - noise).pow(2).mean()
        return loss, {"eps_mse": float(loss.detach())}

    def sample(self, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        x = self._noise(cond.shape[0], generator) if noise is None else noise
        self.sampler.set_timesteps(self.config.num_inference_steps)
        for t in self.sampler.timesteps:                                       # one forward per step
            eps = self.model(x, cond, t.expand(x.shape[0]).to(x.device))
            x = self.sampler.step(eps, t, x, generator=generator).prev_sample
        return x


register_policy(DiffusionConfig, DiffusionPolicy)
