"""LeRobotDataset v3.0 reader on a genuine fixture (3 Push-T episodes written by the official writer, see
tests/fixtures/lerobot/make_fixture.py): feature mapping, windows, statistics, failure modes, hub, training."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

pytest.importorskip("pyarrow", reason="the [lerobot] extra (pyarrow) is not installed")
pytest.importorskip("av", reason="the [lerobot] extra (av) is not installed")

from drift_policy.data.lerobot import DatasetError, camera_name, load_lerobot, read_meta, resolve_dataset, select_features  # noqa: E402
from drift_policy.data.pusht import load_pusht_lowdim  # noqa: E402
from drift_policy.data.windows import make_windows  # noqa: E402
from drift_policy.normalizer import Normalizer  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "lerobot" / "pusht3"
N_EPS, N = 3, 420            # the fixture holds the zarr's first 3 episodes (161 + 118 + 141 frames)


@pytest.fixture(scope="module")
def data():
    return load_lerobot(FIXTURE)


@pytest.fixture(scope="module")
def zarr3(pusht_zarr):
    """The same 3 episodes from the zarr store, through the zarr loaders."""
    d = load_pusht_lowdim(pusht_zarr)
    return {"obs": d["obs"][:N], "action": d["action"][:N], "episode_ends": d["episode_ends"][:N_EPS]}


def copy_fixture(tmp_path) -> Path:
    dst = tmp_path / "pusht3"
    shutil.copytree(FIXTURE, dst)
    return dst


def test_features_are_mapped():
    meta = read_meta(FIXTURE)
    assert meta.fps == 10 and meta.n_episodes == N_EPS
    obs, cams, act = select_features(meta)
    # default: environment_state then state (Diffusion Policy's keypoints + agent position), every camera
    assert obs == ["observation.environment_state", "observation.state"] and act == "action"
    assert cams == ["observation.image"] and camera_name(cams[0]) == "image"
    assert meta.image_shape("observation.image") == (3, 96, 96)
    # overrides are checked against the features and name the key and the file
    assert select_features(meta, ["observation.state"], [])[:2] == (["observation.state"], [])
    with pytest.raises(DatasetError, match=r"'observation.velocity' not in the dataset") as e:
        select_features(meta, ["observation.velocity"])
    assert "info.json" in str(e.value)
    with pytest.raises(DatasetError, match="camera 'observation.images.top' not in the dataset"):
        select_features(meta, image_keys=["observation.images.top"])


def test_frames_match_the_zarr_store(data, zarr3, pusht_zarr):
    assert data["obs"].shape == (N, 20) and data["action"].shape == (N, 2) and data["image"].shape == (N, 3, 96, 96)
    np.testing.assert_array_equal(data["episode_ends"], zarr3["episode_ends"])
    np.testing.assert_array_equal(data["obs"], zarr3["obs"])          # parquet is lossless
    np.testing.assert_array_equal(data["action"], zarr3["action"])
    # Video is lossy (AV1 at crf 30): frames are close, and frame i is frame i (not a neighbour) where it moves.
    ref = np.rint(np.asarray(zarr.open(str(pusht_zarr), "r")["data/img"][:N])).transpose(0, 3, 1, 2)
    got = data["image"].astype(np.float32)
    err = np.abs(got - ref).reshape(N, -1).mean(1)
    assert err.max() < 3.0, err.max()
    moving = np.abs(ref[1:] - ref[:-1]).reshape(N - 1, -1).mean(1) > 1.0   # the frames that differ most
    moving &= ~np.isin(np.arange(1, N), data["episode_ends"])          # not across an episode boundary
    assert moving.sum() >= 10
    shifted = np.abs(got[1:] - ref[:-1]).reshape(N - 1, -1).mean(1)
    assert np.all(err[1:][moving] < shifted[moving])


def test_frames_match_the_official_reader(data):
    """The official LeRobotDataset reader (torchcodec) read these frames back when the fixture was written."""
    ref = np.load(FIXTURE.with_name(FIXTURE.name + ".reference.npz"))
    idx = ref["index"]
    assert len(idx) == 4 * N_EPS and str(ref["decoder"]) == "torchcodec"
    np.testing.assert_array_equal(data["image"][idx], ref["image"])           # the same pixels, to the bit
    np.testing.assert_array_equal(data["obs"][idx], np.concatenate(
        [ref["observation_environment_state"], ref["observation_state"]], axis=1))
    np.testing.assert_array_equal(data["action"][idx], ref["action"])


def test_frames_resized_on_decode(data):
    small = load_lerobot(FIXTURE, obs_keys=["observation.state"], image_size=(48, 64))
    assert small["obs"].shape == (N, 2) and small["image"].shape == (N, 3, 48, 64)
    # the same pictures at another size: per-frame mean intensity within a grey level or two
    diff = small["image"].reshape(N, -1).mean(1) - data["image"].reshape(N, -1).mean(1).astype(np.float64)
    assert np.abs(diff).max() < 2.0


def test_windows_padded_like_the_zarr_path(data, zarr3):
    for val_ratio in (0.0, 0.34):
        a_tr, a_va = make_windows(data, horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=val_ratio)
        b_tr, b_va = make_windows(zarr3, horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=val_ratio)
        assert torch.equal(a_tr.index, b_tr.index)
        assert (a_va is None) == (b_va is None) and (a_va is None or torch.equal(a_va.index, b_va.index))
    idx = a_tr.index.numpy()
    # a window starts n_obs_steps - 1 = 1 step before episode 0 (first step repeated) ...
    np.testing.assert_array_equal(idx[0, :3], [0, 0, 1])
    # ... and the last window of an episode repeats its last step up to n_action_steps - 1 = 7 times
    ends = data["episode_ends"]
    in_ep = idx[(idx[:, 0] >= ends[0]) & (idx[:, 0] < ends[1])]
    assert in_ep[-1, -1] == ends[1] - 1 and (in_ep[-1] == ends[1] - 1).sum() == 8
    ba, bb = (s.sample(8, torch.Generator().manual_seed(0)) for s in (a_tr, b_tr))
    assert torch.equal(ba["obs"], bb["obs"]) and torch.equal(ba["action"], bb["action"])
    assert ba["image"].shape == (8, 2, 3, 96, 96) and ba["image"].dtype == torch.uint8


def test_statistics(data, zarr3):
    stats = read_meta(FIXTURE).stats()
    # the official writer's meta/stats.json agrees with the frames read here and with the zarr store
    parts = {"observation.environment_state": slice(0, 18), "observation.state": slice(18, 20)}
    for key, sl in parts.items():
        np.testing.assert_allclose(stats[key]["min"], zarr3["obs"][:, sl].min(0), rtol=0, atol=1e-4)
        np.testing.assert_allclose(stats[key]["max"], zarr3["obs"][:, sl].max(0), rtol=0, atol=1e-4)
        np.testing.assert_allclose(stats[key]["mean"], data["obs"][:, sl].mean(0), rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(stats[key]["std"], data["obs"][:, sl].std(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(stats["action"]["mean"], zarr3["action"].mean(0), rtol=1e-5)
    # camera statistics (on [0, 1], per channel) agree within the video codec's loss
    img_mean = data["image"].astype(np.float64).mean((0, 2, 3)) / 255
    np.testing.assert_allclose(np.ravel(stats["observation.image"]["mean"]), img_mean, atol=0.01)
    # the normaliser is fitted on the training split only: min -> -1 and max -> +1 over the training episodes
    tr, va = make_windows(data, horizon=16, n_obs_steps=2, n_action_steps=8, val_ratio=0.34)
    held_out = sorted(set(range(N_EPS)) - set(int(e) for e in np.searchsorted(data["episode_ends"],
                                                                             tr.index.unique().numpy(), "right")))
    assert len(held_out) == 1
    starts = np.concatenate([[0], data["episode_ends"][:-1]])
    keep = np.ones(N, bool)
    keep[starts[held_out[0]]:data["episode_ends"][held_out[0]]] = False
    norm = Normalizer().fit("obs", tr.steps("obs")).fit("action", tr.steps("action"))
    lo, hi = zarr3["obs"][keep].min(0), zarr3["obs"][keep].max(0)
    np.testing.assert_allclose(norm.normalize("obs", torch.from_numpy(lo)), -1, atol=1e-5)
    np.testing.assert_allclose(norm.normalize("obs", torch.from_numpy(hi)), 1, atol=1e-5)
    assert not np.allclose(lo, zarr3["obs"].min(0)) or not np.allclose(hi, zarr3["obs"].max(0))


def _rewrite_data(root: Path, fn) -> Path:
    import pyarrow.parquet as pq

    p = root / "data" / "chunk-000" / "file-000.parquet"
    pq.write_table(fn(pq.read_table(p)), p)
    return p


def test_corrupt_parquet_is_a_clear_error(tmp_path):
    root = copy_fixture(tmp_path)
    p = root / "data" / "chunk-000" / "file-000.parquet"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])          # truncated: no footer
    with pytest.raises(DatasetError, match="not a readable parquet file") as e:
        load_lerobot(root)
    assert str(p) in str(e.value)
    ep = root / "meta" / "episodes" / "chunk-000" / "file-000.parquet"
    ep.write_bytes(b"garbage" * 100)
    with pytest.raises(DatasetError, match="not a readable parquet file") as e:
        read_meta(root)
    assert str(ep) in str(e.value)


def test_missing_column_and_nan_are_clear_errors(tmp_path):
    import pyarrow as pa

    root = copy_fixture(tmp_path)
    p = _rewrite_data(root, lambda t: t.drop_columns(["action"]))
    with pytest.raises(DatasetError, match=r"missing column\(s\) \['action'\]") as e:
        load_lerobot(root)
    assert str(p) in str(e.value)

    root = copy_fixture(tmp_path / "nan")

    def with_nan(t):
        col = t.column("observation.state").combine_chunks()
        vals = col.flatten().to_numpy().copy()
        vals[7] = np.nan
        i = t.column_names.index("observation.state")
        return t.set_column(i, "observation.state", pa.FixedSizeListArray.from_arrays(pa.array(vals), 2))

    p = _rewrite_data(root, with_nan)
    with pytest.raises(DatasetError, match="'observation.state' has NaN or inf at 1 steps") as e:
        load_lerobot(root)
    assert str(p) in str(e.value)


def test_flipped_bytes_are_caught_by_the_dataset_statistics(tmp_path):
    """Issue 38 item 10.1: 64 flipped bytes inside a data parquet's compressed values still decode, into numbers
    far outside meta/stats.json's range; the loader refuses them, naming the file, the column and the rows."""
    import pyarrow.parquet as pq

    root = copy_fixture(tmp_path)
    p = root / "data" / "chunk-000" / "file-000.parquet"
    col = pq.ParquetFile(p).metadata.row_group(0).column(0)
    assert col.path_in_schema == "observation.state.list.element"
    start = (col.dictionary_page_offset or col.data_page_offset) + 36      # inside its values, past the page header
    data = bytearray(p.read_bytes())
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])
    p.write_bytes(bytes(data))
    table = pq.read_table(p)                                                # still a readable parquet file
    state = np.asarray(table.column("observation.state").to_pylist())
    damaged = np.flatnonzero((state != load_lerobot(FIXTURE, image_keys=[])["obs"][:, 18:]).any(1))
    assert len(damaged) > 0
    with pytest.raises(DatasetError, match=r"'observation.state' lies outside meta/stats.json's \[min, max\]") as e:
        load_lerobot(root, image_keys=[])
    msg = str(e.value)
    assert str(p) in msg and "\n" not in msg
    assert f"{len(damaged)} rows" in msg and f"rows {damaged[0]}-{damaged[-1]}" in msg
    # the same values in the untouched fixture are inside the range, to the last row
    assert load_lerobot(FIXTURE, image_keys=[])["obs"].shape == (N, 20)


def test_missing_or_damaged_video_is_a_clear_error(tmp_path):
    root = copy_fixture(tmp_path)
    v = root / "videos" / "observation.image" / "chunk-000" / "file-000.mp4"
    v.unlink()
    with pytest.raises(DatasetError, match="video file not found") as e:
        load_lerobot(root)
    assert str(v) in str(e.value) and "observation.image" in str(e.value)
    # without the camera the same folder still reads (low-dim only)
    assert load_lerobot(root, image_keys=[])["obs"].shape == (N, 20)
    shutil.copy(FIXTURE / v.relative_to(root), v)
    v.write_bytes(v.read_bytes()[: v.stat().st_size // 3])           # cut short
    with pytest.raises(DatasetError, match="observation.image") as e:
        load_lerobot(root)
    assert str(v) in str(e.value)


def test_not_a_dataset_and_old_format(tmp_path):
    with pytest.raises(DatasetError, match="not a LeRobotDataset folder"):
        read_meta(tmp_path)
    root = copy_fixture(tmp_path)
    info = json.loads((root / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (root / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DatasetError, match="codebase_version 'v2.1' is not supported"):
        read_meta(root)


def test_hub_download_and_offline_message(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="the [lerobot] extra (huggingface_hub) is missing")
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(**kw):
        calls.append(kw)
        if kw.get("local_files_only"):
            raise LocalEntryNotFoundError("not in the cache")
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError, match="task.dataset=/abs/path/to/DIR") as e:
        resolve_dataset("someone/so100_pick")
    assert "someone/so100_pick" in str(e.value) and "hf download" in str(e.value)
    assert [c["repo_type"] for c in calls] == ["dataset", "dataset"] and calls[0]["repo_id"] == "someone/so100_pick"

    def online(**kw):
        calls.append(kw)
        return str(FIXTURE)

    calls.clear()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", online)
    assert resolve_dataset("someone/pusht@v3.0") == FIXTURE
    assert calls[0]["repo_id"] == "someone/pusht" and calls[0]["revision"] == "v3.0"
    # a local folder wins over the hub, and a path that is neither is an error naming it
    assert resolve_dataset(str(FIXTURE)) == FIXTURE.resolve()
    with pytest.raises(DatasetError, match="no such dataset folder"):
        resolve_dataset("./nowhere/at/all")


# ---- task=lerobot ---------------------------------------------------------------------------------------------
def test_task_config_resolves_features_from_the_dataset():
    from drift_policy.config import Config, compose
    from drift_policy.tasks import has_env

    cfg = compose(["task=lerobot", f"task.dataset={FIXTURE}"])
    assert cfg.task.obs_keys == ("observation.environment_state", "observation.state")
    assert cfg.task.image_keys == ("image",) and cfg.task.dataset == str(FIXTURE.resolve())
    assert (cfg.policy.obs_dim, cfg.policy.action_dim, cfg.policy.image_keys) == (20, 2, ("image",))
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()     # config.json reads back the same
    assert not has_env(cfg.task)
    low = compose(["task=lerobot", f"task.dataset={FIXTURE}", "task.image_keys=[]",
                   "task.obs_keys=[observation.state]"])
    assert (low.policy.obs_dim, low.policy.image_keys) == (2, ())
    by_key = compose(["task=lerobot", f"task.dataset={FIXTURE}", "task.image_keys=[observation.image]"])
    assert by_key.task.image_keys == ("image",)


@pytest.mark.parametrize("overrides,match", [
    ([], "task.dataset must be given"),
    ([f"task.dataset={FIXTURE}", "task.obs_keys=[observation.velocity]"], "task.obs_keys.*'observation.velocity'"),
    ([f"task.dataset={FIXTURE}", "task.image_keys=[top]"], "camera 'top' not in the dataset"),
    ([f"task.dataset={FIXTURE}", "task.obs_keys=[auto,observation.state]"], "'auto' stands alone"),
    ([f"task.dataset={FIXTURE}", "task.options.eval_env=gazebo"], "task.options.eval_env must be one of"),
    ([f"task.dataset={FIXTURE}", "task.options.action_key=observation.image"], "dtype 'video'"),
])
def test_task_config_errors_name_the_key(overrides, match):
    from drift_policy.config import compose
    from drift_policy.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        compose(["task=lerobot", *overrides])


def test_eval_env_must_observe_what_the_dataset_holds():
    from drift_policy.config import compose
    from drift_policy.errors import ConfigError
    from drift_policy.tasks import env_spec, family

    cfg = compose(["task=lerobot", f"task.dataset={FIXTURE}", "task.image_keys=[]", "task.options.eval_env=pusht"])
    spec = env_spec(cfg.task)
    assert spec["family"] is family("pusht") and spec["kwargs"] == {"image": False}
    bad = compose(["task=lerobot", f"task.dataset={FIXTURE}", "task.image_keys=[]", "task.obs_keys=[observation.state]",
                   "task.options.eval_env=pusht"])
    with pytest.raises(ConfigError, match="eval_env=pusht observes"):
        env_spec(bad.task)
    with pytest.raises(ConfigError, match="has no evaluation environment.*task.options.eval_env"):
        env_spec(compose(["task=lerobot", f"task.dataset={FIXTURE}"]).task)


def test_task_dataset_from_the_hub(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub", reason="the [lerobot] extra (huggingface_hub) is missing")

    from drift_policy.config import compose
    from drift_policy.tasks import load_data

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(FIXTURE))
    monkeypatch.chdir(tmp_path)
    cfg = compose(["task=lerobot", "task.dataset=someone/pusht_three", "task.image_keys=[]"])
    assert cfg.task.dataset == "someone/pusht_three" and cfg.policy.obs_dim == 20      # the id is what is recorded
    assert load_data(cfg.task)["obs"].shape == (N, 20)
    assert calls and all(c["repo_id"] == "someone/pusht_three" and c["repo_type"] == "dataset" for c in calls)


@pytest.mark.slow
def test_short_cli_training_writes_pretrained(tmp_path):
    import os
    import subprocess
    import sys

    from drift_policy.policies import Policy

    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "drift_policy", "train", "task=lerobot", f"task.dataset={FIXTURE}",
           "train.max_steps=3", "train.max_minutes=0", "policy.backbone=tiny", "policy.vision_backbone=tiny",
           "train.batch_size=4", "train.threads=1", "train.log_every=1", f"train.run_dir={run}"]
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "no evaluation environment" in out.stdout and not (run / "eval").exists()
    assert (run / "pretrained" / "model.safetensors").exists()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    policy = Policy.from_pretrained(run / "pretrained")
    assert policy.config.image_keys == ("image",) and policy.config.obs_dim == 20
    d = load_lerobot(FIXTURE)
    obs = {"obs": torch.from_numpy(d["obs"][None, :2]), "image": torch.from_numpy(d["image"][None, :2])}
    act = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    assert act.shape == (1, policy.config.n_action_steps, 2) and torch.isfinite(act).all()
