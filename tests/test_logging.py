"""Training's progress bar, wandb offline logging (same keys as metrics.jsonl) and evaluation records."""
import io
import json

import pytest

from drift_policy import train as train_mod
from drift_policy.config import compose
from drift_policy.evaluation import save_eval_json
from drift_policy.progress import TrainProgress


def _last_line(buf: io.StringIO) -> str:
    return buf.getvalue().replace("\n", "\r").split("\r")[-2 if buf.getvalue().endswith("\n") else -1]


def test_progress_under_a_step_budget_shows_the_eta_and_the_latest_evaluation():
    buf = io.StringIO()
    bar = TrainProgress(max_steps=200, max_minutes=0, file=buf)
    assert bar.bar.total == 200
    for step in range(1, 51):
        bar.update(step, step * 0.01)
    bar.set_eval(0.612, 50)
    bar.set_train(0.25, 0.0123)
    line = _last_line(buf)
    assert " 50/200 " in line and "25%" in line
    assert "<" in line.split("[", 1)[1]                  # tqdm's "elapsed<remaining": the ETA
    assert "eval=0.612@50" in line and "loss=0.250" in line and "mse=0.0123" in line


def test_progress_under_a_time_budget_shows_training_minutes_against_the_budget():
    buf = io.StringIO()
    bar = TrainProgress(max_steps=10**6, max_minutes=30, step=10, train_seconds=60, file=buf)
    assert bar.bar.total == 1800 and bar.bar.n == 60     # resumed runs start where they were
    bar.update(20, 900.0)
    bar.set_eval(0.4, 20)
    line = _last_line(buf)
    assert line.startswith("train 15.0/30.0 min") and "50%" in line and "step=20" in line and "eval=0.400@20" in line
    bar.update(30, 5000.0)                               # the last step may overshoot the budget
    assert bar.bar.n == bar.bar.total
    bar.close()
    bar.set_eval(0.5, 30)                                # the final evaluation comes after close: no error


def test_eval_json_names_its_videos_relative_to_itself(tmp_path):
    video = tmp_path / "videos" / "pusht_keypoints_seed100000.mp4"
    video.parent.mkdir()
    video.write_bytes(b"x")
    path = save_eval_json({"mean_score": 0.5, "videos": [str(video)]}, tmp_path / "eval" / "e.json")
    rec = json.loads(path.read_text())
    assert rec["videos"] == ["../videos/pusht_keypoints_seed100000.mp4"]
    assert (path.parent / rec["videos"][0]).resolve() == video.resolve()


def test_wandb_offline_logs_the_same_keys_as_metrics_jsonl(tmp_path, monkeypatch, pusht_zarr):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.sdk.wandb_run.Run.log

    def capture(self, data, *args, **kwargs):
        logged.append(dict(data))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", capture)
    run = tmp_path / "run"
    cfg = compose(["policy.backbone=tiny", "train.batch_size=4", "train.threads=1", "train.log_every=1",
                   "train.warmup_steps=2", "train.max_steps=3", "train.ckpt_every_steps=3", "train.eval_episodes=1",
                   "train.eval_workers=0", "train.eval_every_steps=3", "train.eval_every_minutes=0",
                   "task.max_steps=8", "train.wandb=offline", f"task.data_root={pusht_zarr.parents[1]}",
                   f"train.run_dir={run}"])
    train_mod.train(cfg, progress=False)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == len(lines) == 4                # 3 training steps + 1 evaluation
    assert [set(r) for r in logged] == [set(r) for r in lines]
    assert any("eval/mean_score" in r for r in logged) and any("train/mse_to_expert" in r for r in logged)
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0
