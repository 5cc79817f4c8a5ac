"""The deployment API's input contract, checked in one place (``Policy.predict_action`` and ``select_action``,
and whatever executes action chunks, call these).

* Low-dim observations (``"obs"``) must be finite: one NaN or inf gives NaN actions, and a chunk computed from
  it would be served for the next Ta - 1 steps too.
* Images are RGB, channels first, in 0..255: ``uint8`` (what the environments and data loaders produce), or a
  float or integer tensor with values in 0..255. A float image whose values all lie in (0, 1] is refused: it is
  almost certainly a [0, 1] image, which would be read as nearly black. Convert it with ``(img * 255)`` or pass
  uint8. An all-zero frame is the same in both conventions and accepted.
* A chunk with NaN or inf is never returned or queued (``check_chunk``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_observation(obs: dict[str, Tensor], image_keys=(), where: str = "predict_action") -> None:
    """Raise ValueError naming the key (and the first bad row) when an observation breaks the contract above."""
    low = obs["obs"]
    if not torch.isfinite(low).all():
        rows = (~torch.isfinite(low)).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"{where}: observation 'obs' holds NaN or inf (batch rows {rows[:5]}); "
                         f"refusing to compute actions from it")
    for k in image_keys:
        check_image(obs[k], k, where)


def check_image(img: Tensor, key: str, where: str = "predict_action") -> None:
    if img.dtype == torch.uint8:
        return
    if img.dtype == torch.bool or img.is_complex():
        raise ValueError(f"{where}: image {key!r} must be uint8 or a number tensor in 0..255, got dtype {img.dtype}")
    if img.numel() == 0:
        return
    if img.is_floating_point() and not torch.isfinite(img).all():
        raise ValueError(f"{where}: image {key!r} holds NaN or inf")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{where}: image {key!r} has values in [{lo:g}, {hi:g}]; images must be in 0..255 "
                         f"(uint8, or float 0..255)")
    if img.is_floating_point() and 0 < hi <= 1.0:
        raise ValueError(f"{where}: image {key!r} is float with values in [{lo:g}, {hi:g}]: that looks like a [0, 1] "
                         f"image, but images are read as 0..255. Pass uint8, or multiply by 255")


def check_chunk(chunk: Tensor, where: str = "predict_action") -> Tensor:
    """The chunk itself, or FloatingPointError when the generator produced NaN or inf (never queue it)."""
    if not torch.isfinite(chunk).all():
        raise FloatingPointError(f"{where}: the policy produced NaN or inf actions from a finite observation "
                                 f"(broken weights?); nothing was queued")
    return chunk
