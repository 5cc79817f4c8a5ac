"""robomimic hdf5 reading, robosuite env creation and scripted demos, on small generated fixtures."""
from __future__ import annotations

import json
import shutil
import urllib.error

import numpy as np
import pytest

pytest.importorskip("robosuite")
h5py = pytest.importorskip("h5py")

from drift_policy.data import robomimic as rm  # noqa: E402
from drift_policy.data import scripted  # noqa: E402
from drift_policy.data.robomimic import load_robomimic, read_env_meta, robomimic_spaces  # noqa: E402
from drift_policy.envs.robomimic import (  # noqa: E402
    TASK_ENV_NAMES,
    RobomimicEnv,
    default_env_meta,
    matrix_to_rot6d,
    rot6d_to_matrix,
)
from drift_policy.errors import DatasetError  # noqa: E402

KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]


@pytest.fixture(scope="module")
def lift_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("robomimic") / "lift.hdf5"
    stats = scripted.generate_dataset("lift", 3, path, seed=0, progress=False)
    assert stats["successes"] == 3, stats
    return path


@pytest.fixture(scope="module")
def lift_env():
    env = RobomimicEnv(default_env_meta("lift"), KEYS, max_steps=400)
    yield env
    env.close()


def _copy(src, tmp_path):
    dst = tmp_path / "copy.hdf5"
    shutil.copy(src, dst)
    return dst


# ---------------------------------------------------------------- reading


def test_round_trip(lift_file):
    d = load_robomimic(lift_file, ["robot0_eef_pos", "object"])
    with h5py.File(lift_file) as f:
        demos = [f[f"data/demo_{i}"] for i in range(3)]
        lengths = [g["actions"].shape[0] for g in demos]
        eef = np.concatenate([g["obs/robot0_eef_pos"][:] for g in demos])
        obj = np.concatenate([g["obs/object"][:] for g in demos])
        act = np.concatenate([g["actions"][:] for g in demos])
        assert f["data"].attrs["total"] == sum(lengths)
        assert all(g.attrs["num_samples"] == n for g, n in zip(demos, lengths))
        assert demos[0]["states"].shape[1] == 32  # Lift: time + qpos + qvel
        assert json.loads(f["data"].attrs["env_args"])["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"
        assert all(g["dones"][-1] == 1 for g in demos)
    assert d["obs"].dtype == np.float32 and d["obs"].shape == (sum(lengths), 13)
    np.testing.assert_allclose(d["obs"][:, :3], eef, rtol=1e-6)  # concatenated in the order asked
    np.testing.assert_allclose(d["obs"][:, 3:], obj, rtol=1e-6)
    assert d["action"].dtype == np.float32 and d["action"].shape == (sum(lengths), 7)
    np.testing.assert_allclose(d["action"], act, rtol=1e-6)
    assert np.abs(d["action"]).max() <= 1.0
    assert d["episode_ends"].dtype == np.int64
    np.testing.assert_array_equal(d["episode_ends"], np.cumsum(lengths))
    assert robomimic_spaces("lift", ["robot0_eef_pos", "object"], False) == (13, 7)


def test_filter_keys_and_env_meta(lift_file):
    with h5py.File(lift_file) as f:
        train = sorted(n.decode() for n in f["mask/train"][:])
        valid = sorted(n.decode() for n in f["mask/valid"][:])
    assert len(valid) == 1 and sorted(train + valid) == ["demo_0", "demo_1", "demo_2"]
    full = load_robomimic(lift_file, KEYS)
    tr = load_robomimic(lift_file, KEYS, filter_key="train")
    va = load_robomimic(lift_file, KEYS, filter_key="valid")
    assert len(tr["episode_ends"]) == 2 and len(va["episode_ends"]) == 1
    assert tr["obs"].shape[0] + va["obs"].shape[0] == full["obs"].shape[0]
    meta = read_env_meta(lift_file)
    assert meta["env_name"] == "Lift" and meta["type"] == 1 and "controller_configs" in meta["env_kwargs"]


def _mutate(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda f: f["data/demo_1/obs"].__delitem__("robot0_eef_pos"), r"demo_1.*robot0_eef_pos"),
        (lambda f: f["data/demo_0"].__delitem__("actions"), r"demo_0.*'actions'"),
        (lambda f: (f["data/demo_2/obs"].__delitem__("object"),
                    f["data/demo_2/obs"].create_dataset("object", data=np.zeros((2, 10)))),
         r"'demo_2' obs/object has 2 steps but actions have"),
        (lambda f: f["data/demo_0/actions"].__setitem__((1, 2), np.nan), r"demo_0.*NaN"),
        (lambda f: f["data/demo_1/obs/object"].__setitem__((0, 0), np.inf), r"demo_1.*obs/object.*NaN or inf"),
        (lambda f: (f["data/demo_0"].__delitem__("actions"),
                    f["data/demo_0"].create_dataset("actions", data=np.zeros((f["data/demo_0"].attrs["num_samples"],
                                                                               5)))), r"demo_0.*\(\d+, 5\)"),
        (lambda f: f["data/demo_0"].attrs.__setitem__("num_samples", 999), r"num_samples=999"),
        (lambda f: f["data"].attrs.__setitem__("total", 5), r"total"),
        (lambda f: f.__delitem__("data"), r"missing group 'data'"),
        (lambda f: [f["data"].__delitem__(k) for k in list(f["data"].keys())], r"no demos"),
    ],
    ids=["missing-obs-key", "missing-actions", "length-mismatch", "nan-action", "inf-obs", "action-dims",
         "num-samples", "total", "no-data", "zero-demos"],
)
def test_bad_files(lift_file, tmp_path, mutate, match):
    path = _copy(lift_file, tmp_path)
    _mutate(path, mutate)
    with pytest.raises(DatasetError, match=match) as e:
        load_robomimic(path, KEYS)
    assert str(path) in str(e.value)


def test_missing_file_and_filter_key(lift_file, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_robomimic(tmp_path / "nope.hdf5", KEYS)
    with pytest.raises(DatasetError, match="filter key 'test'.*available: \\['train', 'valid'\\]"):
        load_robomimic(lift_file, KEYS, filter_key="test")
    path = _copy(lift_file, tmp_path)
    _mutate(path, lambda f: f.__delitem__("mask"))
    with pytest.raises(DatasetError, match="filter key 'train'"):
        load_robomimic(path, KEYS, filter_key="train")
    _mutate(path, lambda f: f.create_dataset("mask/empty", data=np.array([], dtype="S8")))
    with pytest.raises(DatasetError, match="no demos selected by filter key 'empty'"):
        load_robomimic(path, KEYS, filter_key="empty")
    (tmp_path / "junk.hdf5").write_text("not hdf5")
    with pytest.raises(DatasetError, match="not a readable hdf5"):
        load_robomimic(tmp_path / "junk.hdf5", KEYS)


def test_spaces_table_errors():
    assert robomimic_spaces("tool_hang", KEYS, True) == (44 + 9, 10)
    with pytest.raises(ValueError, match="unknown robomimic task 'transport'"):
        robomimic_spaces("transport", KEYS, False)
    with pytest.raises(ValueError, match="'robot0_eef_vel'"):
        robomimic_spaces("lift", ["robot0_eef_vel"], False)


def test_spaces_match_envs():
    """The table agrees with robosuite's actual observation sizes (robomimic's "object" = "object-state")."""
    for task in TASK_ENV_NAMES:
        env = RobomimicEnv(default_env_meta(task), KEYS)
        try:
            obs, _ = env.reset(seed=0)
            assert obs["obs"].shape == (robomimic_spaces(task, KEYS, False)[0],), task
            assert env.action_dim == 7
        finally:
            env.close()


# ---------------------------------------------------------------- env


def test_env_from_v01_metadata(lift_env):
    meta = default_env_meta("lift")
    assert meta["env_kwargs"]["controller_configs"]["type"] == "OSC_POSE"  # robosuite 1.2 part config
    arm = lift_env.unwrapped.robots[0].part_controllers["right"]
    assert arm.input_type == "delta" and arm.input_ref_frame == "world"
    assert np.allclose(arm.kd, 2 * np.sqrt(arm.kp))  # "damping": 1 became damping_ratio 1
    assert lift_env.obs_dim == 19


def test_env_seeding(lift_env):
    a, _ = lift_env.reset(seed=3)
    b, _ = lift_env.reset(seed=4)
    c, _ = lift_env.reset(seed=3)
    np.testing.assert_array_equal(a["obs"], c["obs"])
    assert not np.allclose(a["obs"][:3], b["obs"][:3])  # cube position differs
    other = RobomimicEnv(default_env_meta("lift"), KEYS)  # a second instance reproduces the placement
    try:
        np.testing.assert_array_equal(other.reset(seed=3)[0]["obs"], a["obs"])
    finally:
        other.close()


def test_step_semantics(lift_env, lift_file):
    obs, info = lift_env.reset(seed=0)
    assert obs["obs"].dtype == np.float32 and info == {"success": False, "elapsed_steps": 0}
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        lift_env.step(np.zeros(6))
    with pytest.raises(ValueError, match="finite"):
        lift_env.step(np.array([0, 0, np.nan, 0, 0, 0, 0]))
    lift_env.max_steps = 2
    try:
        _, _, term, trunc, info = lift_env.step(np.zeros(7))
        assert (term, trunc, info["elapsed_steps"]) == (False, False, 1)
        _, _, term, trunc, info = lift_env.step(np.zeros(7))
        assert (term, trunc, info) == (False, True, {"success": False, "elapsed_steps": 2})
    finally:
        lift_env.max_steps = 400
    # replaying a recorded demo from its first state reaches success on its last step
    with h5py.File(lift_file) as f:
        states, actions = f["data/demo_0/states"][:], f["data/demo_0/actions"][:]
        eef0 = f["data/demo_0/obs/robot0_eef_pos"][0]
    obs = lift_env.reset_to(states[0])
    np.testing.assert_allclose(lift_env.get_state(), states[0])
    np.testing.assert_allclose(obs["obs"][10:13], eef0, atol=1e-6)
    terms = [lift_env.step(a)[2] for a in actions]
    assert terms[-1] and not any(terms[:-3])


def test_rot6d_round_trip():
    from scipy.spatial.transform import Rotation

    R = Rotation.random(5, random_state=0).as_matrix()
    np.testing.assert_allclose(rot6d_to_matrix(matrix_to_rot6d(R)), R, atol=1e-12)


def test_abs_actions_track_demo(lift_file):
    """Converted absolute actions, replayed with an absolute OSC, follow the recorded eef path (< 1 cm)."""
    d = load_robomimic(lift_file, ["robot0_eef_pos"], abs_action=True, filter_key="valid")
    assert d["action"].shape == (d["episode_ends"][-1], 10)
    rot = rot6d_to_matrix(d["action"][:, 3:9])
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    env = RobomimicEnv(read_env_meta(lift_file), ["robot0_eef_pos"], abs_action=True)
    try:
        arm = env.unwrapped.robots[0].part_controllers["right"]
        assert arm.input_type == "absolute"
        with h5py.File(lift_file) as f:
            name = f["mask/valid"][0].decode()
            states = f[f"data/{name}/states"][:]
            delta = f[f"data/{name}/actions"][:]
        obs = env.reset_to(states[0])
        errs, success = [], False
        for t, a in enumerate(d["action"]):
            errs.append(np.linalg.norm(obs["obs"] - d["obs"][t]))
            obs, _, term, _, _ = env.step(a)
            success |= term
        # the absolute target is the current eef plus the scaled delta
        np.testing.assert_allclose(d["action"][0, :3] - d["obs"][0], delta[0, :3] * 0.05, atol=1e-4)
        np.testing.assert_array_equal(d["action"][:, 9], delta[:, 6])
        assert max(errs) < 0.01, max(errs)  # measured ~2 mm
        assert success
    finally:
        env.close()


def needs_offscreen_renderer():
    """Skip only on the one condition that makes these tests impossible: no offscreen OpenGL context."""
    from drift_policy.envs.robomimic import offscreen_renderer_error

    reason = offscreen_renderer_error()
    if reason is not None:
        pytest.skip(f"offscreen rendering unavailable: {reason}")


def test_images_and_render(tmp_path):
    needs_offscreen_renderer()
    env = RobomimicEnv(default_env_meta("lift"), KEYS, image_keys=["agentview_image"], image_size=32, render=True)
    try:
        obs, _ = env.reset(seed=0)
        img = obs["agentview_image"]
        assert img.shape == (3, 32, 32) and img.dtype == np.uint8 and img.std() > 0
        frame = env.render(size=48)
        assert frame.shape == (48, 48, 3) and frame.dtype == np.uint8
    finally:
        env.close()
    blind = RobomimicEnv(default_env_meta("lift"), KEYS)
    try:
        with pytest.raises(RuntimeError, match="render=True"):
            blind.render()
    finally:
        blind.close()


# ---------------------------------------------------------------- writing, download, CLI


def test_generate_is_atomic_and_checks_seeds(tmp_path, monkeypatch):
    out = tmp_path / "x.hdf5"
    with pytest.raises(ValueError, match="overlap the evaluation seeds"):
        scripted.generate_dataset("lift", 10, out, seed=99995, progress=False)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scripted, "run_episode", boom)
    with pytest.raises(KeyboardInterrupt):
        scripted.generate_dataset("lift", 2, out, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_download_offline(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(RuntimeError, match="copy it to .*robomimic/lift/ph/low_dim_v141.hdf5"):
        rm.download_robomimic("lift", root=tmp_path)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    assert rm.robomimic_url("can") == "http://downloads.cs.stanford.edu/downloads/rt_benchmark/can/ph/low_dim_v141.hdf5"


def test_cli_inspect(lift_file, capsys):
    rm.main(["inspect", str(lift_file)])
    out = capsys.readouterr().out
    assert "env: Lift" in out and "demos: 3" in out and "obs/object: (10,)" in out and "mask/valid: 1" in out


def test_missing_robosuite_message(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "robosuite", None)
    monkeypatch.delitem(sys.modules, "drift_policy.envs.robomimic")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[robomimic\]"'):
        importlib.import_module("drift_policy.envs.robomimic")


@pytest.mark.parametrize("task", ["can", "square"])
def test_demonstrators_succeed(task):
    """One scripted episode per task (Can ~1.6 s, Square ~1.8 s on one core; both succeed for seed 0)."""
    env = RobomimicEnv(default_env_meta(task), ["object"], max_steps=400)
    try:
        res = scripted.run_episode(env, task, seed=0, record=True)
        assert res["success"], res["steps"]
        assert res["actions"].shape == (res["steps"], 7) and np.abs(res["actions"]).max() <= 1.0
        assert res["obs"]["object"].shape == (res["steps"], 14)
        assert res["dones"][-1] == 1
    finally:
        env.close()


@pytest.mark.slow
def test_train_and_eval_from_the_cli(lift_file, tmp_path):
    """hdf5 -> windows -> drift policy -> rollouts in robosuite (a worker process), then `drift-policy eval`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    common = [f"task.dataset={lift_file}", "task.max_steps=12"]
    subprocess.run([sys.executable, "-m", "drift_policy", "train", "task=lift_lowdim", *common,
                    "policy.backbone=tiny", "policy.n_noise=4", "train.max_steps=3", "train.max_minutes=0",
                    "train.batch_size=4", "train.eval_episodes=2", "train.eval_workers=1", "train.threads=1",
                    f"train.run_dir={run}"], check=True, env=env, capture_output=True, timeout=300)
    res = json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())
    assert res["task"] == "lift_lowdim" and res["n_episodes"] == 2 and "coverage_score" not in res
    assert [e["seed"] for e in res["per_episode"]] == [100000, 100001]
    assert all(e["steps"] == 12 and not e["success"] for e in res["per_episode"])   # 3 steps: no lift yet
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["policy"]["obs_dim"] == 19 and cfg["policy"]["action_dim"] == 7
    out = tmp_path / "eval.json"
    p = subprocess.run([sys.executable, "-m", "drift_policy", "eval", f"checkpoint={run / 'pretrained'}",
                        "episodes=1", "workers=0", "videos=1", f"out={out}"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["task"] == "lift_lowdim" and "lift_lowdim: score" in p.stdout
    video = tmp_path / "videos" / "lift_lowdim_seed100000.mp4"
    assert res["videos"] == ["videos/lift_lowdim_seed100000.mp4"]      # named relative to the JSON
    assert (out.parent / res["videos"][0]) == video and video.stat().st_size > 1000


def test_image_task_trains_and_evaluates_end_to_end(tmp_path):
    """lift_image: two cameras at a small size from a generated image file, through the same loop and evaluation."""
    from drift_policy import train as train_mod
    from drift_policy.config import compose

    path = tmp_path / "lift_img.hdf5"
    needs_offscreen_renderer()
    scripted.generate_dataset("lift", 1, path, seed=0, progress=False,
                              image_keys=("agentview_image", "robot0_eye_in_hand_image"), image_size=32)
    data = load_robomimic(path, KEYS[1:], image_keys=["agentview_image", "robot0_eye_in_hand_image"])
    assert data["agentview_image"].shape[1:] == (3, 32, 32) and data["agentview_image"].dtype == np.uint8
    cfg = compose(["task=lift_image", f"task.dataset={path}", "task.image_size=32", "task.crop_size=28",
                   "task.max_steps=4", "task.val_ratio=0", "policy.backbone=tiny", "policy.vision_backbone=tiny", "policy.n_noise=4",
                   "train.max_steps=2", "train.max_minutes=0", "train.batch_size=4", "train.eval_episodes=1",
                   "train.eval_workers=0", "train.threads=1", f"train.run_dir={tmp_path / 'run'}"])
    run = train_mod.train(cfg, progress=False)
    res = json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())
    assert res["task"] == "lift_image" and res["per_episode"][0]["steps"] == 4


def test_absolute_action_tasks_get_an_absolute_action_env(lift_file):
    """task.options.abs_action reaches the evaluation env: a policy trained on 10-d absolute actions steps a
    10-d controller (the env spec once dropped the option)."""
    from drift_policy.config import compose
    from drift_policy.tasks import env_spec, make_env

    for abs_action, dim in ((True, 10), (False, 7)):
        cfg = compose(["task=lift_lowdim", f"task.dataset={lift_file}", f"task.options.abs_action={abs_action}"])
        assert cfg.policy.action_dim == dim
        spec = env_spec(cfg.task)
        assert spec["kwargs"]["abs_action"] is abs_action
        env = make_env(spec, max_steps=2)
        try:
            assert env.action_dim == dim
        finally:
            env.close()
