"""The AOTInductor batch-1 kernel of the U-Net's fast path (drift_policy/models/aot.py; DRIFT_POLICY_COMPILE=aoti
makes the drift net use it too): same actions as the reference layers to 1e-5, weights read live (optimizer
steps, .data writes, replaced parameters), one compile per key shared through the disk cache, and the TorchScript
fallback when no compiler is found or compiling is switched off."""
import warnings

import pytest
import torch

from drift_policy.config import compose
from drift_policy.errors import ConfigError
from drift_policy.models import aot
from drift_policy.policies import make_policy

TOL = 1e-5


def _policy(seed=0):
    torch.manual_seed(seed)
    policy = make_policy(compose(["policy.backbone=tiny"]).policy)
    with torch.no_grad():                       # move every weight off its init (GroupNorm 1/0, zero biases)
        for p in policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy.eval()


def _obs(seed=1):
    return torch.randn(1, 2, 20, generator=torch.Generator().manual_seed(seed))


def _actions(policy, obs, fast=True, seed=0):
    policy.model.fast_inference = fast
    try:
        return policy.predict_action(obs, torch.Generator().manual_seed(seed))["action_pred"]
    finally:
        policy.model.fast_inference = True


def _entries(policy):
    return list(policy.model.__dict__["_trace_cache"].traces.values())


def _is_compiled(fn) -> bool:
    from drift_policy.models.cpu_kernel import CpuKernel

    return hasattr(fn, "key") or isinstance(fn, CpuKernel)


@pytest.fixture
def compiling(monkeypatch, tmp_path_factory):
    """Compiling on, with one cache folder for the whole module (one compile), and no kernel loaded yet."""
    cache = tmp_path_factory.getbasetemp() / "aot_cache"
    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "aoti")
    monkeypatch.setenv("DRIFT_POLICY_CACHE_DIR", str(cache))
    aot.clear_loaded()
    yield cache
    aot.clear_loaded()


@pytest.mark.slow
def test_compiled_kernel_matches_reference_and_sees_weight_changes(compiling):
    policy, other = _policy(), _policy(seed=5)
    obs = _obs()
    fast = _actions(policy, obs)
    assert (fast - _actions(policy, obs, fast=False)).abs().max().item() <= TOL
    assert any(_is_compiled(f) for f in _entries(policy)), "batch 1 did not run the compiled kernel"
    assert list(compiling.glob("unet_*.pt2")), "the kernel was not cached on disk"

    with torch.no_grad():                         # .data writes do not bump the version counter
        for p, q in zip(policy.model.parameters(), other.model.parameters()):
            p.data.copy_(q.data)
    assert (_actions(policy, obs) - _actions(other, obs, fast=False)).abs().max().item() <= TOL

    opt = torch.optim.SGD(policy.parameters(), lr=0.05)
    before = _actions(policy, obs)
    policy.train()
    loss, _ = policy.compute_loss({"obs": torch.randn(4, 2, 20), "action": torch.randn(4, 16, 2)})
    loss.backward()
    opt.step()
    policy.eval()
    after = _actions(policy, obs)
    assert (after - before).abs().max().item() > 1e-3, "stale (pre-step) weights"
    assert (after - _actions(policy, obs, fast=False)).abs().max().item() <= TOL

    fresh = _policy(seed=9)
    policy.load_state_dict({k: v.clone() for k, v in fresh.state_dict().items()}, assign=True)
    assert (_actions(policy, obs) - _actions(fresh, obs, fast=False)).abs().max().item() <= TOL

    # Batch 2 keeps the trace (no compile per batch size); inside aot.disabled() batch 1 does too.
    two = torch.cat([obs, _obs(seed=2)])
    assert (_actions(policy, two) - _actions(policy, two, fast=False)).abs().max().item() <= TOL
    with aot.disabled():
        assert (_actions(fresh, obs) - _actions(fresh, obs, fast=False)).abs().max().item() <= TOL
        assert not any(_is_compiled(f) for f in _entries(fresh))


@pytest.mark.slow
def test_cached_kernel_loads_without_compiling(compiling, monkeypatch):
    policy = _policy(seed=3)
    _actions(policy, _obs())                       # compiled by the test above, or now
    aot.clear_loaded()                             # as a new process: only the disk cache is left

    def no_compile(*a, **k):
        raise AssertionError("compiled again although the kernel is cached")

    monkeypatch.setattr(aot, "_compile", no_compile)
    again = _policy(seed=4)
    obs = _obs(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _actions(again, obs)
    assert any(_is_compiled(f) for f in _entries(again))
    assert (got - _actions(again, obs, fast=False)).abs().max().item() <= TOL


def test_no_compiler_falls_back_to_the_trace(monkeypatch, tmp_path):
    from torch._inductor import config as inductor_config

    from drift_policy.models import cpu_kernel

    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "auto")
    monkeypatch.setenv("DRIFT_POLICY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    # inductor's own patch, not monkeypatch: undoing a monkeypatch deletes the config entry for later tests
    no_cxx = inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))})
    no_cxx.__enter__()
    aot.clear_loaded()
    cpu_kernel.clear_loaded()
    try:
        policy, obs = _policy(), _obs()
        with pytest.warns(UserWarning) as record:
            got = _actions(policy, obs)
        messages = " | ".join(str(w.message) for w in record)
        assert "C kernel is unavailable" in messages and "no compiled kernel" in messages
        assert (got - _actions(policy, obs, fast=False)).abs().max().item() <= TOL
        assert _entries(policy) and not any(_is_compiled(f) for f in _entries(policy))
        assert not list(tmp_path.glob("*.pt2"))
        with warnings.catch_warnings():            # the failure is remembered: no second try, no second warning
            warnings.simplefilter("error")
            _actions(_policy(seed=1), obs)
    finally:
        no_cxx.__exit__(None, None, None)
        aot.clear_loaded()
        cpu_kernel.clear_loaded()


def test_switched_off_never_compiles(monkeypatch, tmp_path):
    from drift_policy.models import cpu_kernel

    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "0")
    monkeypatch.setenv("DRIFT_POLICY_CACHE_DIR", str(tmp_path))

    def no_compile(*a, **k):
        raise AssertionError("compiled although DRIFT_POLICY_COMPILE=0")

    monkeypatch.setattr(aot, "_compile", no_compile)
    monkeypatch.setattr(cpu_kernel, "_build", no_compile)
    policy, obs = _policy(), _obs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = _actions(policy, obs)
    assert (got - _actions(policy, obs, fast=False)).abs().max().item() <= TOL
    assert not any(_is_compiled(f) for f in _entries(policy))


def test_bad_switch_is_a_config_error(monkeypatch):
    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "yes please")
    with pytest.raises(ConfigError, match="DRIFT_POLICY_COMPILE"):
        aot.compile_mode()
    monkeypatch.setenv("DRIFT_POLICY_COMPILE", "auto")
    monkeypatch.setenv("DRIFT_POLICY_AOT_GEMM", "blas")
    with pytest.raises(ConfigError, match="DRIFT_POLICY_AOT_GEMM"):
        aot.gemm_form()


def test_key_tells_structures_and_shapes_apart():
    a, b = _policy(), _policy(seed=1)
    s, c = torch.zeros(1, 16, 2), torch.zeros(1, a.model.down[0][0].film[1].in_features)
    assert aot.kernel_key(a.model, (s, c)) == aot.kernel_key(b.model, (s, c))     # weights are inputs
    assert aot.kernel_key(a.model, (s, c)) != aot.kernel_key(a.model, (torch.zeros(2, 16, 2), c.repeat(2, 1)))
    big = make_policy(compose(["policy.backbone=small"]).policy)
    assert aot.kernel_key(a.model, (s, c)) != aot.kernel_key(big.model, (s, c))
