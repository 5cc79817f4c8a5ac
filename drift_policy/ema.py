"""Exponential moving average of a model's weights, shared by robot and image training."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float, warmup: int = 10) -> None:
    """ema <- d * ema + (1 - d) * model for the parameters, buffers copied; d = min(decay, (1 + step) / (warmup +
    step)), a warm-up so that early weights are not averaged with the random initialisation for long. The cap
    ``decay`` is reached at step (warmup * decay - 1) / (1 - decay): warm-up 10 and decay 0.999 at ~9k steps,
    warm-up 2 at ~1k, warm-up 1 at once (no warm-up)."""
    d = min(decay, (1 + step) / (warmup + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
