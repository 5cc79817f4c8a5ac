"""Multimodal block pushing (Florence et al. 2021, "Implicit Behavioral Cloning"), as Diffusion Policy's
``blockpush_lowdim_seed_abs`` task uses it, rebuilt from pybullet primitives.

Facts taken from IBC's ``block_pushing_multimodal`` env and Diffusion Policy's copy of it (no code copied):

* table plane; workspace bounds x in [0.15, 0.70], y in [-0.5, 0.5] m; the effector starts at (0.3, -0.4);
* two 4 cm cubes ("block" A, "block2" B) at x = 0.4 +- 0.1, y = -0.2 +- 0.15, yaw ~ U(0, pi), centres more
  than 0.1 m apart; two flat target zones at y = 0.2 +- 0.0075, x = 0.4 +- 0.12 (+- 0.005; which target
  sits left is random), yaw pi +- pi/30;
* absolute action: the effector's target xy, clipped to the workspace; 10 Hz control over a 240 Hz simulation;
* a block is in a target when its centre is within 0.05 m of the target centre; the episode succeeds (and
  terminates) when both blocks are in different targets; 350 steps at most;
* the 16-d observation, in this order (Diffusion Policy flattens IBC's ordered observation dict):
  block xy, block yaw, block2 xy, block2 yaw, effector xy, effector target xy, target xy, target yaw,
  target2 xy, target2 yaw; yaws are ``euler_z mod pi``.
* Diffusion Policy scores an episode with the set of rewards it saw (0.49 per block entering a target, 0.51
  when both are in): p1 = at least one block reached a target, p2 = both were in different targets at once.

What differs from IBC, and why: IBC drives an xArm's suction tip through inverse kinematics; here the effector is
a free cylinder (radius ``EFFECTOR_RADIUS``) held by a fixed constraint whose pivot moves in a straight line to
the commanded target within each 0.1 s step, so the task keeps its planar pushing physics without the arm's
meshes. The reward here is DP's episode score so far (0, 0.49 once a block reached a target, 1.0 at success),
so an episode's maximum reward is Diffusion Policy's per-episode ``total_reward``. Block reset rejects
pairs closer than 0.1 m in xy (IBC compares x only).
"""
from __future__ import annotations

import math
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

__all__ = ["BlockPushEnv", "ModeTracker", "episode_modes", "MODE_FLAGS", "ENGAGE_DIST", "OBS_DIM", "ACTION_DIM", "OBS_SLICES", "WORKSPACE_BOUNDS", "GOAL_TOLERANCE",  # noqa: E501
           "MAX_STEPS", "CONTROL_HZ", "BLOCK_SIZE", "EFFECTOR_RADIUS", "P1_SCORE", "P2_SCORE"]

WORKSPACE_BOUNDS = np.array([[0.15, -0.5], [0.70, 0.5]])  # [[x_min, y_min], [x_max, y_max]] (m)
EFFECTOR_START = np.array([0.3, -0.4])
BLOCK_SIZE = 0.04                 # cube edge (m)
TARGET_SIZE = 0.12                # side of the drawn target square (visual only: blocks slide over it)
EFFECTOR_RADIUS = 0.01
GOAL_TOLERANCE = 0.05             # block centre to target centre (m)
MIN_BLOCK_DIST = 0.1
MIN_TARGET_DIST = 0.12
CONTROL_HZ = 10
SIM_HZ = 240
MAX_STEPS = 350
P1_SCORE, P2_SCORE = 0.49, 1.0    # Diffusion Policy's episode score after one / both blocks

# name -> slice of the 16-d observation
OBS_SLICES = {
    "block_translation": slice(0, 2), "block_orientation": slice(2, 3),
    "block2_translation": slice(3, 5), "block2_orientation": slice(5, 6),
    "effector_translation": slice(6, 8), "effector_target_translation": slice(8, 10),
    "target_translation": slice(10, 12), "target_orientation": slice(12, 13),
    "target2_translation": slice(13, 15), "target2_orientation": slice(15, 16),
}
OBS_DIM, ACTION_DIM = 16, 2
BLOCKS, TARGETS = ("block", "block2"), ("target", "target2")
# The effector is "at" a block when its centre is this close to the block's: the cube's half-diagonal, the
# effector's radius and 1 cm of slack, i.e. touching or about to touch it.
ENGAGE_DIST = BLOCK_SIZE / 2 * math.sqrt(2) + EFFECTOR_RADIUS + 0.01
# Per-episode mode flags (true at any step): which block reached a target first, which target each block was in
# at some step (block A = "block", target 1 = "target"), and whether the effector went from one block to the other
# before either reached a target (a rollout that hesitates between the two orders: mode averaging).
MODE_FLAGS = ("a_first", "b_first", "a_in_t1", "a_in_t2", "b_in_t1", "b_in_t2", "switched")

_EFFECTOR_Z = 0.025               # cylinder centre: spans z 0.005..0.045, so it touches the cubes, not the table
_EFFECTOR_LENGTH = 0.04
_MAX_RESET_TRIES = 1000


def _pybullet():
    """pybullet, imported when an env is made: the layout constants above serve the data loader without it."""
    try:
        import pybullet
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"BlockPushEnv needs pybullet 3.2.7 ({e}); install it with "
                          '`pip install -e ".[blockpush]"`') from e
    return pybullet


def _yaw_of(quat) -> float:
    """Euler z (roll-pitch-yaw convention) of an (x, y, z, w) quaternion, mod pi."""
    x, y, z, w = quat
    return float(math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)) % math.pi)


class ModeTracker:
    """The modes of one episode from its observations alone (so stored demonstrations and rollouts are measured
    the same way): ``update(obs)`` after every reset/step returns the flags so far (``MODE_FLAGS``)."""

    def __init__(self, goal_tolerance: float = GOAL_TOLERANCE, engage_dist: float = ENGAGE_DIST):
        self.goal_tolerance, self.engage_dist = float(goal_tolerance), float(engage_dist)
        self.first_block = -1            # 0: block A reached a target first, 1: block B, -1: none yet
        self.ever_in = np.zeros((2, 2), bool)   # [block, target]
        self.engaged = -1                # the block the effector was last at, before the first reached a target
        self.switched = False

    def update(self, obs: np.ndarray) -> dict:
        obs = np.asarray(obs, np.float64)
        blocks = [obs[OBS_SLICES[f"{b}_translation"]] for b in BLOCKS]
        dist = np.array([[np.linalg.norm(p - obs[OBS_SLICES[f"{t}_translation"]]) for t in TARGETS] for p in blocks])
        inside = dist < self.goal_tolerance
        if self.first_block < 0:
            ee = obs[OBS_SLICES["effector_translation"]]
            near = [np.linalg.norm(ee - p) for p in blocks]
            at = int(np.argmin(near))
            if near[at] < self.engage_dist:
                self.switched = self.switched or (self.engaged >= 0 and at != self.engaged)
                self.engaged = at
            if inside.any():
                hit = np.flatnonzero(inside.any(1))
                self.first_block = int(hit[np.argmin(dist[hit].min(1))])   # both at once: the closer one
        self.ever_in |= inside
        self.inside, self.dist = inside, dist
        return {"a_first": self.first_block == 0, "b_first": self.first_block == 1,
                "a_in_t1": bool(self.ever_in[0, 0]), "a_in_t2": bool(self.ever_in[0, 1]),
                "b_in_t1": bool(self.ever_in[1, 0]), "b_in_t2": bool(self.ever_in[1, 1]),
                "switched": self.switched}


def episode_modes(obs: np.ndarray, goal_tolerance: float = GOAL_TOLERANCE) -> dict:
    """The mode flags of one stored episode, observations [T, 16] (a demonstration's or a rollout's)."""
    tracker = ModeTracker(goal_tolerance)
    flags = {}
    for o in np.asarray(obs):
        flags = tracker.update(o)
    return flags


class BlockPushEnv(gym.Env):
    """Gymnasium env; observation float32 [16] (see ``OBS_SLICES``), action float32 [2] (effector target xy, m).

    ``info`` after every reset/step: ``p1`` / ``p2`` (so far in the episode), ``is_success`` (= p2),
    ``first_block`` (0: block A reached a target first, 1: block B, -1: none yet), the mode flags ``MODE_FLAGS``
    (``ModeTracker``: a_first, b_first, which target each block was in, switched), ``in_target`` (per block, now).
    ``render(size)`` draws an RGB frame with
    pybullet's CPU renderer. pybullet is imported when the first env is made (``_pybullet``).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, max_steps: int = MAX_STEPS, goal_tolerance: float = GOAL_TOLERANCE):
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.max_steps, self.goal_tolerance = int(max_steps), float(goal_tolerance)
        low = np.full(OBS_DIM, -5.0, np.float32)
        self.observation_space = spaces.Box(low, -low, dtype=np.float32)
        self.action_space = spaces.Box(WORKSPACE_BOUNDS[0].astype(np.float32),
                                       WORKSPACE_BOUNDS[1].astype(np.float32), dtype=np.float32)
        self._pb = pb = _pybullet()
        self._client = pb.connect(pb.DIRECT)   # headless, one physics server per env
        self._rng = np.random.default_rng()
        self._built = False

    # -- scene ---------------------------------------------------------------------------------------------
    def _build(self) -> None:
        """A fresh world every reset, so a seed's rollout never depends on what ran before it."""
        pb = self._pb
        c = self._client
        pb.resetSimulation(physicsClientId=c)
        pb.setGravity(0, 0, -9.8, physicsClientId=c)
        pb.setTimeStep(1.0 / SIM_HZ, physicsClientId=c)
        plane = pb.createCollisionShape(pb.GEOM_PLANE, physicsClientId=c)
        table_vis = pb.createVisualShape(pb.GEOM_BOX, halfExtents=[0.3, 0.55, 0.0005],
                                               rgbaColor=[0.85, 0.85, 0.8, 1], physicsClientId=c)
        self._table = pb.createMultiBody(0, plane, table_vis, basePosition=[0.425, 0, 0], physicsClientId=c)
        half = BLOCK_SIZE / 2
        box = pb.createCollisionShape(pb.GEOM_BOX, halfExtents=[half] * 3, physicsClientId=c)
        self._blocks, self._targets = [], []
        for color in ([0.2, 0.4, 0.9, 1], [0.9, 0.3, 0.2, 1]):
            vis = pb.createVisualShape(pb.GEOM_BOX, halfExtents=[half] * 3, rgbaColor=color,
                                             physicsClientId=c)
            self._blocks.append(pb.createMultiBody(0.1, box, vis, basePosition=[0, 0, half], physicsClientId=c))
        for color in ([0.3, 0.8, 0.3, 1], [0.6, 0.9, 0.4, 1]):
            vis = pb.createVisualShape(pb.GEOM_BOX, halfExtents=[TARGET_SIZE / 2] * 2 + [0.0005],
                                             rgbaColor=color, physicsClientId=c)
            self._targets.append(pb.createMultiBody(0, -1, vis, basePosition=[0, 0, 0.001], physicsClientId=c))
        for body in [self._table, *self._blocks]:
            pb.changeDynamics(body, -1, lateralFriction=0.5, physicsClientId=c)
        cyl = pb.createCollisionShape(pb.GEOM_CYLINDER, radius=EFFECTOR_RADIUS, height=_EFFECTOR_LENGTH,
                                            physicsClientId=c)
        cyl_vis = pb.createVisualShape(pb.GEOM_CYLINDER, radius=EFFECTOR_RADIUS, length=_EFFECTOR_LENGTH,
                                             rgbaColor=[0.2, 0.2, 0.2, 1], physicsClientId=c)
        start = [*EFFECTOR_START, _EFFECTOR_Z]
        self._effector = pb.createMultiBody(1.0, cyl, cyl_vis, basePosition=start, physicsClientId=c)
        pb.changeDynamics(self._effector, -1, lateralFriction=0.5, physicsClientId=c)
        # The effector hovers above the table: only the blocks touch it.
        pb.setCollisionFilterPair(self._effector, self._table, -1, -1, 0, physicsClientId=c)
        self._holder = pb.createConstraint(self._effector, -1, -1, -1, pb.JOINT_FIXED, [0, 0, 0],
                                                 [0, 0, 0], start, physicsClientId=c)
        pb.changeConstraint(self._holder, start, maxForce=200.0, physicsClientId=c)
        self._built = True

    def _place(self) -> None:
        pb = self._pb
        rng, c = self._rng, self._client
        for _ in range(_MAX_RESET_TRIES):
            xy = [np.array([0.4 + rng.uniform(-0.1, 0.1), -0.2 + rng.uniform(-0.15, 0.15)]) for _ in BLOCKS]
            if np.linalg.norm(xy[0] - xy[1]) > MIN_BLOCK_DIST:
                break
        else:  # pragma: no cover - the acceptance rate is high
            raise RuntimeError("could not place the blocks apart")
        for body, p in zip(self._blocks, xy):
            quat = pb.getQuaternionFromEuler([0, 0, rng.uniform(0, math.pi)])
            pb.resetBasePositionAndOrientation(body, [*p, BLOCK_SIZE / 2], quat, physicsClientId=c)
        side = 0.12 * rng.choice([-1.0, 1.0])            # which target is on the left
        self._target_pose = []
        for body, dx in zip(self._targets, (side, -side)):
            p = np.array([0.4 + dx + rng.uniform(-0.005, 0.005), 0.2 + rng.uniform(-0.0075, 0.0075)])
            yaw = math.pi + rng.uniform(-math.pi / 30, math.pi / 30)
            pb.resetBasePositionAndOrientation(body, [*p, 0.001], pb.getQuaternionFromEuler([0, 0, yaw]),
                                                     physicsClientId=c)
            self._target_pose.append((p, yaw % math.pi))

    # -- gymnasium API -------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        pb = self._pb
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(int(seed))
        self._build()
        self._place()
        for _ in range(SIM_HZ // CONTROL_HZ):           # let the blocks settle on the table
            pb.stepSimulation(physicsClientId=self._client)
        self._effector_target = EFFECTOR_START.copy()
        self._steps = 0
        self._p1 = self._p2 = False
        self._modes = ModeTracker(self.goal_tolerance)
        obs = self._observe()
        return obs, self._info(obs)

    def step(self, action):
        pb = self._pb
        if not self._built:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            raise ValueError(f"action must be 2 finite numbers (effector target x, y in m), got {action!r}")
        start = self._effector_target
        goal = np.clip(a, WORKSPACE_BOUNDS[0], WORKSPACE_BOUNDS[1])
        n = SIM_HZ // CONTROL_HZ
        for k in range(1, n + 1):                       # the pivot moves in a straight line over the step
            pivot = start + (goal - start) * (k / n)
            pb.changeConstraint(self._holder, [*pivot, _EFFECTOR_Z], maxForce=200.0, physicsClientId=self._client)
            pb.stepSimulation(physicsClientId=self._client)
        self._effector_target = goal
        self._steps += 1
        obs = self._observe()
        info = self._info(obs)
        reward = P2_SCORE if self._p2 else (P1_SCORE if self._p1 else 0.0)
        return obs, reward, bool(self._p2), self._steps >= self.max_steps and not self._p2, info

    def _observe(self) -> np.ndarray:
        pb = self._pb
        c = self._client
        obs = np.zeros(OBS_DIM, np.float64)
        for name, body in zip(BLOCKS, self._blocks):
            pos, quat = pb.getBasePositionAndOrientation(body, physicsClientId=c)
            obs[OBS_SLICES[f"{name}_translation"]] = pos[:2]
            obs[OBS_SLICES[f"{name}_orientation"]] = _yaw_of(quat)
        obs[OBS_SLICES["effector_translation"]] = pb.getBasePositionAndOrientation(
            self._effector, physicsClientId=c)[0][:2]
        obs[OBS_SLICES["effector_target_translation"]] = self._effector_target
        for name, (p, yaw) in zip(TARGETS, self._target_pose):
            obs[OBS_SLICES[f"{name}_translation"]] = p
            obs[OBS_SLICES[f"{name}_orientation"]] = yaw
        return obs.astype(np.float32)

    def _info(self, obs: np.ndarray) -> dict:
        modes = self._modes.update(obs)
        inside = self._modes.inside                      # [block, target] now
        self._p1 = self._p1 or bool(inside.any())
        # success: each block inside a different target (the targets are 0.24 m apart, more than twice the tolerance)
        self._p2 = self._p2 or bool((inside[0, 0] and inside[1, 1]) or (inside[0, 1] and inside[1, 0]))
        return {"p1": self._p1, "p2": self._p2, "is_success": self._p2, "first_block": self._modes.first_block,
                **modes, "in_target": inside.any(1).tolist(), "steps": self._steps}

    def render(self, size: int = 256) -> np.ndarray:
        """uint8 [size, size, 3], the table seen from straight above, +x up (pybullet's CPU renderer)."""
        pb = self._pb
        c = self._client
        view = pb.computeViewMatrix([0.425, 0.0, 1.25], [0.425, 0.0, 0.0], [1, 0, 0], physicsClientId=c)
        proj = pb.computeProjectionMatrixFOV(48, 1.0, 0.05, 3.0, physicsClientId=c)
        _, _, rgba, _, _ = pb.getCameraImage(size, size, view, proj, renderer=pb.ER_TINY_RENDERER,
                                                   physicsClientId=c)
        return np.asarray(rgba, np.uint8).reshape(size, size, 4)[:, :, :3].copy()

    def close(self) -> None:
        pb = self._pb
        if self._client is not None and pb.isConnected(self._client):
            pb.disconnect(self._client)
        self._client = None
