"""Push-T data loading, validation, windowing and normalisation."""

import numpy as np
import pytest
import torch
import zarr

from drift_policy.data.pusht import download_pusht, load_pusht_lowdim, make_pusht_windows
from drift_policy.data.windows import sequence_indices, split_episodes
from drift_policy.errors import DatasetError
from drift_policy.normalizer import Normalizer


def test_real_store_loads(pusht_zarr):
    d = load_pusht_lowdim(pusht_zarr)
    assert d["obs"].shape == (25650, 20) and d["action"].shape == (25650, 2)
    assert len(d["episode_ends"]) == 206 and d["episode_ends"][-1] == 25650
    # obs = 9 keypoints (x, y) then agent position (state[:, :2])
    state = np.asarray(zarr.open(str(pusht_zarr), "r")["data/state"][:10])
    np.testing.assert_allclose(d["obs"][:10, 18:], state[:, :2])
    assert 0 <= d["action"].min() and d["action"].max() <= 512


def test_sequence_padding_matches_diffusion_policy():
    ends = np.array([5, 12])
    idx = sequence_indices(ends, np.array([0, 1]), horizon=4, pad_before=1, pad_after=2)
    # episode 0 covers 0..4: windows start at -1 .. 5-4+2=3 -> 5 windows, clipped to the episode
    ep0 = idx[:5]
    np.testing.assert_array_equal(ep0[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(ep0[-1], [3, 4, 4, 4])
    assert idx.min() >= 0 and idx.max() <= 11
    assert not np.any((idx[:5] >= 5))          # no window of episode 0 reaches into episode 1
    assert np.all(idx[5:] >= 5)
    assert len(idx) == 5 + 7                    # episode 1 covers 5..11: starts 4..10 -> 7 windows


def test_split_is_by_episode_and_disjoint():
    tr, va = split_episodes(206, 0.02, seed=42)
    assert len(va) == 4 and len(tr) == 202 and not set(tr) & set(va)
    tr2, va2 = split_episodes(206, 0.02, seed=42)
    np.testing.assert_array_equal(va, va2)
    with pytest.raises(ValueError):
        split_episodes(10, 1.5, 0)


def test_windows_from_real_data(pusht_zarr):
    train, val = make_pusht_windows(pusht_zarr, horizon=16, n_obs_steps=2, n_action_steps=8)
    assert train.steps("obs").shape[1:] == (20,) and train.index.shape[1:] == (16,)
    assert val is not None and len(val) < len(train) / 20
    b = train.sample(5, torch.Generator().manual_seed(0))
    assert b["obs"].shape == (5, 2, 20) and b["action"].shape == (5, 16, 2)


def _write_store(path, n=30, ends=(10, 30), nan=False, drop=None, bad_shape=False):
    root = zarr.open(str(path), mode="w")
    state = np.random.rand(n, 5).astype(np.float32)
    if nan:
        state[3, 1] = np.nan
    arrays = {"state": state, "keypoint": np.random.rand(n, 9, 2).astype(np.float32),
              "action": np.random.rand(n, 3 if bad_shape else 2).astype(np.float32)}
    for k, v in arrays.items():
        if k != drop:
            root.create_dataset(f"data/{k}", data=v)
    root.create_dataset("meta/episode_ends", data=np.array(ends, dtype=np.int64))
    return path


@pytest.mark.parametrize("kwargs,match", [
    (dict(drop="keypoint"), "missing array 'keypoint'"),
    (dict(bad_shape=True), "'data/action' has shape"),
    (dict(nan=True), "'data/state' has NaN"),
    (dict(ends=(20, 10)), "strictly increasing"),
    (dict(ends=(10, 25)), "ends at 25 but the data has 30"),
])
def test_bad_stores_get_clear_errors(tmp_path, kwargs, match):
    p = _write_store(tmp_path / "bad.zarr", **kwargs)
    with pytest.raises(DatasetError, match=match) as e:
        load_pusht_lowdim(p)
    assert str(p) in str(e.value)  # the message names the file


def test_missing_store_and_offline_download(tmp_path, monkeypatch):
    import urllib.error

    with pytest.raises(DatasetError, match="not found"):
        load_pusht_lowdim(tmp_path / "nope.zarr")

    # Offline, whatever this machine's network: the download fails with a message that says what to do.
    def offline(*a, **k):
        raise urllib.error.URLError("no network (monkeypatched)")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(RuntimeError, match="could not download .*copy pusht_cchi_v7_replay.zarr"):
        download_pusht(tmp_path)
    assert not any(tmp_path.rglob("*.part"))  # nothing half-written is left behind


def test_download_unpacks_the_archive(tmp_path, monkeypatch):
    """The download path with a fake server: the zip is fetched via .part and unpacked into the data root."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pusht/pusht_cchi_v7_replay.zarr/.zgroup", '{"zarr_format": 2}')
    monkeypatch.setattr("urllib.request.urlopen", lambda url, timeout=None: io.BytesIO(buf.getvalue()))
    target = download_pusht(tmp_path)
    assert target == tmp_path / "pusht" / "pusht_cchi_v7_replay.zarr" and (target / ".zgroup").exists()
    assert not any(tmp_path.rglob("*.part"))


def test_normalizer_roundtrip_range_and_errors():
    x = torch.tensor([[0.0, 5.0, 1.0], [10.0, 7.0, 1.0], [5.0, 6.0, 1.0]])
    n = Normalizer().fit("obs", x)
    y = n.normalize("obs", x)
    assert y[:, :2].min() == -1 and y[:, :2].max() == 1
    assert torch.all(y[:, 2] == 0)                           # constant dim: centred, not blown up
    torch.testing.assert_close(n.unnormalize("obs", y), x)
    with pytest.raises(KeyError, match="no statistics for 'action'"):
        n.normalize("action", x)
    with pytest.raises(ValueError, match="last dimension"):
        n.normalize("obs", x[:, :2])
    with pytest.raises(ValueError, match="NaN"):
        Normalizer().fit("obs", torch.tensor([[float("nan")]]))
    n2 = Normalizer.from_state_dict(n.state_dict())
    torch.testing.assert_close(n2.normalize("obs", x), y)


def test_normalizer_min_range_keeps_a_jittering_dimension_small_and_centred():
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.rand(500, generator=g) * 2.0,                 # moves 2 units: min-max as before
                     0.3 + 0.004 * torch.rand(500, generator=g),         # jitters 0.004 around 0.302
                     torch.full((500,), 7.0)], dim=1)                    # constant
    plain, floored = Normalizer().fit("obs", x), Normalizer().fit("obs", x, min_range=0.1)
    y = floored.normalize("obs", x)
    torch.testing.assert_close(y[:, 0], plain.normalize("obs", x)[:, 0])
    assert plain.normalize("obs", x)[:, 1].abs().max() == pytest.approx(1.0)        # min-max stretches the jitter
    lo, hi = x[:, 1].min(), x[:, 1].max()
    assert y[:, 1].abs().max() <= (hi - lo) / 0.1 + 1e-6 < 0.05                     # ... the floor does not
    assert ((y[:, 1].max() + y[:, 1].min()) / 2).abs() < 1e-5                       # centred on its midpoint
    assert torch.all(y[:, 2] == 0)
    torch.testing.assert_close(floored.unnormalize("obs", y), x)
    with pytest.raises(ValueError, match="min_range"):
        Normalizer().fit("obs", x, min_range=-1.0)
