"""Latent mode: the generator works on autoencoder latents; samples are decoded for viewing and evaluation.

Two codecs with one interface (``encode_all``, ``decode``, ``latent_shape``):

* ``KLCodec``: a diffusers ``AutoencoderKL`` (e.g. SD-VAE ft-EMA, as in the paper) loaded from a LOCAL
  folder with ``local_files_only=True``; nothing is downloaded. Latents are scaled by the VAE's
  ``scaling_factor`` (0.18215 for SD-VAE) so they have roughly unit variance.
* ``TinyAutoencoder``: a small conv autoencoder (28x28x1 -> 7x7x4) trained here, to exercise latent mode on CPU.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_checkpoint, save_checkpoint

__all__ = ["TinyAutoencoder", "train_tiny_autoencoder", "KLCodec", "TinyCodec", "make_codec"]


class TinyAutoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 32):
        super().__init__()
        w = width
        self.enc = nn.Sequential(nn.Conv2d(in_channels, w, 3, 2, 1), nn.SiLU(),          # H/2
                                 nn.Conv2d(w, 2 * w, 3, 2, 1), nn.SiLU(),                 # H/4
                                 nn.Conv2d(2 * w, latent_channels, 3, 1, 1))
        self.dec = nn.Sequential(nn.Conv2d(latent_channels, 2 * w, 3, 1, 1), nn.SiLU(),
                                 nn.Upsample(scale_factor=2), nn.Conv2d(2 * w, w, 3, 1, 1), nn.SiLU(),
                                 nn.Upsample(scale_factor=2), nn.Conv2d(w, in_channels, 3, 1, 1))

    def encode(self, x: Tensor) -> Tensor:                        # [B, C, H, W] -> [B, 4, H/4, W/4]
        return self.enc(x)

    def decode(self, z: Tensor) -> Tensor:                        # [B, 4, H/4, W/4] -> [B, C, H, W] in [-1, 1]
        return torch.tanh(self.dec(z))


def train_tiny_autoencoder(x: Tensor, *, minutes: float = 3.0, max_steps: int = 10 ** 9, batch: int = 128,
                           lr: float = 2e-3, seed: int = 0, log=print) -> tuple[TinyAutoencoder, dict]:
    """Reconstruction MSE with a small latent L2 penalty (keeps the latent scale bounded)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ae = TinyAutoencoder(x.shape[1])
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    t0, step, losses = time.time(), 0, []
    while step < max_steps and (minutes <= 0 or time.time() - t0 < minutes * 60):   # minutes <= 0: steps only
        xb = x[torch.randint(0, len(x), (batch,), generator=g)]
        z = ae.encode(xb)
        loss = F.mse_loss(ae.decode(z), xb) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and step % 200 == 0:
            log(f"tiny AE step {step} loss {loss.item():.4f}")
        step += 1
    return ae.eval(), {"steps": step, "loss_first": losses[0] if losses else None,
                       "loss_last": sum(losses[-20:]) / max(len(losses[-20:]), 1)}


class _Codec:
    scale: float = 1.0

    @torch.no_grad()
    def encode_all(self, x: Tensor, batch: int = 256) -> Tensor:
        return torch.cat([self._encode(x[i:i + batch]) for i in range(0, len(x), batch)]) * self.scale

    @torch.no_grad()
    def decode(self, z: Tensor, batch: int = 256) -> Tensor:
        return torch.cat([self._decode(z[i:i + batch] / self.scale) for i in range(0, len(z), batch)]).clamp(-1, 1)


class TinyCodec(_Codec):
    def __init__(self, ae: TinyAutoencoder, scale: float):
        self.ae, self.scale = ae.eval(), scale

    def _encode(self, x):
        return self.ae.encode(x)

    def _decode(self, z):
        return self.ae.decode(z)


class KLCodec(_Codec):
    """diffusers AutoencoderKL from a local folder (config.json + weights); fails clearly if it is missing."""

    def __init__(self, path: str | Path | None, scale: float | None = None, device="cpu"):
        if not path or not Path(path).is_dir():
            raise FileNotFoundError(
                f"latent.kind=kl needs latent.path = a local folder with a diffusers AutoencoderKL "
                f"(config.json + diffusion_pytorch_model.safetensors), got {path!r}. Nothing is downloaded here; "
                f"fetch e.g. stabilityai/sd-vae-ft-ema on a machine with internet and copy the folder over.")
        try:
            from diffusers import AutoencoderKL
        except ImportError as e:
            raise ImportError("latent.kind=kl needs diffusers: pip install 'drift-policy[diffusion]'") from e
        self.vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.scale = float(scale if scale is not None else getattr(self.vae.config, "scaling_factor", 0.18215))
        self.device = device

    def _encode(self, x):
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.vae.encode(x.to(self.device)).latent_dist.mean.cpu()

    def _decode(self, z):
        return self.vae.decode(z.to(self.device)).sample.cpu()


def make_codec(cfg: dict, x_train: Tensor, log=print) -> _Codec:
    lat = cfg["latent"]
    if lat["kind"] == "kl":
        return KLCodec(lat["path"], lat["scale"])
    if lat["kind"] == "tiny":
        path = Path(lat["path"] or "runs/image/tiny_ae.pt")          # relative to the working directory
        ae = TinyAutoencoder(x_train.shape[1])
        if path.exists():
            ck = load_checkpoint(path)
            ae.load_state_dict(ck["ae"])
            scale = float(ck["scale"])
        else:
            ae, stats = train_tiny_autoencoder(x_train, minutes=lat["tiny_minutes"], log=log)
            with torch.no_grad():
                scale = float(1.0 / ae.encode(x_train[:2000]).std().clamp_min(1e-6))
            save_checkpoint({"ae": ae.state_dict(), "scale": torch.tensor(scale)}, path)
            log(f"tiny AE: {stats}, latent scale {scale:.3f} -> {path}")
        return TinyCodec(ae, float(lat["scale"] or scale))
    raise ValueError(f"unknown latent.kind {lat['kind']!r} (none | tiny | kl)")
