"""1-D temporal convolutional U-Net with FiLM conditioning (the CNN generator of Diffusion Policy, Chi et al. 2023).

Input: a sequence shaped like the action chunk [B, T, Da] (Gaussian noise for the drift generator, a noisy
action for diffusion). Conditioning: a global vector (flattened observation features), plus a diffusion
timestep embedding when ``timestep_dim > 0``. Each residual block modulates its features with a per-channel
scale and bias predicted from the conditioning (FiLM).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Channel widths per resolution level. "large" is Diffusion Policy's low-dim Push-T net (down_dims 256/512/1024,
# 65.8M parameters with its timestep embedding); "xlarge" its image net (512/1024/2048).
UNET_PRESETS = {
    "tiny": dict(down_dims=(32, 64, 128)),
    "small": dict(down_dims=(64, 128, 256)),
    "medium": dict(down_dims=(128, 256, 512)),
    "large": dict(down_dims=(256, 512, 1024)),
    "xlarge": dict(down_dims=(512, 1024, 2048)),
}


class Conv1dBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.block1(x)                                   # [B, C, T]
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, C, 1] each
        h = self.block2(scale * h + bias)
        return h + self.skip(x)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float().unsqueeze(-1) * freqs                   # [B, half]
    return torch.cat([args.sin(), args.cos()], dim=-1)       # [B, dim]


class ConditionalUnet1D(nn.Module):
    def __init__(self, action_dim: int, global_cond_dim: int, down_dims=(64, 128, 256), kernel_size: int = 5,
                 n_groups: int = 8, timestep_dim: int = 0):
        super().__init__()
        self.timestep_dim = timestep_dim
        cond_dim = global_cond_dim
        if timestep_dim > 0:
            self.time_mlp = nn.Sequential(nn.Linear(timestep_dim, 4 * timestep_dim), nn.Mish(),
                                          nn.Linear(4 * timestep_dim, timestep_dim))
            cond_dim += timestep_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))
        block = lambda i, o: FiLMResBlock(i, o, cond_dim, kernel_size, n_groups)  # noqa: E731

        self.down = nn.ModuleList()
        for k, (c_in, c_out) in enumerate(pairs):
            last = k == len(pairs) - 1
            self.down.append(nn.ModuleList([block(c_in, c_out), block(c_out, c_out),
                                            nn.Conv1d(c_out, c_out, 3, 2, 1) if not last else nn.Identity()]))
        self.mid = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(pairs[1:]):  # every up level doubles T back; the top skip is not reused
            self.up.append(nn.ModuleList([block(2 * c_out, c_in), block(c_in, c_in),
                                          nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        """sample [B, T, Da], global_cond [B, C], timestep [B] (diffusion only) -> [B, T, Da]."""
        if (timestep is None) != (self.timestep_dim == 0):
            raise ValueError("timestep must be given exactly when the net was built with timestep_dim > 0")
        cond = global_cond
        if timestep is not None:
            cond = torch.cat([self.time_mlp(sinusoidal_embedding(timestep, self.timestep_dim)), cond], dim=-1)
        x = sample.transpose(1, 2)                           # [B, Da, T]
        skips = []
        for res1, res2, down in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)                                      # T -> T/2 except at the last level
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, up in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = res2(res1(x, cond), cond)
            x = up(x)
        return self.final(x).transpose(1, 2)                 # [B, T, Da]
