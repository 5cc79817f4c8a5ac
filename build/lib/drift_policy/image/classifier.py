"""A small CNN classifier trained here; used only for evaluation (label agreement, feature-space FD/KID/PR).

It is trained supervised on the training split and never seen by the generator (whose drift features come
from the separate self-supervised encoder), so agreement with it is not gamed by the training loss.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallCNN", "train_classifier", "accuracy"]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 24, feat_dim: int = 128):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2),     # 14x14
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * w, feat_dim), nn.ReLU())
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:                      # [B, C, H, W] -> [B, feat_dim]
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    return correct / len(x)


def train_classifier(x: Tensor, y: Tensor, *, epochs: float = 2.0, minutes: float = 3.0, batch: int = 128,
                     lr: float = 2e-3, seed: int = 0, num_classes: int = 10, log=print) -> SmallCNN:
    """Adam with cosine decay, random horizontal flips + 2-pixel shifts; stops at ``epochs`` or ``minutes``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(x.shape[1], num_classes)
    steps = int(epochs * len(x) / batch)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    model.train()
    for s in range(steps):
        if time.time() - t0 > minutes * 60:
            log(f"classifier: time budget hit at step {s}/{steps}")
            break
        idx = torch.randint(0, len(x), (batch,), generator=g)
        xb = x[idx]
        if torch.rand(1, generator=g).item() < 0.5:
            xb = xb.flip(-1)
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        xb = torch.roll(xb, (dy, dx), (-2, -1))
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if s % 200 == 0:
            log(f"classifier step {s}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    return model.eval()
