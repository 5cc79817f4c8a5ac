"""Training survives faults: kill -9 and resume, corrupted checkpoints, non-finite losses; and is deterministic."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from drift_policy import train as train_mod
from drift_policy.checkpoint import load_checkpoint
from drift_policy.config import compose
from drift_policy.errors import CheckpointError
from drift_policy.policies import DriftPolicy, Policy
from drift_policy.runs import latest_good_checkpoint, list_checkpoints

REPO = Path(__file__).resolve().parents[1]

TINY = ["policy.backbone=tiny", "train.batch_size=4", "train.eval_episodes=0", "train.threads=1",
        "train.log_every=1", "train.warmup_steps=5", "train.wandb=disabled"]


def step_of(path) -> int:
    return int(path.stem.split("_")[1])


def logged_steps(run_dir) -> list[int]:
    """Steps in metrics.jsonl; a last line cut by a kill is ignored."""
    steps = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except json.JSONDecodeError:
                pass
    return steps


@pytest.fixture(scope="module")
def datasets(pusht_zarr):
    """The real Push-T windows, loaded once for the in-process tests."""
    return train_mod.make_datasets(compose([*TINY, f"task.data_root={pusht_zarr.parents[1]}"]))


@pytest.fixture
def tiny(tmp_path, datasets, monkeypatch):
    monkeypatch.setattr(train_mod, "make_datasets", lambda cfg: datasets)

    def make(name, *overrides):
        return compose([*TINY, f"train.run_dir={tmp_path / name}", *overrides])
    return make


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path, pusht_zarr):
    run = tmp_path / "run"
    env = {**os.environ, "DRIFT_POLICY_DATA_ROOT": str(pusht_zarr.parents[1]), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    every, total = 5, 60
    cmd = [sys.executable, "-m", "drift_policy", "train", *TINY, f"train.ckpt_every_steps={every}",
           f"train.max_steps={total}", f"train.run_dir={run}"]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.time() + 300
            while True:      # wait for a checkpoint and a little progress past it, then kill -9 mid-interval
                ckpts = list_checkpoints(run)
                if ckpts and max(logged_steps(run), default=0) >= step_of(ckpts[0]) + 2:
                    break
                assert proc.poll() is None, f"training ended before the kill:\n{(tmp_path / 'train.log').read_text()}"
                assert time.time() < deadline, "no checkpoint within 300 s"
                time.sleep(0.01)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpts = list_checkpoints(run)
    newest = step_of(ckpts[0])
    last_logged = max(logged_steps(run))
    assert newest < total and 0 <= last_logged - newest <= every       # at most one interval of work lost
    for p in ckpts:                                                     # what is on disk verifies (sha256)
        assert load_checkpoint(p)["step"] == step_of(p)

    res = subprocess.run([sys.executable, "-m", "drift_policy", "resume", str(run)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"from step_{newest:08d}.pt (step {newest})" in res.stdout
    final = list_checkpoints(run)[0]
    assert step_of(final) == total and load_checkpoint(final)["step"] == total
    # every step logged exactly once: records of the redone steps were dropped on resume
    assert logged_steps(run) == list(range(1, total + 1))
    pol = Policy.from_pretrained(run / "pretrained")
    assert torch.isfinite(pol.predict_action(torch.rand(1, 2, 20) * 512)["action"]).all()


def test_corrupted_checkpoint_is_reported_and_resume_falls_back(tiny):
    cfg = tiny("run", "train.max_steps=10", "train.ckpt_every_steps=5", "train.keep_checkpoints=3")
    run = train_mod.train(cfg, progress=False)
    p5, p10 = sorted(list_checkpoints(run), key=step_of)
    reference = load_checkpoint(p10)["model"]

    data = p10.read_bytes()
    p10.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"step_00000010\.pt: truncated \(\d+ of \d+ bytes\)"):
        load_checkpoint(p10)
    p10.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    with pytest.raises(CheckpointError, match=r"corrupted \(SHA-256 does not match step_00000010\.pt\.json\)"):
        load_checkpoint(p10)
    with pytest.warns(UserWarning, match="skipping bad checkpoint: .*step_00000010.pt: corrupted"):
        path, ckpt = latest_good_checkpoint(run)
    assert path == p5 and ckpt["step"] == 5

    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        train_mod.train(cfg, run_dir=run, resume=True, progress=False)
    # redone from step 5 with the saved RNG states: bit-identical to the uninterrupted run
    redone = load_checkpoint(p10)["model"]
    assert all(torch.equal(redone[k], v) for k, v in reference.items())

    for p in list_checkpoints(run):                                      # nothing usable left
        p.write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no usable checkpoint"):
        train_mod.train(cfg, run_dir=run, resume=True, progress=False)


def test_nan_loss_skips_the_step_then_aborts(tiny, monkeypatch):
    original = DriftPolicy.compute_loss
    calls = []

    def nan_on_third_call(self, batch):
        loss, info = original(self, batch)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 3 else loss), info

    monkeypatch.setattr(DriftPolicy, "compute_loss", nan_on_third_call)
    with pytest.warns(UserWarning, match="step 2: non-finite loss or gradient .*step skipped"):
        run = train_mod.train(tiny("flaky", "train.max_steps=5", "train.ckpt_every_steps=5"), progress=False)
    assert len(calls) == 6 and logged_steps(run) == [1, 2, 3, 4, 5]     # the bad step was retried, not counted
    ckpt = load_checkpoint(list_checkpoints(run)[0])
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())

    monkeypatch.setattr(DriftPolicy, "compute_loss", lambda self, b: (original(self, b)[0] * float("inf"), {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=r"3 consecutive non-finite steps at step 0; aborting "
                                                     r"\(last good weights saved in .*checkpoints\)"):
            train_mod.train(tiny("broken", "train.max_bad_steps=3"), progress=False)


def test_same_seed_same_evaluation(tiny):
    results = []
    for name in ("a", "b"):
        cfg = tiny(name, "train.max_steps=6", "train.ckpt_every_steps=6", "train.eval_episodes=2",
                   "train.eval_workers=0", "task.max_steps=16", "train.eval_every_steps=0")
        run = train_mod.train(cfg, progress=False)
        res = json.loads((run / "eval" / "step_00000006.json").read_text())
        res.pop("wall_s"), res.pop("train_minutes")                     # wall-clock times
        results.append(res)
    assert results[0] == results[1]
    assert len(results[0]["per_episode"]) == 2 and results[0]["step"] == 6


# ---- issue 38 item 10: faults found by probing main ---------------------------------------------------------------
def cli_error(capsys, *argv) -> str:
    """The one-line error of ``drift-policy argv`` (exit status 2), without a traceback."""
    from drift_policy.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("drift-policy ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def pretrained(tmp_path):
    """A bare pretrained folder of a tiny Push-T keypoints policy (obs_dim 20, no camera)."""
    from drift_policy.normalizer import Normalizer

    norm = Normalizer().fit("obs", torch.rand(50, 20) * 512).fit("action", torch.rand(50, 2) * 512)
    return DriftPolicy(compose(["policy.backbone=tiny"]).policy, norm).save_pretrained(tmp_path / "pretrained")


def test_cli_option_errors_are_one_line(capsys, pretrained, tmp_path, monkeypatch):
    import drift_policy.evaluation as evaluation

    def no_rollouts(*a, **kw):
        raise AssertionError("an evaluation started before the options were checked")

    monkeypatch.setattr(evaluation, "evaluate", no_rollouts)
    out = tmp_path / "e.json"
    msg = cli_error(capsys, "eval", f"checkpoint={pretrained}", "episodes=0", f"out={out}")
    assert msg == "drift-policy eval: error: episodes must be >= 1, got 0"
    msg = cli_error(capsys, "eval", f"checkpoint={pretrained}", "task=pusht_image", "episodes=1", f"out={out}")
    assert "task=pusht_image" in msg and "obs_dim 20" in msg and "camera" in msg
    assert not out.exists()
    msg = cli_error(capsys, "run", f"checkpoint={pretrained}", "rate_hz=abc", f"out={tmp_path / 'r.json'}")
    assert "rate_hz" in msg and "'abc'" in msg and "max" in msg
    msg = cli_error(capsys, "export", f"checkpoint={pretrained}", "format=tflite", f"out={tmp_path / 'p.tfl'}")
    assert msg == "drift-policy export: error: format must be one of onnx, torchscript, aoti, got 'tflite'"


def test_divergence_is_a_one_line_error(capsys, tiny, tmp_path):
    run = tmp_path / "diverged"
    msg = cli_error(capsys, "train", *TINY, "train.lr=1e30", "train.max_steps=50", "train.max_bad_steps=3",
                    f"train.run_dir={run}")
    assert msg.startswith("drift-policy train: error: training diverged: 3 consecutive non-finite steps at step ")
    assert "train.lr" in msg and "1e+30" in msg and str(run / "checkpoints") in msg


# A full disk, simulated with a file-size limit (prlimit --fsize): the writes fail with EFBIG, not a signal.
FULL_DISK = """
import resource, signal, sys
import torch
from drift_policy import cli, train
from drift_policy.checkpoint import save_checkpoint

def rollouts(policy, cfg, n, workers, **kw):   # the episodes' results, without running them: writing is under test
    eps = [{"seed": 100000 + i, "max_reward": 0.25, "steps": 300, "success": False} for i in range(n)]
    return {"task": cfg.task.name, "mean_score": sum(e["max_reward"] for e in eps) / n, "success_rate": 0.0,
            "n_episodes": n, "start_seed": 100000, "per_episode": eps, "videos": []}

train.evaluate_policy = rollouts
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
if sys.argv[1] == "checkpoint":
    try:
        save_checkpoint({"model": {"w": torch.zeros(1000)}, "ema": {}}, sys.argv[2])
    except OSError as e:
        print(f"{type(e).__name__}: {e}")
else:
    cli.main(sys.argv[1:])
"""


@pytest.mark.slow
def test_a_full_disk_names_the_file_and_keeps_the_score(pretrained, tmp_path):
    def run(*args):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        return subprocess.run([sys.executable, "-c", FULL_DISK, *args], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)

    out = tmp_path / "records" / "eval.json"
    res = run("eval", f"checkpoint={pretrained}", "episodes=20", f"out={out}")
    assert res.returncode == 2, res.stderr
    assert "pusht_keypoints: score 0.250, success rate 0.00 over 20 episodes" in res.stdout    # not lost
    err = [line for line in res.stderr.splitlines() if line.startswith("drift-policy")]
    assert err == [f"drift-policy eval: error: [Errno 27] cannot write {out}: File too large"], res.stderr
    assert not out.exists() and list(out.parent.iterdir()) == []              # no temporary file left behind
    ckpt = tmp_path / "checkpoints" / "step_00000005.pt"
    res = run("checkpoint", str(ckpt))
    assert res.stdout.strip() == f"OSError: [Errno 27] cannot write {ckpt}: File too large", res.stderr


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    """Issue 38 item 10.5: files are created as a plain open() would create them (0666 minus the umask), not
    0600 as mkstemp makes its temporary files: a released policy can be read by another user or container."""
    import stat

    from drift_policy.checkpoint import save_checkpoint
    from drift_policy.fileio import atomic_write_text, unique_temp_path
    from drift_policy.normalizer import Normalizer

    norm = Normalizer().fit("obs", torch.rand(50, 20) * 512).fit("action", torch.rand(50, 2) * 512)
    policy = DriftPolicy(compose(["policy.backbone=tiny"]).policy, norm)
    old = os.umask(umask)
    try:
        files = [atomic_write_text(tmp_path / "config.json", "{}"),
                 save_checkpoint({"model": {"w": torch.zeros(3)}, "ema": {}}, tmp_path / "ckpt" / "step_00000001.pt"),
                 unique_temp_path(tmp_path / "policy.onnx")]           # what export writes into, then renames
        files += list(policy.save_pretrained(tmp_path / "pretrained").iterdir())
    finally:
        os.umask(old)
    assert len(files) == 6
    got = {str(f.relative_to(tmp_path)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert got == {name: oct(mode) for name in got}


@pytest.mark.parametrize("typo,fix", [
    ("train.lrr=0.1", "train.lr=0.1"), ("trian.lr=0.1", "train.lr=0.1"), ("policy.n_noize=4", "policy.n_noise=4"),
    ("taskk=pusht_image", "task=pusht_image"), ("+train.lrr=0.1", "train.lr")])
def test_a_typo_hint_names_the_real_key(typo, fix, capsys):
    """Issue 38 item 10.6: the hint names the closest real key, and following it works; it never suggests a '+'
    override (an added key is refused)."""
    import re

    from drift_policy.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        compose([typo])
    msg = str(e.value)
    assert f"did you mean {fix}?" in msg and "+" not in msg, msg
    if "=" in fix:
        compose([fix])                                                     # the hint is accepted
    line = cli_error(capsys, "train", typo)
    assert re.search(rf"did you mean {re.escape(fix)}\?", line) and "+" not in line
