"""drift-policy plot: PNGs from a real (tiny) run folder, written by the command and at the end of training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from drift_policy import train as train_mod
from drift_policy.config import compose
from drift_policy.errors import RunFolderError
from drift_policy.plots import plot_run

REPO = Path(__file__).resolve().parents[1]
TINY = ["policy.backbone=tiny", "train.batch_size=4", "train.threads=1", "train.log_every=1",
        "train.warmup_steps=2", "train.wandb=disabled", "train.max_steps=6", "train.ckpt_every_steps=6",
        "train.eval_episodes=1", "train.eval_workers=0", "train.eval_every_steps=3", "train.eval_every_minutes=0",
        "task.max_steps=16"]


def _png_ok(path: Path) -> None:
    """A readable PNG with real content: not blank, several colours, a plotted curve's worth of ink."""
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300, img.shape
    rgb = img[..., :3]
    ink = (rgb.mean(axis=-1) < 0.9).mean()
    assert 0.01 < ink < 0.6, f"{path.name}: {ink:.3f} of the pixels are drawn"
    assert len(np.unique((rgb * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 10


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, pusht_zarr):
    """A real run folder: 6 steps of the tiny drift policy, evaluated at steps 3 and 6 (1 episode, 16 env steps)."""
    run = tmp_path_factory.mktemp("plots") / "run"
    cfg = compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}", f"train.run_dir={run}"])
    train_mod.train(cfg, progress=False)
    return run


def test_training_writes_the_plots(tiny_run):
    names = sorted(p.name for p in (tiny_run / "plots").glob("*.png"))
    # Training records carry sample-pass accounting, so the score is also plotted against it.
    assert names == ["drift_v2.png", "loss.png", "mse_to_expert.png", "score_sample_passes.png", "score_steps.png"]
    for p in (tiny_run / "plots").glob("*.png"):
        _png_ok(p)


@pytest.mark.slow
def test_plot_command_writes_pngs(tiny_run, tmp_path):
    out = tmp_path / "figs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "drift_policy", "plot", f"run={tiny_run}", f"out={out}"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    written = sorted(out.glob("*.png"))
    assert [w.name for w in written] == ["drift_v2.png", "loss.png", "mse_to_expert.png", "score_sample_passes.png",
                                         "score_steps.png"]
    assert all(f"written: {w}" in p.stdout for w in written)
    for w in written:
        _png_ok(w)


def test_score_against_sample_passes_when_records_carry_them(tiny_run, tmp_path):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text((tiny_run / "config.json").read_text())
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    for r in metrics:                           # records with sample-pass accounting: metrics lines ...
        r["sample_passes"] = r["step"] * 4 / 1000
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    evals = sorted((tiny_run / "eval").glob("step_*.json"))
    assert len(evals) == 2
    for i, e in enumerate(evals):               # ... and an eval record's own field (the other falls back)
        rec = json.loads(e.read_text())
        if i == 0:
            rec["sample_passes"] = 0.5
        (run / "eval" / e.name).write_text(json.dumps(rec))
    names = sorted(p.name for p in plot_run(run, tmp_path / "out"))
    assert "score_sample_passes.png" in names and "score_steps.png" in names
    _png_ok(tmp_path / "out" / "score_sample_passes.png")


@pytest.mark.slow
def test_missing_or_empty_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(RunFolderError, match="not a run folder"):
        plot_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(RunFolderError, match="nothing to plot"):
        plot_run(tmp_path / "empty")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "drift_policy", "plot", f"run={tmp_path / 'nope'}"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "not a run folder" in p.stderr and "Traceback" not in p.stderr
