"""Actions predicted relative to an observed position (policy.action_anchor)."""
import numpy as np
import pytest
import torch

from drift_policy import train as train_mod
from drift_policy.config import Config, compose
from drift_policy.data.windows import make_windows
from drift_policy.errors import ConfigError
from drift_policy.export import ExportablePolicy
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, make_policy
from drift_policy.runs import load_policy_for_eval


def _norm():
    g = torch.Generator().manual_seed(0)
    return Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit(
        "action", torch.rand(100, 2, generator=g) * 100 - 50)


@pytest.mark.parametrize("cfg_cls", [DriftConfig, DiffusionConfig])
def test_anchored_actions_are_the_absolute_policys_output_shifted_by_the_observed_position(cfg_cls):
    torch.manual_seed(0)
    extra = {"num_inference_steps": 3} if cfg_cls is DiffusionConfig else {}
    absolute = make_policy(cfg_cls(backbone="tiny", **extra), _norm()).eval()
    anchored = make_policy(cfg_cls(backbone="tiny", action_anchor=(18, 19), **extra), _norm()).eval()
    anchored.load_state_dict(absolute.state_dict())
    obs = torch.rand(3, 2, 20) * 512
    a = absolute.predict_action(obs, generator=torch.Generator().manual_seed(1))["action_pred"]
    b = anchored.predict_action(obs, generator=torch.Generator().manual_seed(1))["action_pred"]
    # Same weights, same noise: the anchored chunk is the absolute one plus the LATEST step's agent position.
    torch.testing.assert_close(b - a, obs[:, -1, 18:20].unsqueeze(1).expand_as(a))
    assert not torch.allclose(b - a, obs[:, 0, 18:20].unsqueeze(1).expand_as(a))


def test_normalize_action_inverts_and_broadcasts_over_positives():
    pol = make_policy(DriftConfig(backbone="tiny", action_anchor=(0, 5)), _norm())
    obs = torch.rand(4, 2, 20) * 512
    chunk = torch.rand(4, 16, 2) * 512
    n = pol.normalize_action(chunk, obs)
    torch.testing.assert_close(n, pol.normalizer.normalize("action", chunk - obs[:, -1, [0, 5]].unsqueeze(1)))
    torch.testing.assert_close(pol.unnormalize_action(n, obs), chunk, atol=1e-3, rtol=1e-5)
    pos = torch.rand(4, 3, 16, 2) * 512                                    # [B, P, Tp, Da]: neighbour positives
    torch.testing.assert_close(pol.normalize_action(pos, obs)[:, 1], pol.normalize_action(pos[:, 1], obs))


def test_export_keeps_the_anchor():
    pol = make_policy(DriftConfig(backbone="tiny", action_anchor=(18, 19)), _norm()).eval()
    obs, noise = torch.rand(2, 2, 20) * 512, torch.randn(2, 16, 2)
    _, pred = ExportablePolicy(pol)(obs, noise)
    ref = pol.unnormalize_action(pol.sample(pol.condition({"obs": obs}), noise=noise), obs)
    torch.testing.assert_close(pred, ref)
    with torch.no_grad():
        plain = pol.normalizer.unnormalize("action", pol.sample(pol.condition({"obs": obs}), noise=noise))
    torch.testing.assert_close(pred - plain, obs[:, -1, 18:20].unsqueeze(1).expand_as(pred))


@pytest.mark.parametrize("anchor,match", [((18,), "one observation dim"), ((18, 20), r"0\.\.19"), ((-1, 3), "action_anchor")])
def test_a_bad_anchor_is_a_config_error_naming_the_key(anchor, match):
    with pytest.raises(ConfigError, match=match):
        DriftConfig(action_anchor=anchor)
    with pytest.raises(ConfigError, match="policy.action_anchor"):
        DriftConfig(action_anchor=anchor)


def test_action_targets_are_chunks_relative_to_each_windows_latest_observation():
    rng = np.random.default_rng(0)
    n_eps, length = 4, 12
    obs = rng.normal(size=(n_eps * length, 3)).astype(np.float32)
    action = rng.normal(size=(n_eps * length, 2)).astype(np.float32)
    data = {"obs": obs, "action": action, "episode_ends": np.arange(1, n_eps + 1) * length}
    train, _ = make_windows(data, horizon=4, n_obs_steps=2, n_action_steps=2, val_ratio=0.0)
    assert torch.equal(train.action_targets(), train.steps("action"))        # no anchor: the distinct steps
    rel = train.action_targets((2, 0)).view(len(train), 4, 2)
    for w in (0, 5, len(train) - 1):
        rows = train.index[w]
        expect = train.data["action"][rows] - train.data["obs"][rows[1]][[2, 0]]
        torch.testing.assert_close(rel[w], expect)


def test_training_on_pusht_fits_the_normaliser_on_relative_chunks(tmp_path, pusht_zarr):
    cfg = compose(["policy.backbone=tiny", "train.batch_size=4", "train.eval_episodes=0", "train.threads=1",
                   "train.wandb=disabled", f"task.data_root={pusht_zarr.parents[1]}", "train.max_steps=2",
                   "policy.action_anchor=[18,19]", f"train.run_dir={tmp_path / 'run'}"])
    run = train_mod.train(cfg, progress=False)
    pol, loaded = load_policy_for_eval(run)
    assert loaded.policy.action_anchor == (18, 19)
    train_set, _ = train_mod.make_datasets(cfg)
    batch = train_set.sample(256, torch.Generator().manual_seed(0))
    n = pol.normalize_action(batch["action"], batch["obs"])
    # Fitted on the training windows' relative chunks: every training chunk lies in [-1, 1] and spans it.
    assert n.abs().max() <= 1 + 1e-5 and n.abs().max() > 0.5
    absolute = pol.normalizer.normalize("action", batch["action"])
    assert not torch.allclose(n, absolute)


@pytest.mark.parametrize("overrides,expect", [
    (["policy=drift_unet"], (18, 19)),                           # Push-T keypoints' drift recipe: the agent
    (["policy=drift_unet", "recipe=null"], ()),                  # the policy's default: absolute
    (["policy=drift_unet", "task=pusht_image"], (0, 1)),         # the pixels recipe: the agent (its whole obs)
    (["policy=drift_unet", "task=blockpush_lowdim"], (8, 9)),    # BlockPush's recipe: the effector target
    (["policy=drift_unet", "task=can_lowdim"], ()),              # robomimic actions are not observed positions
    (["policy=diffusion_unet"], ()),                             # the baseline's default: Diffusion Policy's
    (["policy=diffusion_unet", "policy.action_anchor=[18,19]"], (18, 19)),
    (["policy=drift_unet", "policy.action_anchor=[]"], ()),
])
def test_the_anchor_is_the_recipes_recorded_in_the_config(overrides, expect):
    cfg = compose(overrides)
    assert cfg.policy.action_anchor == expect
    # Resolved once: config.json records the dims, and reading it back gives the same policy.
    assert Config.from_dict(cfg.to_dict()).policy.action_anchor == expect


def test_a_config_written_before_the_key_existed_keeps_absolute_actions():
    d = compose(["policy=drift_unet"]).to_dict()
    del d["policy"]["action_anchor"]
    assert Config.from_dict(d).policy.action_anchor == ()
