"""Observations also measured from an observed position (policy.obs_origin)."""
import pytest
import torch

from drift_policy.errors import ConfigError
from drift_policy.export import ExportablePolicy
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, make_policy


def _norm():
    g = torch.Generator().manual_seed(0)
    return Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit(
        "action", torch.rand(100, 2, generator=g) * 512)


def test_relative_obs_are_each_dim_minus_the_origin_of_its_axis_in_the_origins_units():
    pol = make_policy(DriftConfig(backbone="tiny", obs_origin=(18, 19)), _norm())
    obs = torch.rand(3, 2, 20) * 512
    rel = pol.relative_obs(obs)                                            # [B, To, 18]
    assert rel.shape == (3, 2, 18)
    scale = pol.normalizer.params("obs")[0]
    torch.testing.assert_close(rel[..., 0::2], (obs[..., 0:18:2] - obs[..., 18:19]) * scale[18])   # x minus agent x
    torch.testing.assert_close(rel[..., 1::2], (obs[..., 1:18:2] - obs[..., 19:20]) * scale[19])   # y minus agent y
    # Moving everything by the same offset leaves the relative features unchanged, and a keypoint on the agent reads 0.
    shifted = obs.clone()
    shifted[..., 0::2] += 37.0
    shifted[..., 1::2] -= 11.0
    torch.testing.assert_close(pol.relative_obs(shifted), rel, atol=1e-4, rtol=1e-5)
    obs[..., 4:6] = obs[..., 18:20]
    assert pol.relative_obs(obs)[..., 4:6].abs().max() == 0


@pytest.mark.parametrize("cfg_cls", [DriftConfig, DiffusionConfig])
def test_the_conditioning_gains_the_relative_dims_and_training_and_export_use_them(cfg_cls):
    torch.manual_seed(0)
    extra = {"num_inference_steps": 2} if cfg_cls is DiffusionConfig else {}
    pol = make_policy(cfg_cls(backbone="tiny", obs_origin=(18, 19), **extra), _norm())
    obs = torch.rand(4, 2, 20) * 512
    cond = pol.condition({"obs": obs})
    assert cond.shape == (4, 2 * (20 + 18))
    torch.testing.assert_close(cond.view(4, 2, 38)[..., 20:], pol.relative_obs(obs))
    loss, _ = pol.compute_loss({"obs": obs, "action": torch.rand(4, 16, 2) * 512})
    loss.backward()
    assert torch.isfinite(loss)
    if cfg_cls is DiffusionConfig:                                          # export is for the 1-NFE policy
        return
    pol.eval()
    noise = torch.randn(4, 16, 2)
    _, pred = ExportablePolicy(pol)(obs, noise)
    torch.testing.assert_close(pred, pol.unnormalize_action(pol.sample(pol.condition({"obs": obs}), noise=noise), obs))


@pytest.mark.parametrize("origin", [(18,), (18, 20), (18, 18), (-1, 3)])
def test_a_bad_origin_is_a_config_error_naming_the_key(origin):
    # (18,) is fine for 20 dims (19 others, one axis), so only the others must fail; check each explicitly
    if origin == (18,):
        assert DriftConfig(obs_origin=origin).obs_origin == (18,)
        with pytest.raises(ConfigError, match="policy.obs_origin"):
            DriftConfig(obs_origin=(0, 1, 2))                               # 17 other dims over 3 axes
        return
    with pytest.raises(ConfigError, match="policy.obs_origin"):
        DriftConfig(obs_origin=origin)


@pytest.mark.parametrize("overrides,expect", [
    ([], (18, 19)),                                                         # Push-T keypoints' drift recipe: the agent
    (["recipe=null"], ()),                                                  # the policy's default: none
    (["policy=diffusion_unet"], ()),                                        # the baseline: no recipe
    (["policy=diffusion_unet", "policy.obs_origin=[18,19]"], (18, 19)),
    (["task=pusht_image"], ()),                                             # from pixels the obs is the agent alone
    (["policy.obs_origin=[]"], ()),
])
def test_the_origin_is_the_recipes_recorded_in_the_config(overrides, expect):
    from drift_policy.config import Config, compose

    cfg = compose(overrides)
    assert cfg.policy.obs_origin == expect
    assert Config.from_dict(cfg.to_dict()).policy.obs_origin == expect        # config.json holds the dims used


def test_a_config_written_before_the_key_reads_as_no_origin():
    from drift_policy.config import Config, compose

    d = compose([]).to_dict()
    del d["policy"]["obs_origin"]
    assert Config.from_dict(d).policy.obs_origin == ()
