"""DiT-style one-step image generator: noise, class label and CFG scale alpha -> image (or latent).

One forward pass maps eps [B, C, H, W] to x [B, C, H, W]. Conditioning (Peebles & Xie's adaLN-zero):

    c = class_emb(y) + alpha_emb(alpha) + sum_{k<n_style} style_codebook[idx_k],  idx_k ~ U{0..codebook-1}

c modulates every block through zero-initialised (shift, scale, gate) projections. Optional in-context class
tokens (learned per class) are prepended to the patch tokens and dropped at the output.

Collapse at init: with adaLN-zero *and* a zero final projection (as in DiT), f(eps) would be the same image for
every eps, and the drift field cannot un-collapse it (see tests/test_drift.py's ``_ResidualMLP``). The blocks
keep adaLN-zero (each starts as the identity), but the head gets a unit-gain random init (std 1/sqrt(hidden)
on LayerNorm'd tokens), so the initial samples are a random linear function of the noise patches with per-pixel
std ~0.7 across samples (tested). ``noise_skip=True`` is the alternative x = eps + head(...) with a zero head
(x = eps at init); measured on the synthetic test task it learns slower (it must learn to cancel eps).

Class embeddings start at std 1 (not DiT's 0.02): with a 1-NFE generator trained for a few hundred steps on
CPU, a 0.02 class signal next to the summed style embeddings took >400 steps to become class-conditional,
std 1 took <200 (synthetic task, 1.0 vs 0.3 template agreement at 200 steps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DiT", "PRESETS", "build_dit", "sinusoidal"]

# Plain-dict size presets. "tiny"/"small" are for CPU; B/2 and L/2 follow the paper (hidden 768/1024,
# depth 12/24) for 32x32x4 latents with patch 2; "*_pixel" variants use patch 16 for 256x256 pixels.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden=96, depth=3, heads=4, mlp_ratio=3.0),
    "small": dict(hidden=192, depth=6, heads=6, mlp_ratio=4.0),
    "B/2": dict(hidden=768, depth=12, heads=12, mlp_ratio=4.0, patch=2),
    "L/2": dict(hidden=1024, depth=24, heads=16, mlp_ratio=4.0, patch=2),
    "B/16_pixel": dict(hidden=768, depth=12, heads=12, mlp_ratio=4.0, patch=16),
    "L/16_pixel": dict(hidden=1024, depth=24, heads=16, mlp_ratio=4.0, patch=16),
}


def sinusoidal(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[B] -> [B, dim] sin/cos features of a scalar (here alpha, scaled by 100 so 1..4 spans many periods)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    a = t.float()[:, None] * freqs[None]
    emb = torch.cat([a.cos(), a.sin()], dim=-1)
    return F.pad(emb, (0, dim % 2))


def sincos_2d(h: int, w: int, dim: int) -> Tensor:
    """Fixed 2-D sine-cosine position embedding [h*w, dim]."""
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    d = dim // 2
    return torch.cat([sinusoidal(ys.flatten(), d, 100.0), sinusoidal(xs.flatten(), dim - d, 100.0)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    """Pre-norm transformer block with adaLN-zero: gates start at 0, so the block starts as the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, ada_init_std: float = 0.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        m = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, m), nn.GELU(approximate="tanh"), nn.Linear(m, hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.normal_(self.ada[1].weight, std=ada_init_std) if ada_init_std > 0 else nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:          # x [B, L, H], c [B, H]
        B, L, H = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), sh1, sc1)).view(B, L, 3, self.heads, H // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, h, L, d]
        x = x + g1.unsqueeze(1) * self.proj(a.transpose(1, 2).reshape(B, L, H))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DiT(nn.Module):
    def __init__(self, *, image_size: int = 28, in_channels: int = 1, patch: int = 4, hidden: int = 96,
                 depth: int = 3, heads: int = 4, mlp_ratio: float = 3.0, num_classes: int = 10,
                 n_context_tokens: int = 4, n_style: int = 32, style_codebook: int = 64,
                 alpha_dim: int = 64, noise_skip: bool = False, head_init_std: float | None = None,
                 ada_init_std: float = 0.0, class_init_std: float = 1.0):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} must be a multiple of patch {patch}")
        if hidden % heads:
            raise ValueError(f"hidden {hidden} must be divisible by heads {heads}")
        self.image_size, self.in_channels, self.patch = image_size, in_channels, patch
        self.num_classes, self.n_style, self.style_codebook = num_classes, n_style, style_codebook
        self.n_ctx, self.noise_skip, self.alpha_dim = n_context_tokens, noise_skip, alpha_dim
        g = image_size // patch
        self.grid = g
        self.patch_embed = nn.Linear(in_channels * patch * patch, hidden)
        self.register_buffer("pos", sincos_2d(g, g, hidden), persistent=False)          # [L, H]
        self.class_emb = nn.Embedding(num_classes, hidden)
        self.alpha_mlp = nn.Sequential(nn.Linear(alpha_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.style = nn.Embedding(style_codebook, hidden) if n_style > 0 else None
        if n_context_tokens > 0:
            self.ctx = nn.Parameter(torch.zeros(num_classes, n_context_tokens, hidden))
            nn.init.normal_(self.ctx, std=0.02)
        self.blocks = nn.ModuleList(Block(hidden, heads, mlp_ratio, ada_init_std) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.head = nn.Linear(hidden, in_channels * patch * patch)
        nn.init.normal_(self.class_emb.weight, std=class_init_std)
        if self.style is not None:
            nn.init.normal_(self.style.weight, std=0.02)
        nn.init.normal_(self.ada_out[1].weight, std=ada_init_std) if ada_init_std > 0 else nn.init.zeros_(self.ada_out[1].weight)
        nn.init.zeros_(self.ada_out[1].bias)
        if noise_skip and head_init_std is None:
            nn.init.zeros_(self.head.weight)   # x = eps at init: spread exactly like the noise
        else:
            # LayerNorm'd tokens have unit variance, so std 1/sqrt(hidden) gives outputs of std ~1 per pixel
            nn.init.normal_(self.head.weight, std=head_init_std if head_init_std is not None else hidden ** -0.5)
        nn.init.zeros_(self.head.bias)

    def patchify(self, x: Tensor) -> Tensor:                       # [B, C, H, W] -> [B, L, C*p*p]
        B, C, H, W = x.shape
        p = self.patch
        return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)

    def unpatchify(self, t: Tensor) -> Tensor:                     # [B, L, C*p*p] -> [B, C, H, W]
        B, p, g, C = t.shape[0], self.patch, self.grid, self.in_channels
        return t.view(B, g, g, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, g * p, g * p)

    def cond(self, y: Tensor, alpha: Tensor, style_idx: Tensor | None) -> Tensor:
        c = self.class_emb(y) + self.alpha_mlp(sinusoidal(alpha * 100.0, self.alpha_dim))   # [B, H]
        if self.style is not None:
            c = c + self.style(style_idx).sum(1)                                              # [B, n_style, H] -> [B, H]
        return c

    def sample_style(self, B: int, device, generator: torch.Generator | None = None) -> Tensor:
        return torch.randint(0, self.style_codebook, (B, self.n_style), device=device, generator=generator)

    def forward(self, eps: Tensor, y: Tensor, alpha: Tensor | float = 1.0, style_idx: Tensor | None = None) -> Tensor:
        """eps [B, C, H, W], y [B] long, alpha [B] or scalar, style_idx [B, n_style] (random if None)."""
        B = eps.shape[0]
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=eps.device).expand(B)
        if self.style is not None and style_idx is None:
            style_idx = self.sample_style(B, eps.device)
        c = self.cond(y, alpha, style_idx)                                                    # [B, H]
        h = self.patch_embed(self.patchify(eps)) + self.pos                                   # [B, L, H]
        if self.n_ctx:
            h = torch.cat([self.ctx[y] + c.unsqueeze(1), h], dim=1)                         # [B, n_ctx + L, H]
        for blk in self.blocks:
            h = blk(h, c)
        h = h[:, self.n_ctx:]
        sh, sc = self.ada_out(c).chunk(2, dim=-1)
        out = self.unpatchify(self.head(modulate(self.norm_out(h), sh, sc)))                  # [B, C, H, W]
        return eps + out if self.noise_skip else out


def build_dit(preset: str = "tiny", **overrides) -> DiT:
    if preset not in PRESETS:
        raise ValueError(f"unknown DiT preset {preset!r}; choose from {sorted(PRESETS)}")
    return DiT(**{**PRESETS[preset], **overrides})
