"""The eval/ scripts that turn records into diagnoses: they must read what the bench writes and count correctly."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

EVAL = Path(__file__).resolve().parents[1] / "eval"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, EVAL / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_spearman_is_a_rank_correlation_with_ties():
    fc = _script("failure_coverage")
    assert fc.spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert fc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert fc.spearman([1, 2, 3], [5, 5, 5]) is None
    assert list(fc._ranks(np.array([3.0, 1.0, 3.0]))) == [1.5, 0.0, 1.5]


def test_failure_coverage_counts_each_test_seeds_failures_over_the_last_evaluations(pusht_zarr, tmp_path, monkeypatch):
    monkeypatch.setenv("DRIFT_POLICY_DATA_ROOT", str(pusht_zarr.parents[1]))
    fc = _script("failure_coverage")
    evals = [{"low_score_seeds": [100001]}, {"low_score_seeds": [100000, 100002]}, {"low_score_seeds": [100002]}]
    rec = {"meta": {"task": "pusht_keypoints", "start_seed": 100000, "eval_episodes": 3},
           "runs": [{"label": "drift_unet", "policy": "drift", "seed": 0, "evals": evals},
                    {"label": "diffusion_unet", "policy": "diffusion", "seed": 0, "evals": [{"mean_score": 1.0}]}]}
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec))
    out = json.loads(fc.main(["--records", str(path), "--dims", "0:18", "--last", "2", "--out", str(tmp_path / "o.json")]).read_text())
    assert out["test_seeds"] == [100000, 100001, 100002]
    assert len(out["runs"]) == 1 and out["runs"][0]["failures"] == [1, 0, 2]      # the last 2 evaluations only
    assert list(out["summary"]) == ["drift"]                                       # no failure lists: not counted
    assert all(d >= 0 for d in out["nearest"])
    # One seed per third, nearest first; each failed that many of its 2 counted episodes.
    expected = [[1, 0, 2][i] / 2 for i in np.argsort(out["nearest"], kind="stable")]
    assert out["summary"]["drift"]["failure_rate_by_third"] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="whole 2-d points"):
        fc.main(["--records", str(path), "--dims", "0:17", "--out", str(tmp_path / "o.json")])


def test_gpu_check_calibrates_seconds_per_step_from_the_logged_steps_after_the_first(tmp_path):
    gc = _script("gpu_check")
    rows = [{"step": 0, "train_minutes": 0.0},                                   # no loss: an eval line, skipped
            {"step": 10, "train_minutes": 1.0, "loss": 1.0},
            {"step": 20, "train_minutes": 2.0, "loss": 1.0},                     # 6 s/step (compiling): left out
            {"step": 30, "train_minutes": 2.1, "loss": 1.0},                     # 0.6 s/step
            {"step": 40, "train_minutes": 2.2, "loss": 1.0},                     # 0.6 s/step
            {"step": 50, "train_minutes": 2.5, "loss": 1.0}]                     # 1.8 s/step
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert gc.seconds_per_step(tmp_path) == pytest.approx(0.6)                  # the median of 0.6, 0.6, 1.8
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(SystemExit, match="calib_steps"):
        gc.seconds_per_step(tmp_path)


def test_gpu_check_names_an_unknown_argument_and_part():
    gc = _script("gpu_check")
    with pytest.raises(SystemExit, match="'minute=4'"):
        gc.main(["minute=4"])
    with pytest.raises(SystemExit, match="part must be"):
        gc.main(["part=train"])


def test_gpu_check_tiny_fills_the_cpu_budget_and_given_values_win(monkeypatch):
    gc = _script("gpu_check")
    seen = []
    monkeypatch.setattr(gc, "latency", lambda o: seen.append(o))
    gc.main(["part=latency", "tiny=1", "presets=small"])
    o = seen[0]
    assert o["device"] == "cpu" and o["latency_budget_s"] == gc.TINY["latency_budget_s"]
    assert o["presets"] == "small"                                             # given on the command line: kept
    with pytest.raises(SystemExit, match="compile_modes"):
        gc.throughput({**o, "compile_modes": "jit"})


def test_runner_record_writes_every_run_and_its_table(tmp_path):
    import torch

    from drift_policy.normalizer import Normalizer
    from drift_policy.policies import DriftConfig, make_policy

    rr = _script("runner_record")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit(
        "action", torch.rand(100, 2, generator=g) * 300 + 100)
    folder = make_policy(DriftConfig(backbone="tiny"), norm).eval().save_pretrained(tmp_path / "p")
    out = tmp_path / "runner.json"
    rec = rr.main([f"checkpoint={folder}", "rates=50,100", "seconds=0", "episodes=1", "max_steps=10", "search=0",
                   f"out={out}"])
    saved = json.loads(out.read_text())
    assert [r["report"]["target_rate_hz"] for r in saved["runs"]] == [50.0, 100.0]
    assert all(r["report"]["ticks"] == 10 and r["report"]["config"]["threads"] == 1 for r in saved["runs"])
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| 50 Hz |") == 1 and md.count("\n| 100 Hz |") == 1 and rec["search"] is None
    with pytest.raises(SystemExit, match="checkpoint= is required"):
        rr.main(["rates=50"])
