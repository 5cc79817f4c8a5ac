"""Policies with image observations: encoder trained end to end, dict observations, persistence, training loop
and closed-loop evaluation on the Push-T image env (tiny sizes so this runs in seconds on one core)."""
import numpy as np
import pytest
import torch

from drift_policy import train as train_mod
from drift_policy.config import compose
from drift_policy.data.windows import make_windows
from drift_policy.normalizer import Normalizer
from drift_policy.policies import Policy, make_policy

TINY = ["task=pusht_image", "policy.backbone=tiny", "policy.vision_backbone=tiny"]


def _fake_pusht_image(n_eps=4, length=20, seed=0):
    rng = np.random.default_rng(seed)
    n = n_eps * length
    return {"obs": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            "image": rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8),
            "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
            "episode_ends": np.arange(1, n_eps + 1) * length}


def _policy(kind="drift_unet", *extra):
    cfg = compose([*TINY, f"policy={kind}", *(["policy.n_noise=4"] if kind.startswith("drift") else []), *extra])
    train, _ = make_windows(_fake_pusht_image(), cfg.policy.horizon, cfg.policy.n_obs_steps,
                            cfg.policy.n_action_steps, val_ratio=0.0)
    norm = Normalizer().fit("obs", train.steps("obs")).fit("action", train.steps("action"))
    torch.manual_seed(0)
    return make_policy(cfg.policy, norm), train


@pytest.mark.parametrize("kind", ["drift_unet", "drift_transformer", "diffusion_unet"])
def test_loss_trains_the_image_encoder_end_to_end(kind):
    policy, train = _policy(kind)
    assert policy.obs_encoder is not None
    loss, _ = policy.compute_loss(train.sample(8, torch.Generator().manual_seed(0)))
    loss.backward()
    enc = [p for p in policy.obs_encoder.parameters() if p.requires_grad]
    assert enc and all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc)
    assert sum(float(p.grad.abs().sum()) for p in enc) > 0


def test_predict_select_and_round_trip(tmp_path):
    policy, train = _policy()
    policy.eval()
    b = train.sample(3, torch.Generator().manual_seed(1))
    obs = {"obs": b["obs"], "image": b["image"]}
    out = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    assert out["action"].shape == (3, 8, 2) and torch.isfinite(out["action"]).all()
    # Eval mode uses the centre crop: the same inputs and noise give the same actions.
    again = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out["action"], again["action"])
    loaded = Policy.from_pretrained(policy.save_pretrained(tmp_path / "p"))
    torch.testing.assert_close(loaded.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"],
                               out["action"])
    # select_action takes one step of the dict observation and queues the chunk.
    policy.reset()
    a = policy.select_action({"obs": b["obs"][:, -1], "image": b["image"][:, -1]})
    assert a.shape == (3, 2)
    assert len(policy.executor) == 7


def test_image_observations_are_validated():
    policy, train = _policy()
    b = train.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="missing 'image'"):
        policy.predict_action({"obs": b["obs"]})
    with pytest.raises(ValueError, match="'image' must be"):
        policy.predict_action({"obs": b["obs"], "image": b["image"][..., :90]})


def test_training_loop_and_evaluation_with_images(tmp_path, monkeypatch):
    cfg = compose([*TINY, f"train.run_dir={tmp_path / 'run'}", "train.max_steps=3", "train.max_minutes=0",
                   "train.batch_size=4", "train.eval_episodes=2", "train.eval_workers=0", "train.threads=1",
                   "task.max_steps=10", "train.eval_every_minutes=0"])
    p = cfg.policy
    monkeypatch.setattr(train_mod, "make_datasets", lambda c: make_windows(
        _fake_pusht_image(), p.horizon, p.n_obs_steps, p.n_action_steps, val_ratio=0.0))
    run = train_mod.train(cfg, progress=False)
    import json

    res = json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())
    assert res["n_episodes"] == 2 and res["task"] == "pusht_image"
    assert all(e["steps"] == 10 for e in res["per_episode"])
    assert 0.0 <= res["coverage_score"] <= 1.0
    assert (run / "pretrained" / "model.safetensors").exists()


# ---- encoder-pass accounting (issue 39) -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["drift_unet", "diffusion_unet"])
def test_encoder_passes_count_the_images_that_go_through_the_encoder(kind):
    """What a config says one step encodes is what compute_loss pushes through the encoder: batch x cameras x To
    for both methods (drift encodes an observation once for its G samples), so at equal sample-passes drift
    encodes 1/G of the baseline's images."""
    extra = ["train.batch_size=6", *(["policy.n_noise=3"] if kind.startswith("drift") else [])]
    cfg = compose([*TINY, f"policy={kind}", *extra])
    policy, train = _policy(kind, *extra)
    seen = []
    for enc in policy.obs_encoder.encoders.values():
        enc.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    policy.compute_loss(train.sample(cfg.train.batch_size, torch.Generator().manual_seed(0)))
    assert sum(seen) == cfg.encoder_passes_per_step == 6 * cfg.policy.n_obs_steps
    assert cfg.sample_passes_per_step == 6 * (3 if kind.startswith("drift") else 1)
    assert compose(["task=pusht_keypoints", f"policy={kind}"]).encoder_passes_per_step == 0   # no camera


@pytest.mark.parametrize("kind", ["drift_unet", "diffusion_unet"])
def test_a_tiny_run_records_encoder_passes_beside_sample_passes(tmp_path, monkeypatch, kind):
    import json

    from drift_policy.records import run_record

    cfg = compose([*TINY, f"policy={kind}", f"train.run_dir={tmp_path / 'run'}", "train.max_steps=2",
                   "train.max_minutes=0", "train.batch_size=4", "train.eval_episodes=1", "train.eval_workers=0",
                   "train.threads=1", "task.max_steps=4", "train.eval_every_minutes=0", "train.log_every=1",
                   *(["policy.n_noise=2"] if kind.startswith("drift") else [])])
    p = cfg.policy
    monkeypatch.setattr(train_mod, "make_datasets", lambda c: make_windows(
        _fake_pusht_image(), p.horizon, p.n_obs_steps, p.n_action_steps, val_ratio=0.0))
    run = train_mod.train(cfg, progress=False)
    images_per_step = 4 * p.n_obs_steps                       # batch x To x one camera, for either method
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert [r["encoder_passes"] for r in steps] == [images_per_step * r["step"] for r in steps] == [8, 16]
    assert [r["sample_passes"] for r in steps] == [cfg.sample_passes_per_step * r["step"] for r in steps]
    final = json.loads(sorted((run / "eval").glob("step_*.json"))[-1].read_text())
    assert final["encoder_passes"] == 2 * images_per_step
    rec = run_record(run)
    assert rec["encoder_passes"] == 2 * images_per_step and rec["encoder_passes_per_step"] == images_per_step
    assert rec["evals"][-1]["encoder_passes"] == 2 * images_per_step
    assert rec["sample_passes"] == 2 * (4 * 2 if kind.startswith("drift") else 4)


def test_encoder_bf16_runs_the_training_encoder_in_bfloat16_and_keeps_the_ema_float32(tmp_path):
    from drift_policy.distributed import Distributed
    from drift_policy.errors import ConfigError

    cfg = compose([*TINY, "train.encoder_bf16=true"])
    policy, _ = _policy("drift_unet", "train.encoder_bf16=true")
    trained, _, ema, _, _ = train_mod._build(cfg, policy.normalizer, Distributed("cpu"))
    assert [e.autocast for e in trained.obs_encoder.encoders.values()] == [torch.bfloat16]
    assert [(e.autocast, e.channels_last) for e in ema.obs_encoder.encoders.values()] == [(None, False)]
    with pytest.raises(ConfigError, match="encoder_bf16 needs a task with cameras"):
        train_mod.train(compose(["task=pusht_keypoints", "train.encoder_bf16=true", f"train.run_dir={tmp_path / 'r'}"]),
                        progress=False)
    assert not (tmp_path / "r").exists()
