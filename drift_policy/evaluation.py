"""Closed-loop evaluation under Diffusion Policy's protocol, for every task family.

``evaluate(predict, env_spec)`` runs the environment a ``tasks.env_spec`` describes: {"family": a
``tasks.TaskFamily``, "name", "kwargs"}; this module knows no family (``tasks.pusht.evaluate_pusht`` is the
Push-T keypoints case with an array-in, array-out ``predict``). It runs ``n_episodes`` episodes seeded
``start_seed, start_seed + 1, ...`` (test seeds 100000..100049 by default), each at most ``max_steps`` env
steps at the family's control rate. The policy runs in the calling process: every chunk, the observation
windows of all still-running episodes go to one ``predict`` call, and each episode then executes the returned
actions (receding horizon, ``executor.ChunkExecutor``) until they run out, the task succeeds or the step limit
is hit. Env stepping is spread over ``num_workers`` spawned processes that import neither torch nor the
caller's ``__main__`` and run single-threaded; ``num_workers=0`` steps in-process. Results do not depend on the
process layout.

Metrics: ``mean_score`` is the mean over episodes of the episode's maximum reward, Diffusion Policy's
``test/mean_score``, also reported under the family's ``score_aliases`` (Push-T: ``coverage_score``, as its
reward is clip(coverage / 0.95, 0, 1); BlockPush: 0.49 once a block is in a target, 1 with both).
``success_rate`` is the fraction of episodes that reached success at some step (the family's ``success_key`` in
the step info: Push-T coverage > 0.95, LeRobot's ``pc_success`` / 100; robomimic: the task's success check;
BlockPush: both blocks in targets). Per episode, the maximum of each of the family's ``track_max`` info keys is
reported as ``max_<key>`` (Push-T: ``max_coverage``), and each of its ``episode_flags`` (info keys, BlockPush:
``p1``, ``p2``, ``a_first``, ``b_first``) as true if true at any step; the fraction of episodes with each flag
is a top-level key of the result, and ``flags`` lists them; each of its ``episode_values`` (Kitchen: the subtasks
completed, in order) is copied into the episode's record as the env reported it last. An episode ends when the env
terminates it (most at success) or after ``max_steps`` steps.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import types
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .executor import ChunkExecutor

__all__ = ["evaluate", "save_eval_json", "VIDEO_SIZE"]

VIDEO_SIZE = 256  # px, square frames of the optional evaluation videos
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

PredictFn = Callable[[dict[str, np.ndarray]], np.ndarray]


# -- one episode (used in workers and in-process) --------------------------------------------------------------
def _as_dict(obs) -> dict[str, np.ndarray]:
    return dict(obs) if isinstance(obs, dict) else {"obs": obs}


class _Episode:
    def __init__(self, index: int, seed: int, spec: dict, n_obs_steps: int, max_steps: int, video_path: str | None):
        self.index, self.seed, self.family = index, seed, spec["family"]
        self.env = self.family.make_env(**spec["kwargs"], max_steps=max_steps, video=video_path is not None)
        obs, info = self.env.reset(seed=seed)
        self.executor = ChunkExecutor(n_obs_steps, where="evaluation")   # executes all k actions predict() returns
        self.executor.observe(_as_dict(obs))
        self.steps = 0
        self.max_reward = 0.0
        self.max_info = {k: 0.0 for k in self.family.track_max if k in info}   # e.g. Push-T's coverage
        self.success = False
        # the family's episode flags (BlockPush: p1, p2, a_first, b_first): true if true at any step
        self.flags = {k: bool(info.get(k, False)) for k in self.family.episode_flags}
        # the family's episode values (Kitchen: the subtasks completed, in order): their value at the last step
        self.values = {k: info[k] for k in self.family.episode_values if k in info}
        self.done = False
        self.writer = None
        self.video_path = video_path
        if video_path is not None:
            import cv2

            self.writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*"mp4v"), self.family.control_hz,
                                          (VIDEO_SIZE,) * 2)
            if not self.writer.isOpened():
                raise RuntimeError(f"cv2.VideoWriter could not open {video_path}")
            self._write_frame()

    def _write_frame(self) -> None:
        frame = self.env.render(VIDEO_SIZE, **self.family.render_kwargs())
        self.writer.write(np.ascontiguousarray(frame[:, :, ::-1]))  # RGB -> BGR

    def window(self) -> dict[str, np.ndarray]:
        return self.executor.window(np.stack)

    def run_chunk(self, actions: np.ndarray) -> dict:
        executed = 0
        ex = self.executor
        ex.load(actions)
        while len(ex) and not self.done:
            obs, reward, terminated, truncated, info = self.env.step(ex.pop())
            executed += 1
            self.steps += 1
            ex.observe(_as_dict(obs))
            self.max_reward = max(self.max_reward, float(reward))
            self.success = self.success or bool(info.get(self.family.success_key, False))
            for k in self.max_info:
                self.max_info[k] = max(self.max_info[k], float(info[k]))
            for k in self.flags:
                self.flags[k] = self.flags[k] or bool(info.get(k, False))
            self.values.update((k, info[k]) for k in self.family.episode_values if k in info)
            if self.writer is not None:
                self._write_frame()
            if terminated or truncated:
                self.done = True
        if self.done:
            self.close()
        return {"window": self.window(), "executed": executed, "done": self.done, "summary": self.summary()}

    def summary(self) -> dict:
        out = {"seed": int(self.seed), "max_reward": float(self.max_reward), "steps": int(self.steps),
               "success": bool(self.success), **self.flags, **self.values}
        out.update({f"max_{k}": float(v) for k, v in self.max_info.items()})
        return out

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        self.env.close()


class _EpisodeFailed(Exception):
    def __init__(self, seed: int, tb: str):
        super().__init__(seed, tb)
        self.seed, self.tb = seed, tb


def _start_episodes(specs: Sequence[tuple], env: dict, n_obs_steps: int, max_steps: int) -> dict[int, _Episode]:
    episodes = {}
    for index, seed, video_path in specs:
        try:
            episodes[index] = _Episode(index, seed, env, n_obs_steps, max_steps, video_path)
        except Exception:
            for ep in episodes.values():
                ep.close()
            raise _EpisodeFailed(seed, traceback.format_exc()) from None
    return episodes


def _run_chunks(episodes: dict[int, _Episode], actions: dict[int, np.ndarray]) -> dict[int, dict]:
    out = {}
    for index, acts in actions.items():
        try:
            out[index] = episodes[index].run_chunk(acts)
        except Exception:
            raise _EpisodeFailed(episodes[index].seed, traceback.format_exc()) from None
    return out


# -- worker process ---------------------------------------------------------------------------------------------
def _worker_main(conn, specs, env: dict, n_obs_steps: int, max_steps: int) -> None:
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    episodes: dict[int, _Episode] = {}
    try:
        try:
            episodes = _start_episodes(specs, env, n_obs_steps, max_steps)
            conn.send(("ready", {i: ep.window() for i, ep in episodes.items()}, {"torch": "torch" in sys.modules}))
        except _EpisodeFailed as exc:
            conn.send(("error", exc.seed, exc.tb))
            return
        while True:
            msg = conn.recv()
            if msg[0] == "close":
                return
            if msg[0] == "step":
                try:
                    conn.send(("ok", _run_chunks(episodes, msg[1])))
                except _EpisodeFailed as exc:
                    conn.send(("error", exc.seed, exc.tb))
                    return
            else:
                conn.send(("error", -1, f"unknown request {msg[0]!r}"))
                return
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        return
    finally:
        for ep in episodes.values():
            ep.close()
        conn.close()


@contextlib.contextmanager
def _lean_spawn() -> Iterator[None]:
    """While spawning: hide the caller's ``__main__`` (else the child re-imports it, and with it torch) and pin
    BLAS/OpenMP pools to one thread in the environment the child inherits."""
    saved_env = {var: os.environ.get(var) for var in _THREAD_VARS}
    saved_main = sys.modules.get("__main__")
    for var in _THREAD_VARS:
        os.environ[var] = "1"
    sys.modules["__main__"] = types.ModuleType("__main__")  # no __spec__ / __file__: nothing to re-run
    try:
        yield
    finally:
        if saved_main is not None:
            sys.modules["__main__"] = saved_main
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


class _EnvPool:
    """Episodes stepped in-process (``num_workers == 0``) or by worker processes each owning a slice."""

    def __init__(self, specs: Sequence[tuple], env: dict, n_obs_steps: int, max_steps: int, num_workers: int):
        self.specs = list(specs)
        self.env = env
        self.seed_of = {index: seed for index, seed, _ in self.specs}
        self.n_obs_steps, self.max_steps = n_obs_steps, max_steps
        self.num_workers = min(num_workers, len(self.specs))
        self.episodes: dict[int, _Episode] = {}
        self.procs: list = []
        self.conns: list = []
        self.owner: dict[int, int] = {}
        self.worker_info: list[dict] = []

    # context management
    def __enter__(self) -> "_EnvPool":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self.num_workers == 0:
            try:
                self.episodes = _start_episodes(self.specs, self.env, self.n_obs_steps, self.max_steps)
            except _EpisodeFailed as exc:
                raise self._error(exc.seed, exc.tb, where="in-process") from None
            return
        ctx = mp.get_context("spawn")
        slices = [self.specs[w :: self.num_workers] for w in range(self.num_workers)]  # round-robin balance
        with _lean_spawn():
            for w, part in enumerate(slices):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(child, part, self.env, self.n_obs_steps, self.max_steps),
                    name=f"{self.env['name']}-eval-{w}",
                    daemon=True,
                )
                proc.start()
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
                for index, _, _ in part:
                    self.owner[index] = w

    def reset_windows(self) -> dict[int, np.ndarray]:
        if self.num_workers == 0:
            return {i: ep.window() for i, ep in self.episodes.items()}
        windows = {}
        for w in range(self.num_workers):
            msg = self._recv(w)
            windows.update(msg[1])
            self.worker_info.append(msg[2])
        return windows

    def step(self, actions: dict[int, np.ndarray]) -> dict[int, dict]:
        if self.num_workers == 0:
            try:
                return _run_chunks(self.episodes, actions)
            except _EpisodeFailed as exc:
                raise self._error(exc.seed, exc.tb, where="in-process") from None
        per_worker: dict[int, dict] = {}
        for index, acts in actions.items():
            per_worker.setdefault(self.owner[index], {})[index] = acts
        for w, part in per_worker.items():  # send all requests first: the workers step concurrently
            try:
                self.conns[w].send(("step", part))
            except (BrokenPipeError, EOFError, OSError):
                raise self._dead(w) from None
        out = {}
        for w in per_worker:
            out.update(self._recv(w)[1])
        return out

    def _recv(self, w: int):
        try:
            msg = self.conns[w].recv()
        except (EOFError, OSError):
            raise self._dead(w) from None
        if msg[0] == "error":
            raise self._error(msg[1], msg[2], where=f"worker {w} (pid {self.procs[w].pid})")
        return msg

    def _error(self, seed: int, tb: str, where: str) -> RuntimeError:
        return RuntimeError(f"{self.env['name']} evaluation failed on seed {seed} ({where}):\n{tb}")

    def _dead(self, w: int) -> RuntimeError:
        proc = self.procs[w]
        proc.join(timeout=1.0)
        seeds = [self.seed_of[i] for i, owner in self.owner.items() if owner == w]
        return RuntimeError(
            f"{self.env['name']} evaluation worker {w} (pid {proc.pid}) exited unexpectedly (exit code {proc.exitcode}) "
            f"while running seeds {seeds}"
        )

    def close(self) -> None:
        for ep in self.episodes.values():
            ep.close()
        self.episodes = {}
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.send(("close",))
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5.0)
        for conn in self.conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.procs, self.conns = [], []


# -- public API -------------------------------------------------------------------------------------------------
def _check_actions(actions: Any, n: int, action_dim: int | None, seeds: list[int]) -> np.ndarray:
    arr = np.asarray(actions, dtype=np.float64)
    if arr.ndim != 3 or arr.shape[0] != n or arr.shape[1] < 1 or (action_dim is not None and arr.shape[2] != action_dim):
        raise ValueError(f"predict must return actions of shape [B={n}, k>=1, {action_dim or 'Da'}], got {tuple(arr.shape)}")
    bad = ~np.isfinite(arr).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"predict returned non-finite actions for seeds {[seeds[i] for i in np.flatnonzero(bad)]}")
    return arr


def evaluate(
    predict: PredictFn,
    env: dict,
    *,
    n_episodes: int = 50,
    start_seed: int = 100000,
    n_obs_steps: int = 2,
    max_steps: int = 300,
    num_workers: int = 2,
    video_dir: str | os.PathLike | None = None,
    n_videos: int = 0,
    progress: bool = True,
    action_dim: int | None = None,
) -> dict:
    """Closed-loop evaluation of the environment ``env`` (a ``tasks.env_spec``); returns a JSON-serialisable dict.

    ``predict(obs)`` gets the observation windows of the B running episodes (in seed order; at reset the first
    observation is repeated n_obs_steps times) as {"obs": float32 [B, n_obs_steps, D], <camera>: uint8
    [B, n_obs_steps, 3, H, W]} and returns actions [B, k, Da] to execute, k >= 1. Keys: ``mean_score``,
    ``success_rate`` (and the family's score aliases, e.g. ``coverage_score``), ``n_episodes``, ``start_seed``, ``n_obs_steps``,
    ``max_steps``, ``num_workers``, ``per_episode`` (list of {seed, max_reward, steps, success[, max_<tracked key>]}),
    ``videos`` (paths written), ``wall_s``. Videos (mp4v, VIDEO_SIZE px, at the control rate) of the first
    ``n_videos`` episodes go to ``video_dir`` as ``<task>_seed<seed>.mp4``.
    """
    from tqdm import tqdm

    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if n_obs_steps < 1:
        raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    n_videos = max(0, min(int(n_videos), n_episodes))
    if n_videos and video_dir is None:
        raise ValueError("n_videos > 0 needs a video_dir")
    t0 = time.perf_counter()
    name = env["name"]
    seeds = [int(start_seed) + i for i in range(n_episodes)]
    videos: list[str] = []
    if n_videos:
        Path(video_dir).mkdir(parents=True, exist_ok=True)
        videos = [str(Path(video_dir) / f"{name}_seed{seed}.mp4") for seed in seeds[:n_videos]]
    specs = [(i, seed, videos[i] if i < n_videos else None) for i, seed in enumerate(seeds)]

    summaries: dict[int, dict] = {}
    bar = tqdm(total=n_episodes * max_steps, unit="step", desc=f"{name} eval", disable=not progress, leave=False)
    try:
        with _EnvPool(specs, env, n_obs_steps, max_steps, num_workers) as pool:
            windows = pool.reset_windows()
            if any(info.get("torch") for info in pool.worker_info):
                warnings.warn(f"a {name} evaluation worker imported torch", RuntimeWarning, stacklevel=2)
            active = list(range(n_episodes))
            while active:
                obs = {k: np.stack([windows[i][k] for i in active]) for k in windows[active[0]]}
                obs["obs"] = obs["obs"].astype(np.float32, copy=False)
                actions = _check_actions(predict(obs), len(active), action_dim, [seeds[i] for i in active])
                results = pool.step({i: actions[j] for j, i in enumerate(active)})
                still = []
                for i in active:
                    res = results[i]
                    windows[i] = res["window"]
                    summaries[i] = res["summary"]
                    bar.update(res["executed"])
                    if res["done"]:
                        bar.update(max_steps - res["summary"]["steps"])  # early end: skip its remainder
                    else:
                        still.append(i)
                if len(still) < len(active):
                    running = set(still)
                    done = [s["max_reward"] for i, s in summaries.items() if i not in running]
                    bar.set_postfix(done=len(done), score=f"{np.mean(done):.3f}")
                active = still
    finally:
        bar.close()

    per_episode = [summaries[i] for i in range(n_episodes)]
    score = float(np.mean([e["max_reward"] for e in per_episode]))
    return {
        "task": name,
        "mean_score": score,
        **{alias: score for alias in env["family"].score_aliases},
        "success_rate": float(np.mean([e["success"] for e in per_episode])),
        **{k: float(np.mean([e[k] for e in per_episode])) for k in env["family"].episode_flags},
        "flags": list(env["family"].episode_flags),
        **env["family"].eval_protocol,
        "n_episodes": int(n_episodes),
        "start_seed": int(start_seed),
        "n_obs_steps": int(n_obs_steps),
        "max_steps": int(max_steps),
        "num_workers": int(min(num_workers, n_episodes)),
        "per_episode": per_episode,
        "videos": videos,
        "wall_s": float(time.perf_counter() - t0),
    }


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_eval_json(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON atomically (see ``fileio.atomic_write_text``).

    The JSON names its videos (``videos``) by paths relative to its own folder, so the record and its videos
    can be moved or committed together: ``Path(json_file).parent / v`` finds each one."""
    from .fileio import atomic_write_text

    path = Path(path)
    if result.get("videos"):
        here = path.parent.resolve()
        result = {**result, "videos": [os.path.relpath(Path(v).resolve(), here) for v in result["videos"]]}
    return atomic_write_text(path, json.dumps(result, indent=2, default=_json_default, allow_nan=True) + "\n")
