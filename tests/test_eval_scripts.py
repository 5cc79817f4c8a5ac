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


# ---- eval/profile_image_step.py (issue 39) -------------------------------------------------------------------
def _fake_pusht_image(n_eps=4, length=20, seed=0):
    rng = np.random.default_rng(seed)
    n = n_eps * length
    return {"obs": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            "image": rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8),
            "action": rng.uniform(0, 512, (n, 2)).astype(np.float32), "episode_ends": np.arange(1, n_eps + 1) * length}


TINY_IMAGE = ["policy.backbone=tiny", "policy.vision_backbone=tiny"]


@pytest.mark.parametrize("kind", ["drift_unet", "diffusion_unet"])
def test_profile_image_step_times_the_loss_and_gradients_of_compute_loss(kind):
    """The profiler's split step (encoder, then the generator from detached features, backward in two halves) is
    the training step: the same loss and the same gradient for every parameter."""
    import torch

    from drift_policy.config import compose
    from drift_policy.data.windows import make_windows
    from drift_policy.normalizer import Normalizer
    from drift_policy.policies import make_policy

    prof = _script("profile_image_step")
    cfg = compose(["task=pusht_image", f"policy={kind}", *TINY_IMAGE])
    p = cfg.policy
    data, _ = make_windows(_fake_pusht_image(), p.horizon, p.n_obs_steps, p.n_action_steps, val_ratio=0.0)
    norm = Normalizer().fit("obs", data.steps("obs")).fit("action", data.steps("action"))
    torch.manual_seed(0)
    policy = make_policy(p, norm).train()
    policy.obs_encoder.eval()       # the centre crop: both paths see the same pixels (GroupNorm: mode-free)
    batch = data.sample(6, torch.Generator().manual_seed(0))

    def grads():
        out = {n: q.grad.clone() for n, q in policy.named_parameters() if q.grad is not None}
        policy.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(1)
    want, _ = policy.compute_loss(batch)
    want.backward()
    want_g = grads()
    torch.manual_seed(1)
    loss, feats, leaf = prof.forward_parts(policy, batch, prof.Timer())
    loss.backward()
    feats.backward(leaf.grad)
    got_g = grads()
    torch.testing.assert_close(loss, want)
    assert set(got_g) == set(want_g) and any(n.startswith("obs_encoder.") for n in got_g)
    for n in want_g:
        torch.testing.assert_close(got_g[n], want_g[n], msg=n)


def test_profile_image_step_writes_a_record_per_part_and_merges(tmp_path, monkeypatch):
    from drift_policy.data.windows import make_windows
    from drift_policy.provenance import git_commit

    prof = _script("profile_image_step")

    def fake(cfg):
        p = cfg.policy
        return make_windows(_fake_pusht_image(), p.horizon, p.n_obs_steps, p.n_action_steps, val_ratio=0.0)

    monkeypatch.setattr(prof, "make_datasets", fake)
    out = tmp_path / "prof" / "rec.json"
    common = ["--steps=1", "--batch-scale=0.125", f"--extra={' '.join(TINY_IMAGE)}", f"--out={out}"]
    prof.main(["--policies=drift_unet,diffusion_unet", "--variants=default,channels_last", *common])
    prof.main(["--policies=drift_unet", "--variants=bf16", "--merge", *common])
    rec = json.loads(out.read_text())
    assert len(rec["runs"]) == 2 and all(r["code_commit"] == git_commit() for r in rec["runs"])
    got = {(r["policy"], r["variant"]): r for r in rec["rows"]}
    assert set(got) == {("drift_unet", "default"), ("drift_unet", "channels_last"), ("diffusion_unet", "default"),
                        ("diffusion_unet", "channels_last"), ("drift_unet", "bf16")}
    for r in got.values():
        assert set(r["cpu_seconds"]) == {*prof.PARTS, "total"} and min(r["cpu_seconds"].values()) >= 0
        assert r["encoder_passes_per_step"] == 2 * r["batch_size"]          # To = 2, one camera
    drift, diff = got[("drift_unet", "default")], got[("diffusion_unet", "default")]
    assert (drift["batch_size"], diff["batch_size"]) == (4, 8)                 # 32 x 0.125, 64 x 0.125
    assert drift["sample_passes_per_step"] == diff["sample_passes_per_step"] == 8
    assert got[("drift_unet", "bf16")]["run"] == 1 and not got[("drift_unet", "default")]["channels_last"]
    md = out.with_suffix(".md").read_text()
    assert "## drift_unet" in md and "## diffusion_unet" in md and "| speed-up vs default |" in md
    for text in (out.read_text(), md):
        assert str(tmp_path) not in text and "/work/" not in text


def test_kitchen_orders_pools_the_last_evaluations_and_counts_known_orders(tmp_path):
    ko = _script("kitchen_orders")
    a, b, c, d = "microwave", "kettle", "light switch", "slide cabinet"
    runs_dir = tmp_path / "bench"

    def run(name: str, evals: list[list[list[str]]]):
        r = runs_dir / name
        (r / "eval").mkdir(parents=True)
        (r / "config.json").write_text("{}")
        (r / "pretrained").mkdir()
        (r / "pretrained" / "model.safetensors").write_text("")
        for i, episodes in enumerate(evals):
            (r / "eval" / f"step_{i:08d}.json").write_text(json.dumps(
                {"task": "kitchen_lowdim", "step": i, "per_episode": [{"completed": e} for e in episodes]}))

    early = [[d, d, d, d]]                                  # outside --last 2: must not count
    run("drift_unet-s0", [early, [[a, b, c, d], []], [[a, b, c, d], [b]]])
    run("drift_unet-s1", [early, [[b, a, c, d, "top burner"]], [[c]]])
    run("diffusion_unet-s0", [early, [[a]], [[a, b]]])
    run("diffusion_unet-s1", [[[a, b, c, d]]])
    (runs_dir / "diffusion_unet-s1" / "pretrained" / "model.safetensors").unlink()      # unfinished: left out
    demo = tmp_path / "demo.json"
    demo.write_text(json.dumps({"per_episode": [{"completed": [a, b, c, d]}, {"completed": [b, a, c, d]}]}))
    out = ko.main(["--runs", str(runs_dir), "--last", "2", "--demonstrator", str(demo), "--out", str(tmp_path / "o.json")])
    rec = json.loads(out.read_text())
    drift = rec["variants"]["drift_unet"]
    assert drift["seeds"] == [0, 1] and drift["episodes"] == 6
    assert drift["p4"] == pytest.approx(3 / 6) and drift["p1"] == pytest.approx(5 / 6)
    assert drift["distinct_orders"] == 2 and drift["top_orders"][0] == [f"{a} > {b} > {c} > {d}", 2]
    assert drift["first_task"][a] == pytest.approx(2 / 6) and drift["first_task"]["none"] == pytest.approx(1 / 6)
    assert drift["task_share"]["top burner"] == pytest.approx(1 / 6)
    assert drift["mean_completed"] == pytest.approx((4 + 0 + 4 + 1 + 5 + 1) / 6)
    assert rec["variants"]["diffusion_unet"]["distinct_orders"] == 0 and rec["variants"]["diffusion_unet"]["seeds"] == [0]
    assert rec["demonstrator"]["p4"] == 1.0 and rec["demonstrator"]["distinct_orders"] == 2
    assert "| drift_unet (seeds 0, 1" in (tmp_path / "o.md").read_text()
    with pytest.raises(SystemExit, match="no kitchen run folders"):
        ko.main(["--runs", str(tmp_path / "demo_only"), "--demonstrator", str(demo), "--out", str(tmp_path / "x.json")])
