"""Time-series transformer generator (the transformer backbone of Diffusion Policy, Chi et al. 2023).

Action-chunk tokens (one per step, from the input sequence: noise for the drift generator, a noisy action for
diffusion) self-attend and cross-attend to observation tokens (one per observation step, plus a diffusion
timestep token when ``timestep_dim > 0``). ``causal=True`` masks each action token's self-attention to earlier
steps and its cross-attention to observation tokens up to its own time, as in Diffusion Policy.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .unet1d import sinusoidal_embedding

# Diffusion Policy's simulation setting is 8 layers, 4 heads, width 256 (about 9M parameters).
TRANSFORMER_PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_emb=64),
    "small": dict(n_layer=8, n_head=4, n_emb=256),
    "medium": dict(n_layer=12, n_head=8, n_emb=512),
}


class TimeSeriesTransformer(nn.Module):
    def __init__(self, action_dim: int, global_cond_dim: int, n_obs_steps: int, horizon: int, n_layer: int = 8,
                 n_head: int = 4, n_emb: int = 256, p_drop: float = 0.0, causal: bool = True, timestep_dim: int = 0):
        super().__init__()
        if global_cond_dim % n_obs_steps:
            raise ValueError(f"global_cond_dim {global_cond_dim} is not n_obs_steps={n_obs_steps} observation tokens")
        self.n_obs_steps, self.horizon, self.timestep_dim = n_obs_steps, horizon, timestep_dim
        self.obs_dim = global_cond_dim // n_obs_steps
        n_cond = n_obs_steps + (1 if timestep_dim else 0)
        self.action_in = nn.Linear(action_dim, n_emb)
        self.obs_in = nn.Linear(self.obs_dim, n_emb)
        if timestep_dim:
            self.time_in = nn.Linear(timestep_dim, n_emb)
        self.action_pos = nn.Parameter(torch.zeros(1, horizon, n_emb))
        self.cond_pos = nn.Parameter(torch.zeros(1, n_cond, n_emb))
        nn.init.normal_(self.action_pos, std=0.02)
        nn.init.normal_(self.cond_pos, std=0.02)
        self.cond_encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        layer = nn.TransformerDecoderLayer(n_emb, n_head, 4 * n_emb, p_drop, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, n_layer)
        self.norm = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)
        if causal:
            t = torch.arange(horizon)
            self.register_buffer("self_mask", t[None, :] > t[:, None], persistent=False)   # [Tp, Tp], True = blocked
            # action step t (time t in the chunk) sees the timestep token and observations at times <= t
            obs_t = torch.arange(n_obs_steps)
            blocked = obs_t[None, :] > t[:, None]                                           # [Tp, To]
            if timestep_dim:
                blocked = torch.cat([torch.zeros(horizon, 1, dtype=torch.bool), blocked], dim=1)
            self.register_buffer("cross_mask", blocked, persistent=False)                  # [Tp, n_cond]
        else:
            self.self_mask = self.cross_mask = None

    def forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        """sample [B, Tp, Da], global_cond [B, To * obs_dim], timestep [B] (diffusion only) -> [B, Tp, Da]."""
        if (timestep is None) != (self.timestep_dim == 0):
            raise ValueError("timestep must be given exactly when the net was built with timestep_dim > 0")
        B = sample.shape[0]
        cond = self.obs_in(global_cond.view(B, self.n_obs_steps, self.obs_dim))          # [B, To, E]
        if timestep is not None:
            t_tok = self.time_in(sinusoidal_embedding(timestep.expand(B), self.timestep_dim)).unsqueeze(1)
            cond = torch.cat([t_tok, cond], dim=1)                                       # [B, 1 + To, E]
        memory = self.cond_encoder(cond + self.cond_pos)                                 # [B, n_cond, E]
        x = self.action_in(sample) + self.action_pos                                     # [B, Tp, E]
        x = self.decoder(x, memory, tgt_mask=self.self_mask, memory_mask=self.cross_mask)
        return self.head(self.norm(x))                                                   # [B, Tp, Da]
