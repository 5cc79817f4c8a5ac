"""Exponential moving average of a model's weights, shared by robot and image training."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """ema <- d * ema + (1 - d) * model for the parameters, buffers copied; d = min(decay, (1 + step) / (10 +
    step)), a warm-up so that early weights are not averaged with the random initialisation for long."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
