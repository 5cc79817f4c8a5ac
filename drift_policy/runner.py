"""Real-time control loop: drive a task's simulator at a target control rate with a wall clock, and report whether
it kept up. The task is the run's (a bare ``pretrained/`` folder: Push-T keypoints).

    drift-policy run checkpoint=runs/<run>/pretrained rate_hz=10 seconds=120 async=1 ensemble=0 backend=eager \\
        out=eval/results/runner/runner.json
    drift-policy run checkpoint=... rate_hz=max seconds=60 async=1 out=...   # find the highest sustained rate

Every control tick (period 1 / rate_hz) the loop sleeps until the tick's start time, picks the action for this
tick, steps the simulator once and records the timing. The first chunk of each episode is computed before the
episode's clock starts (a robot would not start moving without one). Then:

* receding horizon (``ensemble=0``): each chunk's Ta executable actions are played in order (Diffusion Policy's
  protocol). With ``async=0`` the next chunk is computed inside the tick that needs it, so that tick must fit
  inference and the env step in one period. With ``async=1`` it is computed in a background thread, started
  ``lead`` ticks before the queue runs out from the observation of that tick (by default the fewest ticks that
  cover 1.5 x the slowest warm-up inference, at least 1); the actions of a chunk are indexed
  by time, so a chunk computed from the observation at tick s and first used at tick s + lead starts with its
  action for tick s + lead (``action_pred[To - 1 + lead]``), never with an action whose time has passed.
* temporal ensembling (``ensemble=1``, ACT / Diffusion Policy style): a new chunk every tick; the action for tick t
  is the average of every stored chunk's prediction for t over the Ta-step window, with weights exp(-k * i), i = 0
  for the oldest prediction (ACT's scheme, k = ``ensemble_k``, 0.01 by default). With ``async=1`` the chunk for
  the observation at tick t is computed in the background and joins the average from the tick after it is ready.

A deadline is missed when the action for a tick was not ready when the tick needed it (the loop had to wait for
a background chunk) or when the tick's work ended after the next tick's start time (overrun). After an overrun
the loop does not try to catch up: the next tick starts immediately and the schedule restarts from there, so the
achieved rate falls below the target.

The simulator always advances one control period of its task family per tick (Push-T: 0.1 s, its 10 Hz control,
the rate the policy was trained at), so at rate_hz above the family's rate the world runs faster than real
time: such runs measure whether the controller (inference plus env step) keeps up with the period, with the
task itself unchanged.

Backends: the names of ``drift_policy.backends`` (``eager``, ``jit_trace``, ``onnxruntime``, ...): the policy's own
``predict_action`` with its backbone run by that engine (``accelerated_policy``). The sampling noise comes from
one seeded torch.Generator whichever the backend, so every backend sees the same noise sequence.
"""
from __future__ import annotations

import dataclasses
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import ConfigError
from .executor import ChunkExecutor, executable
from .observations import check_chunk
from .timing import latency_stats, machine_info


@dataclass
class RunConfig:
    rate_hz: float = 10.0
    seconds: float = 60.0          # wall-clock budget (0: no limit, use episodes); an episode cut by it is incomplete
    episodes: int = 0              # stop after this many episodes (0: only the time budget)
    async_: bool = False           # background inference
    ensemble: bool = False         # temporal ensembling instead of receding horizon
    ensemble_k: float = 0.01       # ensemble weights exp(-k * i), i = 0 for the oldest prediction
    lead: int = 0                  # async receding horizon: start the next chunk this many ticks before it is
                                   # needed (0: from the warm-up latency, see auto_lead)
    backend: str = "eager"         # an inference backend of backends.py (CPU_BACKENDS): eager | jit_trace | onnxruntime ...
    threads: int = 1               # intra-op threads of the inference backend
    max_steps: int = 0             # env steps per episode (0: the task's max_steps, 300 on Push-T)
    start_seed: int = 100000       # episode seeds start_seed, start_seed + 1, ...
    seed: int = 0                  # sampling-noise seed
    warmup: int = 10               # untimed inferences before the first episode

    def check(self, n_obs_steps: int, n_action_steps: int, horizon: int) -> None:
        if not self.rate_hz > 0:
            raise ConfigError(f"rate_hz must be > 0, got {self.rate_hz}")
        if self.seconds <= 0 and self.episodes <= 0:
            raise ConfigError("give seconds > 0 or episodes > 0")
        from .backends import CPU_BACKENDS

        if self.backend not in CPU_BACKENDS:
            raise ConfigError(f"backend must be one of {list(CPU_BACKENDS)}, got {self.backend!r}")
        max_lead = horizon - n_obs_steps + 1 - n_action_steps
        if self.async_ and not self.ensemble and self.lead and not 1 <= self.lead <= max_lead:
            raise ConfigError(f"lead must be in [1, {max_lead}] (horizon - n_obs_steps + 1 - n_action_steps), got {self.lead}")


# ---- inference: obs window [To, obs_dim] or {"obs": [To, D], <camera>: [To, 3, H, W]} (data units)
# ---- -> actions [Tp - To + 1, Da] from step To - 1 on, through one of backends.py's backends
class Backend:
    def __init__(self, policy, cfg: RunConfig):
        from .backends import accelerated_policy
        from .threads import set_threads

        set_threads(cfg.threads)
        c = policy.config
        self.policy = accelerated_policy(policy.eval(), cfg.backend, cfg.threads)
        self.slice = executable(c.n_obs_steps)
        self.gen = torch.Generator().manual_seed(cfg.seed)     # one noise stream, whichever the backend

    def __call__(self, window) -> np.ndarray:
        window = window if isinstance(window, dict) else {"obs": window}
        batch = {k: torch.from_numpy(np.ascontiguousarray(v[None])) for k, v in window.items()}
        batch["obs"] = batch["obs"].float()
        with torch.inference_mode():
            pred = self.policy.predict_action(batch, generator=self.gen)["action_pred"].numpy()
        return pred[0, self.slice]

    def close(self) -> None:
        pass


@dataclass
class Chunk:
    start: int                # the tick whose observation it was computed from
    actions: np.ndarray       # [n, Da]: actions[j] is the action for tick start + j

    def at(self, tick: int) -> np.ndarray | None:
        j = tick - self.start
        return self.actions[j] if 0 <= j < len(self.actions) else None


class Controller:
    """Chooses the action for each tick from chunks, synchronously or with one background inference thread."""

    def __init__(self, backend: Backend, cfg: RunConfig, n_action_steps: int):
        self.backend, self.cfg, self.Ta = backend, cfg, n_action_steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference") if cfg.async_ else None
        self.latencies: list[float] = []
        self.pending: Future | None = None

    def _infer(self, window: np.ndarray, tick: int) -> Chunk:
        t0 = time.perf_counter()
        actions = self.backend(window)
        self.latencies.append(time.perf_counter() - t0)
        return Chunk(tick, check_chunk(actions, "runner"))    # a non-finite chunk is never played

    def _submit(self, window: np.ndarray, tick: int) -> None:
        self.pending = self.pool.submit(self._infer, window, tick)

    def begin_episode(self, window: np.ndarray) -> None:
        if self.pending is not None:             # a chunk of the previous episode: finish and drop it
            self.pending.result()
            self.pending = None
        first = self._infer(window, 0)
        self.chunks = [first]                    # ensembling: the stored chunks, oldest first
        self.current, self.plan_end = first, self.Ta   # receding horizon: the chunk played until tick plan_end

    def act(self, tick: int, window: np.ndarray) -> tuple[np.ndarray, bool, int]:
        """(action for this tick, whether the loop had to wait for a chunk, age in ticks of the newest chunk used)."""
        return self._ensemble(tick, window) if self.cfg.ensemble else self._receding(tick, window)

    def _receding(self, tick: int, window: np.ndarray) -> tuple[np.ndarray, bool, int]:
        waited = False
        if self.pool is not None and self.pending is None and self.plan_end - tick <= self.cfg.lead:
            self._submit(window, tick)           # from this tick's observation, needed at tick plan_end
        if tick >= self.plan_end:
            if self.pool is not None:
                waited = not self.pending.done()
                chunk, self.pending = self.pending.result(), None
            else:
                chunk = self._infer(window, tick)
            self.current = chunk
            self.plan_end = min(tick + self.Ta, chunk.start + len(chunk.actions))
        return self.current.at(tick), waited, tick - self.current.start

    def _ensemble(self, tick: int, window: np.ndarray) -> tuple[np.ndarray, bool, int]:
        waited = False
        if self.pool is None:
            self.chunks.append(self._infer(window, tick))
        else:
            if self.pending is not None and self.pending.done():
                self.chunks.append(self.pending.result())
                self.pending = None
            if self.pending is None:
                self._submit(window, tick)
        # Keep the chunks whose Ta-step window covers this tick (they are ordered oldest first).
        self.chunks = [c for c in self.chunks if 0 <= tick - c.start < self.Ta]
        if not self.chunks:                      # async only: every stored prediction is too old
            waited = True
            self.chunks.append(self.pending.result())
            self.pending = None
        preds = np.stack([c.at(tick) for c in self.chunks])
        w = np.exp(-self.cfg.ensemble_k * np.arange(len(preds)))
        action = (w[:, None] * preds).sum(0) / w.sum()
        return action, waited, tick - self.chunks[-1].start

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)


# ---- the loop ----------------------------------------------------------------------------------------------------
def run_episode(env, ctrl: Controller, seed: int, cfg: RunConfig, n_obs_steps: int, wall_deadline: float,
                ticks: dict, family) -> dict:
    """One episode on the wall clock; ``family`` (the task's ``tasks.TaskFamily``) names the success key and the
    info keys whose maximum is reported."""
    obs, info = env.reset(seed=seed)
    # The history and the To - 1 slice come from the executor; which action plays at a tick is the Controller's
    # choice (its chunks are indexed by tick, for the async lead and temporal ensembling).
    ex = ChunkExecutor(n_obs_steps, where="runner")
    ex.observe(_as_dict(obs))
    ctrl.begin_episode(ex.window(np.stack))
    period = 1.0 / cfg.rate_hz
    max_reward, success = 0.0, False
    max_info = {k: 0.0 for k in family.track_max if k in info}
    steps, complete = 0, True
    t_clock = t_next = time.perf_counter()
    end = t_clock
    for tick in range(cfg.max_steps):
        if time.perf_counter() >= wall_deadline:
            complete = False
            break
        delay = t_next - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        start = time.perf_counter()
        action, waited, age = ctrl.act(tick, ex.window(np.stack))
        ready = time.perf_counter()
        obs, reward, terminated, truncated, info = env.step(action)
        end = time.perf_counter()
        ex.observe(_as_dict(obs))
        steps += 1
        max_reward, success = max(max_reward, reward), success or bool(info.get(family.success_key, False))
        for k in max_info:
            max_info[k] = max(max_info[k], float(info[k]))
        deadline = t_next + period
        overrun = end > deadline
        for k, v in (("lateness", start - t_next), ("work", end - start), ("act", ready - start),
                     ("env", end - ready), ("age", age), ("waited", waited), ("overrun", overrun)):
            ticks[k].append(v)
        t_next = end if overrun else deadline    # no catching up after an overrun
        if terminated or truncated:
            break
    # The clock ran until the last tick's period ended (or until its overrun ended).
    return {"seed": int(seed), "steps": steps, "max_reward": float(max_reward),
            **{f"max_{k}": float(v) for k, v in max_info.items()}, "success": success, "complete": complete,
            "clock_s": float(max(end, t_next) - t_clock)}


def _as_dict(obs) -> dict:
    return dict(obs) if isinstance(obs, dict) else {"obs": obs}


def run(policy, cfg: RunConfig, checkpoint: str = "", task=None) -> dict:
    """Run episodes of ``task`` (a TaskConfig; default: Push-T keypoints) at cfg.rate_hz and return the report
    (a JSON-serialisable dict)."""
    from .config import TaskConfig
    from .tasks import env_spec, make_env

    task = task if task is not None else TaskConfig()
    spec = env_spec(task)
    fam = spec["family"]                         # the family whose env runs (for a LeRobot task, its eval env)
    c = policy.config
    cfg = RunConfig(**asdict(cfg))               # a copy: the report records the lead and max_steps actually used
    cfg.max_steps = cfg.max_steps or task.max_steps
    cfg.check(c.n_obs_steps, c.n_action_steps, c.horizon)
    backend = Backend(policy, cfg)
    ctrl = Controller(backend, cfg, c.n_action_steps)
    dummy = {"obs": np.zeros((c.n_obs_steps, c.obs_dim), dtype=np.float32),
             **{k: np.zeros((c.n_obs_steps, *c.image_shape), dtype=np.uint8) for k in c.image_keys}}
    warm = []
    for _ in range(cfg.warmup):
        t = time.perf_counter()
        backend(dummy)
        warm.append(time.perf_counter() - t)
    if cfg.async_ and not cfg.ensemble and not cfg.lead:
        cfg.lead = auto_lead(warm, cfg.rate_hz, c.horizon - c.n_obs_steps + 1 - c.n_action_steps)
    env = make_env(spec, max_steps=cfg.max_steps)
    ticks = {k: [] for k in ("lateness", "work", "act", "env", "age", "waited", "overrun")}
    episodes = []
    t0 = time.perf_counter()
    wall_deadline = t0 + cfg.seconds if cfg.seconds > 0 else math.inf
    try:
        while (cfg.episodes <= 0 or len(episodes) < cfg.episodes) and time.perf_counter() < wall_deadline:
            episodes.append(run_episode(env, ctrl, cfg.start_seed + len(episodes), cfg, c.n_obs_steps,
                                        wall_deadline, ticks, fam))
    finally:
        ctrl.close()
        backend.close()
        env.close()
    wall = time.perf_counter() - t0
    n = len(ticks["work"])
    waited, overrun = np.asarray(ticks["waited"], bool), np.asarray(ticks["overrun"], bool)
    missed = int((waited | overrun).sum())
    clock = sum(e["clock_s"] for e in episodes)
    done = [e for e in episodes if e["complete"]]
    score = float(np.mean([e["max_reward"] for e in done])) if done else None
    return {
        "checkpoint": str(checkpoint),
        "policy": {"type": c.type, "backbone": c.backbone, "n_obs_steps": c.n_obs_steps,
                   "n_action_steps": c.n_action_steps, "horizon": c.horizon,
                   "nfe": c.nfe},
        "config": {("async" if k == "async_" else k): v for k, v in asdict(cfg).items()},
        "machine": machine_info("cpu"),
        "target_rate_hz": cfg.rate_hz,
        "achieved_rate_hz": n / clock if clock > 0 else 0.0,
        "ticks": n,
        "missed_deadlines": missed,
        "missed_fraction": missed / n if n else 0.0,
        "waited_for_chunk": int(waited.sum()),
        "overruns": int(overrun.sum()),
        "inferences": len(ctrl.latencies),
        "inference_latency_ms": latency_stats(ctrl.latencies, 1e3),
        "tick_work_ms": latency_stats(ticks["work"], 1e3),          # action selection + env step
        "action_ready_ms": latency_stats(ticks["act"], 1e3),        # from tick start until the action is known
        "env_step_ms": latency_stats(ticks["env"], 1e3),
        "tick_start_lateness_ms": latency_stats(ticks["lateness"], 1e3),
        "action_age_ticks": latency_stats(ticks["age"]),            # tick minus the observation tick of the newest chunk
        "task": task.name,
        "sim_seconds_per_tick": 1.0 / fam.control_hz,
        "realtime_factor": cfg.rate_hz / fam.control_hz,     # simulated seconds per wall second while the clock runs
        "episodes": episodes,
        "n_complete_episodes": len(done),
        **{k: score for k in ("mean_score", *fam.score_aliases)},
        "success_rate": float(np.mean([e["success"] for e in done])) if done else None,
        "wall_s": wall,
    }


def auto_lead(warmup_latencies: list[float], rate_hz: float, max_lead: int) -> int:
    """Ticks of head start for a background chunk: 1.5 x the slowest warm-up inference (the first two, which
    allocate, excluded), in periods, rounded up; between 1 and max_lead."""
    slowest = max(warmup_latencies[2:], default=0.0)
    return int(min(max_lead, max(1, math.ceil(1.5 * slowest * rate_hz))))


def sustained(report: dict, tolerance: float) -> bool:
    return report["missed_fraction"] <= tolerance and report["achieved_rate_hz"] >= 0.99 * report["target_rate_hz"]


def find_max_rate(policy, cfg: RunConfig, seconds: float = 5.0, tolerance: float = 0.01, start: float = 10.0,
                  limit: float = 20000.0, refine: int = 4, task=None) -> tuple[float, list[dict]]:
    """Highest rate (Hz) at which a ``seconds``-long run misses at most ``tolerance`` of its deadlines (and
    achieves 99 % of the rate): doubling from ``start`` until a rate fails, then ``refine`` bisection steps
    (geometric) between the last sustained and the first failed rate. Returns (rate, one record per trial).
    ``drift-policy run rate_hz=max`` then runs ``seconds`` at that rate, stepping down 5 % (at most 3 times)
    while the full-length run misses more than ``tolerance``."""
    trials = []

    def trial(rate: float) -> bool:
        r = run(policy, RunConfig(**{**asdict(cfg), "rate_hz": rate, "seconds": seconds, "episodes": 0}), task=task)
        ok = sustained(r, tolerance)
        trials.append({"rate_hz": rate, "missed_fraction": r["missed_fraction"], "achieved_rate_hz": r["achieved_rate_hz"],
                       "waited_for_chunk": r["waited_for_chunk"], "overruns": r["overruns"], "lead": r["config"]["lead"],
                       "inference_latency_ms_p99": r["inference_latency_ms"].get("p99"),
                       "tick_work_ms_p99": r["tick_work_ms"].get("p99"), "ok": ok})
        print(f"  {rate:8.1f} Hz: missed {r['missed_fraction']:.4f}, achieved {r['achieved_rate_hz']:.1f} Hz -> "
              f"{'sustained' if ok else 'not sustained'}", flush=True)
        return ok

    good, bad = 0.0, None
    rate = start
    while rate <= limit:
        if not trial(rate):
            bad = rate
            break
        good, rate = rate, rate * 2
    if bad is not None and good > 0:
        for _ in range(refine):
            mid = round(math.sqrt(good * bad))
            if mid in (good, bad):
                break
            good, bad = (mid, bad) if trial(mid) else (good, mid)
    return good, trials


# ---- command line ---------------------------------------------------------------------------------------------
def rate_or_max(v: str) -> float | str:
    """The ``rate_hz`` option: a positive number of Hz, or ``max`` (search the highest sustained rate)."""
    if v == "max":
        return v
    try:
        hz = float(v)
    except ValueError:
        hz = math.nan
    if not (math.isfinite(hz) and hz > 0):
        raise ValueError(f"expected a positive number of Hz or 'max', got {v!r}")
    return hz


def cmd_run(args: list[str]) -> None:
    from .evaluation import save_eval_json
    from .fileio import check_writable
    from .runs import flag, load_policy_for_eval, parse_kv

    usage = ("usage: drift-policy run checkpoint=PATH [rate_hz=10|max seconds=60 episodes=0 async=0 "
             "ensemble=0 backend=eager|jit_trace|onnxruntime|... threads=1 out=report.json]")
    defaults = {("async" if f.name == "async_" else f.name): f.default for f in dataclasses.fields(RunConfig)}
    defaults.update(rate_hz="10 (or max: search the highest sustained rate)", out="runner_report.json",
                    search_seconds=5.0, tolerance=0.01)
    opts = parse_kv(args, {"checkpoint": str, "rate_hz": rate_or_max, "seconds": float, "episodes": int, "async": flag,
                           "ensemble": flag, "ensemble_k": float, "lead": int, "backend": str, "threads": int,
                           "max_steps": int, "start_seed": int, "seed": int, "warmup": int, "out": str,
                           "search_seconds": float, "tolerance": float}, usage=usage, defaults=defaults)
    if "checkpoint" not in opts:
        raise SystemExit(usage)
    checkpoint = opts.pop("checkpoint")
    out = check_writable(opts.pop("out", "runner_report.json"), "run out=")   # before the run, not after
    policy, run_cfg = load_policy_for_eval(checkpoint)
    task = run_cfg.task if run_cfg is not None else None      # a bare pretrained folder: Push-T keypoints
    rate = opts.pop("rate_hz", 10.0)
    search = {"seconds": opts.pop("search_seconds", 5.0), "tolerance": opts.pop("tolerance", 0.01)}
    if "async" in opts:
        opts["async_"] = opts.pop("async")
    cfg = RunConfig(**opts)
    trials = None
    if rate == "max":
        print(f"searching the highest sustained rate ({search['seconds']:.0f} s per trial, at most "
              f"{search['tolerance']:.1%} missed deadlines)", flush=True)
        cfg.rate_hz, trials = find_max_rate(policy, cfg, **search, task=task)
        if cfg.rate_hz <= 0:
            raise SystemExit("not even 10 Hz is sustained on this machine")
    else:
        cfg.rate_hz = float(rate)
    report = run(policy, cfg, checkpoint, task)
    if trials is not None:
        # The search's trials are short; if the full-length run misses too many deadlines, step down 5 % at a time.
        final = [{"rate_hz": cfg.rate_hz, "missed_fraction": report["missed_fraction"]}]
        while not sustained(report, search["tolerance"]) and len(final) < 4:
            cfg.rate_hz = float(round(cfg.rate_hz * 0.95))
            print(f"  {final[-1]['missed_fraction']:.2%} missed over {cfg.seconds:g} s; again at {cfg.rate_hz:g} Hz", flush=True)
            report = run(policy, cfg, checkpoint, task)
            final.append({"rate_hz": cfg.rate_hz, "missed_fraction": report["missed_fraction"]})
        report["rate_search"] = {**search, "trials": trials, "full_length_runs": final,
                                 "max_sustained_hz": cfg.rate_hz if sustained(report, search["tolerance"]) else None}
    lat = report["inference_latency_ms"]
    score = report["mean_score"]
    # The summary first: if the report cannot be written (a full disk), the run's result is not lost with it.
    print(f"{report['ticks']} ticks at {report['achieved_rate_hz']:.1f} Hz (target {cfg.rate_hz:g}); missed deadlines "
          f"{report['missed_deadlines']} ({report['missed_fraction']:.2%}); inference p50 {lat['p50']:.2f} ms, "
          f"p99 {lat['p99']:.2f} ms, max {lat['max']:.2f} ms; {report['task']} score "
          f"{'n/a' if score is None else f'{score:.3f}'} over {report['n_complete_episodes']} complete episodes",
          flush=True)
    save_eval_json(report, out)
    print(f"written to {out}")
