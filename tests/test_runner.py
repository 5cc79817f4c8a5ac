"""Real-time runner: chunk scheduling (receding horizon, async, temporal ensembling), deadlines, the report."""
import json
import time

import numpy as np
import pytest
import torch

from drift_policy.normalizer import Normalizer
from drift_policy.policies import DriftConfig, make_policy
from drift_policy.runner import Backend, Controller, RunConfig, run

TO, TA, TP = 2, 8, 16
N_ACT = TP - TO + 1                                   # actions per chunk, from the observation's tick on


class FakeBackend:
    """Chunk k (the k-th call) holds actions [k, j] for j = 0..N_ACT-1, returned at once."""

    def __init__(self):
        self.calls = 0

    def __call__(self, window):
        k, self.calls = self.calls, self.calls + 1
        return np.stack([np.full(N_ACT, k, float), np.arange(N_ACT, dtype=float)], 1)


def window(t):
    return np.full((TO, 20), t, np.float32)


def drive(ctrl, n_ticks, settle=False):
    """Run n_ticks; ``settle``: let any background inference finish before the next tick (a tick long enough for
    it), so the schedule does not depend on how fast this machine runs threads."""
    ctrl.begin_episode(window(0))
    out = []
    for t in range(n_ticks):
        out.append(ctrl.act(t, window(t)))
        if settle and ctrl.pending is not None:
            ctrl.pending.result()
    ctrl.close()
    return out


class LateFuture:
    """A background chunk that is certainly not ready when the tick needing it asks: done() is False until
    result() is called, which releases the (gated) backend and waits for it. No clock involved."""

    def __init__(self, future, gate):
        self.future, self.gate = future, gate

    def done(self):
        return self.gate.is_set() and self.future.done()

    def result(self):
        self.gate.set()
        return self.future.result()


class LatePool:
    """The controller's inference pool, handing out LateFutures."""

    def __init__(self, pool, gate):
        self.pool, self.gate = pool, gate

    def submit(self, fn, *args):
        return LateFuture(self.pool.submit(fn, *args), self.gate)

    def shutdown(self, wait=True):
        self.gate.set()
        self.pool.shutdown(wait=wait)


def test_receding_horizon_sync_runs_once_per_chunk():
    fb = FakeBackend()
    out = drive(Controller(fb, RunConfig(), TA), 3 * TA)
    assert fb.calls == 3
    for t, (action, waited, age) in enumerate(out):
        assert not waited and age == t % TA
        assert action.tolist() == [t // TA, t % TA]   # chunk t // TA, from its first executable action on


def test_receding_horizon_async_skips_actions_whose_time_has_passed():
    fb = FakeBackend()
    lead = 2
    out = drive(Controller(fb, RunConfig(async_=True, lead=lead), TA), 3 * TA, settle=True)
    assert fb.calls == 4                                   # the first chunk, then at ticks 6, 14 and 22 (lead 2)
    acts = [a.tolist() for a, _, _ in out]
    assert acts[:TA] == [[0, j] for j in range(TA)]
    # chunk 1 is computed from the observation at tick TA - lead and first used at tick TA: its action index `lead`
    assert acts[TA:2 * TA] == [[1, lead + j] for j in range(TA)]
    assert not any(w for _, w, _ in out)                  # the fake is instant: always ready in time
    assert [age for _, _, age in out[TA:2 * TA]] == [lead + j for j in range(TA)]


def test_async_counts_a_wait_when_the_chunk_is_late():
    import threading

    gate = threading.Event()
    fb = FakeBackend()
    gated = lambda w: (gate.wait(), fb(w))[1] if fb.calls else fb(w)  # noqa: E731  (chunk 0 is not gated)
    ctrl = Controller(gated, RunConfig(async_=True, lead=1), TA)
    ctrl.pool = LatePool(ctrl.pool, gate)
    out = drive(ctrl, TA + 2)
    waited = [w for _, w, _ in out]
    assert waited[TA] and sum(waited) == 1                # the tick that needed chunk 1 had to wait for it
    assert out[TA][0].tolist() == [1, 1]                  # and then played it from the right index


def test_temporal_ensemble_weights_are_acts():
    k = 0.5
    fb = FakeBackend()
    out = drive(Controller(fb, RunConfig(ensemble=True, ensemble_k=k), TA), 12)
    # sync: chunk 0 from begin_episode (tick 0) and chunk t + 1 computed at tick t, all with start = their tick
    starts = {0: 0, **{t + 1: t for t in range(12)}}
    for t, (action, waited, age) in enumerate(out):
        chunks = sorted(c for c, s in starts.items() if s <= t and t - s < TA)   # oldest first
        w = np.exp(-k * np.arange(len(chunks)))
        want = np.stack([[c, t - starts[c]] for c in chunks])
        np.testing.assert_allclose(action, (w[:, None] * want).sum(0) / w.sum())
        assert age == 0 and not waited
    assert fb.calls == 13                                  # one chunk per tick


def test_async_ensemble_uses_ready_chunks_only():
    fb = FakeBackend()
    out = drive(Controller(fb, RunConfig(ensemble=True, async_=True), TA), 10, settle=True)
    assert all(age >= 1 for _, _, age in out[1:])         # the chunk of tick t joins from tick t + 1
    assert not any(w for _, w, _ in out)


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    norm = Normalizer().fit("obs", torch.rand(100, 20, generator=g) * 512).fit("action", torch.rand(100, 2, generator=g) * 300 + 100)
    return make_policy(DriftConfig(backbone="tiny"), norm).eval()


def test_backends_agree(policy):
    pytest.importorskip("onnxruntime")
    w = window(200)
    outs = {}
    for kind in ("eager", "jit_trace", "onnxruntime"):
        b = Backend(policy, RunConfig(backend=kind, seed=3))
        outs[kind] = np.stack([b(w), b(w)])               # the same noise sequence in every backend
        b.close()
    assert outs["eager"].shape == (2, N_ACT, 2)
    np.testing.assert_allclose(outs["jit_trace"], outs["eager"], atol=1e-3)
    np.testing.assert_allclose(outs["onnxruntime"], outs["eager"], atol=1e-3)
    assert not np.allclose(outs["eager"][0], outs["eager"][1])


def test_run_on_pusht_reports_timing_and_coverage(policy):
    cfg = RunConfig(rate_hz=50, seconds=0, episodes=2, max_steps=12, async_=True, warmup=2)
    r = run(policy, cfg)
    assert [e["seed"] for e in r["episodes"]] == [100000, 100001]
    assert r["ticks"] == 24 and r["n_complete_episodes"] == 2 and 0 <= r["coverage_score"] <= 1
    assert r["inferences"] == 2 * 2                        # per episode: the first chunk, then one more (12 > Ta)
    assert {"p50", "p99", "max"} <= set(r["inference_latency_ms"])
    assert r["achieved_rate_hz"] > 0
    assert max(r["waited_for_chunk"], r["overruns"]) <= r["missed_deadlines"] <= r["waited_for_chunk"] + r["overruns"]
    json.dumps(r)


def test_overload_is_reported_as_missed_deadlines(policy, monkeypatch):
    # Every inference takes at least 5 ms (a sleep is a lower bound on any machine), so a 1 ms period (1000 Hz)
    # with synchronous inference every tick is overrun on every tick, however fast the CPU.
    real = Backend.__call__
    monkeypatch.setattr(Backend, "__call__", lambda self, w: (time.sleep(0.005), real(self, w))[1])
    r = run(policy, RunConfig(rate_hz=1000, seconds=0, episodes=1, max_steps=20, ensemble=True, warmup=1))
    assert r["overruns"] > 0 and r["missed_fraction"] > 0.5 and r["achieved_rate_hz"] < 1000


def test_run_cli_writes_the_report(policy, tmp_path, capsys):
    from drift_policy.cli import main

    folder = policy.save_pretrained(tmp_path / "p")
    out = tmp_path / "report.json"
    main(["run", f"checkpoint={folder}", "rate_hz=100", "seconds=0", "episodes=1", "max_steps=10", "async=1",
          "ensemble=1", "backend=eager", f"out={out}"])
    r = json.loads(out.read_text())
    assert r["config"]["async"] is True and r["config"]["ensemble"] is True and r["ticks"] == 10
    with pytest.raises(SystemExit) as e:                # a bad option: exit status 2 and the key, no traceback
        main(["run", f"checkpoint={folder}", "lead=9", "async=1", "episodes=1", f"out={out}"])
    assert e.value.code == 2 and "lead must be in [1, 7]" in capsys.readouterr().err


def test_auto_lead_covers_the_inference_latency():
    from drift_policy.runner import auto_lead

    assert auto_lead([1.0, 1.0, 0.004, 0.005], rate_hz=10, max_lead=7) == 1      # 7.5 ms of a 100 ms period
    assert auto_lead([1.0, 1.0, 0.004, 0.005], rate_hz=1000, max_lead=7) == 7    # capped: 7.5 periods
    assert auto_lead([1.0, 1.0, 0.004, 0.005], rate_hz=500, max_lead=7) == 4     # 3.75 periods, rounded up
    assert auto_lead([], rate_hz=10, max_lead=7) == 1
