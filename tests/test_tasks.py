"""Task configs, flat-index training windows, and the generic evaluation path with dict observations."""

from pathlib import Path

import numpy as np
import pytest
import torch

from drift_policy.config import Config, compose
from drift_policy.data.windows import make_windows
from drift_policy.errors import ConfigError, DatasetError
from drift_policy.paths import CONFIG_DIR
from drift_policy.tasks import dataset_path, task_spaces

TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))
# Tasks whose YAML leaves a key to the user (``dataset: ???``): what completes them here, and what they need.
COMPLETE = {"lerobot": [f"task.dataset={Path(__file__).parent / 'fixtures' / 'lerobot' / 'pusht3'}"]}
NEEDS = {"lerobot": ("pyarrow", "av")}


@pytest.mark.parametrize("task", TASKS)
def test_every_task_config_composes_with_sizes_from_python(task):
    for module in NEEDS.get(task, ()):
        pytest.importorskip(module, reason=f"task {task} needs the {task} extra")
    cfg = compose([f"task={task}", "policy=drift_unet", *COMPLETE.get(task, [])])
    spaces = task_spaces(cfg.task)
    assert cfg.policy.obs_dim == spaces["obs_dim"] > 0
    assert cfg.policy.action_dim == spaces["action_dim"]
    assert cfg.policy.image_keys == tuple(cfg.task.image_keys)
    if cfg.task.image_keys:
        assert cfg.policy.crop_shape == (cfg.task.crop_size,) * 2
    # A config written to disk (checkpoint, config.json) reads back to the same config.
    assert Config.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_known_sizes():
    assert compose(["task=pusht_keypoints"]).policy.obs_dim == 20
    assert compose(["task=pusht_image"]).policy.obs_dim == 2
    lift = compose(["task=lift_lowdim"]).policy
    assert (lift.obs_dim, lift.action_dim) == (19, 7)
    assert compose(["task=lift_lowdim", "task.options.abs_action=true"]).policy.action_dim == 10
    assert compose(["task=can_lowdim"]).policy.obs_dim == 23


@pytest.mark.parametrize("overrides,match", [
    (["task=pusht_keypoints", "task.obs_keys=[agent_pos]"], "image_keys"),
    (["task=pusht_image", "task.crop_size=100"], "crop_size"),
    (["task=pusht_keypoints", "task.env=mujoco"], "task.env"),
    (["task=lift_lowdim", "task.options.robomimic_task=stack"], "stack"),
    (["task=lift_lowdim", "task.obs_keys=[object,joint_torque]"], "joint_torque"),
    (["task=pusht_keypoints", "+policy.obs_dim=7"], "contradicts"),
])
def test_bad_task_values_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        compose(overrides)


def test_dataset_path_is_relative_to_the_data_root_unless_absolute(tmp_path):
    cfg = compose(["task=lift_lowdim", f"task.data_root={tmp_path}"])
    assert dataset_path(cfg.task) == tmp_path / "robomimic/lift/ph/low_dim_v141.hdf5"
    cfg = compose(["task=lift_lowdim", f"task.dataset={tmp_path / 'x.hdf5'}"])
    assert dataset_path(cfg.task) == tmp_path / "x.hdf5"


def _episodes(lengths=(5, 7, 6), img=(3, 8, 8)):
    n = sum(lengths)
    steps = np.arange(n, dtype=np.float32)
    return {"obs": np.stack([steps, -steps], 1), "action": steps[:, None] * np.ones((1, 2), np.float32),
            "image": (np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, *img), np.uint8)),
            "episode_ends": np.cumsum(lengths)}


def test_windows_gather_obs_images_and_actions_from_the_same_steps():
    data = _episodes()
    train, val = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.0)
    assert val is None
    b = train.sample(64, torch.Generator().manual_seed(0))
    assert b["obs"].shape == (64, 2, 2) and b["image"].shape == (64, 2, 3, 8, 8) and b["action"].shape == (64, 4, 2)
    assert b["image"].dtype == torch.uint8                       # images stay uint8 until the encoder
    # Every key of a window indexes the same steps: obs step t carries t, image t, action t.
    np.testing.assert_array_equal(b["obs"][..., 0], b["action"][:, :2, 0])
    np.testing.assert_array_equal(b["image"][:, :, 0, 0, 0].float(), b["action"][:, :2, 0])
    # Windows never cross an episode boundary: consecutive steps differ by 0 (padding) or 1.
    d = np.diff(b["action"][:, :, 0].numpy(), axis=1)
    assert set(np.unique(d)) <= {0.0, 1.0}


def test_train_and_val_share_storage_and_split_by_episode():
    data = _episodes(lengths=(6,) * 10)
    train, val = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.2, seed=0)
    assert train.data["image"].data_ptr() == val.data["image"].data_ptr()   # stored once
    tr, va = set(train.steps("obs")[:, 0].tolist()), set(val.steps("obs")[:, 0].tolist())
    assert not tr & va and len(tr | va) == 60
    ep = lambda s: {int(x) // 6 for x in s}
    assert len(ep(va)) == 2 and not ep(tr) & ep(va)


def test_windows_reject_inconsistent_data():
    data = _episodes()
    bad = {**data, "image": data["image"][:-1]}
    with pytest.raises(DatasetError, match="'image' has 17 steps"):
        make_windows(bad, 4, 2, 2)
    with pytest.raises(DatasetError, match="episode_ends"):
        make_windows({**data, "episode_ends": np.array([5, 9])}, 4, 2, 2)
    with pytest.raises(DatasetError, match="missing 'action'"):
        make_windows({k: v for k, v in data.items() if k != "action"}, 4, 2, 2)


def test_bench_summary_reads_a_runs_evaluations(tmp_path, capsys):
    import json

    from drift_policy.bench import run_summary

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    cfg = compose(["task=lift_lowdim"]).to_dict()
    (run / "config.json").write_text(json.dumps(cfg))
    for step, score in [(100, 0.5), (200, 0.9), (300, 0.8)]:   # robomimic files: mean_score, no coverage_score
        (run / "eval" / f"step_{step:08d}.json").write_text(json.dumps(
            {"step": step, "train_minutes": step / 100, "mean_score": score, "success_rate": score}))
    s = run_summary([f"run={run}", f"out={tmp_path / 'rec.json'}"])
    assert [r["step"] for r in s["evals"]] == [100, 200, 300]
    assert s["max_coverage"] == 0.9 and abs(s["last10_coverage"] - 2.2 / 3) < 1e-9
    assert json.loads((tmp_path / "rec.json").read_text())["config"]["task"]["name"] == "lift_lowdim"
    assert s["plots"] == ["rec_score_steps.png"] and (tmp_path / "rec_score_steps.png").stat().st_size > 1000
    assert "![rec_score_steps](rec_score_steps.png)" in (tmp_path / "rec.md").read_text()
    assert "| 300 | 3.0 | 0.800 | 0.80 |" in capsys.readouterr().out
    from drift_policy.errors import RunFolderError

    with pytest.raises(RunFolderError, match="not a run folder"):
        run_summary([f"run={tmp_path}"])


@pytest.mark.slow
def test_cli_reports_config_and_data_errors_without_a_traceback(tmp_path):
    import subprocess
    import sys

    for args, needle in [(["train", "task.val_ratio=2"], "task.val_ratio must be in [0, 1)"),
                         (["train", "task=lift_lowdim", f"task.data_root={tmp_path}"], "robomimic dataset not found")]:
        p = subprocess.run([sys.executable, "-m", "drift_policy", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr[-1500:]
