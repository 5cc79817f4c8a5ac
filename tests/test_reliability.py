"""No lost data and no silent wrong results (issue 13). Each test names the issue item it covers; each one fails on
the code before the fix. Everything is tiny: synthetic data or a small synthetic zarr store in tmp_path, the tiny
backbone, a few steps, one thread."""
import fcntl
import hashlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from drift_policy import train as train_mod
from drift_policy.checkpoint import load_checkpoint, save_checkpoint
from drift_policy.cli import main
from drift_policy.config import compose
from drift_policy.data.windows import make_windows
from drift_policy.errors import CheckpointError, ConfigError, DatasetError
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, DriftPolicy, Policy, make_policy
from drift_policy.runs import RunDirError, latest_good_checkpoint, list_checkpoints, prune_checkpoints

TINY = ["policy.backbone=tiny", "policy.n_noise=4", "train.batch_size=4", "train.eval_episodes=0",
        "train.threads=1", "train.log_every=1", "train.warmup_steps=2", "train.wandb=disabled",
        "train.max_minutes=0"]


def synthetic_data(n_eps=4, length=40, seed=0):
    rng = np.random.default_rng(seed)
    n = n_eps * length
    return {"obs": rng.uniform(0, 512, (n, 20)).astype(np.float32),
            "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            "episode_ends": np.arange(1, n_eps + 1) * length}


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """compose() for a tiny run in tmp_path/<name>, trained on synthetic windows (no data files)."""
    def fake_datasets(cfg):
        p = cfg.policy
        return make_windows(synthetic_data(), p.horizon, p.n_obs_steps, p.n_action_steps, val_ratio=0.0)

    monkeypatch.setattr(train_mod, "make_datasets", fake_datasets)

    def make(name, *overrides):
        return compose([*TINY, f"train.run_dir={tmp_path / name}", *overrides])
    return make


def _tiny_policy(**kw):
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)
    torch.manual_seed(0)
    return make_policy(DriftConfig(backbone="tiny", n_noise=4, **kw), norm).eval()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---- item 1: pruning ------------------------------------------------------------------------------------------
def test_prune_never_counts_or_keeps_out_a_corrupt_checkpoint(tmp_path):
    """Item 1: a corrupt newer checkpoint does not take the keep slot; the newest verified one survives."""
    ck = tmp_path / "checkpoints"
    state = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "step": 0}
    for step in (2, 4, 6):
        save_checkpoint({**state, "step": step}, ck / f"step_{step:08d}.pt")
    _truncate(ck / "step_00000006.pt")                               # newest: truncated, its checksum says so
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in ck.glob("*.pt")) == ["step_00000004.pt", "step_00000006.pt"]
    assert load_checkpoint(ck / "step_00000004.pt")["step"] == 4       # kept: the newest good one
    (ck / "step_00000004.pt.json").unlink()                           # unverifiable (no checksum) never counts
    prune_checkpoints(tmp_path, keep=1)
    assert (ck / "step_00000004.pt").exists()


def test_resume_beside_a_truncated_newer_checkpoint_keeps_the_good_one(tiny):
    """Item 1, the reproduction: keep_checkpoints=1, a truncated newer checkpoint, resume, resume again."""
    cfg = tiny("run", "train.max_steps=4", "train.ckpt_every_steps=2", "train.keep_checkpoints=1")
    run = train_mod.train(cfg, progress=False)
    good = list_checkpoints(run)[0]
    bad = good.with_name("step_00000006.pt")
    bad.write_bytes(good.read_bytes()[:100])
    bad.with_name(bad.name + ".json").write_text(good.with_name(good.name + ".json").read_text())
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        train_mod.train(cfg, run_dir=run, resume=True, progress=False)
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        found = latest_good_checkpoint(run)
    assert found is not None and found[1]["step"] == 4


# ---- item 2: run folders --------------------------------------------------------------------------------------
def test_a_finished_run_is_not_overwritten_without_the_flag(tiny):
    """Item 2: training into a finished run whose checkpoints were removed is refused; overwrite=true replaces it."""
    cfg = tiny("run", "train.max_steps=2", "train.ckpt_every_steps=2")
    run = train_mod.train(cfg, progress=False)
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    (run / "checkpoints").rmdir()
    before = {p: p.read_bytes() for p in [run / "config.json", run / "pretrained" / "model.safetensors"]}
    other = tiny("run", "train.max_steps=3", "train.ckpt_every_steps=3", "train.seed=1")
    with pytest.raises(RunDirError, match=r"already holds a run .*train\.overwrite=true"):
        train_mod.train(other, progress=False)
    assert all(p.read_bytes() == b for p, b in before.items())
    again = tiny("run", "train.max_steps=3", "train.ckpt_every_steps=3", "train.seed=1", "train.overwrite=true")
    train_mod.train(again, progress=False)
    assert json.loads((run / "config.json").read_text())["train"]["seed"] == 1


def test_a_run_that_died_before_its_first_checkpoint_is_not_joined(tiny):
    """Item 2: metrics.jsonl of a dead run is not appended to (it would read steps 1..5, then 1..3)."""
    run = Path(tiny("dead").train.run_dir)
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 6)))
    with pytest.raises(RunDirError, match="already holds a run"):
        train_mod.train(tiny("dead", "train.max_steps=3"), progress=False)
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 5


def test_bad_data_writes_nothing(tmp_path):
    """Item 2: a run that fails on its data has not created or changed anything in its folder."""
    run = tmp_path / "run"
    cfg = compose([*TINY, f"train.run_dir={run}", f"task.dataset={tmp_path / 'missing.zarr'}"])
    with pytest.raises(DatasetError, match="Push-T store not found"):
        train_mod.train(cfg, progress=False)
    assert not run.exists()


def test_a_run_folder_is_claimed_exclusively(tiny):
    """Item 2: while another process holds the folder's lock, a training into it fails at once."""
    cfg = tiny("locked", "train.max_steps=2")
    run = Path(cfg.train.run_dir)
    run.mkdir()
    with open(run / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)            # what a running training holds
        with pytest.raises(RunDirError, match="in use by another training"):
            train_mod.train(cfg, progress=False)
    assert not (run / "config.json").exists()
    train_mod.train(cfg, progress=False)                           # released: the folder can be used
    assert (run / "pretrained" / "model.safetensors").exists()


def test_atomic_writes_use_unique_temporary_files(tmp_path, monkeypatch):
    """Item 2: two writers of one checkpoint path never share a temporary file name."""
    sources = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (sources.append(str(a)), real_replace(a, b))[1])
    path = tmp_path / "checkpoints" / "step_00000002.pt"
    for _ in range(2):
        save_checkpoint({"model": {}, "ema": {}, "step": 2}, path)
    ckpt_tmps = [s for s in sources if "step_00000002.pt" in s and ".pt.json" not in s]     # the .pt's own temp files
    assert len(ckpt_tmps) == 2 and len(set(ckpt_tmps)) == 2, sources


# ---- item 3: non-finite weights and config values ---------------------------------------------------------------
@pytest.mark.parametrize("override", ["train.lr=inf", "train.max_minutes=nan", "train.grad_clip=inf",
                                      "train.weight_decay=-inf"])
def test_non_finite_config_values_are_rejected(override):
    """Item 3: lr, max_minutes, grad_clip (every float key) must be finite."""
    with pytest.raises(ConfigError, match=rf"{override.split('=')[0]} must be a finite number"):
        compose([override])


@pytest.mark.parametrize("every, newest", [(1, r"step_00000001\.pt"), (100, "none")])
def test_non_finite_weights_are_never_saved_as_a_checkpoint(tiny, monkeypatch, every, newest):
    """Item 3: an update that leaves NaN in the weights (simulated: the model is corrupted after step 2) makes the
    following steps non-finite; the run aborts without saving those weights as "the last good" checkpoint (nor a
    pretrained folder), so resume and eval cannot pick them."""
    real = train_mod.ema_update

    def corrupting(ema, model, step, decay, warmup=10):
        real(ema, model, step, decay, warmup)
        if step == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    monkeypatch.setattr(train_mod, "ema_update", corrupting)
    cfg = tiny("boom", "train.max_bad_steps=3", "train.max_steps=50", f"train.ckpt_every_steps={every}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError) as e:
            train_mod.train(cfg, progress=False)
    run = Path(cfg.train.run_dir)
    for p in list_checkpoints(run):
        state = load_checkpoint(p)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (run / "pretrained").exists()
    assert e.match(rf"NaN or inf .*not saved. Newest good checkpoint: .*{newest}")
    with pytest.raises(CheckpointError, match="refusing to save"):
        save_checkpoint({"model": {"w": torch.tensor([float("nan")])}, "ema": {}}, run / "x.pt")


# ---- item 4: output paths -----------------------------------------------------------------------------------------
def test_eval_and_run_check_the_output_path_before_working(tmp_path, monkeypatch, capsys):
    """Item 4: an out= path that cannot be written is an error before any rollout or control loop runs."""
    import drift_policy.runner as runner_mod

    folder = _tiny_policy().save_pretrained(tmp_path / "p")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    work = []
    monkeypatch.setattr(train_mod, "evaluate_policy", lambda *a, **k: work.append("eval") or {})
    monkeypatch.setattr(runner_mod, "run", lambda *a, **k: work.append("run") or {})
    for cmd in (["eval", f"checkpoint={folder}", "episodes=1"], ["run", f"checkpoint={folder}", "episodes=1"]):
        with pytest.raises((SystemExit, OSError)) as e:
            main([*cmd, f"out={blocker / 'sub' / 'out.json'}"])
        assert work == []
        assert isinstance(e.value, SystemExit) and e.value.code == 2
    assert "not writable" in capsys.readouterr().err


# ---- items 5 and 6: reading data ------------------------------------------------------------------------------------
def _pusht_store(path: Path, n_eps=4, length=40, action=None) -> Path:
    """A small store with Push-T's layout (data/state, keypoint, action; meta/episode_ends), 16 steps per chunk."""
    import zarr

    rng = np.random.default_rng(0)
    n = n_eps * length
    root = zarr.open_group(str(path), mode="w")
    root.create_dataset("data/state", data=rng.uniform(0, 512, (n, 5)).astype(np.float32), chunks=(16, 5))
    root.create_dataset("data/keypoint", data=rng.uniform(0, 512, (n, 9, 2)).astype(np.float32), chunks=(16, 9, 2))
    act = rng.uniform(0, 512, (n, 2)).astype(np.float32) if action is None else action
    root.create_dataset("data/action", data=act, chunks=(16, 2))
    root.create_dataset("meta/episode_ends", data=np.arange(1, n_eps + 1, dtype=np.int64) * length)
    return path


def test_a_missing_zarr_chunk_is_an_error_not_zeros(tmp_path):
    """Item 5: zarr reads a deleted chunk as its fill value; the loader names the array and the chunk instead."""
    from drift_policy.data.pusht import load_pusht_lowdim

    store = _pusht_store(tmp_path / "s.zarr")
    assert load_pusht_lowdim(store)["action"].shape == (160, 2)
    (store / "data" / "action" / "3.0").unlink()
    with pytest.raises(DatasetError, match=r"array 'data/action' is missing 1 of its 10 chunks \(first: chunk 3.0, "
                                           r"rows 48..63\)"):
        load_pusht_lowdim(store)


def test_a_corrupt_zarr_chunk_names_array_and_chunk(tmp_path):
    """Item 5: a truncated chunk gives a DatasetError naming the array and chunk, not a raw codec error."""
    from drift_policy.data.pusht import load_pusht_lowdim

    store = _pusht_store(tmp_path / "s.zarr")
    _truncate(store / "data" / "keypoint" / "2.0.0")
    with pytest.raises(DatasetError, match=r"array 'data/keypoint' chunk 2 \(rows 32..47\) cannot be decoded"):
        load_pusht_lowdim(store)


def test_one_absurd_value_is_refused_naming_file_key_and_index(tmp_path, monkeypatch):
    """Item 6: a single action of 1e30 is finite but would collapse the normaliser; the shared window builder
    refuses it, naming the file, the key and the step, for every loader (here through train's make_datasets)."""
    action = np.random.default_rng(1).uniform(0, 512, (160, 2)).astype(np.float32)
    action[77, 1] = 1e30
    store = _pusht_store(tmp_path / "s.zarr", action=action)
    cfg = compose([*TINY, f"task.dataset={store}"])
    with pytest.raises(DatasetError, match=rf"{store}: 'action' has 1 value\(s\) far outside .* 1e\+30 at step 77 "
                                           r"\(episode 1\), dimension 1"):
        train_mod.make_datasets(cfg)
    data = synthetic_data()
    make_windows(data, 16, 2, 8, source="ok")                        # ordinary data passes
    data["obs"][5, 3] = -1e9
    with pytest.raises(DatasetError, match=r"demo.hdf5: 'obs' .* at step 5"):
        make_windows(data, 16, 2, 8, source="demo.hdf5")


# ---- items 7, 8, 9: the deployment API ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observations_are_rejected(bad):
    """Item 7: predict_action and select_action refuse NaN/inf observations; nothing non-finite is queued."""
    policy = _tiny_policy()
    obs = torch.rand(2, 2, 20) * 512
    obs[1, 0, 4] = bad
    with pytest.raises(ValueError, match=r"'obs' holds NaN or inf \(batch rows \[1\]\)"):
        policy.predict_action(obs)
    policy.reset()
    step = torch.rand(1, 20) * 512
    first = policy.select_action(step)
    assert torch.isfinite(first).all()
    with pytest.raises(ValueError, match="select_action: observation 'obs' holds NaN or inf"):
        policy.select_action(torch.full((1, 20), bad))
    assert all(torch.isfinite(a).all() for a in policy.executor.queue)


def test_a_non_finite_chunk_is_never_queued(monkeypatch):
    """Item 7: if the generator itself returns NaN, select_action raises and the queue stays empty."""
    policy = _tiny_policy()
    policy.reset()
    real = DriftPolicy.sample
    monkeypatch.setattr(DriftPolicy, "sample", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    with pytest.raises(FloatingPointError, match="nothing was queued"):
        policy.select_action(torch.rand(1, 20) * 512)
    assert len(policy.executor) == 0
    monkeypatch.setattr(DriftPolicy, "sample", real)
    assert torch.isfinite(policy.select_action(torch.rand(1, 20) * 512)).all()


def test_the_chunk_executor_checks_what_enters_history_and_queue():
    """Items 7 and 8 where the queue lives (executor.ChunkExecutor, also used by the evaluation episode and the
    runner, on numpy arrays): non-finite steps and chunks are refused, a shape change needs reset()."""
    from drift_policy.executor import ChunkExecutor

    ex = ChunkExecutor(2, where="runner")
    ex.observe({"obs": np.zeros(20, np.float32), "image": np.zeros((3, 8, 8), np.uint8)})
    with pytest.raises(ValueError, match="runner: observation 'obs' holds NaN or inf"):
        ex.observe({"obs": np.full(20, np.nan, np.float32), "image": np.zeros((3, 8, 8), np.uint8)})
    with pytest.raises(ValueError, match="runner: image 'image' is float with values in"):
        ex.observe({"obs": np.zeros(20, np.float32), "image": np.full((3, 8, 8), 0.5, np.float32)})
    with pytest.raises(FloatingPointError, match="nothing was queued"):
        ex.load([np.zeros(2), np.array([np.inf, 0.0])])
    assert len(ex) == 0
    with pytest.raises(ValueError, match=r"observation 'obs' has shape \(3, 20\).*call reset\(\)"):
        ex.observe({"obs": np.zeros((3, 20), np.float32), "image": np.zeros((3, 8, 8), np.uint8)})
    ex.reset()
    ex.observe({"obs": np.zeros((3, 20), np.float32), "image": np.zeros((3, 3, 8, 8), np.uint8)})


def test_the_runner_never_plays_a_non_finite_chunk():
    """Item 7 in the real-time runner, whose Controller holds the chunks it plays."""
    from drift_policy.runner import Controller, RunConfig

    ctrl = Controller(lambda w: np.full((15, 2), np.nan), RunConfig(), 8)
    with pytest.raises(FloatingPointError, match="runner: .*nothing was queued"):
        ctrl.begin_episode(np.zeros((2, 20), np.float32))


def test_a_batch_size_change_without_reset_is_a_clear_error():
    """Item 8: 1 row then 3 rows (or 3 then 1) without reset() raises, naming reset(); after reset() it works."""
    policy = _tiny_policy()
    for first, second in ((1, 3), (3, 1)):
        policy.reset()
        policy.select_action(torch.rand(first, 20) * 512)
        with pytest.raises(ValueError, match=rf"shape \({second}, 20\), but .* for \({first}, 20\); call reset\(\)"):
            policy.select_action(torch.rand(second, 20) * 512)
        policy.reset()
        assert policy.select_action(torch.rand(second, 20) * 512).shape == (second, 2)


def test_float_images_in_0_1_are_rejected_uint8_and_0_255_accepted():
    """Item 9: the image contract is 0..255 (uint8 or float); a float image in [0, 1] is refused, not misread."""
    cfg = compose(["task=pusht_image", "policy.backbone=tiny", "policy.vision_backbone=tiny", "policy.n_noise=4"])
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(50, 2, generator=g) * 512).fit("action", torch.rand(50, 2, generator=g) * 512)
    policy = make_policy(cfg.policy, norm).eval()
    img = torch.randint(0, 256, (1, 2, 3, 96, 96), dtype=torch.uint8)
    obs = {"obs": torch.rand(1, 2, 2) * 512}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = policy.predict_action({**obs, "image": img}, gen())["action"]
    b = policy.predict_action({**obs, "image": img.float()}, gen())["action"]      # float 0..255: the same
    assert torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"'image' is float with values in \[0, 1\].*multiply by 255"):
        policy.predict_action({**obs, "image": img.float() / 255}, gen())
    with pytest.raises(ValueError, match=r"'image' has values in \[-1"):
        policy.predict_action({**obs, "image": img.float() / 127.5 - 1}, gen())
    policy.reset()
    with pytest.raises(ValueError, match="select_action: image 'image' is float"):
        policy.select_action({"obs": torch.rand(1, 2) * 512, "image": img[:, 0].float() / 255})


# ---- item 10: pretrained folders ----------------------------------------------------------------------------------
def _rewrite_manifest(folder: Path) -> None:
    """What a careless tool would do: make the manifest match whatever the files now hold."""
    manifest = {f: {"sha256": hashlib.sha256((folder / f).read_bytes()).hexdigest(),
                    "bytes": (folder / f).stat().st_size} for f in ("config.json", "model.safetensors")}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_pretrained_folders_are_verified(tmp_path):
    """Item 10: flipped bytes are detected; missing config keys and a config that contradicts the weights
    (horizon, n_action_steps) are refused rather than filled with defaults or accepted."""
    policy = _tiny_policy()
    folder = policy.save_pretrained(tmp_path / "p")
    assert Policy.from_pretrained(folder).config == policy.config
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-5] ^= 0x01                                                    # one flipped bit in a weight
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: corrupted or changed"):
        Policy.from_pretrained(folder)

    for name, edit, match in (("missing", lambda c: c.pop("n_noise"), r"missing key\(s\) policy.n_noise"),
                              ("horizon", lambda c: c.update(horizon=24), r"contradicts the weights.*policy.horizon=16"),
                              ("n_action", lambda c: c.update(n_action_steps=4), r"policy.n_action_steps=8")):
        folder = policy.save_pretrained(tmp_path / name)
        cfg = json.loads((folder / "config.json").read_text())
        edit(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match="does not match manifest.json|changed"):
            Policy.from_pretrained(folder)                             # the manifest notices any edit
        _rewrite_manifest(folder)
        with pytest.raises(CheckpointError, match=match):
            Policy.from_pretrained(folder)                             # and the weights' own record does too


def test_a_pretrained_folder_written_before_later_keys_existed_loads_as_trained(tmp_path):
    """Keys added after a policy was saved (``PolicyConfig.LEGACY``) read as the value it was trained with; any
    other missing key is still refused (the test above)."""
    from safetensors.torch import load, save

    policy = _tiny_policy()
    folder = policy.save_pretrained(tmp_path / "old")
    later = ("per_dim_scale", "neighbor_same_episode", "noise_scale", "action_anchor")
    cfg = json.loads((folder / "config.json").read_text())
    for k in later:
        cfg.pop(k)
    (folder / "config.json").write_text(json.dumps(cfg))
    weights = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(weights[:8], "little")
    meta = json.loads(weights[8: 8 + n])["__metadata__"]
    meta["config"] = json.dumps({k: v for k, v in json.loads(meta["config"]).items() if k not in later})
    (folder / "model.safetensors").write_bytes(save(load(weights), metadata=meta))
    _rewrite_manifest(folder)
    loaded = Policy.from_pretrained(folder).config
    assert (loaded.per_dim_scale, loaded.neighbor_same_episode, loaded.noise_scale,
            loaded.action_anchor) == (False, True, 1.0, ())


# ---- item 11: unpickling ------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_loading_a_checkpoint_cannot_run_code(tmp_path):
    """Item 11: a .pt whose pickle calls a function (here os.mkdir) is refused and the call never happens,
    even with a valid checksum file beside it; a real checkpoint (optimizer state, RNG states) still loads."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "checkpoints" / "step_00000001.pt"
    save_checkpoint({"model": {}, "ema": {}, "step": 1}, path)
    buf = io.BytesIO()
    torch.save({"model": {}, "ema": {}, "step": 1, "x": _Payload(str(marker))}, buf)
    path.write_bytes(buf.getvalue())
    path.with_name(path.name + ".json").write_text(json.dumps(
        {"sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "bytes": len(buf.getvalue()), "step": 1}))
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_training_checkpoint_loads_with_weights_only(tiny):
    """Item 11: everything a training checkpoint holds is allowed by the weights-only loader."""
    run = train_mod.train(tiny("ok", "train.max_steps=2", "train.ckpt_every_steps=2"), progress=False)
    state = load_checkpoint(list_checkpoints(run)[0])
    assert state["step"] == 2 and "optimizer" in state and isinstance(state["data_rng"], torch.Tensor)


# ---- item 12: config value types ----------------------------------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("train.lr=abc", r"train\.lr must be a finite number, got 'abc'"),
    ("policy.n_noise=abc", r"policy\.n_noise must be an integer, got 'abc'"),
    ("train.batch_size=2.5", r"train\.batch_size must be an integer, got 2\.5"),
    ("train.betas=[0.9]", r"train\.betas must be a list \[a finite number, a finite number\]"),
    ("policy.temperatures=[0.1,x]", r"policy\.temperatures\[1\] must be a finite number"),
    ("task.val_ratio=[1]", r"task\.val_ratio must be a finite number"),
    ("train.wandb=[1]", r"train\.wandb must be a string"),
])
def test_every_type_error_names_the_key_and_the_type(override, match):
    """Item 12: one generic check over the dataclass field types, for every config group."""
    with pytest.raises(ConfigError, match=match):
        compose([override])


def test_cli_reports_a_type_error_in_one_line(capsys):
    """Item 12: through the CLI, exit code 2 and the key, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(["train", "train.lr=abc"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "drift-policy train: error: train.lr must be a finite number, got 'abc'"


# ---- item 13: the command line's errors -----------------------------------------------------------------------------
def test_cli_reports_checkpoint_and_weight_errors_in_one_line(tmp_path, capsys):
    """Item 13: a missing checkpoint, corrupt safetensors / JSON and a config of another policy type over the
    weights are one-line errors with exit code 2."""
    def fails(*args):
        with pytest.raises(SystemExit) as e:
            main(list(args))
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        return err

    assert "checkpoint not found" in fails("eval", f"checkpoint={tmp_path / 'nowhere' / 'step_1.pt'}")
    assert not (tmp_path / "nowhere").exists()                        # the out= probe left nothing behind
    (tmp_path / "empty_run").mkdir()
    assert "no usable checkpoint" in fails("eval", f"checkpoint={tmp_path / 'empty_run'}")
    policy = _tiny_policy()
    folder = policy.save_pretrained(tmp_path / "p")
    (folder / "config.json").write_text(json.dumps(DiffusionConfig(backbone="tiny").to_dict()))
    _rewrite_manifest(folder)
    assert "contradicts the weights" in fails("eval", f"checkpoint={folder}", "episodes=1")
    save_file(dict(policy.state_dict()), str(folder / "model.safetensors"))   # weights without their config record
    _rewrite_manifest(folder)
    assert "the weights do not fit this DiffusionPolicy" in fails("eval", f"checkpoint={folder}", "episodes=1")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _rewrite_manifest(folder)
    assert "not a readable safetensors file" in fails("export", f"checkpoint={folder}", f"out={tmp_path / 'x.onnx'}")
    (folder / "manifest.json").write_text("{not json")
    assert "manifest.json is corrupted" in fails("run", f"checkpoint={folder}", "episodes=1")


def test_resume_survives_a_truncated_config_json(tiny, capsys):
    """Item 13: config.json is written atomically, and resume uses the checkpoint's own config (then repairs
    config.json from it)."""
    cfg = tiny("run", "train.max_steps=4", "train.ckpt_every_steps=2")
    run = train_mod.train(cfg, progress=False)
    good = (run / "config.json").read_text()
    (run / "config.json").write_text(good[: len(good) // 3])
    main(["resume", str(run)])
    assert "resuming" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text()) == json.loads(good)


# ---- item 14: --help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd, expect", [
    (["train", "--help"], ["usage: drift-policy train", "pusht_keypoints", "drift_unet", "diffusion_unet",
                           "train.lr=0.0006", "policy.horizon=16", "task.max_steps=300"]),
    (["resume", "--help"], ["usage: drift-policy resume RUN_DIR"]),
    (["eval", "--help"], ["usage: drift-policy eval", "episodes", "default: 50"]),
    (["export", "-h"], ["usage: drift-policy export", "format", "default: onnx"]),
    (["run", "--help"], ["usage: drift-policy run", "rate_hz", "seconds", "default: 60.0"]),
    (["bench", "--help"], ["usage: drift-policy bench"]),
    (["bench", "latency", "--help"], ["usage: drift-policy bench latency", "repeats", "default: 200"]),
    (["bench", "train", "--help"], ["usage: drift-policy bench train", "budget", "default: 1200000"]),
    (["bench", "summary", "--help"], ["usage: drift-policy bench summary", "run"]),
])
def test_every_subcommand_has_help(cmd, expect, capsys):
    """Item 14: --help prints the usage and the keys with their defaults (train: also the task/policy options)."""
    try:
        main(cmd)
    except SystemExit as e:
        assert e.code in (0, None)
    out = capsys.readouterr().out
    for text in expect:
        assert text in out, (text, out)


# ---- item 15: records --------------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def test_run_records_are_written_by_bench_summary(tmp_path, capsys):
    """Item 15: every committed run record (eval/results/**.json with a run's evaluations) has exactly the fields
    `drift-policy bench summary` writes, taken from running it on a small run folder, not from a list here;
    a hand-assembled record (extra or missing fields) fails. Every eval/results file the README cites exists."""
    from drift_policy.bench import run_summary

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(compose(TINY).to_dict()))
    (run / "eval" / "step_00000001.json").write_text(json.dumps(
        {"step": 1, "train_minutes": 0.1, "mean_score": 0.5, "success_rate": 0.0}))
    written = set(run_summary([f"run={run}", f"out={tmp_path / 'rec.json'}"]))
    capsys.readouterr()
    records = [p for p in (REPO / "eval" / "results").rglob("*.json")
               if isinstance(d := json.loads(p.read_text()), dict) and "evals" in d and "run_dir" in d]
    assert records
    # "plots" came later, and so did the provenance fields: records written before them lack them, and say the
    # commit they were committed at instead (eval/migrate_records.py)
    later = {"plots", "provenance", "code_commit", "command", "seed", "budget_sample_passes"}
    for p in records:
        assert written - later <= set(json.loads(p.read_text())) <= written | {"committed_at", "last_committed_at"}, p
    import re

    cited = set(re.findall(r"eval/(?:results|diagnostics)/[\w./-]+\.(?:json|md|png|yaml)",
                           (REPO / "README.md").read_text()))
    missing = sorted(c for c in cited if not (REPO / c).exists() and c != "eval/results/x.json")   # x: an example
    assert not missing, missing


# ---- item 16: the tests themselves ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ci_fails_loudly_when_the_pusht_store_is_missing(tmp_path):
    """Item 16: with CI set, a test that needs the Push-T store errors instead of skipping; locally it skips."""
    import subprocess
    import sys

    env = {**os.environ, "DRIFT_POLICY_DATA_ROOT": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py::test_real_store_loads"]
    env.pop("CI", None)
    local = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout
    ci = subprocess.run(cmd, cwd=REPO, env={**env, "CI": "1"}, capture_output=True, text=True, timeout=300)
    assert ci.returncode != 0 and "Push-T store not found" in ci.stdout and "CI must run" in ci.stdout, ci.stdout


def test_robomimic_image_tests_skip_only_without_a_renderer():
    """Item 16: the skip condition is one probe of the offscreen OpenGL context (None: available), so any other
    failure of the image tests is a failure, not a skip."""
    pytest.importorskip("robosuite")
    from drift_policy.envs.robomimic import offscreen_renderer_error

    reason = offscreen_renderer_error()
    assert reason is None or reason.startswith(f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}")
    src = (REPO / "tests" / "test_robomimic.py").read_text()
    assert "except Exception as e:  # no EGL/OSMesa" not in src and "needs_offscreen_renderer()" in src


@pytest.mark.parametrize("override, match", [("train.minutes=abc", r"train\.minutes must be a finite number, got 'abc'"),
                                             ("train.max_steps=2.5", r"train\.max_steps must be an integer, got 2\.5"),
                                             ("train.nope=1", r"unknown config key 'train\.nope'")])
def test_image_track_config_errors_name_the_key_and_type(override, match):
    """Item 12 for the image-generation track's dict config: the same kind of error, checked against DEFAULTS."""
    from drift_policy.image.config import load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the parent-death signal is Linux's")
def test_a_bench_killed_with_sigkill_takes_its_runs_with_it(tmp_path):
    """A bench stopped with ``kill -9`` must not leave its runs training unseen (they held the cores for hours)."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from drift_policy.bench import launch_child\n"
        f"c = launch_child([sys.executable, '-c', 'import time; time.sleep(120)'], open({str(tmp_path / 'log')!r}, 'a'))\n"
        "print(c.pid, flush=True); c.wait()")], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(100):                                  # the kernel signals the child as the parent dies
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:            # reaped by init only later: a zombie counts as stopped
            if f.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the bench's run outlived the bench")
