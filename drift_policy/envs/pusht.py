"""Push-T with Diffusion Policy's low-dimensional ("keypoints") observation and seeding.

We subclass gym-pusht's pymunk ``PushTEnv`` (same physics: 100 Hz simulation, 10 Hz control, PD gains
k_p=100 / k_v=20, reward ``clip(coverage / 0.95, 0, 1)``, success when coverage > 0.95) and change what
Diffusion Policy's evaluation protocol needs:

* observation: the 9 block keypoints of Diffusion Policy's Push-T data set (``PUSHT_LOCAL_KEYPOINTS``
  carried by the current block pose) flattened, then the agent x, y -> 20 float32 numbers. gym-pusht's own
  "keypoints" are the 8 corners of the T, a different observation.
* seeding: a seed maps to an initial state with numpy's legacy ``RandomState`` exactly as Diffusion
  Policy draws it (``legacy_initial_state``), not with gym-pusht's ``np_random``.
* state placement (``placement``): a seeded reset places the block as Diffusion Policy's official evaluation
  does (its shipped Push-T configs set ``legacy_test: True``): position first, then angle. pymunk turns a body
  about its centre of gravity, which for the T is not the body origin, so the block ends away from the drawn
  position by (I - R(angle)) @ cog (``official_block_position``). ``placement="exact"`` sets the angle first, so
  ``block.position`` ends where asked; ``reset_to_state`` (replaying a recorded state) always places exactly.
* episode length: truncation after ``max_steps`` env steps (300 in Diffusion Policy's protocol).

Run ``python -m drift_policy.envs.pusht --episode 0`` for the demo-replay diagnostic (see envs/README.md).
"""
from __future__ import annotations

import os

# Headless pygame: must be set before pygame is imported (gym_pusht imports it).
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import argparse  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
import shapely.geometry as sg  # noqa: E402
from gym_pusht.envs.pusht import PushTEnv as _GymPushTEnv  # noqa: E402
from gymnasium import spaces  # noqa: E402

__all__ = [
    "PUSHT_LOCAL_KEYPOINTS",
    "GOAL_POSE",
    "SUCCESS_THRESHOLD",
    "OBS_DIM",
    "PushTKeypointsEnv",
    "PushTImageEnv",
    "keypoints_from_state",
    "keypoint_obs_from_state",
    "fit_local_keypoints",
    "legacy_initial_state",
    "official_block_position",
    "PLACEMENTS",
    "coverage_from_block_pose",
    "replay_episode",
]

# The 9 keypoints of Diffusion Policy's Push-T data set in the block's body frame (pymunk units = px of the
# 512x512 arena), in the data set's point order. Derived once with ``fit_local_keypoints`` on all 25,650
# frames of pusht_cchi_v7_replay.zarr (least squares, refit without the 62 frames whose keypoints deviate
# > 0.1 px from the rigid model) and rounded to 1e-4 px. World keypoint = R(angle) @ p + (block x, block y),
# with R the counter-clockwise rotation pymunk uses (``Vec2d.rotated``) and angle the pymunk body angle as
# stored in data/state[:, 4] (taken mod 2*pi). Reconstruction error on the data set: median 1e-4 px, mean
# 0.003 px, 99th percentile 0.027 px.
PUSHT_LOCAL_KEYPOINTS = np.array(
    [
        [9.2697, 90.0411],
        [-60.9834, -1.1867],
        [60.9128, -1.3932],
        [-0.2705, 25.5437],
        [-14.0650, 122.8159],
        [39.0027, 32.8575],
        [-39.9664, 32.7297],
        [-16.8244, 62.8632],
        [23.5415, -1.7002],
    ],
    dtype=np.float64,
)
PUSHT_LOCAL_KEYPOINTS.setflags(write=False)

GOAL_POSE = (256.0, 256.0, math.pi / 4)  # block x, y, angle of the target T
SUCCESS_THRESHOLD = 0.95  # coverage above which an episode succeeds (and terminates)
OBS_DIM = 2 * len(PUSHT_LOCAL_KEYPOINTS) + 2  # 20
DEFAULT_MAX_STEPS = 300
# How a seeded reset places the block. "official": Diffusion Policy's evaluation (legacy_test: True), position then
# angle; "exact": angle then position (block.position = the drawn position; how a recorded state is replayed).
PLACEMENTS = ("official", "exact")

# The T in its body frame, as gym_pusht.add_tee builds it with scale=30, length=4: a 120x30 bar and a
# 30x90 stem below it (pymunk y grows downwards on screen).
_TEE_LOCAL_POLYS = (
    ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0)),
    ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0)),
)


def _rotation(angle: np.ndarray) -> np.ndarray:
    """[..., 2, 2] counter-clockwise rotation matrices (pymunk's convention) for angles [...]."""
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], axis=-1), np.stack([s, c], axis=-1)], axis=-2)


def keypoints_from_state(state: np.ndarray, local_keypoints: np.ndarray | None = None) -> np.ndarray:
    """World keypoints [..., 9, 2] (float64) of Push-T states [..., 5] = (agent x, agent y, block x, block y, angle)."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape[-1] != 5:
        raise ValueError(f"state must have last dimension 5, got shape {state.shape}")
    local = PUSHT_LOCAL_KEYPOINTS if local_keypoints is None else np.asarray(local_keypoints, dtype=np.float64)
    rot = _rotation(state[..., 4])  # [..., 2, 2]
    return np.einsum("...ij,kj->...ki", rot, local) + state[..., None, 2:4]


def keypoint_obs_from_state(state: np.ndarray) -> np.ndarray:
    """Diffusion Policy's low-dim Push-T observation [..., 20] float32: 9 keypoints (x, y) then agent (x, y)."""
    state = np.asarray(state, dtype=np.float64)
    kp = keypoints_from_state(state)
    flat = kp.reshape(*kp.shape[:-2], -1)
    return np.concatenate([flat, state[..., :2]], axis=-1).astype(np.float32)


def fit_local_keypoints(state: np.ndarray, keypoint: np.ndarray, *, outlier_px: float | None = 0.1) -> np.ndarray:
    """Least-squares body-frame keypoints [K, 2] such that keypoint ~= R(angle) @ p + block position.

    Because R is orthogonal, the least-squares solution is the mean over frames of R(angle)^T (keypoint - pos).
    With ``outlier_px`` set, frames whose worst keypoint misses the first fit by more than that many px are
    dropped and the mean is taken again (the data set has a few dozen such frames, mostly episode starts).
    """
    state = np.asarray(state, dtype=np.float64).reshape(-1, 5)
    keypoint = np.asarray(keypoint, dtype=np.float64)
    keypoint = keypoint.reshape(state.shape[0], -1, 2)
    rot = _rotation(state[:, 4])
    local = np.einsum("nji,nkj->nki", rot, keypoint - state[:, None, 2:4])  # R^T (kp - pos), [N, K, 2]
    fit = local.mean(axis=0)
    if outlier_px is not None:
        err = np.linalg.norm(keypoints_from_state(state, fit) - keypoint, axis=-1).max(axis=-1)
        inliers = err <= outlier_px
        if inliers.any():
            fit = local[inliers].mean(axis=0)
    return fit


def legacy_initial_state(seed: int) -> np.ndarray:
    """Diffusion Policy's initial Push-T state for ``seed`` (numpy legacy RandomState), float64 [5]."""
    rs = np.random.RandomState(seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


def official_block_position(state: np.ndarray, cog: tuple[float, float]) -> np.ndarray:
    """Where Diffusion Policy's official (legacy) placement puts the block origin for a drawn state [5]: the
    position is set at angle 0, then the angle turns the body about its centre of gravity ``cog`` (body frame),
    which stays fixed, so origin = pos + (I - R(angle)) @ cog."""
    state = np.asarray(state, dtype=np.float64)
    cog = np.asarray(cog, dtype=np.float64)
    return state[2:4] + cog - _rotation(state[4]) @ cog


def _tee_geometry(x: float, y: float, angle: float) -> sg.MultiPolygon:
    c, s = math.cos(angle), math.sin(angle)
    polys = [sg.Polygon([(x + c * px - s * py, y + s * px + c * py) for px, py in poly]) for poly in _TEE_LOCAL_POLYS]
    return sg.MultiPolygon(polys)


def coverage_from_block_pose(x: float, y: float, angle: float) -> float:
    """Fraction of the goal T covered by a block at (x, y, angle) -- the env's coverage, without a simulator."""
    goal = _tee_geometry(*GOAL_POSE)
    block = _tee_geometry(float(x), float(y), float(angle))
    return float(goal.intersection(block).area / goal.area)


class PushTKeypointsEnv(_GymPushTEnv):
    """Push-T with Diffusion Policy's 20-d keypoint observation, legacy seeding and a step limit.

    ``reset(seed=s)`` starts from ``legacy_initial_state(s)`` placed as ``placement`` says ("official": Diffusion
    Policy's evaluation; "exact"); ``reset(options={"reset_to_state": state5})`` from a given [agent x, agent y,
    block x, block y, block angle], placed exactly. ``step(action)`` takes an absolute agent
    target (x, y) in [0, 512] px (not clipped, like Diffusion Policy) and returns
    ``(obs[20] float32, reward, terminated, truncated, info)`` with ``info["coverage"]``,
    ``info["is_success"]`` and ``info["state"]``. ``render()`` returns an RGB uint8 image
    (``render_size`` square, 96 like the data set's frames, or ``render(size=...)`` for videos).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, max_steps: int | None = DEFAULT_MAX_STEPS, render_size: int = 96, placement: str = "official"):
        super().__init__(obs_type="state", render_mode="rgb_array")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.placement = placement
        if max_steps is not None and max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
        if render_size < 1:
            raise ValueError(f"render_size must be >= 1, got {render_size}")
        self.max_steps = max_steps
        self.render_size = int(render_size)
        self.success_threshold = SUCCESS_THRESHOLD
        # Nominal bounds: keypoints and the agent live in the 512x512 arena (PD overshoot can leave it briefly).
        self.observation_space = spaces.Box(low=0.0, high=512.0, shape=(OBS_DIM,), dtype=np.float32)
        self.action_space = spaces.Box(low=0.0, high=512.0, shape=(2,), dtype=np.float32)
        self.elapsed_steps = 0
        self.initial_state: np.ndarray | None = None
        self.seed_used: int | None = None
        self._ready = False

    # -- state -------------------------------------------------------------------------------------------
    def get_state(self) -> np.ndarray:
        """[agent x, agent y, block x, block y, block angle mod 2pi] float64, the data set's ``state``."""
        ax, ay = self.agent.position
        bx, by = self.block.position
        return np.array([ax, ay, bx, by, self.block.angle % (2 * np.pi)], dtype=np.float64)

    def _set_state(self, state: np.ndarray, placement: str = "exact") -> None:
        # pymunk keeps the centre of gravity fixed when the angle changes. "exact": angle first, then position, so
        # the body origin ends where asked. "official": Diffusion Policy's legacy order (position, then angle),
        # which its evaluation uses for the test seeds, so the origin ends away from the drawn position.
        self.agent.position = (float(state[0]), float(state[1]))
        if placement == "official":
            self.block.position = (float(state[2]), float(state[3]))
            self.block.angle = float(state[4])
        else:
            self.block.angle = float(state[4])
            self.block.position = (float(state[2]), float(state[3]))
        self.space.step(self.dt)  # as gym-pusht and Diffusion Policy: one physics step to settle contacts

    def get_obs(self) -> np.ndarray:
        return keypoint_obs_from_state(self.get_state())

    def get_coverage(self) -> float:
        return float(self._get_coverage())

    # -- gym API -----------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        gym.Env.reset(self, seed=seed)
        self._setup()
        self._last_action = None
        self.elapsed_steps = 0
        state = None if options is None else options.get("reset_to_state")
        placement = "exact" if state is not None else self.placement
        if state is not None:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (5,) or not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be 5 finite numbers, got {state!r}")
            self.seed_used = seed
        else:
            if seed is None:  # no seed: draw one from the env's generator, then follow the legacy protocol
                seed = int(self.np_random.integers(0, 2**31 - 1))
            state = legacy_initial_state(seed)
            self.seed_used = int(seed)
        self.initial_state = state.copy()
        self._set_state(state, placement)
        self._ready = True
        coverage = self.get_coverage()
        info = {"coverage": coverage, "is_success": coverage > self.success_threshold, "state": self.get_state()}
        return self.get_obs(), info

    def step(self, action):
        if not self._ready:
            raise RuntimeError("call reset() before step()")
        act = np.asarray(action, dtype=np.float64)
        if act.shape != (2,):
            raise ValueError(f"action must have shape (2,) (agent target x, y), got {act.shape}")
        if not np.all(np.isfinite(act)):
            raise ValueError(f"action must be finite, got {act.tolist()}")
        _, reward, terminated, _, base_info = super().step(act)
        self.elapsed_steps += 1
        coverage = float(base_info["coverage"])
        truncated = self.max_steps is not None and self.elapsed_steps >= self.max_steps
        info = {
            "coverage": coverage,
            "is_success": bool(terminated),
            "state": self.get_state(),
            "elapsed_steps": self.elapsed_steps,
        }
        return self.get_obs(), float(reward), bool(terminated), bool(truncated), info

    def render(self, size: int | None = None, *, draw_action: bool = False) -> np.ndarray:
        """RGB uint8 [size, size, 3] image of the arena (goal in green); ``size`` defaults to ``render_size``."""
        if not self._ready:
            raise RuntimeError("call reset() before render()")
        size = self.render_size if size is None else int(size)
        img = self._get_img(self._draw(), width=size, height=size, render_action=draw_action)
        return np.ascontiguousarray(img, dtype=np.uint8)


class PushTImageEnv(PushTKeypointsEnv):
    """Push-T with Diffusion Policy's image observation: ``{"obs": float32 [2], "image": uint8 [3, S, S]}``.

    ``obs`` is the agent position (x, y), ``S = render_size`` (96, the data set's frames). The image is rendered
    as the data set's frames were: the 512x512 pygame drawing (goal T in light green, block, agent) resized with
    OpenCV, *without* the action cross-hair, of the state after the step (the stored frame t shows state t).
    Rendering a stored state gives the stored frame up to anti-aliasing on a few edge pixels (mean absolute
    difference about 0.08 / 255, see tests/test_vision.py). Seeding, ``info``, rewards and the step limit are
    ``PushTKeypointsEnv``'s.
    """

    def __init__(self, max_steps: int | None = DEFAULT_MAX_STEPS, render_size: int = 96, placement: str = "official"):
        super().__init__(max_steps=max_steps, render_size=render_size, placement=placement)
        s = self.render_size
        self.observation_space = spaces.Dict({
            "obs": spaces.Box(low=0.0, high=512.0, shape=(2,), dtype=np.float32),
            "image": spaces.Box(low=0, high=255, shape=(3, s, s), dtype=np.uint8),
        })
        self._defer_obs = False

    def render_obs_image(self) -> np.ndarray:
        """The observation image, uint8 [3, render_size, render_size] (CHW)."""
        s = self.render_size
        img = self._get_img(self._draw(), width=s, height=s, render_action=False)  # [S, S, 3]
        return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))

    def get_obs(self) -> dict[str, np.ndarray] | None:
        if self._defer_obs:  # inside step(): gym-pusht's step asks for an observation we would throw away
            return None
        agent = np.array(tuple(self.agent.position), dtype=np.float32)
        return {"obs": agent, "image": self.render_obs_image()}

    def step(self, action):
        self._defer_obs = True
        try:
            _, reward, terminated, truncated, info = super().step(action)
        finally:
            self._defer_obs = False
        return self.get_obs(), reward, terminated, truncated, info


# -- demo replay diagnostic --------------------------------------------------------------------------------
def _episode_bounds(ends: np.ndarray, episode: int) -> tuple[int, int]:
    if not 0 <= episode < len(ends):
        raise IndexError(f"episode {episode} out of range: the store has {len(ends)} episodes")
    start = 0 if episode == 0 else int(ends[episode - 1])
    return start, int(ends[episode])


def replay_episode(zarr_path: str | os.PathLike, episode: int) -> dict:
    """Reset to a demo episode's first recorded state, replay its recorded actions open-loop and compare.

    After replayed step t the simulated state is compared with the recorded state t+1 (the data set stores
    the state *before* each action). Reports block position error (px, mean and max over the episode),
    mean absolute block angle error (rad), agent position error (px), and the coverage of the last aligned
    frame in the replay vs. in the recording (plus the maxima over the episode), and the coverage after the
    episode's last action, whose resulting state the store does not hold.
    """
    import zarr  # local: the env itself does not need zarr

    root = zarr.open(str(zarr_path), mode="r")
    start, end = _episode_bounds(root["meta/episode_ends"][:], int(episode))
    states = np.asarray(root["data/state"][start:end], dtype=np.float64)
    actions = np.asarray(root["data/action"][start:end], dtype=np.float64)
    env = PushTKeypointsEnv(max_steps=None)
    env.reset(options={"reset_to_state": states[0]})
    sim = [env.get_state()]
    cov_sim = [env.get_coverage()]
    for t in range(len(states) - 1):
        env.step(actions[t])
        sim.append(env.get_state())
        cov_sim.append(env.get_coverage())
    # The store has no state after the last action; replaying it shows whether the demo ends in success.
    _, _, terminated, _, info = env.step(actions[-1])
    env.close()
    sim = np.stack(sim)
    block_err = np.linalg.norm(sim[1:, 2:4] - states[1:, 2:4], axis=-1) if len(sim) > 1 else np.zeros(1)
    ang = sim[1:, 4] - states[1:, 4]
    ang_err = np.abs((ang + np.pi) % (2 * np.pi) - np.pi) if len(sim) > 1 else np.zeros(1)
    agent_err = np.linalg.norm(sim[1:, :2] - states[1:, :2], axis=-1) if len(sim) > 1 else np.zeros(1)
    cov_rec = [coverage_from_block_pose(*s[2:5]) for s in states]
    return {
        "episode": int(episode),
        "n_steps": int(len(states) - 1),
        "block_pos_err_mean_px": float(block_err.mean()),
        "block_pos_err_max_px": float(block_err.max()),
        "block_angle_err_mean_rad": float(ang_err.mean()),
        "agent_pos_err_mean_px": float(agent_err.mean()),
        "final_coverage_replay": float(cov_sim[-1]),
        "final_coverage_recorded": float(cov_rec[-1]),
        "max_coverage_replay": float(max(cov_sim)),
        "max_coverage_recorded": float(max(cov_rec)),
        "coverage_after_last_action": float(info["coverage"]),
        "success_after_last_action": bool(terminated),
    }


def _main(argv: list[str] | None = None) -> int:
    from drift_policy.paths import pusht_zarr_path

    parser = argparse.ArgumentParser(
        prog="python -m drift_policy.envs.pusht",
        description="Replay Push-T demos open-loop in the simulator and report how closely the block follows.",
    )
    parser.add_argument("--episode", type=int, nargs="*", default=[0], help="episode indices (default: 0)")
    parser.add_argument("--all", action="store_true", help="replay every episode in the store")
    parser.add_argument("--zarr", type=Path, default=None, help="store path (default: drift_policy.paths)")
    args = parser.parse_args(argv)
    path = args.zarr if args.zarr is not None else pusht_zarr_path()
    if not Path(path).exists():
        parser.error(f"no Push-T store at {path} (set DRIFT_POLICY_DATA_ROOT or pass --zarr)")
    if args.all:
        import zarr

        episodes = list(range(len(zarr.open(str(path), mode="r")["meta/episode_ends"])))
    else:
        episodes = args.episode
    header = (
        f"{'ep':>4} {'steps':>5} {'blk_err_mean':>12} {'blk_err_max':>11} {'ang_err_mean':>12} {'agt_err_mean':>12} "
        f"{'cov_replay':>10} {'cov_record':>10} {'cov_after_last':>14}"
    )
    print(header)
    rows = []
    for ep in episodes:
        r = replay_episode(path, ep)
        rows.append(r)
        print(
            f"{r['episode']:>4} {r['n_steps']:>5} {r['block_pos_err_mean_px']:>12.2e} {r['block_pos_err_max_px']:>11.2e} "
            f"{r['block_angle_err_mean_rad']:>12.2e} {r['agent_pos_err_mean_px']:>12.2e} "
            f"{r['final_coverage_replay']:>10.4f} {r['final_coverage_recorded']:>10.4f} "
            f"{r['coverage_after_last_action']:>14.4f}",
            flush=True,
        )
    if len(rows) > 1:
        blk_mean = np.array([r["block_pos_err_mean_px"] for r in rows])
        blk_max = np.array([r["block_pos_err_max_px"] for r in rows])
        ang = np.array([r["block_angle_err_mean_rad"] for r in rows])
        cov_gap = np.array([abs(r["final_coverage_replay"] - r["final_coverage_recorded"]) for r in rows])
        succ = np.mean([r["success_after_last_action"] for r in rows])
        print(
            f"{len(rows)} episodes: block err mean px median={np.median(blk_mean):.2e} max={blk_mean.max():.2e}; "
            f"worst block err px={blk_max.max():.2e}; angle err mean rad max={ang.max():.2e}; "
            f"|final coverage gap| max={cov_gap.max():.2e}; demos ending in success after last action={succ:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
