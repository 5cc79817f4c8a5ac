"""The fast CPU inference path of the U-Net (the default in predict_action / select_action) against the reference
layers: same actions to 1e-5 on random weights, at batch 1 and > 1, after train()/eval() switches, after
optimizer steps and other weight changes, after dtype moves, copies and pickling."""
import copy
import pickle

import pytest
import torch

from drift_policy.config import compose
from drift_policy.models.unet1d import FAST_MAX_BATCH
from drift_policy.policies import make_policy

TOL = 1e-5


def _policy(*overrides, seed=0):
    torch.manual_seed(seed)
    policy = make_policy(compose(list(overrides)).policy)
    with torch.no_grad():                       # move every weight off its init (GroupNorm 1/0, zero biases)
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


def _obs(policy, batch, seed=1):
    return torch.randn(batch, policy.config.n_obs_steps, policy.config.obs_dim,
                       generator=torch.Generator().manual_seed(seed))


def _actions(policy, obs, fast: bool, seed=0):
    policy.model.fast_inference = fast
    try:
        return policy.predict_action(obs, torch.Generator().manual_seed(seed))["action_pred"]
    finally:
        policy.model.fast_inference = True


def _assert_parity(policy, obs):
    ref, fast = _actions(policy, obs, False), _actions(policy, obs, True)
    assert ref.shape == fast.shape
    assert (ref - fast).abs().max().item() <= TOL
    return fast


@pytest.mark.parametrize("batch", [1, 3])
def test_default_drift_policy_matches_reference(batch):
    policy = _policy()
    obs = _obs(policy, batch)
    with torch.no_grad():
        assert policy.model.uses_fast_path(torch.zeros(batch, 16, 2))
    _assert_parity(policy, obs)
    assert policy.model.__dict__["_trace_cache"].traces, "predict_action did not take the fast path"


def test_diffusion_timestep_path_matches_reference():
    policy = _policy("policy=diffusion_unet", "policy.backbone=tiny", "policy.scheduler=ddim",
                     "policy.num_inference_steps=3")
    _assert_parity(policy, _obs(policy, 2))


def test_large_batch_and_training_use_reference_layers():
    policy = _policy("policy.backbone=tiny")
    net = policy.model
    x = torch.zeros(1, 16, 2)
    with torch.no_grad():
        assert not net.uses_fast_path(torch.zeros(FAST_MAX_BATCH, 16, 2))
        net.train()
        assert not net.uses_fast_path(x)
        net.eval()
        assert net.uses_fast_path(x)
    assert not net.uses_fast_path(x)              # gradients enabled


def test_train_eval_switches_and_optimizer_steps_are_seen():
    policy = _policy("policy.backbone=tiny")
    obs = _obs(policy, 1)
    before = _assert_parity(policy, obs)
    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    batch = {"obs": torch.randn(4, 2, 20), "action": torch.randn(4, 16, 2)}
    for _ in range(2):
        policy.train()
        loss, _ = policy.compute_loss(batch)
        opt.zero_grad()
        loss.backward()                           # gradients flow: training runs the reference layers
        assert all(p.grad is not None for p in policy.model.parameters())
        opt.step()
        policy.eval()
        after = _assert_parity(policy, obs)
        assert (after - before).abs().max().item() > 1e-3, "fast path returned stale (pre-step) actions"
        before = after


def test_other_weight_changes_are_seen():
    policy, other = _policy("policy.backbone=tiny"), _policy("policy.backbone=tiny", seed=5)
    obs = _obs(policy, 2)
    _assert_parity(policy, obs)
    with torch.no_grad():                         # .data writes do not bump the version counter
        for p, q in zip(policy.model.parameters(), other.model.parameters()):
            p.data.copy_(q.data)
    assert (_actions(policy, obs, True) - _actions(other, obs, False)).abs().max().item() <= TOL
    fresh = _policy("policy.backbone=tiny", seed=9)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    policy.load_state_dict(state, assign=True)    # new parameter tensors
    assert (_actions(policy, obs, True) - _actions(fresh, obs, False)).abs().max().item() <= TOL


def test_dtype_moves_copies_and_pickles():
    policy = _policy("policy.backbone=tiny")
    obs = _obs(policy, 1)
    _assert_parity(policy, obs)
    with torch.no_grad():                               # the conditioning's width: the obs (and its relative view)
        width = policy.condition({"obs": obs}).shape[1]
    net, s, c = policy.model, torch.randn(1, 16, 2), torch.randn(1, width)
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):     # _apply swaps every parameter tensor
            net.to(dtype)
            fast, ref = net(s.to(dtype), c.to(dtype)), net.reference_forward(s.to(dtype), c.to(dtype))
            assert fast.dtype == dtype and (fast - ref).abs().max().item() <= TOL
    for clone in (copy.deepcopy(policy), pickle.loads(pickle.dumps(policy))):
        assert not clone.model.__dict__["_trace_cache"].traces
        assert (_actions(clone, obs, True) - _actions(policy, obs, False)).abs().max().item() <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_device_round_trip():
    policy = _policy("policy.backbone=tiny")
    obs = _obs(policy, 1)
    ref = _actions(policy, obs, False)
    policy.cuda()
    assert not policy.model.uses_fast_path(torch.zeros(1, 16, 2, device="cuda"))
    policy.cpu()
    assert (_actions(policy, obs, True) - ref).abs().max().item() <= TOL


def test_select_action_matches_reference():
    policy = _policy("policy.backbone=tiny")
    ref = copy.deepcopy(policy)
    ref.model.fast_inference = False
    policy.reset()
    ref.reset()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in range(10):
        step = torch.randn(2, 20, generator=torch.Generator().manual_seed(t))
        a, b = policy.select_action(step, g1), ref.select_action(step, g2)
        assert (a - b).abs().max().item() <= TOL
