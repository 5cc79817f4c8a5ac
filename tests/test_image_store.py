"""The on-disk store (issue 43 item 1): encode a fake ImageNet folder with a tiny random AutoencoderKL, resume an
interrupted encode, stream it through the DistributedSampler loader, train on it."""
import json

import numpy as np
import pytest
import torch

from drift_policy.errors import ConfigError, DatasetError
from drift_policy.image.store import ShardStore, StoreStream, center_crop, encode_folder, list_image_folder, read_index


def make_fake_imagenet(root, classes=("n01", "n02"), per_class=5, size=(20, 24), seed=0):
    """root/<wnid>/<i>.png of random RGB (non-square: exercises the center crop); later classes are brighter."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            a = (rng.integers(0, 128, (*size, 3)) + 30 * ci).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"img{i}.png")
    return root


def make_tiny_vae(path):
    """A randomly initialised diffusers AutoencoderKL (16x16x3 -> 8x8x4) saved as a local folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    return make_fake_imagenet(root / "train"), make_tiny_vae(root / "vae")


def test_center_crop_is_adm_preprocessing():
    from PIL import Image

    a = np.zeros((40, 100, 3), np.uint8)
    a[:, 25:75] = 255                                          # a bright band around the middle 40 columns
    out = center_crop(Image.fromarray(a), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert out.min() == 255                                    # the center 40x40 square lies inside the band
    a[:, 48:52] = 0                                            # a dark stripe at the center stays at the center
    out = center_crop(Image.fromarray(a), 16)[0, :, 0]
    assert out[7:9].max() < 128 and out[:4].min() == 255 and out[-4:].min() == 255
    big = center_crop(Image.fromarray(np.full((130, 300, 3), 7, np.uint8)), 32)   # box-halved twice first
    assert big.shape == (32, 32, 3) and (big == 7).all()


def test_pixel_store_holds_flipped_copies_and_labels(tmp_path, fake):
    src, _ = fake
    idx = encode_folder(src, tmp_path / "pix", kind="pixel", size=16, shard_size=3, batch=2, log=lambda *a: None)
    files, classes = list_image_folder(src)
    assert idx["count"] == 2 * len(files) == 20 and idx["shape"] == [3, 16, 16] and idx["dtype"] == "uint8"
    assert [s["count"] for s in idx["shards"]] == [6, 6, 6, 2] and classes == ["n01", "n02"]
    store = ShardStore(tmp_path / "pix")
    x = torch.stack([store[i][0] for i in range(len(store))])
    y = torch.tensor([store[i][1] for i in range(len(store))])
    assert torch.bincount(y).tolist() == [10, 10]
    # every image is there as itself and as its mirror
    keys = {x[i].numpy().tobytes() for i in range(len(x))}
    assert all(x[i].flip(-1).numpy().tobytes() in keys for i in range(len(x)))
    assert store.to_model(x).min() >= -1 and store.to_model(x).max() <= 1


def test_latent_store_encode_resume_and_settings_guard(tmp_path, fake):
    src, vae = fake
    out = tmp_path / "lat"
    idx = encode_folder(src, out, vae=vae, size=16, shard_size=4, batch=4, log=lambda *a: None)
    assert idx["shape"] == [4, 8, 8] and idx["dtype"] == "float16" and idx["count"] == 20
    assert idx["scale"] == pytest.approx(0.18215) and len(idx["shards"]) == 3
    first = {p.name: p.read_bytes() for p in out.glob("shard_*.x.npy")}
    # an interrupted encode: shard 1 lost its marker (killed after writing), shard 2 holds a truncated array
    (out / "shard_000001.json").unlink()
    (out / "shard_000002.x.npy").write_bytes(b"\x93NUMPY garbage")
    (out / "index.json").unlink()
    marker0 = (out / "shard_000000.json").stat().st_mtime_ns
    lines = []
    encode_folder(src, out, vae=vae, size=16, shard_size=4, batch=4, log=lines.append)
    assert "2 shards encoded, 1 already finished" in lines[-1]
    assert (out / "shard_000000.json").stat().st_mtime_ns == marker0          # finished shard not redone
    assert {p.name: p.read_bytes() for p in out.glob("shard_*.x.npy")} == first   # redone bit-identically
    with pytest.raises(ConfigError, match="other settings.*size"):
        encode_folder(src, out, vae=vae, size=32, shard_size=4, log=lambda *a: None)


def test_encode_fails_clearly_without_a_local_vae(tmp_path, fake):
    src, _ = fake
    with pytest.raises(FileNotFoundError, match="needs vae = a local diffusers AutoencoderKL.*nothing is downloaded"):
        encode_folder(src, tmp_path / "x", vae=tmp_path / "no-such-vae", size=16)
    assert not (tmp_path / "x").exists()                         # failed before writing anything
    with pytest.raises(DatasetError, match="not a finished image store"):
        read_index(tmp_path)


def test_stream_ranks_split_each_epoch_and_resume_mid_epoch(tmp_path, fake):
    src, _ = fake
    encode_folder(src, tmp_path / "pix", kind="pixel", size=16, shard_size=3, log=lambda *a: None)
    store = ShardStore(tmp_path / "pix")
    ident = lambda x: {t.numpy().tobytes() for t in x}
    seen = []
    for rank in (0, 1):
        s = StoreStream(store, batch=5, rank=rank, world=2, seed=3)
        seen.append(ident(torch.cat([s.next()[0] for _ in range(2)])))            # one epoch: 2 batches of 5
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 20             # disjoint, together the whole set
    a = StoreStream(store, batch=4, seed=3)
    for _ in range(7):                                                          # into the 2nd epoch (5 a epoch)
        a.next()
    b = StoreStream(store, batch=4, seed=3)
    b.load_state(a.state())
    for _ in range(6):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        StoreStream(store, batch=11, world=2)


def _store_cfg(tmp_path, store, vae, *extra):
    from drift_policy.image.config import load_config

    return load_config(None, [
        "data.name=store", f"data.root={store}", "data.num_classes=2", "data.image_size=16", "latent.kind=kl",
        f"latent.path={vae}", "model.patch=2", "model.hidden=32", "model.depth=1", "model.heads=2",
        "model.n_context_tokens=2", "encoder.widths=[8,16]", "encoder.stages=[0]", "encoder.loc_stages=[1]",
        "encoder.mae_max_steps=3", "encoder.mae_minutes=0", "encoder.mae_batch=8", "encoder.input_x2=true",
        f"encoder.path={tmp_path / 'enc.pt'}", "drift.labels_per_step=2", "drift.n_gen=4", "drift.n_pos=4",
        "drift.n_unc=4", "drift.per_class_queue=8", "drift.global_queue=16", "drift.push_per_step=4",
        "train.minutes=0", "train.threads=1", f"train.out={tmp_path / 'run'}", *extra])


def test_training_streams_the_store_and_resumes_bit_exactly(tmp_path, fake):
    from drift_policy.image.train import load_generator, train

    src, vae = fake
    encode_folder(src, tmp_path / "lat", vae=vae, size=16, shard_size=4, log=lambda *a: None)
    quiet = lambda *a: None
    straight = train(_store_cfg(tmp_path, tmp_path / "lat", vae, "train.steps=6"), log=quiet)
    assert straight["steps"] == 6 and (tmp_path / "enc.pt").exists()      # MAE pretrained on store draws
    cut = tmp_path / "cut"
    first = train(_store_cfg(tmp_path, tmp_path / "lat", vae, "train.steps=6", "train.max_steps=3",
                             f"train.out={cut}"), log=quiet)
    assert first["steps"] == 3
    rest = train(_store_cfg(tmp_path, tmp_path / "lat", vae, "train.steps=6", "train.resume=true",
                            f"train.out={cut}"), log=quiet)
    assert rest["steps"] == 6
    for a, b in ((straight["model"], rest["model"]), (straight["ema"], rest["ema"])):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [json.loads(x)["step"] for x in (cut / "history.jsonl").read_text().splitlines()]
    assert steps == list(range(6))
    model, cfg = load_generator(cut)
    assert (model.in_channels, model.image_size) == (4, 8)
    with pytest.raises(ConfigError, match="holds latents: set latent.kind=kl"):
        train(_store_cfg(tmp_path, tmp_path / "lat", vae, "latent.kind=none"), log=quiet)
