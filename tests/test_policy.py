"""Backbone, policies and config validation."""
import pytest
import torch

from drift_policy.config import Config, compose
from drift_policy.errors import ConfigError
from drift_policy.models.unet1d import UNET_PRESETS, ConditionalUnet1D
from drift_policy.normalizer import Normalizer
from drift_policy.policies import DiffusionConfig, DriftConfig, make_policy


def _norm():
    g = torch.Generator().manual_seed(0)
    return Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 512)


def test_unet_shapes_and_film_conditioning():
    net = ConditionalUnet1D(2, 40, **UNET_PRESETS["tiny"])
    x, c = torch.randn(3, 16, 2), torch.randn(3, 40)
    y = net(x, c)
    assert y.shape == (3, 16, 2)
    # the conditioning changes the output (FiLM is wired in)
    assert not torch.allclose(net(x, c), net(x, c + 1.0))
    with pytest.raises(ValueError, match="timestep"):
        net(x, c, torch.zeros(3))


def test_large_preset_is_diffusion_policys_net():
    # Diffusion Policy's ConditionalUnet1D for low-dim Push-T has 65.8M parameters (with its 256-d step embedding)
    net = ConditionalUnet1D(2, 40, timestep_dim=256, **UNET_PRESETS["large"])
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - 65.8) < 0.5, n


@pytest.mark.parametrize("groups", ["per_step", "chunk"])
def test_drift_policy_loss_trains_toward_expert(groups):
    torch.manual_seed(0)
    cfg = DriftConfig(backbone="tiny", drift_groups=groups, n_noise=4)
    pol = make_policy(cfg, _norm())
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.rand(4, 2, 20, generator=g) * 512, "action": torch.rand(4, 16, 2, generator=g) * 512}
    opt = torch.optim.Adam(pol.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        loss, info = pol.compute_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else info["mse_to_expert"]
    assert loss.shape == () and torch.isfinite(loss)
    assert {"mse_to_expert", "sample_std", "scale", "v2_tau0.02"} <= set(info)
    assert info["mse_to_expert"] < 0.5 * first  # memorises the 4 expert chunks


@pytest.mark.parametrize("groups", ["per_step", "chunk"])
def test_guidance_negatives_are_the_other_observations_expert_chunks(groups):
    B, N = 5, 3
    pol = make_policy(DriftConfig(backbone="tiny", drift_groups=groups, n_noise=N, guidance=2.5), _norm())
    act_n = torch.arange(B, dtype=torch.float32).view(B, 1, 1).expand(B, 16, 2) / 10   # chunk b is b/10 everywhere
    x = torch.randn(B, N, 16, 2)
    gen, pos, w, neg, neg_w = pol.drift_groups(x, act_n, {})
    G = B * 16 if groups == "per_step" else B
    D = 2 if groups == "per_step" else 32
    assert gen.shape == (G, N, D) and pos.shape == (G, 1, D) and neg.shape == (G, B - 1, D)
    own = pos[:, 0, 0]                                                  # each group's own observation (b/10)
    assert not (neg[..., 0] == own.unsqueeze(1)).any()                  # its own chunk is never a negative
    assert torch.equal(torch.sort(torch.cat([neg[..., 0], own.unsqueeze(1)], 1), 1).values[0],
                       torch.arange(B, dtype=torch.float32) / 10)       # and every other observation's chunk is
    assert neg_w == pytest.approx((2.5 - 1) * (N - 1) / (B - 1))        # (alpha - 1)(N - 1)/M, Sec. 3.5
    # alpha = 1 is the plain conditional loss: no negatives, the same value
    plain = make_policy(DriftConfig(backbone="tiny", drift_groups=groups, n_noise=N), _norm())
    assert plain.drift_groups(x, act_n, {})[3] is None
    torch.manual_seed(0)
    batch = {"obs": torch.rand(B, 2, 20) * 512, "action": torch.rand(B, 16, 2) * 512}
    pol.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    l_plain, _ = plain.compute_loss(batch)
    torch.manual_seed(1)
    l_guided, _ = pol.compute_loss(batch)
    assert torch.isfinite(l_guided) and not torch.allclose(l_plain, l_guided)


@pytest.mark.parametrize("groups", ["per_step", "chunk"])
def test_per_dim_scale_makes_the_loss_invariant_to_rescaling_an_action_dim(groups):
    torch.manual_seed(0)
    x, act_n = torch.randn(4, 2, 16, 2), torch.randn(4, 16, 2)
    stretch = torch.tensor([1.0, 7.0])                                  # dim 1 seven times wider
    scaled = make_policy(DriftConfig(backbone="tiny", drift_groups=groups, per_dim_scale=True), _norm())

    def loss_and_grad(pol, x, act):
        x = x.clone().requires_grad_(True)
        loss = pol.drift_loss(x, act, {})[0].sum()
        return loss, torch.autograd.grad(loss, x)[0]

    l0, g0 = loss_and_grad(scaled, x, act_n)
    l1, g1 = loss_and_grad(scaled, x * stretch, act_n * stretch)
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g1 * stretch, g0)                        # the same field in the stretched units
    # without it the wide dim dominates the kernel's distances and the loss changes
    plain = make_policy(DriftConfig(backbone="tiny", drift_groups=groups), _norm())
    assert not torch.allclose(plain.drift_loss(x * stretch, act_n * stretch, {})[0], plain.drift_loss(x, act_n, {})[0])
    # a constant dim is floored, not divided by zero
    act_c = act_n.clone()
    act_c[..., 1] = 0.3
    assert torch.isfinite(scaled.drift_loss(x, act_c, {})[0]).all()


def test_predict_action_shapes_and_units():
    pol = make_policy(DriftConfig(backbone="tiny"), _norm()).eval()
    out = pol.predict_action(torch.rand(3, 2, 20) * 512)
    assert out["action"].shape == (3, 8, 2) and out["action_pred"].shape == (3, 16, 2)
    torch.testing.assert_close(out["action"], out["action_pred"][:, 1:9])   # executed slice starts at To - 1
    with pytest.raises(ValueError, match="obs must be"):
        pol.predict_action(torch.rand(3, 2, 19))


def test_diffusion_baseline_uses_n_forward_passes():
    cfg = DiffusionConfig(backbone="tiny", scheduler="ddim", num_inference_steps=10)
    pol = make_policy(cfg, _norm()).eval()
    calls = []
    pol.model.register_forward_hook(lambda *a: calls.append(1))
    out = pol.predict_action(torch.rand(2, 2, 20) * 512)
    assert len(calls) == 10 and out["action"].shape == (2, 8, 2)
    batch = {"obs": torch.rand(4, 2, 20) * 512, "action": torch.rand(4, 16, 2) * 512}
    loss, info = pol.compute_loss(batch)
    assert torch.isfinite(loss) and loss > 0
    assert pol.noise_scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert pol.noise_scheduler.config.prediction_type == "epsilon" and pol.noise_scheduler.config.clip_sample


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="huge"), "policy.backbone"),
    (dict(n_noise=1), "policy.n_noise"),
    (dict(drift_groups="flat"), "policy.drift_groups"),
    (dict(drift_groups="both"), "policy.drift_groups"),   # removed (saved configs with it still load)
    (dict(horizon=10), "policy.horizon"),
    (dict(n_action_steps=16), "n_action_steps"),
    (dict(temperatures=(0.1, -1.0)), "policy.temperatures"),
    (dict(guidance=0.5), "policy.guidance"),
])
def test_drift_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DriftConfig(**kwargs)


def test_compose_defaults_and_errors_name_the_key():
    cfg = compose([])
    assert cfg.policy.type == "drift" and cfg.policy.drift_groups == "per_step" and cfg.policy.obs_dim == 20
    assert compose(["policy=diffusion_unet"]).policy.num_inference_steps == 100
    with pytest.raises(ConfigError, match="lr_rate"):
        compose(["train.lr_rate=1"])
    with pytest.raises(ConfigError, match="train.ema_decay"):
        compose(["train.ema_decay=1.5"])
    with pytest.raises(ConfigError, match="task/nope"):
        compose(["task=nope"])
    d = cfg.to_dict()
    d["train"]["bogus"] = 1
    with pytest.raises(ConfigError, match="train.bogus"):
        Config.from_dict(d)
    d = cfg.to_dict()
    d["policy"]["obs_dim"] = 7   # contradicts the task: derived values are not overridable
    with pytest.raises(ConfigError, match="contradicts"):
        Config.from_dict(d)
    assert Config.from_dict(cfg.to_dict()) == cfg


def test_transformer_backbone_is_causal_and_conditioned():
    from drift_policy.models.transformer import TRANSFORMER_PRESETS, TimeSeriesTransformer

    torch.manual_seed(0)
    net = TimeSeriesTransformer(2, 40, n_obs_steps=2, horizon=16, **TRANSFORMER_PRESETS["tiny"]).eval()
    x, c = torch.randn(2, 16, 2), torch.randn(2, 40)
    y = net(x, c)
    assert y.shape == (2, 16, 2)
    x2 = x.clone()
    x2[:, 10:] += 1.0                               # change only the future input steps
    y2 = net(x2, c)
    torch.testing.assert_close(y2[:, :10], y[:, :10])   # earlier steps cannot see them
    assert not torch.allclose(y2[:, 10:], y[:, 10:])
    c2 = c.clone()
    c2[:, 20:] += 1.0                               # change the second observation step
    y3 = net(x, c2)
    torch.testing.assert_close(y3[:, :1], y[:, :1])     # action step 0 only sees observation step 0
    assert not torch.allclose(y3[:, 1:], y[:, 1:])
    nc = TimeSeriesTransformer(2, 40, n_obs_steps=2, horizon=16, causal=False, **TRANSFORMER_PRESETS["tiny"]).eval()
    assert not torch.allclose(nc(x2, c)[:, :10], nc(x, c)[:, :10])


def test_transformer_policy_configs_compose_and_train():
    cfg = compose(["policy=drift_transformer", "policy.backbone=tiny"])
    pol = make_policy(cfg.policy, _norm())
    loss, _ = pol.compute_loss({"obs": torch.rand(3, 2, 20) * 512, "action": torch.rand(3, 16, 2) * 512})
    loss.backward()
    assert all(p.grad is not None for p in pol.model.parameters() if p.requires_grad)
    assert compose(["policy=drift_transformer"]).policy.backbone == "small"
    n = sum(p.numel() for p in make_policy(compose(["policy=drift_transformer"]).policy).parameters())
    assert 8e6 < n < 10e6        # Diffusion Policy's simulation transformer is about 9M parameters
    with pytest.raises(ConfigError, match="policy.backbone"):
        compose(["policy=drift_transformer", "policy.backbone=large"])


def test_noise_scale_scales_the_sampling_noise_only():
    torch.manual_seed(0)
    base = make_policy(DriftConfig(backbone="tiny"), _norm()).eval()
    half = make_policy(DriftConfig(backbone="tiny", noise_scale=0.5), _norm()).eval()
    half.load_state_dict(base.state_dict())
    cond, eps = torch.randn(3, base.config.n_obs_steps * base.config.obs_dim), torch.randn(3, 16, 2)
    with torch.no_grad():
        # passed noise (the exported module's input) and drawn noise are both unit Gaussian, scaled inside
        torch.testing.assert_close(half.sample(cond, noise=eps), base.sample(cond, noise=0.5 * eps))
        drawn = half.sample(cond, torch.Generator().manual_seed(1))
        torch.testing.assert_close(drawn, base.sample(cond, noise=0.5 * torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(1))))
        assert not torch.allclose(drawn, base.sample(cond, torch.Generator().manual_seed(1)))
        zero = make_policy(DriftConfig(backbone="tiny", noise_scale=0.0), _norm()).eval()
        zero.load_state_dict(base.state_dict())
        torch.testing.assert_close(zero.sample(cond, torch.Generator().manual_seed(1)),
                                   zero.sample(cond, torch.Generator().manual_seed(2)))   # f(0, obs): deterministic
    # training draws unit noise whatever the scale: the same loss from the same RNG state
    batch = {"obs": torch.rand(4, 2, 20) * 2 - 1, "action": torch.rand(4, 16, 2) * 2 - 1}
    base.train(), half.train()
    torch.manual_seed(3)
    l_base = base.compute_loss(batch)[0]
    torch.manual_seed(3)
    torch.testing.assert_close(half.compute_loss(batch)[0], l_base)
    with pytest.raises(ConfigError, match="policy.noise_scale"):
        DriftConfig(noise_scale=-1.0)
