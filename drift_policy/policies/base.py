"""What every policy shares: its config, the backbone, the normaliser and observation conditioning, and the registry.

The LeRobot-style control API (``select_action``, ``reset``) is in ``control.py``, persistence
(``save_pretrained`` / ``from_pretrained``) in ``persistence.py``; ``Policy`` combines them."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_keys, check_types
from ..executor import executable
from ..models.transformer import TRANSFORMER_PRESETS, TimeSeriesTransformer
from ..models.unet1d import UNET_PRESETS, ConditionalUnet1D
from ..normalizer import Normalizer
from ..observations import check_chunk, check_observation
from .control import ControlAPI
from .persistence import Pretrained, load_state, plain  # noqa: F401  (load_state: re-exported)


@dataclass
class PolicyConfig:
    # Keys added after policies were first saved, each with the value that a config.json written before the key
    # existed was trained with (``with_legacy_keys``): older run and pretrained folders still load, as what they are.
    LEGACY: ClassVar[dict] = {"action_anchor": (), "obs_origin": (), "image_kp_origin": (), "image_kp_scale": 0.0}
    # Keys removed after policies were saved with them, each lost when measured (its record stays in eval/results):
    # key -> (the value the code now always uses, what another value changed: "training" or "architecture").
    # ``with_legacy_keys`` drops them: silently at that value, with a warning after another training-only value
    # (the weights load and act the same), and with a ConfigError after an architecture (no such network here).
    REMOVED: ClassVar[dict] = {
        "obs_noise": (0.0, "training"),               # Gaussian noise on the normalised obs (regularisation)
        "cond_mlp": (0, "architecture"),              # an MLP between the observation and FiLM (more_levers)
    }
    # Values removed from keys that remain, each training-only: key -> {removed value: what it now reads as}.
    REMOVED_VALUES: ClassVar[dict] = {}
    # Keys that change only how a trained policy acts, never what it learns (compute_loss does not read them), so a
    # trained run can be scored again with other values (``with_inference``; ``drift-policy bench rescore``).
    INFERENCE: ClassVar[tuple[str, ...]] = ("n_action_steps",)

    type: str = ""
    architecture: str = "unet"        # "unet" (1-D conv U-Net + FiLM) or "transformer" (time-series transformer)
    backbone: str = "small"           # size preset of that architecture (UNET_PRESETS / TRANSFORMER_PRESETS)
    kernel_size: int = 5              # U-Net only
    n_groups: int = 8                 # U-Net only: GroupNorm groups
    causal: bool = True               # transformer only: causal self- and cross-attention
    p_drop: float = 0.0               # transformer only: dropout
    action_anchor: tuple[int, ...] = ()   # obs dims (of the latest observation step), one per action dim, that
                                      # the chunk is predicted relative to: action - obs[-1, anchor] is what the
                                      # normaliser and the generator see (the drift recipe for Push-T keypoints:
                                      # (18, 19), the agent's position). (): absolute actions, Diffusion Policy's
                                      # choice
    obs_origin: tuple[int, ...] = ()  # obs dims (x, y, ...: Push-T keypoints' agent position, (18, 19)) to measure
                                      # positions from: the conditioning also gets every other low-dim dim minus
                                      # the origin dim of its axis (the other dims are assigned to the origin's
                                      # axes in turn), in the origin's normalised units. Where things are from the
                                      # agent, which FiLM's Linear(Mish(obs)) cannot subtract exactly. (): none
    horizon: int = 16                 # Tp: predicted actions per chunk
    n_obs_steps: int = 2              # To
    n_action_steps: int = 8           # Ta: executed actions, starting at index To - 1
    obs_dim: int = 20                 # filled from the task: low-dim observation size per step
    action_dim: int = 2               # filled from the task
    image_keys: tuple[str, ...] = ()  # filled from the task: cameras, each with its own encoder
    image_shape: tuple[int, int, int] = (3, 96, 96)   # filled from the task
    crop_shape: tuple[int, int] = (84, 84)            # filled from the task
    vision_backbone: str = "resnet18"  # image encoder trunk (models/resnet.py VISION_BACKBONES): resnet18 (Diffusion
                                      # Policy's), resnet18_half (half width), shallow (robomimic's ShallowConv,
                                      # GroupNorm), tiny (tests). The same for both policies in a comparison
    image_feature_dim: int = 64       # features per camera and step after spatial softmax + linear
    image_kp_origin: tuple[int, ...] = ()   # obs dims (x, y) of a point the camera sees (Push-T image: the agent,
                                      # (0, 1)): the spatial-softmax keypoints are then measured from it in the
                                      # stored frame (the crop's offset added back), so a random crop no longer
                                      # moves them against it; the pixel analogue of obs_origin. (): keypoints in
                                      # the crop's own frame, Diffusion Policy's encoder
    image_kp_scale: float = 0.0       # with image_kp_origin: stored-frame pixels per obs unit, the camera looking
                                      # straight down the obs axes with the frame's corner at 0 (Push-T: 96 / 512)

    def __post_init__(self):
        check_types(self, "policy.")
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
        self.action_anchor = tuple(int(i) for i in self.action_anchor)
        if self.action_anchor and (len(self.action_anchor) != self.action_dim
                                   or not all(0 <= i < self.obs_dim for i in self.action_anchor)):
            raise ConfigError(f"policy.action_anchor must name one observation dim (0..{self.obs_dim - 1}) per action "
                              f"dim ({self.action_dim}), or be empty; got {list(self.action_anchor)}")
        self.obs_origin = tuple(int(i) for i in self.obs_origin)
        if self.obs_origin and (not all(0 <= i < self.obs_dim for i in self.obs_origin)
                                or len(set(self.obs_origin)) != len(self.obs_origin)
                                or (self.obs_dim - len(self.obs_origin)) % len(self.obs_origin)):
            raise ConfigError(f"policy.obs_origin must name distinct observation dims (0..{self.obs_dim - 1}) whose "
                              f"count divides the number of the other dims ({self.obs_dim} - its length), or be "
                              f"empty; got {list(self.obs_origin)}")
        self.image_keys = tuple(self.image_keys)
        self.image_shape, self.crop_shape = tuple(self.image_shape), tuple(self.crop_shape)
        if self.image_keys:
            from ..models.resnet import VISION_BACKBONES

            if self.vision_backbone not in VISION_BACKBONES:
                raise ConfigError(f"policy.vision_backbone must be one of {sorted(VISION_BACKBONES)}, "
                                  f"got {self.vision_backbone!r}")
            if len(self.image_shape) != 3 or len(self.crop_shape) != 2 or not all(
                    0 < c <= s for c, s in zip(self.crop_shape, self.image_shape[1:])):
                raise ConfigError(f"policy.crop_shape {self.crop_shape} must fit in image_shape {self.image_shape}")
            if self.image_feature_dim < 1:
                raise ConfigError(f"policy.image_feature_dim must be >= 1, got {self.image_feature_dim}")
        self.image_kp_origin = tuple(int(i) for i in self.image_kp_origin)
        if self.image_kp_origin and (not self.image_keys or len(self.image_kp_origin) != 2
                                     or not all(0 <= i < self.obs_dim for i in self.image_kp_origin)
                                     or not self.image_kp_scale > 0):
            raise ConfigError(f"policy.image_kp_origin needs a camera, two observation dims (x, y in 0..{self.obs_dim - 1})"
                              f" and policy.image_kp_scale > 0 (pixels per obs unit); got "
                              f"{list(self.image_kp_origin)} and {self.image_kp_scale} on cameras {list(self.image_keys)}")
        if self.architecture == "unet" and any(d % self.n_groups for d in UNET_PRESETS[self.backbone]["down_dims"]):
            raise ConfigError(f"policy.n_groups={self.n_groups} must divide every channel width of {self.backbone}")

    @property
    def sample_passes_per_obs(self) -> int:
        """Action chunks generated (forward + backward) per training observation: the unit of training compute."""
        return 1

    @property
    def encoder_passes_per_obs(self) -> int:
        """Images through the image encoder (forward + backward) per training observation: one per camera and
        observation step, whatever the method (drift encodes an observation once and shares the features among its
        generated chunks). 0 without cameras. The second unit of training compute, beside sample-passes."""
        return len(self.image_keys) * self.n_obs_steps

    @property
    def default_batch_size(self) -> int:
        """Observations per step when ``train.batch_size`` is 0 (Diffusion Policy's CNN recipe on this CPU: 64)."""
        return 64

    @property
    def nfe(self) -> int:
        """Network evaluations per action chunk: what one ``predict_action`` costs (set by each method)."""
        raise NotImplementedError(f"{type(self).__name__} must define nfe")

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        check_keys(cls, d, "policy.")
        d = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Policy(ControlAPI, Pretrained, nn.Module):
    """Base class. Subclasses set ``timestep_dim`` for the backbone and implement compute_loss / sample."""

    timestep_dim = 0

    _ANY_TYPE = True          # Policy.from_pretrained loads any registered type; a subclass only its own

    # The registry's rules for a saved config, for persistence.py (which imports nothing of this module).
    @staticmethod
    def _legacy(d: dict, where: str = "config", removed: str = "warn") -> dict:
        return with_legacy_keys(d, where, removed)

    @staticmethod
    def _removed(d: dict) -> dict:
        return removed_options(d)

    @staticmethod
    def _config_of(d: dict) -> "PolicyConfig":
        return config_from_dict(d)

    @staticmethod
    def _class_of(config: "PolicyConfig") -> type:
        return POLICIES[config.type][1]

    def __init__(self, config: PolicyConfig, normalizer: Normalizer | None = None):
        super().__init__()
        self.config = config
        c = config
        self.normalizer = normalizer if normalizer is not None else Normalizer({"obs": c.obs_dim, "action": c.action_dim})
        # Images are encoded once per (sample, step), trained end to end with the generator (no frozen encoder).
        self.obs_encoder = None
        # obs_origin: each other dim and the origin dim of its axis, fixed by the config (relative_obs)
        origin = list(c.obs_origin or ())
        self._rel_dims = [i for i in range(c.obs_dim) if i not in origin]
        self._rel_ref = [origin[j % len(origin)] for j in range(len(self._rel_dims))] if origin else []
        step_dim = c.obs_dim + (len(self._rel_dims) if origin else 0)
        if c.image_keys:
            from ..models.resnet import MultiImageEncoder

            self.obs_encoder = MultiImageEncoder(list(c.image_keys), image_shape=c.image_shape,
                                                 crop_shape=c.crop_shape, preset=c.vision_backbone,
                                                 feature_dim=c.image_feature_dim)
            step_dim += len(c.image_keys) * c.image_feature_dim
        cond_dim = c.n_obs_steps * step_dim
        if c.architecture == "unet":
            self.model = ConditionalUnet1D(c.action_dim, cond_dim, kernel_size=c.kernel_size,
                                           n_groups=c.n_groups, timestep_dim=self.timestep_dim,
                                           **UNET_PRESETS[c.backbone])
        else:
            self.model = TimeSeriesTransformer(c.action_dim, cond_dim, c.n_obs_steps, c.horizon,
                                               p_drop=c.p_drop, causal=c.causal, timestep_dim=self.timestep_dim,
                                               **TRANSFORMER_PRESETS[c.backbone])

    # ---- shared pieces -------------------------------------------------------------------------------
    def condition(self, obs: dict[str, Tensor], features: Tensor | None = None) -> Tensor:
        """Observation windows in data units ({"obs": [B, To, D], <camera>: [B, To, 3, H, W]}) -> the
        generator's conditioning [B, To * (D + cameras * F)]: normalised low-dim values and image features
        (``features`` [B, To, cameras * F]: already encoded, ``encode_images``; None: encoded here)."""
        c = self.config
        low = self.normalizer.normalize("obs", obs["obs"][:, -c.n_obs_steps:])          # [B, To, D]
        if c.obs_origin:                                                                 # [B, To, 2D - len(origin)]
            low = torch.cat([low, self.relative_obs(obs["obs"][:, -c.n_obs_steps:])], dim=-1)
        if self.obs_encoder is None:
            return low.flatten(1)
        feats = self.encode_images(obs) if features is None else features               # [B, To, cams*F]
        return torch.cat([low, feats], dim=-1).flatten(1)

    def encode_images(self, obs: dict[str, Tensor]) -> Tensor:
        """The cameras' frames of the last To steps ({<camera>: [B, >=To, 3, H, W]}) -> features [B, To, cameras
        * F]: each image through its camera's encoder once (``encoder_passes_per_obs`` per observation)."""
        c = self.config
        To = c.n_obs_steps
        B = obs[c.image_keys[0]].shape[0]
        images = {k: obs[k][:, -To:].flatten(0, 1) for k in c.image_keys}                # [B*To, 3, H, W]
        origin = None
        if c.image_kp_origin:          # the point in the stored frame's pixel indices (pixel i's centre at i)
            origin = obs["obs"][:, -To:, list(c.image_kp_origin)].flatten(0, 1).float() * c.image_kp_scale - 0.5
        return self.obs_encoder(images, origin=origin).view(B, To, -1)                  # origin [B*To, 2]

    def relative_obs(self, obs: Tensor) -> Tensor:
        """``obs_origin``: obs [..., D] in data units -> [..., D - O], every other dim minus the origin dim of its
        axis (the other dims taken in order, assigned to the O origin dims in turn), times that origin dim's
        normaliser scale: a keypoint at the agent's position reads 0, one a table's width away about 2."""
        ref = self._rel_ref
        return (obs[..., self._rel_dims] - obs[..., ref]) * self.normalizer.params("obs")[0][ref]

    def normalize_action(self, action: Tensor, obs: Tensor) -> Tensor:
        """Chunks in data units [B, ..., Tp, Da] -> what the generator models: normalised, and relative to the
        latest observation's ``action_anchor`` dims when the config has them (obs [B, To, D], data units).
        Positives of other windows (neighbours) are expressed relative to this observation too, as the chunks
        that would be good from here."""
        return self.normalizer.normalize("action", action - self._anchor(obs, action.dim()))

    def unnormalize_action(self, action_n: Tensor, obs: Tensor) -> Tensor:
        """The inverse of ``normalize_action``: generator output [B, Tp, Da] -> actions in data units."""
        return self.normalizer.unnormalize("action", action_n) + self._anchor(obs, action_n.dim())

    def anchor_of(self, latest: Tensor) -> Tensor | float:
        """The ``action_anchor`` dims of observations [..., D] -> [..., Da] in data units (0.0: no anchor)."""
        dims = self.config.action_anchor
        return latest[..., list(dims)] if dims else 0.0

    def _anchor(self, obs: Tensor, ndim: int) -> Tensor | float:
        """obs[:, -1, anchor] shaped [B, 1, ..., Da] to broadcast over a chunk of ``ndim`` dims (0.0: none)."""
        a = self.anchor_of(obs[:, -1])                                                  # [B, Da]
        return a if isinstance(a, float) else a.view(a.shape[0], *([1] * (ndim - 2)), a.shape[1])

    def _obs(self, obs) -> dict[str, Tensor]:
        """Validate and move observation windows to the device; keep the latest To steps."""
        c = self.config
        obs = dict(obs) if isinstance(obs, dict) else {"obs": obs}
        for k in ("obs", *c.image_keys):
            if k not in obs:
                raise ValueError(f"observation is missing {k!r} (this policy needs {['obs', *c.image_keys]})")
        low = torch.as_tensor(obs["obs"], dtype=torch.float32, device=self.device)
        if low.dim() != 3 or low.shape[1] < c.n_obs_steps or low.shape[2] != c.obs_dim:
            raise ValueError(f"obs must be [B, >={c.n_obs_steps}, {c.obs_dim}], got {tuple(low.shape)}")
        out = {"obs": low[:, -c.n_obs_steps:]}                           # a longer history: its latest To steps
        for k in c.image_keys:
            img = torch.as_tensor(obs[k], device=self.device)
            if img.dim() != 5 or img.shape[0] != low.shape[0] or tuple(img.shape[2:]) != tuple(c.image_shape):
                raise ValueError(f"{k!r} must be [B={low.shape[0]}, To, {', '.join(map(str, c.image_shape))}], "
                                 f"got {tuple(img.shape)}")
            out[k] = img[:, -c.n_obs_steps:]
        check_observation(out, c.image_keys)
        return out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def sample(self, cond: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """Normalised action chunk [B, Tp, Da] for conditioning [B, C], from ``noise`` [B, Tp, Da] when given
        (else drawn from ``generator``)."""
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        raise NotImplementedError

    @classmethod
    def prepare_data(cls, config: PolicyConfig, train_set, normalizer: Normalizer) -> None:
        """Give the training windows (``data.windows.WindowDataset``) what this policy's ``compute_loss`` reads
        beyond them, before the policy is built: train.py calls it once, on the training split, with the fitted
        normaliser. Nothing by default (drift: its neighbour positives)."""

    @torch.no_grad()
    def predict_action(self, obs, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """obs [B, To, obs_dim] (or {"obs": ..., <camera>: [B, To, 3, H, W]}) in data units -> {"action": [B, Ta, Da], "action_pred": [B, Tp, Da]}."""
        obs = self._obs(obs)
        action_pred = self.unnormalize_action(self.sample(self.condition(obs), generator), obs["obs"])
        check_chunk(action_pred)
        c = self.config
        return {"action": action_pred[:, executable(c.n_obs_steps, c.n_action_steps)], "action_pred": action_pred}

    def _noise(self, n: int, generator: torch.Generator | None) -> Tensor:
        c = self.config
        return torch.randn(n, c.horizon, c.action_dim, generator=generator, device=self.device)

# ---- the registry of policy types ---------------------------------------------------------------------------------
# type -> (config class, policy class). Each policy module registers itself (``register_policy``), so a new method
# is one new module; ``drift_policy.policies`` imports the built-in ones.
POLICIES: dict[str, tuple[type[PolicyConfig], type[Policy]]] = {}


def register_policy(config_cls: type[PolicyConfig], policy_cls: type[Policy]) -> None:
    kind = next(f.default for f in dataclasses.fields(config_cls) if f.name == "type")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{config_cls.__name__} needs a default for its 'type' field")
    POLICIES[kind] = (config_cls, policy_cls)


def policy_class(config: PolicyConfig) -> type[Policy]:
    return POLICIES[config.type][1]


def make_policy(config: PolicyConfig, normalizer=None) -> Policy:
    return policy_class(config)(config, normalizer)


def removed_options(d: dict) -> dict:
    """The removed keys and values (``REMOVED``, ``REMOVED_VALUES``) that a saved policy config was trained with,
    where they differ from what the code now always does: {key: saved value}."""
    cls = POLICIES.get(d.get("type"), (PolicyConfig,))[0]
    out = {k: d[k] for k, (now, _) in cls.REMOVED.items() if k in d and plain(d[k]) != plain(now)}
    out.update({k: d[k] for k, values in cls.REMOVED_VALUES.items() if isinstance(d.get(k), str) and d[k] in values})
    return out


def with_legacy_keys(d: dict, where: str = "config", removed: str = "warn") -> dict:
    """A saved policy config as this code reads it: every key its policy added later (``LEGACY``) that it lacks
    set to the value it was trained with (anything else missing stays missing), and every key or value removed
    since (``REMOVED``, ``REMOVED_VALUES``) dropped. ``removed="warn"``: a removed option that changed only
    training and was not what the code now always does is dropped with a warning naming it (the weights load and
    act the same); one that changed the network is a ConfigError naming ``where`` (the file or folder).
    ``removed="quiet"``: dropped without either (for reading a recipe, never for building its network);
    ``removed="refuse"``: any is a ConfigError (a config being made, not read back)."""
    cls = POLICIES.get(d.get("type"), (PolicyConfig,))[0]
    gone = removed_options(d)
    if removed == "refuse" and gone:
        raise ConfigError(f"{', '.join(f'policy.{k}={v!r}' for k, v in gone.items())}: removed (measured worse; the "
                          f"records are in eval/results)")
    if removed == "warn":
        network = [k for k in gone if cls.REMOVED.get(k, (None, ""))[1] == "architecture"]
        if network:
            raise ConfigError(f"{where} was trained with a removed option, "
                              f"{', '.join(f'policy.{k}={gone[k]!r}' for k in network)}: this version cannot "
                              f"build that network (a release before issue 38 can)")
        if gone:
            warnings.warn(f"{where}: trained with removed option(s) {', '.join(f'policy.{k}={v!r}' for k, v in gone.items())}"
                          f", ignored: the weights load and act the same, but training this config again would "
                          f"not reproduce them", stacklevel=2)
    d = {k: v for k, v in {**cls.LEGACY, **d}.items() if k not in cls.REMOVED}
    for k, values in cls.REMOVED_VALUES.items():
        if k in gone:
            d[k] = values[d[k]]
    return d


def with_inference(config: PolicyConfig, changes: dict) -> PolicyConfig:
    """``config`` with inference-only keys (``INFERENCE``) changed and checked as any config; a key that changes
    training (or is not the policy's) is a ConfigError, since weights trained under it would not be what it says."""
    allowed = type(config).INFERENCE
    for k in changes:
        if k not in allowed:
            raise ConfigError(f"policy.{k} is not an inference-only key of the {config.type} policy; a trained "
                              f"policy can change only {', '.join('policy.' + a for a in allowed)}")
    return type(config).from_dict({**config.to_dict(), **changes})


def config_from_dict(d: dict) -> PolicyConfig:
    d = dict(d)
    kind = d.get("type")
    if kind not in POLICIES:
        raise ConfigError(f"policy.type must be one of {sorted(POLICIES)}, got {kind!r}")
    return POLICIES[kind][0].from_dict(d)
