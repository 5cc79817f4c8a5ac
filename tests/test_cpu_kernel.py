"""The batch-1 C kernel of the drift U-Net (drift_policy/models/cpu_kernel.py), the default at batch 1: same
actions as the reference layers to 1e-5 for the default net and a small one, weights read live at every call
(optimizer steps, .data writes, load_state_dict, a replaced .data storage), and what it leaves to the other paths
(diffusion nets, batch > 1, no C compiler)."""
import warnings

import pytest
import torch

from drift_policy.config import compose
from drift_policy.models import aot, cpu_kernel
from drift_policy.models.cpu_kernel import CpuKernel
from drift_policy.policies import make_policy

TOL = 1e-5


@pytest.fixture(autouse=True)
def c_kernel_on(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "c")
    monkeypatch.setenv("DRIFT_POLICY_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "c_kernel_cache"))


def _policy(*overrides, seed=0):
    torch.manual_seed(seed)
    policy = make_policy(compose(["policy.backbone=tiny", *overrides]).policy)
    with torch.no_grad():                       # move every weight off its init (GroupNorm 1/0, zero biases)
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


def _obs(batch=1, seed=1):
    return torch.randn(batch, 2, 20, generator=torch.Generator().manual_seed(seed))


def _actions(policy, obs, fast=True, seed=0):
    policy.model.fast_inference = fast
    try:
        return policy.predict_action(obs, torch.Generator().manual_seed(seed))["action_pred"]
    finally:
        policy.model.fast_inference = True


def _kernels(policy):
    return [f for f in policy.model.__dict__["_trace_cache"].traces.values() if isinstance(f, CpuKernel)]


def _diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backbone", ["tiny", "small"])
def test_default_net_matches_reference(backbone):
    policy = _policy(f"policy.backbone={backbone}")        # the default task: obs_origin conditioning
    obs = _obs()
    assert _diff(_actions(policy, obs), _actions(policy, obs, fast=False)) <= TOL
    assert _kernels(policy), "batch 1 did not run the C kernel"


def test_weight_changes_are_seen():
    policy, other = _policy(), _policy(seed=5)
    obs = _obs()
    _actions(policy, obs)
    with torch.no_grad():                                   # .data writes do not bump the version counter
        for p, q in zip(policy.model.parameters(), other.model.parameters()):
            p.data.copy_(q.data)
    assert _diff(_actions(policy, obs), _actions(other, obs, fast=False)) <= TOL

    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    before = _actions(policy, obs)
    policy.train()
    loss, _ = policy.compute_loss({"obs": torch.randn(4, 2, 20), "action": torch.randn(4, 16, 2)})
    loss.backward()
    opt.step()
    policy.eval()
    after = _actions(policy, obs)
    assert _diff(after, before) > 1e-3, "stale (pre-step) weights"
    assert _diff(after, _actions(policy, obs, fast=False)) <= TOL

    fresh = _policy(seed=9)
    policy.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)
    assert _diff(_actions(policy, obs), _actions(fresh, obs, fast=False)) <= TOL

    p = next(policy.model.parameters())                     # a new storage behind the same Parameter
    p.data = p.data.clone() + 0.5
    assert _diff(_actions(policy, obs), _actions(policy, obs, fast=False)) <= TOL


def test_a_non_contiguous_storage_is_not_misread():
    policy = _policy()
    obs = _obs()
    before = _actions(policy, obs)
    w = policy.model.down[0][0].block1[0].weight             # [C_out, C_in, k]
    w.data = w.data.transpose(0, 1).contiguous().transpose(0, 1)   # same values, another layout
    assert _diff(_actions(policy, obs), before) <= TOL        # the kernel hands the call to the reference layers
    w.data = w.data.contiguous() * 2
    assert _diff(_actions(policy, obs), _actions(policy, obs, fast=False)) <= TOL
    assert _kernels(policy)


def test_other_nets_and_batches_are_left_to_the_other_paths():
    policy = _policy()
    two = _obs(batch=2)
    assert _diff(_actions(policy, two), _actions(policy, two, fast=False)) <= TOL
    assert not _kernels(policy)                              # batch 2: the trace
    pytest.importorskip("diffusers")
    diff = _policy("policy=diffusion_unet", "policy.scheduler=ddim", "policy.num_inference_steps=2")
    obs = _obs()
    assert _diff(_actions(diff, obs), _actions(diff, obs, fast=False)) <= TOL
    assert not _kernels(diff)                                # a timestep input: not the C kernel's


def test_no_c_compiler_falls_back_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_kernel.clear_loaded()
    try:
        policy, obs = _policy(), _obs()
        with pytest.warns(UserWarning, match="C kernel is unavailable"):
            got = _actions(policy, obs)
        assert _diff(got, _actions(policy, obs, fast=False)) <= TOL and not _kernels(policy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _actions(_policy(seed=2), obs)
    finally:
        cpu_kernel.clear_loaded()


def test_forced_modes():
    policy, obs = _policy(), _obs()
    with aot.forced("0"):
        _actions(policy, obs)
    assert not _kernels(policy)
    _actions(policy, obs)
    assert _kernels(policy)
    with pytest.raises(ValueError, match="mode"):
        with aot.forced("fast"):
            pass
