"""Per-dimension min-max normalisation to [-1, 1], stored with the policy's weights."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalizer(nn.Module):
    """Maps each named field (e.g. "obs", "action") from data units to [-1, 1] and back.

    The statistics are buffers, so they travel in ``state_dict`` and checkpoints. Asking for a field that
    was never fitted is an error: a silent identity would feed raw pixels to a net trained on [-1, 1].
    """

    RANGE_EPS = 1e-4  # a dimension whose range is below this is constant: centre it, do not scale it up

    def __init__(self, dims: dict[str, int] | None = None):
        super().__init__()
        for key, d in (dims or {}).items():
            self.register_buffer(f"{key}_scale", torch.ones(d))
            self.register_buffer(f"{key}_offset", torch.zeros(d))

    @property
    def keys(self) -> list[str]:
        return [n[: -len("_scale")] for n, _ in self.named_buffers() if n.endswith("_scale")]

    def fit(self, key: str, data: Tensor, min_range: float = 0.0) -> "Normalizer":
        """Fit ``key`` on data [..., D] (all leading dimensions are samples).

        ``min_range`` (data units): a dimension that moves less than this in the data is scaled as if its range
        were ``min_range``, centred on its midpoint, so it lands inside [-1, 1] without filling it. Min-max alone
        would stretch a dimension that only carries sensor noise (an object no demonstration touches) to the
        same [-1, 1] as the ones that matter."""
        data = torch.as_tensor(data, dtype=torch.float32).reshape(-1, data.shape[-1])
        if not torch.isfinite(data).all():
            raise ValueError(f"cannot fit normaliser '{key}': data contains NaN or inf")
        if min_range < 0:
            raise ValueError(f"min_range must be >= 0, got {min_range}")
        lo, hi = data.min(0).values, data.max(0).values
        rng = hi - lo
        const = rng < self.RANGE_EPS
        floored = ~const & (rng < min_range)
        span = torch.where(floored, torch.full_like(rng, min_range), rng)
        scale = torch.where(const, torch.ones_like(rng), 2.0 / span.clamp_min(self.RANGE_EPS))
        offset = torch.where(const, -lo, torch.where(floored, -(lo + hi) / 2 * scale, -1.0 - lo * scale))
        self._buffers[f"{key}_scale"] = scale  # (re)registers the buffer
        self._buffers[f"{key}_offset"] = offset
        return self

    def params(self, key: str) -> tuple[Tensor, Tensor]:
        """(scale, offset) of a fitted field: normalised = x * scale + offset (KeyError if never fitted)."""
        if f"{key}_scale" not in self._buffers:
            raise KeyError(f"normaliser has no statistics for '{key}' (fitted: {self.keys})")
        return getattr(self, f"{key}_scale"), getattr(self, f"{key}_offset")

    def normalize(self, key: str, x: Tensor) -> Tensor:
        scale, offset = self.params(key)
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(f"'{key}' has last dimension {x.shape[-1]}, normaliser expects {scale.shape[0]}")
        return x * scale + offset

    def unnormalize(self, key: str, x: Tensor) -> Tensor:
        scale, offset = self.params(key)
        return (x - offset) / scale

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "Normalizer":
        dims = {k[: -len("_scale")]: v.shape[0] for k, v in state.items() if k.endswith("_scale")}
        norm = cls(dims)
        norm.load_state_dict(state)
        return norm
