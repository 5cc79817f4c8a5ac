"""BlockPush demonstrations: a scripted multimodal oracle, the zarr writer and the validating loader.

The oracle (``MultimodalPushOracle``) plays the role of IBC's multimodal push oracle, which generated Diffusion
Policy's 1000 ``multimodal_push_seed_abs`` demonstrations: per episode it draws at random which block goes
first and which target each block goes to (4 plans), its speed, and the side it passes obstacles on. It acts
in absolute effector targets (the task's action), moving at most ``speed / 10 Hz`` per step.

Store schema (zarr v2, the Push-T store's layout)::

    data/obs        float32 [N, 16]  the env's observation (drift_policy.envs.blockpush.OBS_SLICES)
    data/action     float32 [N, 2]   absolute effector target xy (m)
    meta/episode_ends int64 [E]      exclusive end index of each episode
    meta/seeds      int64 [E]        the env seed of each episode
    meta/first_block int64 [E]       0: block A reached a target first, 1: block B
    attrs: schema, generator, seed, episodes, attempts, oracle

Generation seeds start at ``--seed`` and must stay below the evaluation seeds (``EVAL_START_SEED`` = 100000);
only successful episodes are stored, so a store of N episodes uses seeds seed .. seed + attempts - 1.

    python -m drift_policy.data.blockpush generate --episodes 1000 --seed 0 --out datasets/blockpush/oracle.zarr
    python -m drift_policy.data.blockpush oracle-eval --episodes 200 --out eval/results/blockpush_lowdim/default/blockpush_oracle.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..envs.blockpush import ACTION_DIM, BLOCKS, OBS_DIM, OBS_SLICES, TARGETS, WORKSPACE_BOUNDS
from ..errors import DatasetError
from ..provenance import git_commit, machine_free, machine_free_text
from .lowdim_store import load_obs_action_store

__all__ = ["EVAL_START_SEED", "SCHEMA", "MultimodalPushOracle", "run_oracle_episode", "generate", "load_blockpush",
           "oracle_eval", "check_generation_seeds"]

EVAL_START_SEED = 100000   # test seeds 100000.. (Diffusion Policy's protocol); training data never uses them
SCHEMA = "drift_policy.blockpush/1"


def _segment_dist(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance from point p to the segment a-b."""
    ab = b - a
    s = float(np.clip((p - a) @ ab / max(float(ab @ ab), 1e-12), 0.0, 1.0))
    return float(np.linalg.norm(a + s * ab - p))


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 1e-9 else np.zeros_like(v)


class MultimodalPushOracle:
    """Push each block into a target, in a random order and target assignment.

    Per block: go to a point ``PRE`` behind the block on the target->block line (passing other blocks and
    the current one at a clearance), then push along that line, steering by keeping the commanded point
    on the line behind the block's current centre. If the block slides sideways off the line, approach
    again. When the block is within ``DONE`` of its target, back off and take the next block.
    """

    PRE = 0.06          # approach point behind the block centre (m)
    CONTACT = 0.03      # pushing: commanded point this far behind the centre (cube half size + effector radius)
    DONE = 0.025        # block-target distance that ends a push (the task's tolerance is 0.05)
    KEEP = 0.04         # a placed block farther than this from its target is pushed again
    LATERAL = 0.02      # off-line distance that aborts a push
    CLEAR = 0.055       # obstacle clearance of the path (cube half diagonal + radius + margin)
    CORRIDOR = 0.06     # a push line closer than this to another block counts as blocked

    def __init__(self, rng: np.random.Generator, obs: np.ndarray):
        self.rng = rng
        # The 4 plans: which block goes first, and which target each block goes to. Plans whose push lines run
        # into the other block (it would be shoved along and wedge the effector) are left out while a clear one
        # exists, as a person would: the choice among the rest is uniform.
        plans = [[(BLOCKS[b], TARGETS[(b + swap) % 2]) for b in (first, 1 - first)]
                 for first in (0, 1) for swap in (0, 1)]
        clear = [p for p in plans if self._clear(p, obs)]
        self.plan = (clear or plans)[int(rng.integers(len(clear or plans)))]   # [(block, target)] in push order
        self.first_block = BLOCKS.index(self.plan[0][0])
        self.speed = float(rng.uniform(0.25, 0.35))                 # m/s; IBC's oracle moves at 0.3-0.35
        self.side = float(rng.choice([-1.0, 1.0]))                  # preferred side to pass an obstacle on
        self.stage = 0
        self.phase = "approach"
        self.retreat_to: np.ndarray | None = None

    def _clear(self, plan, obs: np.ndarray) -> bool:
        """Neither push line passes within ``CORRIDOR`` of a block it does not push (the first block is then
        at its target)."""
        (b1, t1), (b2, t2) = plan
        g = lambda k: self._get(obs, f"{k}_translation")  # noqa: E731
        return (_segment_dist(g(b2), g(b1), g(t1)) > self.CORRIDOR
                and _segment_dist(g(t1), g(b2) - 0.06 * _unit(g(t2) - g(b2)), g(t2)) > self.CORRIDOR)

    def _get(self, obs: np.ndarray, name: str) -> np.ndarray:
        return np.asarray(obs[OBS_SLICES[name]], np.float64)

    def _route(self, ee: np.ndarray, goal: np.ndarray, blocks: list[np.ndarray]) -> np.ndarray:
        """The next point toward ``goal``: ``goal`` itself, or a detour beside the first block in the way."""
        for c in blocks:                                    # wedged next to a block we are not after: step away
            gap = float(np.linalg.norm(ee - c))
            if gap < self.CLEAR * 0.8 and np.linalg.norm(goal - c) >= self.CLEAR:
                return c + _unit(ee - c if gap > 1e-6 else goal - c) * self.CLEAR * 1.2
        seg = goal - ee
        length = float(np.linalg.norm(seg))
        if length < 1e-6:
            return goal
        u = seg / length
        hits = []
        for c in blocks:
            s = float(np.clip((c - ee) @ u, 0.0, length))
            # an obstacle whose clearance zone holds the goal itself is not avoided: the goal is reachable
            if np.linalg.norm(ee + s * u - c) < self.CLEAR and np.linalg.norm(goal - c) >= self.CLEAR:
                hits.append((s, c))
        if not hits:
            return goal
        _, c = min(hits, key=lambda h: h[0])
        normal = np.array([-u[1], u[0]])
        off = float((ee - c) @ normal)
        sign = np.sign(off) if abs(off) > 0.01 else self.side
        return c + normal * sign * self.CLEAR * 1.3 + u * 0.01

    def act(self, obs: np.ndarray) -> np.ndarray:
        """The next absolute effector target [2] for observation ``obs`` [16]."""
        ee = self._get(obs, "effector_target_translation")
        blocks = [self._get(obs, "block_translation"), self._get(obs, "block2_translation")]
        goal = ee
        # A block knocked out of its target (distance > KEEP) becomes the current job again.
        for i in range(self.stage):
            blk, tgt = self.plan[i]
            if np.linalg.norm(self._get(obs, f"{blk}_translation") - self._get(obs, f"{tgt}_translation")) > self.KEEP:
                self.stage, self.phase = i, "approach"
                break
        for _ in range(8):           # phase changes re-enter the loop; bounded, though 3 changes are the most
            if self.stage >= len(self.plan):
                break
            block, target = self.plan[self.stage]
            b = self._get(obs, f"{block}_translation")
            t = self._get(obs, f"{target}_translation")
            d = _unit(t - b)
            if self.phase == "retreat":
                if np.linalg.norm(ee - self.retreat_to) < 0.005:
                    self.phase = "approach"
                    continue
                goal = self.retreat_to
            elif np.linalg.norm(t - b) < self.DONE:
                self.stage += 1
                self.phase = "retreat"
                self.retreat_to = ee + _unit(ee - b) * 0.05   # back away from the block just placed
                continue
            elif self.phase == "approach":
                pre = b - d * self.PRE
                others = [c for c in blocks if np.linalg.norm(c - b) > 1e-6]
                if any(np.linalg.norm(pre - c) < 0.045 for c in others):
                    pre = b - d * (self.CONTACT + 0.012)    # a neighbour sits there: start just behind the block
                if np.linalg.norm(ee - pre) < 0.005:
                    self.phase = "push"
                    continue
                goal = self._route(ee, pre, blocks)
            else:  # push
                rel = ee - b
                lateral = abs(float(rel @ np.array([-d[1], d[0]])))
                if lateral > self.LATERAL or float(-rel @ d) < 0.0:
                    self.phase = "approach"
                    continue
                goal = b - d * self.CONTACT + d * self.speed / 10.0
            break
        step = goal - ee
        max_step = self.speed / 10.0                        # 10 Hz control
        n = float(np.linalg.norm(step))
        if n > max_step:
            step *= max_step / n
        return np.clip(ee + step, WORKSPACE_BOUNDS[0], WORKSPACE_BOUNDS[1]).astype(np.float32)


def run_oracle_episode(env, seed: int, max_steps: int | None = None) -> dict:
    """One oracle episode on env seed ``seed`` (the oracle's own draws come from the same seed).

    Returns obs [T, 16], action [T, 2], final_obs [16] (after the last action; not stored in a data set), p1, p2,
    first_block (env's: which block reached a target first), plan_first (the oracle's intended first block) and
    steps."""
    obs, info = env.reset(seed=int(seed))
    oracle = MultimodalPushOracle(np.random.default_rng([int(seed), 1]), obs)
    limit = env.max_steps if max_steps is None else int(max_steps)
    obs_l, act_l = [], []
    for _ in range(limit):
        a = oracle.act(obs)
        obs_l.append(obs)
        act_l.append(a)
        obs, _, terminated, truncated, info = env.step(a)
        if terminated or truncated:
            break
    return {"obs": np.stack(obs_l).astype(np.float32), "action": np.stack(act_l).astype(np.float32),
            "final_obs": np.asarray(obs, np.float32), "p1": bool(info["p1"]), "p2": bool(info["p2"]), "first_block": int(info["first_block"]),
            "plan_first": oracle.first_block, "steps": len(act_l)}


def check_generation_seeds(seed: int, attempts: int) -> None:
    """Generation uses seeds seed .. seed + attempts - 1; they must stay below the evaluation seeds."""
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    if seed + attempts > EVAL_START_SEED:
        raise ValueError(f"generation seeds {seed}..{seed + attempts - 1} overlap the evaluation seeds "
                         f"(from {EVAL_START_SEED}); use a smaller --seed or fewer episodes")


def generate(n_episodes: int, out: str | os.PathLike, seed: int = 0, *, max_attempts_factor: float = 1.5,
             progress: bool = True) -> dict:
    """Write ``n_episodes`` successful oracle episodes to the zarr store ``out`` atomically (built in a sibling
    temporary folder, renamed at the end; an existing store is replaced only then). Returns statistics."""
    import zarr
    from tqdm.auto import tqdm

    from ..envs.blockpush import BlockPushEnv

    if n_episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {n_episodes}")
    max_attempts = int(np.ceil(n_episodes * max_attempts_factor)) + 5
    check_generation_seeds(seed, max_attempts)
    out = Path(out)
    env = BlockPushEnv()
    episodes, seeds, attempts = [], [], 0
    t0 = time.perf_counter()
    try:
        with tqdm(total=n_episodes, desc="blockpush oracle", disable=not progress, leave=False) as bar:
            while len(episodes) < n_episodes:
                if attempts >= max_attempts:
                    raise RuntimeError(f"only {len(episodes)} of {attempts} oracle episodes succeeded; "
                                       f"{n_episodes} asked")
                ep = run_oracle_episode(env, seed + attempts)
                if ep["p2"]:
                    episodes.append(ep)
                    seeds.append(seed + attempts)
                    bar.update(1)
                attempts += 1
    finally:
        env.close()
    ends = np.cumsum([e["steps"] for e in episodes]).astype(np.int64)
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
        meta.array("first_block", np.asarray([e["first_block"] for e in episodes], np.int64))
        root.attrs.update({"schema": SCHEMA, "generator": "drift_policy.data.blockpush", "seed": int(seed),
                           "episodes": int(n_episodes), "attempts": int(attempts),
                           "oracle": "MultimodalPushOracle"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    firsts = np.asarray([e["first_block"] for e in episodes])
    return {"path": machine_free(out), "episodes": int(n_episodes), "attempts": int(attempts),
            "success_rate": n_episodes / attempts, "steps": int(ends[-1]), "seeds": [int(seed), int(seed + attempts - 1)],
            "a_first": float(np.mean(firsts == 0)), "b_first": float(np.mean(firsts == 1)),
            "wall_s": time.perf_counter() - t0}


def load_blockpush(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read and validate a store written by ``generate``. Returns obs float32 [N, 16], action float32 [N, 2],
    episode_ends int64 [E]. Errors are ``DatasetError`` naming the file and the key."""
    return load_obs_action_store(path, OBS_DIM, ACTION_DIM, "BlockPush store not found; write one with `python -m "
                                 f"drift_policy.data.blockpush generate --episodes 1000 --seed 0 --out {path}`")



def store_modes(path: str | os.PathLike) -> dict:
    """The mode fractions of a store's demonstrations (``envs.blockpush.episode_modes`` on each episode's
    observations, as rollouts are measured): which block went first, which target each block reached, and how
    often the demonstrator went from one block to the other before the first reached a target. A store holds the
    observation before each action, not the one after the last, so the block that finished an episode may miss
    its ``*_in_t*`` flag; the first block and its target (``*_first_to_*``) are complete."""
    from ..envs.blockpush import MODE_FLAGS, episode_modes

    d = load_blockpush(path)
    starts = np.concatenate([[0], d["episode_ends"][:-1]])
    per = [episode_modes(d["obs"][a:b]) for a, b in zip(starts, d["episode_ends"])]
    out = {"store": Path(path).name, "episodes": len(per),
           **{k: float(np.mean([e[k] for e in per])) for k in MODE_FLAGS}}
    # The four plans (first block, its target): the joint fractions a policy's rollouts are compared with.
    for blk, first in (("a", "a_first"), ("b", "b_first")):
        for t in ("t1", "t2"):
            out[f"{blk}_first_to_{t}"] = float(np.mean([e[first] and e[f"{blk}_in_{t}"] for e in per]))
    return out


def oracle_eval(n_episodes: int, start_seed: int = EVAL_START_SEED, progress: bool = True) -> dict:
    """The oracle's own p1 / p2 and block order over ``n_episodes`` env seeds from ``start_seed``."""
    from tqdm.auto import tqdm

    from ..envs.blockpush import MODE_FLAGS, BlockPushEnv, episode_modes

    env = BlockPushEnv()
    per, t0 = [], time.perf_counter()
    try:
        for s in tqdm(range(start_seed, start_seed + n_episodes), desc="oracle eval", disable=not progress, leave=False):
            ep = run_oracle_episode(env, s)
            per.append({k: ep[k] for k in ("p1", "p2", "first_block", "plan_first", "steps")} | {"seed": s}
                       | episode_modes(np.vstack([ep["obs"], ep["final_obs"]])))
    finally:
        env.close()
    wall = time.perf_counter() - t0
    first = np.array([e["first_block"] for e in per])
    return {
        "task": "blockpush_lowdim", "policy": "MultimodalPushOracle (scripted)",
        "p1": float(np.mean([e["p1"] for e in per])), "p2": float(np.mean([e["p2"] for e in per])),
        "a_first": float(np.mean(first == 0)), "b_first": float(np.mean(first == 1)),
        **{k: float(np.mean([e[k] for e in per])) for k in MODE_FLAGS if k not in ("a_first", "b_first")},
        "n_episodes": int(n_episodes), "start_seed": int(start_seed),
        "mean_steps": float(np.mean([e["steps"] for e in per])),
        "cpu_s_per_episode": wall / n_episodes, "wall_s": wall,
        "machine": _machine(),
        "per_episode": per,
    }


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, 1 thread"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m drift_policy.data.blockpush",
                                 description="BlockPush oracle demonstrations.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write oracle episodes to a zarr store")
    g.add_argument("--episodes", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0, help="first env seed; seeds must stay below 100000")
    g.add_argument("--out", required=True)
    g.add_argument("--record", default=None, help="also write the statistics (success, block order) as JSON here")
    e = sub.add_parser("oracle-eval", help="the oracle's success and block order on the evaluation seeds")
    e.add_argument("--episodes", type=int, default=200)
    e.add_argument("--start-seed", type=int, default=EVAL_START_SEED)
    e.add_argument("--out", required=True, help="JSON record")
    m = sub.add_parser("modes", help="the mode fractions of a store's demonstrations (block order, targets, switches)")
    m.add_argument("--store", required=True)
    m.add_argument("--out", default=None, help="also write them as a JSON record here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "generate":
            stats = generate(args.episodes, args.out, args.seed)
            stats["machine"] = _machine()
            stats["command"] = "python -m drift_policy.data.blockpush " + " ".join(argv if argv is not None else sys.argv[1:])
            if args.record:
                from ..evaluation import save_eval_json

                save_eval_json(stats, args.record)
            print(json.dumps(stats, indent=2))
        elif args.cmd == "modes":
            res = store_modes(args.store)
            res.update(machine=_machine(), code_commit=git_commit(), command=machine_free_text(
                "python -m drift_policy.data.blockpush " + " ".join(argv if argv is not None else sys.argv[1:])))
            if args.out:
                from ..evaluation import save_eval_json

                save_eval_json(res, args.out)
            print(json.dumps(res, indent=2))
        else:
            from ..evaluation import save_eval_json

            res = oracle_eval(args.episodes, args.start_seed)
            res["command"] = "python -m drift_policy.data.blockpush " + " ".join(argv if argv is not None else sys.argv[1:])
            save_eval_json(res, args.out)
            print(json.dumps({k: v for k, v in res.items() if k != "per_episode"}, indent=2))
    except (ValueError, DatasetError) as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
