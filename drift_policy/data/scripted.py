"""Scripted waypoint demonstrators for robomimic's Lift and Can (and Square), writing robomimic-schema hdf5 files.

They act through the same delta OSC_POSE controller as robomimic's datasets (7-d action in [-1, 1]: dpos 3 scaled
by 0.05 m, drot 3 axis-angle scaled by 0.5 rad, gripper -1 open / +1 closed) at 20 Hz, so the files they write
can stand in for robomimic's "ph" datasets in tests and small experiments. Waypoints and gains are randomized
per episode so the demos are diverse; only successful episodes are kept.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..fileio import unique_temp_path

__all__ = ["LOW_DIM_KEYS", "SCRIPTED_TASKS", "EVAL_SEEDS", "WaypointDemonstrator", "run_episode", "generate_dataset"]

# robomimic's low-dim observation keys that robosuite 1.5 still provides (its eef_vel_* are gone).
LOW_DIM_KEYS = [
    "object",
    "robot0_eef_pos",
    "robot0_eef_quat",
    "robot0_gripper_qpos",
    "robot0_gripper_qvel",
    "robot0_joint_pos",
    "robot0_joint_pos_cos",
    "robot0_joint_pos_sin",
    "robot0_joint_vel",
]
SCRIPTED_TASKS = ("lift", "can", "square")
EVAL_SEEDS = range(100000, 100050)  # evaluation seeds; training episodes must not use them

POS_SCALE = 0.05  # OSC_POSE output_max for position (m per unit action)
ROT_SCALE = 0.5  # OSC_POSE output_max for rotation (rad per unit action)


def _quat_to_mat(q_xyzw: np.ndarray) -> np.ndarray:
    x, y, z, w = np.asarray(q_xyzw, dtype=np.float64) / np.linalg.norm(q_xyzw)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _rotvec(mat: np.ndarray) -> np.ndarray:
    """Axis-angle of a rotation matrix."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(mat).as_rotvec()


def _yaw(mat: np.ndarray) -> float:
    return float(np.arctan2(mat[1, 0], mat[0, 0]))


@dataclass
class Phase:
    """Move the eef to ``target(obs)`` (world frame) with the gripper command; end when within ``tol`` after
    ``min_steps``, or after ``max_steps``."""

    name: str
    target: Callable[[dict], np.ndarray]
    gripper: float
    tol: float = 0.01
    min_steps: int = 0
    max_steps: int = 60
    yaw: Callable[[dict], float] | None = None
    # checked when the phase ends: if true, clear the demonstrator's memo and restart from ``retry_from``
    failed: Callable[[dict], bool] | None = None
    retry_from: int = 0


@dataclass
class WaypointDemonstrator:
    """A sequence of phases followed with a clipped proportional controller in the delta OSC_POSE action space."""

    phases: list[Phase]
    memo: dict = field(default_factory=dict)  # per-episode values the phases computed (grasp point, yaw, ...)
    gain: float = 1.0
    rot_gain: float = 1.0
    noise: float = 0.0
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def __post_init__(self) -> None:
        self._i = 0
        self._t = 0
        self._R0: np.ndarray | None = None
        self.retries = 0
        self.max_retries = 2

    @property
    def done(self) -> bool:
        return self._i >= len(self.phases)

    def act(self, raw: dict) -> np.ndarray:
        eef = np.asarray(raw["robot0_eef_pos"], dtype=np.float64)
        R = _quat_to_mat(raw["robot0_eef_quat"])
        if self._R0 is None:
            self._R0 = R  # keep the initial (downward) gripper orientation, rotating only about world z
        while not self.done:
            ph = self.phases[self._i]
            target = ph.target(raw)
            err = target - eef
            rot_err = 0.0 if ph.yaw is None else abs(_closest_yaw(_yaw(_rot_z(ph.yaw(raw)) @ self._R0), _yaw(R),
                                                                  2 * np.pi))
            reached = self._t >= ph.min_steps and np.linalg.norm(err) < ph.tol and rot_err < 0.05
            if reached or self._t >= ph.max_steps:
                self._t = 0
                if ph.failed is not None and ph.failed(raw) and self.retries < self.max_retries:
                    self.retries += 1
                    self.memo.clear()
                    self._i = ph.retry_from
                else:
                    self._i += 1
                continue
            break
        if self.done:
            ph = self.phases[-1]
            target, err = eef, np.zeros(3)
        self._t += 1
        dpos = np.clip(self.gain * err / POS_SCALE, -1.0, 1.0)
        R_goal = self._R0 if ph.yaw is None else _rot_z(ph.yaw(raw)) @ self._R0
        drot = np.clip(self.rot_gain * _rotvec(R_goal @ R.T) / ROT_SCALE, -1.0, 1.0)
        action = np.concatenate([dpos, drot, [ph.gripper]])
        if self.noise > 0:
            action[:6] += self.rng.normal(0.0, self.noise, 6)
        return np.clip(action, -1.0, 1.0)


def _closest_yaw(obj_yaw: float, gripper_yaw: float, period: float) -> float:
    """The rotation about z (wrapped to [-period/2, period/2)) taking the gripper's yaw to the object's."""
    d = obj_yaw - gripper_yaw
    return float((d + period / 2) % period - period / 2)


def _hold_targets(state: dict, carry_z: float):
    """Targets that keep the end effector where it was when first asked (``hold``), or there raised to
    ``carry_z`` (``up``): used while the gripper closes and then lifts."""
    def hold(o):
        state.setdefault("p", np.asarray(o["robot0_eef_pos"], dtype=np.float64).copy())
        return state["p"]

    def up(o):
        p = hold(o).copy()
        p[2] = carry_z
        return p

    return hold, up


def _lift_phases(env, rng: np.random.Generator) -> list[Phase]:
    above = rng.uniform(0.06, 0.10)
    grasp_z = rng.uniform(-0.005, 0.005)
    lift_z = rng.uniform(0.15, 0.22)
    xy = rng.uniform(-0.004, 0.004, 2)
    close_steps = int(rng.integers(6, 10))
    cube = lambda o: np.asarray(o["cube_pos"], dtype=np.float64)  # noqa: E731
    off = lambda dz: np.array([xy[0], xy[1], dz])  # noqa: E731
    state: dict = {}

    hold, _ = _hold_targets(state, 0.0)

    phases = [
        Phase("above", lambda o: cube(o) + off(above), -1.0, tol=0.015, max_steps=60),
        Phase("descend", lambda o: cube(o) + off(grasp_z), -1.0, tol=0.006, max_steps=50),
        Phase("grasp", hold, 1.0, tol=0.0, min_steps=close_steps, max_steps=close_steps),
        Phase("lift", lambda o: hold(o) + np.array([0.0, 0.0, lift_z]), 1.0, tol=0.01, max_steps=60,
              failed=_missed),
    ]
    return phases, state


def _can_phases(env, rng: np.random.Generator) -> list[Phase]:
    rs = env.unwrapped
    # Can's quadrant of bin 2 spans x in [bin2_x, bin2_x + size_x / 2], y in [bin2_y, bin2_y + size_y / 2]; aim at
    # its part nearest the robot, since the quadrant's centre is at the edge of the Panda's reach.
    target = np.array([rs.bin2_pos[0] + rng.uniform(0.04, 0.07), rs.bin2_pos[1] + rng.uniform(0.05, 0.08),
                       rs.bin2_pos[2]])
    above = rng.uniform(0.08, 0.12)
    grasp_z = rng.uniform(-0.01, 0.005)
    carry_z = rs.bin2_pos[2] + rng.uniform(0.17, 0.20)
    drop_z = rs.bin2_pos[2] + rng.uniform(0.11, 0.13)
    close_steps = int(rng.integers(6, 10))
    can = lambda o: np.asarray(o["Can_pos"], dtype=np.float64)  # noqa: E731
    state: dict = {}

    hold, up = _hold_targets(state, carry_z)

    phases = [
        Phase("above", lambda o: can(o) + np.array([0.0, 0.0, above]), -1.0, tol=0.015, max_steps=70),
        Phase("descend", lambda o: can(o) + np.array([0.0, 0.0, grasp_z]), -1.0, tol=0.008, max_steps=50),
        Phase("grasp", hold, 1.0, tol=0.0, min_steps=close_steps, max_steps=close_steps),
        Phase("up", up, 1.0, tol=0.02, max_steps=50, failed=_missed),
        Phase("carry", lambda o: np.array([target[0], target[1], carry_z]), 1.0, tol=0.02, max_steps=80),
        Phase("lower", lambda o: np.array([target[0], target[1], drop_z]), 1.0, tol=0.015, max_steps=40),
        Phase("release", lambda o: np.array([target[0], target[1], drop_z]), -1.0, tol=0.0, min_steps=6,
              max_steps=6),
        # success needs the gripper away from the can (robosuite's r_reach < 0.6, i.e. > ~7 cm)
        Phase("retreat", lambda o: np.array([target[0], target[1], carry_z]), -1.0, tol=0.01, max_steps=40),
    ]
    return phases, state


def _square_phases(env, rng: np.random.Generator) -> list[Phase]:
    rs = env.unwrapped
    nut = rs.nuts[rs.nut_to_id["square"]]
    handle_site = rs.sim.model.site_name2id(nut.important_sites["handle"])
    peg = np.array(rs.sim.data.body_xpos[rs.peg1_body_id], dtype=np.float64)
    table_z = float(rs.table_offset[2])
    above = rng.uniform(0.06, 0.09)
    carry_z = table_z + rng.uniform(0.17, 0.20)
    close_steps = int(rng.integers(6, 10))
    peg_xy = peg[:2] + rng.uniform(-0.003, 0.003, 2)
    outward = rng.uniform(0.002, 0.008)
    handle = lambda o: np.array(rs.sim.data.site_xpos[handle_site], dtype=np.float64)  # noqa: E731
    nut_pos = lambda o: np.asarray(o["SquareNut_pos"], dtype=np.float64)  # noqa: E731
    state: dict = {}
    first: dict = {}

    def grasp_yaw(o) -> float:
        # Panda's fingers close along the eef's local y: align the eef's x with the handle (the nut's local x)
        if "y" not in state:
            # relative to the episode's first eef yaw (the demonstrator's reference orientation), kept on retries
            g0 = first.setdefault("g0", _yaw(_quat_to_mat(o["robot0_eef_quat"])))
            state["y"] = _closest_yaw(_yaw(_quat_to_mat(o["SquareNut_quat"])), g0, np.pi)
        return state["y"]

    def carry_yaw(o) -> float:
        # after the grasp, turn the nut so its handle points back towards the robot (-x) or sideways, whichever
        # needs the smallest turn: the peg is near the edge of the Panda's reach
        if "carry" not in state:
            d = handle(o)[:2] - nut_pos(o)[:2]
            cur = float(np.arctan2(d[1], d[0]))
            turns = [((t - cur + np.pi) % (2 * np.pi)) - np.pi for t in (np.pi, np.pi / 2, -np.pi / 2)]
            turn = min((t for t in turns if abs(t) < 2.2), key=abs, default=min(turns, key=abs))
            state["carry"] = grasp_yaw(o) + turn
        return state["carry"]

    hold, up = _hold_targets(state, carry_z)

    def over_peg(z):
        def f(o):
            off = np.asarray(o["robot0_eef_pos"])[:2] - nut_pos(o)[:2]  # live: the nut turns while carried
            return np.array([peg_xy[0] + off[0], peg_xy[1] + off[1], z])
        return f

    def grasp_point(o):
        # grasp 2-8 mm from the handle site towards the handle's free end: further in, the fingers catch the ring
        h = handle(o)
        d = nut_pos(o) - h
        d[2] = 0.0
        p = h - outward * d / max(np.linalg.norm(d), 1e-6)
        p[2] = max(p[2], table_z + 0.015)
        return p

    phases = [
        Phase("above", lambda o: grasp_point(o) + np.array([0.0, 0.0, above]), -1.0, tol=0.01, max_steps=80,
              yaw=grasp_yaw),
        Phase("descend", grasp_point, -1.0, tol=0.006, max_steps=40, yaw=grasp_yaw),
        Phase("grasp", hold, 1.0, tol=0.0, min_steps=close_steps, max_steps=close_steps, yaw=grasp_yaw),
        Phase("up", up, 1.0, tol=0.02, max_steps=40, yaw=grasp_yaw, failed=_missed),
        Phase("carry", over_peg(carry_z), 1.0, tol=0.006, min_steps=10, max_steps=100, yaw=carry_yaw),
        Phase("down", over_peg(table_z + 0.03), 1.0, tol=0.01, max_steps=50, yaw=carry_yaw),
        Phase("release", lambda o: np.asarray(o["robot0_eef_pos"], dtype=np.float64), -1.0, tol=0.0, min_steps=8,
              max_steps=8, yaw=carry_yaw),
        Phase("retreat", lambda o: np.array([peg_xy[0], peg_xy[1], carry_z]) + np.array([-0.08, 0.0, 0.0]),
              -1.0, tol=0.02, max_steps=40, yaw=carry_yaw),
    ]
    return phases, state


_PHASES = {"lift": _lift_phases, "can": _can_phases, "square": _square_phases}


def make_demonstrator(task: str, env, rng: np.random.Generator) -> WaypointDemonstrator:
    """A randomized demonstrator for the env's current episode (call after ``env.reset``)."""
    if task not in _PHASES:
        raise ValueError(f"no scripted demonstrator for task {task!r}; available: {sorted(_PHASES)}")
    phases, memo = _PHASES[task](env, rng)
    return WaypointDemonstrator(phases, memo=memo, gain=float(rng.uniform(0.8, 1.2)),
                                noise=float(rng.uniform(0.0, 0.05)), rng=rng)


def _missed(o: dict) -> bool:
    """The gripper closed on nothing (finger gap under 1 cm)."""
    q = np.asarray(o["robot0_gripper_qpos"])
    return float(q[0] - q[1]) < 0.01


def run_episode(env, task: str, seed: int, max_steps: int | None = None, record: bool = True) -> dict:
    """One scripted episode from ``env.reset(seed)``. Returns success, steps and (if ``record``) per-step
    ``actions``, ``states``, ``rewards``, ``dones``, ``obs`` (robomimic keys; images HWC uint8)."""
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng([seed, 7919])  # demonstrator noise, independent of the env's placement stream
    demo = make_demonstrator(task, env, rng)
    max_steps = env.max_steps if max_steps is None else max_steps
    rec: dict[str, list] = {"actions": [], "states": [], "rewards": [], "dones": []}
    obs_rec: dict[str, list] = {k: [] for k in LOW_DIM_KEYS + list(env.image_keys)}
    success = False
    steps = 0
    while steps < max_steps and not demo.done:
        raw = env.last_raw_obs
        action = demo.act(raw)
        if record:
            rec["states"].append(env.get_state())
            for k in LOW_DIM_KEYS:
                obs_rec[k].append(np.asarray(raw["object-state" if k == "object" else k], dtype=np.float64))
            for k in env.image_keys:
                obs_rec[k].append(obs[k].transpose(1, 2, 0))
            rec["actions"].append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        if record:
            rec["rewards"].append(reward)
            rec["dones"].append(int(terminated))
        if terminated:
            success = True
            break
    out = {"success": success, "steps": steps}
    if record and steps:
        out.update({k: np.asarray(v) for k, v in rec.items()})
        out["obs"] = {k: np.asarray(v) for k, v in obs_rec.items()}
    return out


def _check_seeds(seed: int, n: int) -> None:
    lo, hi = seed, seed + n
    if lo < EVAL_SEEDS.stop and hi > EVAL_SEEDS.start:
        raise ValueError(f"training seeds {lo}..{hi - 1} overlap the evaluation seeds "
                         f"{EVAL_SEEDS.start}..{EVAL_SEEDS.stop - 1}; pick another --seed")


def generate_dataset(
    task: str,
    n_episodes: int,
    out_path: str | os.PathLike,
    seed: int = 0,
    image_keys: Sequence[str] = (),
    progress: bool = True,
    image_size: int = 84,
) -> dict:
    """Run ``n_episodes`` scripted episodes (env seeds seed, seed+1, ...), keep the successful ones and write
    them atomically in robomimic's hdf5 schema. Returns stats: attempted, successes, success_rate, sec_per_episode,
    steps (total kept samples), out_path."""
    import time

    import h5py
    import robosuite

    from ..envs.robomimic import MAX_STEPS, RobomimicEnv, camera_name, default_env_meta

    if task not in _PHASES:
        raise ValueError(f"no scripted demonstrator for task {task!r}; available: {sorted(_PHASES)}")
    if n_episodes <= 0:
        raise ValueError(f"n_episodes must be positive, got {n_episodes}")
    _check_seeds(seed, n_episodes)
    out_path = Path(out_path)
    meta = default_env_meta(task)
    meta["env_version"] = robosuite.__version__
    if image_keys:
        meta["env_kwargs"].update(
            has_offscreen_renderer=True, use_camera_obs=True, camera_names=[camera_name(k) for k in image_keys],
            camera_heights=image_size, camera_widths=image_size)
    env = RobomimicEnv(meta, ["object"], image_keys=image_keys, image_size=image_size, max_steps=MAX_STEPS[task])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(out_path)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_episodes, desc=f"scripted {task}", unit="ep")
    t0 = time.perf_counter()
    kept = 0
    total = 0
    try:
        with h5py.File(tmp, "w") as f:
            data = f.create_group("data")
            model_xml = env.unwrapped.sim.model.get_xml()
            for ep in range(n_episodes):
                res = run_episode(env, task, seed + ep)
                if res["success"]:
                    g = data.create_group(f"demo_{kept}")
                    n = res["steps"]
                    g.attrs["num_samples"] = n
                    g.attrs["model_file"] = model_xml
                    g.attrs["seed"] = seed + ep
                    g.create_dataset("actions", data=res["actions"].astype(np.float64))
                    g.create_dataset("states", data=res["states"].astype(np.float64))
                    g.create_dataset("rewards", data=res["rewards"].astype(np.float64))
                    g.create_dataset("dones", data=res["dones"].astype(np.int64))
                    og = g.create_group("obs")
                    for k, v in res["obs"].items():
                        if v.dtype == np.uint8:
                            og.create_dataset(k, data=v, compression="gzip", compression_opts=4)
                        else:
                            og.create_dataset(k, data=v)
                    kept += 1
                    total += n
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(success=f"{kept}/{ep + 1}")
            data.attrs["total"] = total
            data.attrs["env_args"] = json.dumps(meta)
            names = [f"demo_{i}" for i in range(kept)]
            n_valid = max(1, round(0.1 * kept)) if kept >= 2 else 0
            perm = np.random.default_rng(seed).permutation(kept)
            valid = sorted((names[i] for i in perm[:n_valid]), key=lambda s: int(s.split("_")[1]))
            train = [s for s in names if s not in set(valid)]
            mask = f.create_group("mask")
            mask.create_dataset("train", data=np.array(train, dtype="S"))
            mask.create_dataset("valid", data=np.array(valid, dtype="S"))
        os.replace(tmp, out_path)
    finally:
        if bar is not None:
            bar.close()
        env.close()
        if tmp.exists():
            tmp.unlink()
    dt = time.perf_counter() - t0
    return {
        "task": task,
        "attempted": n_episodes,
        "successes": kept,
        "success_rate": kept / n_episodes,
        "sec_per_episode": dt / n_episodes,
        "steps": total,
        "out_path": str(out_path),
    }
