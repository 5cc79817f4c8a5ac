"""Franka Kitchen demonstrations: the scripted demonstrator's episodes, the zarr writer and the validating loader.

The demonstrator (``data/kitchen_demo.py``) stands in for the 566 human demonstrations Diffusion Policy trained on
(not usable here): per episode it completes 4 subtasks in an order drawn uniformly from ``ORDERS`` (every ordered
choice of 4 of its 6 subtasks: microwave, kettle, bottom burner, top burner, light switch, slide cabinet), using
privileged simulator state and IK, and acts in the task's joint-velocity action. An episode is kept when all 4 of
its subtasks were completed; it stops 4 steps after the last one.

Store schema (zarr v2, the Push-T store's layout)::

    data/obs          float32 [N, 60]  the env's observation (drift_policy.envs.kitchen.OBS_SLICES)
    data/action       float32 [N, 9]   joint velocities in [-1, 1] (x 2 rad/s)
    meta/episode_ends int64 [E]        exclusive end index of each episode
    meta/seeds        int64 [E]        the env seed of each episode
    meta/order        int64 [E, 4]     the subtasks the demonstrator did, as indices into envs.kitchen.TASKS
    meta/completed    int64 [E, 7]     the subtasks completed, in order, as indices into TASKS (-1: none)
    attrs: schema, generator, seed, episodes, attempts, demonstrator, tasks

Generation seeds start at ``--seed`` and must stay below the evaluation seeds (``EVAL_START_SEED`` = 100000);
only successful episodes are stored, so a store of N episodes uses seeds seed .. seed + attempts - 1.

    python -m drift_policy.data.kitchen generate --episodes 1000 --seed 0 --out datasets/kitchen/demos.zarr
    python -m drift_policy.data.kitchen demo-eval --episodes 200 --out eval/results/kitchen_lowdim/default/kitchen_demonstrator.json
    python -m drift_policy.data.kitchen stats datasets/kitchen/demos.zarr --out eval/results/kitchen_lowdim/default/kitchen_data.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..envs.kitchen import ACTION_DIM, OBS_DIM, TASKS
from ..errors import DatasetError
from ..provenance import git_commit, machine_free, machine_free_text
from .lowdim_store import load_obs_action_store

__all__ = ["EVAL_START_SEED", "SCHEMA", "run_demo_episode", "generate", "load_kitchen", "store_stats", "demo_eval",
           "check_generation_seeds"]

EVAL_START_SEED = 100000   # test seeds 100000.. (Diffusion Policy's protocol); training data never uses them
SCHEMA = "drift_policy.kitchen/1"
TAIL_STEPS = 4             # steps kept after the last subtask is done (the arm pulls back)


def run_demo_episode(env, seed: int, max_steps: int | None = None) -> dict:
    """One demonstrator episode on env seed ``seed`` (its own draws come from the same seed).

    Returns obs [T, 60], action [T, 9], order (the 4 subtasks planned), completed (the env's, in order), success
    (every planned subtask completed) and steps. The episode ends ``TAIL_STEPS`` after the 4th planned subtask
    is done, when the script runs out, or at the env's step limit."""
    from .kitchen_demo import KitchenDemonstrator

    obs, info = env.reset(seed=int(seed))
    demo = KitchenDemonstrator(env, np.random.default_rng([int(seed), 1]))
    limit = env.max_steps if max_steps is None else int(max_steps)
    obs_l, act_l, tail = [], [], None
    for _ in range(limit):
        a = demo.act(obs)
        obs_l.append(obs)
        act_l.append(a)
        obs, _, terminated, truncated, info = env.step(a)
        if tail is None and set(demo.order) <= set(info["completed"]):
            tail = TAIL_STEPS
        if tail is not None:
            tail -= 1
        if terminated or truncated or demo.done or tail == 0:
            break
    return {"obs": np.stack(obs_l).astype(np.float32), "action": np.stack(act_l).astype(np.float32),
            "order": list(demo.order), "completed": list(info["completed"]),
            "success": set(demo.order) <= set(info["completed"]), "steps": len(act_l)}


def check_generation_seeds(seed: int, attempts: int) -> None:
    """Generation uses seeds seed .. seed + attempts - 1; they must stay below the evaluation seeds."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if seed + attempts > EVAL_START_SEED:
        raise ValueError(f"generation seeds {seed}..{seed + attempts - 1} overlap the evaluation seeds "
                         f"(from {EVAL_START_SEED}); use a smaller --seed or fewer episodes")


def _task_ids(names) -> list[int]:
    return [TASKS.index(t) for t in names]


def generate(n_episodes: int, out: str | os.PathLike, seed: int = 0, *, max_attempts_factor: float = 1.5,
             progress: bool = True) -> dict:
    """Write ``n_episodes`` successful demonstrator episodes to the zarr store ``out`` atomically (built in a
    sibling temporary folder, renamed at the end; an existing store is replaced only then). Returns statistics."""
    import zarr
    from tqdm.auto import tqdm

    from ..envs.kitchen import KitchenEnv

    if n_episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {n_episodes}")
    max_attempts = int(np.ceil(n_episodes * max_attempts_factor)) + 5
    check_generation_seeds(seed, max_attempts)
    out = Path(out)
    env = KitchenEnv()
    episodes, seeds, attempts = [], [], 0
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with tqdm(total=n_episodes, desc="kitchen demos", disable=not progress, leave=False) as bar:
            while len(episodes) < n_episodes:
                if attempts >= max_attempts:
                    raise RuntimeError(f"only {len(episodes)} of {attempts} demonstrator episodes succeeded; "
                                       f"{n_episodes} asked")
                ep = run_demo_episode(env, seed + attempts)
                if ep["success"]:
                    episodes.append(ep)
                    seeds.append(seed + attempts)
                    bar.update(1)
                attempts += 1
    finally:
        env.close()
    ends = np.cumsum([e["steps"] for e in episodes]).astype(np.int64)
    completed = np.full((len(episodes), len(TASKS)), -1, np.int64)
    for i, e in enumerate(episodes):
        completed[i, :len(e["completed"])] = _task_ids(e["completed"])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        root = zarr.open_group(str(tmp), mode="w")
        data, meta = root.create_group("data"), root.create_group("meta")
        data.array("obs", np.concatenate([e["obs"] for e in episodes]), chunks=(4096, OBS_DIM))
        data.array("action", np.concatenate([e["action"] for e in episodes]), chunks=(4096, ACTION_DIM))
        meta.array("episode_ends", ends)
        meta.array("seeds", np.asarray(seeds, np.int64))
        meta.array("order", np.asarray([_task_ids(e["order"]) for e in episodes], np.int64))
        meta.array("completed", completed)
        root.attrs.update({"schema": SCHEMA, "generator": "drift_policy.data.kitchen", "seed": int(seed),
                           "episodes": int(n_episodes), "attempts": int(attempts),
                           "demonstrator": "KitchenDemonstrator", "tasks": list(TASKS)})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": machine_free(out), "episodes": int(n_episodes), "attempts": int(attempts),
            "success_rate": n_episodes / attempts, "steps": int(ends[-1]), "seeds": [int(seed), int(seed + attempts - 1)],
            "mean_steps": float(np.mean([e["steps"] for e in episodes])), **_order_stats(episodes),
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}


def _order_stats(episodes: list[dict]) -> dict:
    """How often each subtask was planned, and how many distinct orders were done (the data's modes)."""
    orders = Counter(tuple(e["order"]) for e in episodes)
    return {"distinct_orders": len(orders),
            "first_task": {t: float(np.mean([e["order"][0] == t for e in episodes])) for t in TASKS},
            "task_share": {t: float(np.mean([t in e["order"] for e in episodes])) for t in TASKS}}


def load_kitchen(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate a store written by ``generate``. Returns obs float32 [N, 60], action float32 [N, 9],
    episode_ends int64 [E]. Errors are ``DatasetError`` naming the file and the key."""
    d = load_obs_action_store(path, OBS_DIM, ACTION_DIM, "Kitchen store not found; write one with `python -m "
                              f"drift_policy.data.kitchen generate --episodes 1000 --seed 0 --out {path}` (needs the "
                              "kitchen extra)")
    if np.abs(d["action"]).max(initial=0.0) > 1.0 + 1e-6:
        raise DatasetError(f"{Path(path)}: 'data/action' leaves [-1, 1] (max |a| = {np.abs(d['action']).max():.3g}); "
                           "the task's actions are normalised joint velocities")
    return d



def demo_eval(n_episodes: int, start_seed: int = EVAL_START_SEED, progress: bool = True) -> dict:
    """The demonstrator's own p1..p4 and subtask orders over ``n_episodes`` env seeds from ``start_seed``, each
    run to its end (tail included) as ``generate`` runs them."""
    from tqdm.auto import tqdm

    from ..envs.kitchen import KitchenEnv

    env = KitchenEnv()
    per, t0, c0 = [], time.perf_counter(), time.process_time()
    try:
        for s in tqdm(range(start_seed, start_seed + n_episodes), desc="demo eval", disable=not progress, leave=False):
            ep = run_demo_episode(env, s)
            per.append({"seed": s, "order": ep["order"], "completed": ep["completed"], "success": ep["success"],
                        "steps": ep["steps"]})
    finally:
        env.close()
    n_done = np.array([len(e["completed"]) for e in per])
    return {
        "task": "kitchen_lowdim", "policy": "KitchenDemonstrator (scripted, privileged state)",
        "success_rate": float(np.mean([e["success"] for e in per])),
        **{f"p{k}": float(np.mean(n_done >= k)) for k in (1, 2, 3, 4)},
        "mean_score": float(np.mean(n_done) / len(TASKS)),
        **_order_stats(per),
        "n_episodes": int(n_episodes), "start_seed": int(start_seed),
        "mean_steps": float(np.mean([e["steps"] for e in per])), "max_steps": int(max(e["steps"] for e in per)),
        "cpu_s_per_episode": (time.process_time() - c0) / n_episodes, "wall_s": time.perf_counter() - t0,
        "machine": _machine(), "code_commit": git_commit(),
        "per_episode": per,
    }


def store_stats(path: str | os.PathLike) -> dict:
    """What a store written by ``generate`` holds, read back from it: episodes, steps, the seeds and attempts of
    its generation, and its subtask orders (the data's modes), as ``generate`` reports them."""
    import zarr

    d = load_kitchen(path)                               # validates the arrays first
    root = zarr.open_group(str(path), mode="r")
    if root.attrs.get("schema") != SCHEMA or "order" not in root["meta"]:
        raise DatasetError(f"{Path(path)}: not a Kitchen demonstrator store (schema {root.attrs.get('schema')!r}, "
                           f"expected {SCHEMA!r} with meta/order)")
    order = np.asarray(root["meta/order"][:])
    if order.shape != (len(d["episode_ends"]), 4) or order.min() < 0 or order.max() >= len(TASKS):
        raise DatasetError(f"{Path(path)}: 'meta/order' must be [episodes, 4] indices into the {len(TASKS)} "
                           f"subtasks, got shape {order.shape}")
    ends = d["episode_ends"]
    steps = np.diff(np.concatenate([[0], ends]))
    attempts, seed = int(root.attrs["attempts"]), int(root.attrs["seed"])
    return {"path": machine_free(path), "episodes": int(len(ends)), "attempts": attempts,
            "success_rate": len(ends) / attempts, "steps": int(ends[-1]),
            "seeds": [seed, seed + attempts - 1], "mean_steps": float(steps.mean()),
            **_order_stats([{"order": [TASKS[i] for i in o]} for o in order])}


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, 1 thread"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m drift_policy.data.kitchen",
                                 description="Franka Kitchen scripted demonstrations.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write demonstrator episodes to a zarr store")
    g.add_argument("--episodes", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0, help="first env seed; seeds must stay below 100000")
    g.add_argument("--out", required=True)
    g.add_argument("--record", default=None, help="also write the statistics (success, orders) as JSON here")
    e = sub.add_parser("demo-eval", help="the demonstrator's success and subtask orders on the evaluation seeds")
    e.add_argument("--episodes", type=int, default=200)
    e.add_argument("--start-seed", type=int, default=EVAL_START_SEED)
    e.add_argument("--out", required=True, help="JSON record")
    st = sub.add_parser("stats", help="what an existing store holds (episodes, steps, subtask orders) as a record")
    st.add_argument("store")
    st.add_argument("--out", required=True, help="JSON record")
    args = ap.parse_args(argv)
    command = machine_free_text("python -m drift_policy.data.kitchen " + " ".join(argv if argv is not None else sys.argv[1:]))
    try:
        from ..evaluation import save_eval_json

        if args.cmd == "generate":
            stats = generate(args.episodes, args.out, args.seed)
            stats.update(machine=_machine(), command=command, code_commit=git_commit())
            if args.record:
                save_eval_json(stats, args.record)
            print(json.dumps(stats, indent=2))
        elif args.cmd == "stats":
            stats = store_stats(args.store)
            stats.update(machine=_machine(), command=command, code_commit=git_commit())
            save_eval_json(stats, args.out)
            print(json.dumps(stats, indent=2))
        else:
            res = demo_eval(args.episodes, args.start_seed)
            res["command"] = command
            save_eval_json(res, args.out)
            print(json.dumps({k: v for k, v in res.items() if k != "per_episode"}, indent=2))
    except (ValueError, DatasetError) as exc:
        sys.exit(f"error: {exc}")
    except ImportError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
