"""Feature encoder for the drift loss: a small ResNet with GroupNorm, pretrained here as a masked autoencoder.

The drift field is computed in the encoder's feature space (paper Sec. 4), at several stages and with several
summaries of each stage's map [B, C, H, W] (see ``feature_sets``):

    loc       every spatial location's C-vector (one drift problem per location)
    mean/std  global mean and std over locations                                   [B, C]
    p2m/p2s   2x2-patch means / stds, one drift problem per patch                  [B, H/2*W/2, C]
    p4m/p4s   4x4-patch means / stds

plus the raw generator output. Self-supervision: random 4x4 pixel patches are masked out (set to 0) and a light
decoder reconstructs the image; the loss is the MSE on masked pixels (MAE-style, He et al. 2022, but
convolutional, so masking is done on the input instead of dropping tokens).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResNetEncoder", "MAEDecoder", "MAE", "mae_optimizer", "feature_sets", "pretrain_mae", "random_patch_mask"]


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.n1 = _gn(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.n2 = _gn(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride) if (stride != 1 or cin != cout) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.n1(self.c1(x)))
        return F.silu(self.n2(self.c2(h)) + self.skip(x))


class ResNetEncoder(nn.Module):
    """Stages of ResBlocks; stage i > 0 halves the resolution. ``forward`` returns every stage's map."""

    def __init__(self, in_channels: int = 1, widths=(16, 32, 64), blocks_per_stage=1):
        """``blocks_per_stage``: one count for every stage, or one per stage (ResNet-34: [3, 4, 6, 3])."""
        super().__init__()
        self.in_channels, self.widths = in_channels, tuple(widths)
        blocks = [blocks_per_stage] * len(widths) if isinstance(blocks_per_stage, int) else list(blocks_per_stage)
        if len(blocks) != len(widths) or min(blocks) < 1:
            raise ValueError(f"blocks per stage {blocks_per_stage} must be >= 1, one per stage of widths {widths}")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1)
        stages, cin = [], widths[0]
        for i, (w, nb) in enumerate(zip(widths, blocks)):
            layers = [ResBlock(cin, w, 1 if i == 0 else 2)]
            layers += [ResBlock(w, w, 1) for _ in range(nb - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:                  # x [B, C, H, W] -> [[B, w_i, H/2^i, W/2^i]]
        h = self.stem(x)
        out = []
        for s in self.stages:
            h = s(h)
            out.append(h)
        return out


class MAEDecoder(nn.Module):
    """Upsamples the last stage back to the input resolution (used only for pretraining)."""

    def __init__(self, widths=(16, 32, 64), out_channels: int = 1):
        super().__init__()
        ups = []
        for cin, cout in zip(widths[::-1][:-1], widths[::-1][1:]):
            ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cin, cout, 3, 1, 1),
                                     _gn(cout), nn.SiLU()))
        self.ups = nn.ModuleList(ups)
        self.out = nn.Conv2d(widths[0], out_channels, 3, 1, 1)

    def forward(self, feats: list[Tensor], size) -> Tensor:
        h = feats[-1]
        for i, up in enumerate(self.ups):
            h = up(h)
            skip = feats[-2 - i]
            h = h[..., : skip.shape[-2], : skip.shape[-1]]   # odd sizes (7 -> 14 -> 28) line up after cropping
        return F.interpolate(self.out(h), size=size, mode="nearest") if h.shape[-2:] != size else self.out(h)


def random_patch_mask(B: int, H: int, W: int, patch: int, ratio: float, generator=None, device=None) -> Tensor:
    """[B, 1, H, W] with 1 = masked; a fraction ``ratio`` of patch x patch cells is masked per image."""
    gh, gw = -(-H // patch), -(-W // patch)
    scores = torch.rand(B, gh * gw, generator=generator, device=device)
    k = int(round(ratio * gh * gw))
    m = torch.zeros(B, gh * gw, device=device)
    m.scatter_(1, scores.argsort(dim=1)[:, :k], 1.0)
    m = m.view(B, 1, gh, gw).repeat_interleave(patch, 2).repeat_interleave(patch, 3)
    return m[..., :H, :W]


def _patch_stats(f: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """Non-overlapping k x k patch mean and std of [B, C, H, W] -> two [B, (H//k)*(W//k), C] (None if too small)."""
    if f.shape[-1] < k or f.shape[-2] < k:
        return None
    m = F.avg_pool2d(f, k)
    s = (F.avg_pool2d(f * f, k) - m * m).clamp_min(1e-6).sqrt()
    return m.flatten(2).transpose(1, 2), s.flatten(2).transpose(1, 2)


def feature_sets(maps: list[Tensor], stages=(0, 1, 2), loc_stages=(2,), patches=(2, 4),
                 max_groups: int | None = 64, global_stats: bool = True) -> dict[str, Tensor]:
    """Drift features from encoder maps. Every value is [B, K, D]: K independent drift problems of dim D.

    ``stages`` select which maps give global mean/std and patch stats; ``loc_stages`` which give per-location
    vectors. Patch-stat and per-location sets with more than ``max_groups`` drift problems per image are
    skipped (CPU budget: e.g. 2x2 patches of a 28x28 map are 196 problems); None keeps all.
    """
    out: dict[str, Tensor] = {}
    for i in stages:
        f = maps[i]                                                       # [B, C, H, W]
        if global_stats:
            out[f"s{i}.mean"] = f.mean(dim=(2, 3)).unsqueeze(1)           # [B, 1, C]
            out[f"s{i}.std"] = f.flatten(2).std(dim=2).unsqueeze(1)       # [B, 1, C]
        for k in patches:
            ps = _patch_stats(f, k)
            if ps is not None and (max_groups is None or ps[0].shape[1] <= max_groups):
                out[f"s{i}.p{k}m"], out[f"s{i}.p{k}s"] = ps
    for i in loc_stages:
        if max_groups is None or maps[i].shape[-1] * maps[i].shape[-2] <= max_groups:
            out[f"s{i}.loc"] = maps[i].flatten(2).transpose(1, 2)         # [B, H*W, C]
    return out


class MAE(nn.Module):
    """Encoder + decoder; ``forward(x, mask)`` is the loss (mean squared error on the masked pixels). One module, so
    that DistributedDataParallel sees the whole forward (``mae.py`` pretrains it under torchrun)."""

    def __init__(self, encoder: ResNetEncoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = MAEDecoder(encoder.widths, encoder.in_channels)

    def forward(self, x: Tensor, m: Tensor) -> Tensor:
        rec = self.decoder(self.encoder(x * (1 - m)), x.shape[-2:])
        return ((rec - x) ** 2 * m).sum() / (m.sum() * x.shape[1]).clamp_min(1)


def mae_optimizer(mae: MAE, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(mae.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)


def pretrain_mae(encoder: ResNetEncoder, images, *, minutes: float = 3.0, max_steps: int = 100000,
                 batch: int = 128, lr: float = 2e-3, mask_ratio: float = 0.5, patch: int = 4, seed: int = 0,
                 log_every: int = 100, log=print) -> dict:
    """Masked-reconstruction pretraining of ``encoder`` for a wall-clock budget, in this process (``mae.py``: the
    same under torchrun). ``images``: [N, C, H, W] in memory, or a callable ``(n, generator) -> [n, C, H, W]``
    (random items of an on-disk store)."""
    gen = torch.Generator().manual_seed(seed)
    mae = MAE(encoder)
    opt = mae_optimizer(mae, lr)
    t0, step, hist = time.time(), 0, []
    mae.train()
    while step < max_steps and (minutes <= 0 or time.time() - t0 < minutes * 60):   # minutes <= 0: steps only
        x = images(batch, gen) if callable(images) else images[torch.randint(0, len(images), (batch,), generator=gen)]
        m = random_patch_mask(batch, x.shape[-2], x.shape[-1], patch, mask_ratio, generator=gen)
        loss = mae(x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(loss.item())
        if log and step % log_every == 0:
            log(f"mae step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        step += 1
    encoder.eval()
    tail = hist[-50:]
    return {"steps": step, "seconds": time.time() - t0, "loss_first": hist[0] if hist else None,
            "loss_last50": sum(tail) / max(len(tail), 1)}
