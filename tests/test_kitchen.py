"""Franka Kitchen: the env wrapper (observation layout, noise, score), the scripted demonstrator, the zarr
generator/loader and the task end to end. Skipped without the kitchen extra (gymnasium-robotics)."""
from __future__ import annotations

import json

import numpy as np
import pytest

import drift_policy.envs.kitchen  # noqa: E402,F401  (first: it sets MUJOCO_GL before anything imports mujoco)

pytest.importorskip("gymnasium_robotics")
zarr = pytest.importorskip("zarr")

from drift_policy.data import kitchen as kd  # noqa: E402
from drift_policy.data.kitchen_demo import DEMO_TASKS, ORDERS, KitchenDemonstrator, draw_order  # noqa: E402
from drift_policy.envs.kitchen import (  # noqa: E402
    COMPLETE_THRESH,
    OBS_SLICES,
    TASK_GOALS,
    TASK_QPOS,
    TASKS,
    KitchenEnv,
    completed_tasks,
)
from drift_policy.errors import ConfigError, DatasetError  # noqa: E402

INIT_QPOS = np.array([1.48388023e-01, -1.76848573e00, 1.84390296e00, -2.47685760e00, 2.60252026e-01, 7.12533105e-01,
                      1.59515394e00, 4.79267505e-02, 3.71350919e-02])   # D4RL's start posture of the arm


@pytest.fixture(scope="module")
def env():
    e = KitchenEnv()
    yield e
    e.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("kitchen") / "demos.zarr"
    stats = kd.generate(2, path, seed=11, progress=False)
    return path, stats


def _set_task_state(env, task, done=True):
    """Put ``task``'s object joints at their goal (or back at the start) in the simulator, as if moved there."""
    import mujoco

    m, d = env.sim
    idx = list(TASK_QPOS[task])
    d.qpos[idx] = TASK_GOALS[task] if done else env._env.robot_env.init_qpos[idx]
    d.qvel[:] = 0.0
    mujoco.mj_forward(m, d)


def test_observation_layout_noise_and_seed_determinism(env):
    obs, info = env.reset(seed=100000)
    assert obs.shape == (60,) and obs.dtype == np.float32
    qpos = env.data.qpos
    robot, objects = obs[OBS_SLICES["robot_qpos"]], obs[OBS_SLICES["object_qpos"]]
    # joint positions with D4RL's noise at ratio 0.1: at most 0.1 x 0.1 rad on the robot, 0.1 x amplitude on objects
    assert np.allclose(qpos[:9], INIT_QPOS, atol=1e-6)
    assert 0 < np.abs(robot - qpos[:9]).max() <= 0.01 + 1e-6
    assert np.abs(objects - qpos[9:30]).max() <= 0.01 + 1e-6
    assert np.allclose(objects[23 - 9:26 - 9], [-0.269, 0.35, 1.619], atol=0.011)   # kettle xyz on its burner
    assert not obs[OBS_SLICES["goal"]].any()                                          # D4RL's masked goal
    assert info["completed"] == [] and not any(info[f"p{k}"] for k in (1, 2, 3, 4))

    actions = np.random.default_rng(0).uniform(-1, 1, (3, 9))
    rolls = []
    for _ in range(2):                      # same seed, same actions: the same observations, bit for bit
        o, _ = env.reset(seed=5)
        rolls.append(np.stack([o] + [env.step(a)[0] for a in actions]))
    assert np.array_equal(rolls[0], rolls[1])
    other, _ = env.reset(seed=6)
    assert not np.array_equal(other, rolls[0][0])                 # seeds differ in the noise only
    assert np.allclose(other, rolls[0][0], atol=0.021)
    with pytest.raises(ValueError, match="action"):
        env.step(np.full(9, np.nan))


def test_completion_threshold_matches_d4rl():
    qpos = np.zeros(30)
    for t in TASKS:
        qpos[list(TASK_QPOS[t])] = TASK_GOALS[t]
    assert completed_tasks(qpos) == list(TASKS)
    near = qpos.copy()
    near[22] = TASK_GOALS["microwave"][0] + 0.99 * COMPLETE_THRESH      # microwave just inside the threshold
    near[19] = TASK_GOALS["slide cabinet"][0] - 1.01 * COMPLETE_THRESH  # slide cabinet just outside it
    done = completed_tasks(near)
    assert "microwave" in done and "slide cabinet" not in done


def test_score_counts_known_completions_in_order(env):
    env.reset(seed=1)
    zero = np.zeros(9)
    _set_task_state(env, "kettle")
    _set_task_state(env, "microwave")
    _, r, term, trunc, info = env.step(zero)
    assert info["completed"] == ["microwave", "kettle"]           # the same step: listed in TASKS order
    assert r == pytest.approx(2 / 7) and info["p2"] and not info["p3"] and not info["is_success"]
    assert info["done_microwave"] and info["done_kettle"] and not info["done_light_switch"]
    _set_task_state(env, "microwave", done=False)                  # undoing a subtask does not take it back
    _set_task_state(env, "light switch")
    _, r, _, _, info = env.step(zero)
    assert info["completed"] == ["microwave", "kettle", "light switch"] and r == pytest.approx(3 / 7)
    _set_task_state(env, "slide cabinet")
    _, r, term, _, info = env.step(zero)
    assert info["p4"] and info["is_success"] and info["n_completed"] == 4 and not term
    for t in TASKS:                                                # all seven: the episode ends
        _set_task_state(env, t)
    _, r, term, trunc, info = env.step(zero)
    assert term and not trunc and r == 1.0 and info["completed"][:4] == ["microwave", "kettle", "light switch",
                                                                         "slide cabinet"]


def test_orders_are_multimodal():
    assert len(ORDERS) == 360 and all(len(set(o)) == 4 for o in ORDERS)
    drawn = [draw_order(np.random.default_rng([s, 1])) for s in range(200)]
    assert len(set(drawn)) > 100                                   # many distinct orders ...
    assert {o[0] for o in drawn} == set(DEMO_TASKS)                # ... and every subtask is done first sometimes
    with pytest.raises(ValueError, match="cannot do"):
        KitchenDemonstrator(None, np.random.default_rng(0), order=("hinge cabinet",))   # checked first


def test_demonstrator_completes_its_four_subtasks_deterministically(env):
    eps = [kd.run_demo_episode(env, s) for s in (3, 4)]
    for ep in eps:
        assert ep["success"], (ep["order"], ep["completed"])
        assert [t for t in ep["completed"] if t in ep["order"]] == ep["order"]   # done in the planned order
        assert ep["steps"] <= 280 and np.abs(ep["action"]).max() <= 1.0
    assert eps[0]["order"] != eps[1]["order"]
    again = kd.run_demo_episode(env, 3)
    assert np.array_equal(again["action"], eps[0]["action"]) and np.array_equal(again["obs"], eps[0]["obs"])


@pytest.mark.slow
def test_demonstrator_does_not_depend_on_blas_threads(tmp_path):
    """The same seed gives the same actions with 1 and 4 BLAS threads: OpenBLAS rounds some tiny products
    differently with different thread counts, and one ulp grows into another trajectory within 80 steps."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, numpy as np; from drift_policy.envs.kitchen import KitchenEnv; "
            "from drift_policy.data.kitchen import run_demo_episode; "
            "np.save(sys.argv[1], run_demo_episode(KitchenEnv(), 3, max_steps=80)['action'])")
    repo = str(Path(__file__).resolve().parents[1])
    runs = []
    for threads in ("1", "4"):
        out = tmp_path / f"actions_{threads}.npy"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, capture_output=True)
        runs.append(np.load(out))
    assert runs[0].shape == (80, 9) and np.array_equal(runs[0], runs[1])


def test_generator_round_trips_through_loader_and_replays(store, env):
    path, stats = store
    data = kd.load_kitchen(path)
    ends = data["episode_ends"]
    assert data["obs"].shape == (ends[-1], 60) and data["action"].shape == (ends[-1], 9)
    assert stats["episodes"] == len(ends) == 2 and stats["steps"] == ends[-1]
    root = zarr.open(str(path), mode="r")
    assert root.attrs["schema"] == kd.SCHEMA and list(root.attrs["tasks"]) == list(TASKS)
    seeds = root["meta"]["seeds"][:]
    assert len(seeds) == 2 and all(s < kd.EVAL_START_SEED for s in seeds)
    order = root["meta"]["order"][:]
    completed = root["meta"]["completed"][:]
    for o, c in zip(order, completed):                       # every stored episode did its 4 subtasks
        assert set(o) <= set(c[c >= 0])
    # the stored actions replayed on the stored seed reproduce the stored observations
    obs, _ = env.reset(seed=int(seeds[0]))
    replay = [obs] + [env.step(a)[0] for a in data["action"][:ends[0] - 1]]
    assert np.allclose(np.stack(replay), data["obs"][:ends[0]], atol=1e-6)


def test_store_stats_read_back_what_generation_reported(store, tmp_path, capsys):
    """``stats`` on an existing store writes the record ``generate --record`` would have (orders, steps, seeds)."""
    path, stats = store
    out = tmp_path / "kitchen_data.json"
    kd.main(["stats", str(path), "--out", str(out)])
    rec = json.loads(out.read_text())
    for k in ("episodes", "attempts", "success_rate", "steps", "seeds", "mean_steps", "distinct_orders",
              "first_task", "task_share"):
        assert rec[k] == pytest.approx(stats[k]), k
    assert rec["command"].startswith("python -m drift_policy.data.kitchen stats") and "code_commit" in rec
    assert sum(rec["first_task"].values()) == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="not found"):
        kd.main(["stats", str(tmp_path / "nope.zarr"), "--out", str(out)])


def test_generation_refuses_evaluation_seeds(tmp_path):
    with pytest.raises(ValueError, match="overlap the evaluation seeds"):
        kd.generate(10, tmp_path / "x.zarr", seed=kd.EVAL_START_SEED - 5, progress=False)
    with pytest.raises(SystemExit, match="overlap"):
        kd.main(["generate", "--episodes", "2", "--seed", "100000", "--out", str(tmp_path / "y.zarr")])
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "y.zarr").exists()


def _corrupt(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    edit(zarr.open(str(dst), mode="r+"))
    return dst


@pytest.mark.parametrize("edit, match", [
    (lambda r: r["data"].__delitem__("obs"), "data/obs"),
    (lambda r: r["data"].__setitem__("action", np.zeros((5, 9), np.float32)), "data/action"),
    (lambda r: r["data"].__setitem__("obs", np.zeros((r["data"]["action"].shape[0], 59), np.float32)),
     "data/obs.*expected"),
    (lambda r: r["data"]["obs"].__setitem__((3, 0), np.nan), "data/obs.*NaN"),
    (lambda r: r["data"]["action"].__setitem__((2, 0), 3.0), "data/action.*\\[-1, 1\\]"),
    (lambda r: r["meta"].__setitem__("episode_ends", np.array([5, 3, 9])), "meta/episode_ends"),
    (lambda r: r.__delitem__("meta"), "group 'meta'"),
])
def test_loader_names_file_and_key_on_bad_stores(store, tmp_path, edit, match):
    bad = _corrupt(store[0], tmp_path / "bad.zarr", edit)
    with pytest.raises(DatasetError, match=match) as e:
        kd.load_kitchen(bad)
    assert str(bad) in str(e.value)


def test_missing_store_says_how_to_generate(tmp_path):
    from drift_policy.config import compose
    from drift_policy.tasks import load_data

    cfg = compose(["task=kitchen_lowdim", f"task.dataset={tmp_path / 'nope.zarr'}"])
    with pytest.raises(DatasetError, match="not found.*drift_policy.data.kitchen generate"):
        load_data(cfg.task)
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(DatasetError, match="empty.zarr"):
        kd.load_kitchen(tmp_path / "empty.zarr")


def test_task_config_fixes_horizons_and_checks_keys():
    from drift_policy.config import compose

    cfg = compose(["task=kitchen_lowdim"])
    p = cfg.policy
    assert (p.n_obs_steps, p.n_action_steps, p.horizon, p.obs_dim, p.action_dim) == (2, 8, 16, 60, 9)
    assert cfg.task.max_steps == 280 and cfg.task.start_seed == 100000 and cfg.task.env == "kitchen"
    with pytest.raises(ConfigError, match="task.obs_keys"):
        compose(["task=kitchen_lowdim", "task.obs_keys=[keypoint]"])


def test_train_and_eval_end_to_end_reports_p1_to_p4_and_orders(store, tmp_path):
    """task=kitchen_lowdim trains a tiny drift policy for 2 steps from the CLI; its evaluation record has p1..p4,
    which subtasks each episode completed, and in what order."""
    from drift_policy.cli import main

    run = tmp_path / "run"
    main(["train", "task=kitchen_lowdim", f"task.dataset={store[0]}", "task.max_steps=8", "task.val_ratio=0",
          "policy=drift_unet", "policy.backbone=tiny", "policy.n_noise=2", "train.max_steps=2",
          "train.max_minutes=0", "train.batch_size=4", "train.eval_episodes=1", "train.eval_workers=0",
          "train.threads=1", f"train.run_dir={run}"])
    main(["eval", f"checkpoint={run}", "episodes=2", "workers=0", "videos=1"])
    res = json.loads((run / "eval.json").read_text())
    assert res["task"] == "kitchen_lowdim" and res["n_obs_steps"] == 2 and res["max_steps"] == 8
    for k in ("p1", "p2", "p3", "p4", "done_microwave", "mean_score", "success_rate"):
        assert 0.0 <= res[k] <= 1.0, k
    assert [e["seed"] for e in res["per_episode"]] == [100000, 100001]
    for e in res["per_episode"]:
        assert e["steps"] == 8 and isinstance(e["completed"], list) and "p4" in e
        assert e["max_reward"] == pytest.approx(len(e["completed"]) / 7)
    assert len(res["videos"]) == 1 and (run / res["videos"][0]).stat().st_size > 0   # headless (EGL) frames

    # The object joints that only jitter in the data are not stretched to [-1, 1] (Kitchen.obs_min_range).
    import torch

    from drift_policy import DriftPolicy
    from drift_policy.data.kitchen import load_kitchen
    from drift_policy.envs.kitchen import OBS_SLICES

    obs = torch.as_tensor(load_kitchen(store[0])["obs"])
    y = DriftPolicy.from_pretrained(run / "pretrained").normalizer.normalize("obs", obs)
    rng = obs.max(0).values - obs.min(0).values
    jitter = (rng > 1e-4) & (rng < 0.1)
    jitter[OBS_SLICES["robot_qpos"]] = False
    assert jitter.any() and y[:, jitter].abs().max() < 1.0
    assert y[:, ~jitter & (rng >= 0.1)].abs().max() == pytest.approx(1.0)
