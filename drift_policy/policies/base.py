"""What every policy shares: the backbone, the normaliser, observation conditioning, (de)serialisation."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.transformer import TRANSFORMER_PRESETS, TimeSeriesTransformer
from ..models.unet1d import UNET_PRESETS, ConditionalUnet1D
from ..normalizer import Normalizer


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key."""


def check_keys(cls, d: dict, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(prefix + k for k in unknown)}; known: {sorted(known)}")


@dataclass
class PolicyConfig:
    type: str = ""
    architecture: str = "unet"        # "unet" (1-D conv U-Net + FiLM) or "transformer" (time-series transformer)
    backbone: str = "small"           # size preset of that architecture (UNET_PRESETS / TRANSFORMER_PRESETS)
    kernel_size: int = 5              # U-Net only
    n_groups: int = 8                 # U-Net only: GroupNorm groups
    causal: bool = True               # transformer only: causal self- and cross-attention
    p_drop: float = 0.0               # transformer only: dropout
    horizon: int = 16                 # Tp: predicted actions per chunk
    n_obs_steps: int = 2              # To
    n_action_steps: int = 8           # Ta: executed actions, starting at index To - 1
    obs_dim: int = 20                 # filled from the task
    action_dim: int = 2

    def __post_init__(self):
        presets = {"unet": UNET_PRESETS, "transformer": TRANSFORMER_PRESETS}
        if self.architecture not in presets:
            raise ConfigError(f"policy.architecture must be 'unet' or 'transformer', got {self.architecture!r}")
        if self.backbone not in presets[self.architecture]:
            raise ConfigError(f"policy.backbone must be one of {sorted(presets[self.architecture])} for the "
                              f"{self.architecture}, got {self.backbone!r}")
        if not 0 <= self.p_drop < 1:
            raise ConfigError(f"policy.p_drop must be in [0, 1), got {self.p_drop}")
        for k in ("kernel_size", "n_groups", "horizon", "n_obs_steps", "n_action_steps", "obs_dim", "action_dim"):
            if int(getattr(self, k)) < 1:
                raise ConfigError(f"policy.{k} must be >= 1, got {getattr(self, k)}")
        if self.horizon % 4:
            raise ConfigError(f"policy.horizon must be a multiple of 4 (the U-Net halves it twice), got {self.horizon}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ConfigError(f"policy.n_obs_steps - 1 + policy.n_action_steps must be <= policy.horizon "
                              f"({self.n_obs_steps} - 1 + {self.n_action_steps} > {self.horizon})")
        if self.architecture == "unet" and any(d % self.n_groups for d in UNET_PRESETS[self.backbone]["down_dims"]):
            raise ConfigError(f"policy.n_groups={self.n_groups} must divide every channel width of {self.backbone}")

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        check_keys(cls, d, "policy.")
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Policy(nn.Module):
    """Base class. Subclasses set ``timestep_dim`` for the backbone and implement compute_loss / sample."""

    timestep_dim = 0

    def __init__(self, config: PolicyConfig, normalizer: Normalizer | None = None):
        super().__init__()
        self.config = config
        c = config
        self.normalizer = normalizer if normalizer is not None else Normalizer({"obs": c.obs_dim, "action": c.action_dim})
        if c.architecture == "unet":
            self.model = ConditionalUnet1D(c.action_dim, c.n_obs_steps * c.obs_dim, kernel_size=c.kernel_size,
                                           n_groups=c.n_groups, timestep_dim=self.timestep_dim,
                                           **UNET_PRESETS[c.backbone])
        else:
            self.model = TimeSeriesTransformer(c.action_dim, c.n_obs_steps * c.obs_dim, c.n_obs_steps, c.horizon,
                                               p_drop=c.p_drop, causal=c.causal, timestep_dim=self.timestep_dim,
                                               **TRANSFORMER_PRESETS[c.backbone])

    # ---- shared pieces -------------------------------------------------------------------------------
    def global_cond(self, obs_n: Tensor) -> Tensor:
        return obs_n[:, : self.config.n_obs_steps].flatten(1)           # [B, To * obs_dim]

    def _obs(self, obs) -> Tensor:
        obs = obs["obs"] if isinstance(obs, dict) else obs
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        c = self.config
        if obs.dim() != 3 or obs.shape[1] < c.n_obs_steps or obs.shape[2] != c.obs_dim:
            raise ValueError(f"obs must be [B, >={c.n_obs_steps}, {c.obs_dim}], got {tuple(obs.shape)}")
        return obs[:, -c.n_obs_steps:]                                  # a longer history: its latest To steps

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample(self, cond: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalised action chunk [B, Tp, Da] for conditioning [B, C]."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        raise NotImplementedError

    @torch.no_grad()
    def predict_action(self, obs, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """obs [B, To, obs_dim] (or {"obs": ...}) in data units -> {"action": [B, Ta, Da], "action_pred": [B, Tp, Da]}."""
        obs_n = self.normalizer.normalize("obs", self._obs(obs))
        action_pred = self.normalizer.unnormalize("action", self.sample(self.global_cond(obs_n), generator))
        start = self.config.n_obs_steps - 1
        return {"action": action_pred[:, start: start + self.config.n_action_steps], "action_pred": action_pred}

    # ---- LeRobot-style control API ----------------------------------------------------------------------
    def predict_action_chunk(self, obs, generator: torch.Generator | None = None) -> Tensor:
        """The executable chunk [B, Ta, Da] for obs [B, To, obs_dim]."""
        return self.predict_action(obs, generator)["action"]

    def reset(self) -> None:
        """Forget queued actions and observation history (call at the start of every episode)."""
        self._action_queue: list[Tensor] = []
        self._obs_history: list[Tensor] = []

    @torch.no_grad()
    def select_action(self, obs, generator: torch.Generator | None = None) -> Tensor:
        """One action [B, Da] for the latest single-step obs [B, obs_dim].

        Keeps the last To observations (the first one repeated after ``reset``) and a queue of the current chunk's
        actions; the generator runs only when the queue is empty, i.e. once every Ta calls.
        """
        if not hasattr(self, "_action_queue"):
            self.reset()
        obs = torch.as_tensor(obs["obs"] if isinstance(obs, dict) else obs, dtype=torch.float32, device=self.device)
        if obs.dim() == 1:
            obs = obs.unsqueeze(0)
        if obs.dim() != 2 or obs.shape[1] != self.config.obs_dim:
            raise ValueError(f"select_action takes one step of obs [B, {self.config.obs_dim}], got {tuple(obs.shape)}")
        To = self.config.n_obs_steps
        self._obs_history = (self._obs_history + [obs])[-To:] if self._obs_history else [obs] * To
        if not self._action_queue:
            chunk = self.predict_action_chunk(torch.stack(self._obs_history, dim=1), generator)   # [B, Ta, Da]
            self._action_queue = list(chunk.unbind(dim=1))
        return self._action_queue.pop(0)

    def _noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        c = self.config
        return torch.randn(n, c.horizon, c.action_dim, generator=generator, device=self.device)

    # ---- LeRobot-style persistence ---------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / "config.json.tmp"
        tmp.write_text(json.dumps(self.config.to_dict(), indent=2))
        os.replace(tmp, path / "config.json")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors.tmp"))
        os.replace(path / "model.safetensors.tmp", path / "model.safetensors")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "Policy":
        from safetensors.torch import load_file

        from . import POLICIES, config_from_dict

        path = Path(path)
        for f in ("config.json", "model.safetensors"):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path}: missing {f} (expected a folder written by save_pretrained)")
        config = config_from_dict(json.loads((path / "config.json").read_text()))
        state = load_file(str(path / "model.safetensors"), device=str(device))
        norm = Normalizer.from_state_dict({k[len("normalizer."):]: v for k, v in state.items()
                                           if k.startswith("normalizer.")})
        policy_cls = POLICIES[config.type][1]
        if cls is not Policy and not issubclass(policy_cls, cls):
            raise TypeError(f"{path} holds a {config.type} policy, not a {cls.__name__}")
        policy = policy_cls(config, norm)
        policy.load_state_dict(state)
        return policy.to(device).eval()
