"""Franka Kitchen (Gupta et al. 2019, "Relay Policy Learning"), as Diffusion Policy's ``kitchen_lowdim`` task uses
it, on gymnasium-robotics' ``FrankaKitchen-v1`` (MuJoCo 3 bindings) instead of D4RL's mujoco-py copy.

Facts taken from Diffusion Policy's ``kitchen_lowdim`` config and runner and the D4RL/adept kitchen env it wraps
(``KitchenAllV0``), and from gymnasium-robotics 1.4.2's ``franka_kitchen`` (no code copied):

* a 9-DoF Franka arm (7 joints + 2 fingers) in front of a kitchen with seven subtasks (``TASKS``): microwave door,
  kettle onto the top-left burner, bottom and top burner knobs, light switch, slide cabinet, hinge cabinet. A
  subtask is complete once the L2 distance of its object joints to the goal (``TASK_GOALS``) is below 0.3; it then
  counts for the rest of the episode. Any order counts; the episode ends when all seven are done or at 280 steps;
* action: 9 joint velocities in [-1, 1], scaled by 2 (rad/s, m/s for the fingers); each step the position servos
  are sent ``last observed (noisy) joint position + velocity * dt``, dt = 40 substeps of 2 ms = 0.08 s (12.5 Hz);
* every episode starts from the same state (the arm at D4RL's ``init_qpos``, doors closed, kettle on the
  bottom-left burner): seeds differ only in observation noise, which also enters the control through the noisy
  "last observed position" above. Diffusion Policy sets ``robot_noise_ratio = 0.1``: uniform noise of
  +-0.1 x the config's ``pos_noise_amp`` on the robot's and the objects' joint positions;
* observation (60 numbers, Diffusion Policy's ``obs_dim: 60``): the robot's 9 joint positions, the objects' 21
  joint positions (kettle: xyz + quaternion), then D4RL's 30-d goal, which is all zeros because the env masks it
  (``goal_masking=True``). No velocities;
* score: Diffusion Policy's ``mean_score`` is the number of completed subtasks / 7, and ``p_k`` the share of
  episodes that completed at least k (Table 7 of the drifting paper reports p1..p4).

What differs from Diffusion Policy's env, and why (see also envs/README.md):

* simulator: gymnasium-robotics' port of the kitchen (its own MJCF, MuJoCo 3.3) instead of D4RL/adept on
  mujoco-py + dm_control, which cannot be installed here. Same objects, goals, thresholds, joint limits, action
  scaling and control rate; contact parameters and meshes are the port's.
* object noise: gymnasium-robotics scales it by a separate ``object_noise_ratio`` and indexes the amplitude
  table one entry off; here the port's object noise is off and this wrapper adds D4RL's
  (``robot_noise_ratio`` x amplitudes of config entries 9..29) from the episode's seed.
* completion is checked on the true object joint positions (gymnasium-robotics) rather than on the noisy
  observed ones (D4RL); the noise is at most 0.01, against a 0.3 threshold.
* the 30 goal numbers are kept as zeros so the observation is DP's 60-d layout; they carry no information.
* the data are not DP's (566 human demonstrations, not usable here) but a scripted demonstrator's
  (``drift_policy.data.kitchen``), which completes 4 subtasks per episode.

Install with ``pip install -e ".[kitchen]"``; headless (no renderer is created unless ``render`` is called,
which needs ``MUJOCO_GL=egl`` or ``osmesa``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

if sys.platform.startswith("linux"):
    # Headless rendering by default (as envs/robomimic.py); MuJoCo reads this once, when it is first imported.
    os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

__all__ = ["KitchenEnv", "TASKS", "TASK_QPOS", "TASK_GOALS", "TASK_FLAGS", "COMPLETE_THRESH", "OBS_DIM", "ACTION_DIM",
           "OBS_SLICES", "MAX_STEPS", "CONTROL_HZ", "ROBOT_NOISE_RATIO", "N_SCORE", "P_LEVELS", "completed_tasks"]

# The seven subtasks in D4RL's order, the object qpos indices each is judged on, and their goals.
TASKS = ("bottom burner", "top burner", "light switch", "slide cabinet", "hinge cabinet", "microwave", "kettle")
TASK_QPOS = {"bottom burner": (11, 12), "top burner": (15, 16), "light switch": (17, 18), "slide cabinet": (19,),
             "hinge cabinet": (20, 21), "microwave": (22,), "kettle": (23, 24, 25, 26, 27, 28, 29)}
TASK_GOALS = {"bottom burner": (-0.88, -0.01), "top burner": (-0.92, -0.01), "light switch": (-0.69, -0.05),
              "slide cabinet": (0.37,), "hinge cabinet": (0.0, 1.45), "microwave": (-0.75,),
              "kettle": (-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06)}
TASK_FLAGS = {t: "done_" + t.replace(" ", "_") for t in TASKS}   # per-episode flags: which subtasks were completed
COMPLETE_THRESH = 0.3
N_SCORE = 7                       # mean_score = completed subtasks / 7 (Diffusion Policy's)
N_ROBOT, N_OBJ, N_GOAL = 9, 21, 30
OBS_DIM, ACTION_DIM = N_ROBOT + N_OBJ + N_GOAL, 9
OBS_SLICES = {"robot_qpos": slice(0, 9), "object_qpos": slice(9, 30), "goal": slice(30, 60)}
MAX_STEPS = 280
CONTROL_HZ = 12.5
ROBOT_NOISE_RATIO = 0.1           # Diffusion Policy's runner (gymnasium-robotics' default is 0.01)
P_LEVELS = (1, 2, 3, 4)           # episode flags p1..p4: at least k subtasks completed


def completed_tasks(qpos: np.ndarray, tasks=TASKS) -> list[str]:
    """The subtasks among ``tasks`` whose object joints in ``qpos`` (the full 30-d qpos) are within the threshold."""
    qpos = np.asarray(qpos, np.float64)
    dist = {t: float(np.sqrt(np.sum(np.square(qpos[list(TASK_QPOS[t])] - np.asarray(TASK_GOALS[t])))))
            for t in tasks}      # elementwise and summed, not BLAS: the same bits with any thread count
    return [t for t in tasks if dist[t] < COMPLETE_THRESH]


def _port():
    """gymnasium-robotics' kitchen, imported when an env is made: the constants above serve the data loader."""
    try:
        from gymnasium_robotics.envs.franka_kitchen.kitchen_env import KitchenEnv as PortEnv
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(f"KitchenEnv needs gymnasium-robotics 1.4 ({e}); install it with "
                          '`pip install -e ".[kitchen]"`') from e
    return PortEnv


def _object_noise_amp(port_env) -> np.ndarray:
    """D4RL's object position noise amplitudes: franka_config.xml's pos_noise_amp of qpos9..qpos29."""
    import xml.etree.ElementTree as ET

    import gymnasium_robotics

    cfg = Path(gymnasium_robotics.__file__).parent / "envs/assets/kitchen_franka/franka_assets/franka_config.xml"
    root = ET.parse(cfg).getroot()
    return np.array([float(root.find(f"qpos{i}").get("pos_noise_amp")) for i in range(9, 9 + N_OBJ)])


class KitchenEnv(gym.Env):
    """Gymnasium env; observation float32 [60] (``OBS_SLICES``), action float32 [9] (joint velocities in [-1, 1]).

    ``reward``: the number of subtasks completed so far / 7, so an episode's maximum is Diffusion Policy's
    per-episode score. ``info`` after every reset/step: ``completed`` (subtask names in completion order; two in
    one step are listed in ``TASKS`` order), ``n_completed``, ``p1``..``p4`` (at least k completed),
    ``is_success`` (= p4, what each demonstration does) and one ``done_<subtask>`` flag per subtask. The episode
    terminates when all seven are complete, and truncates after ``max_steps``. ``sim`` exposes the MuJoCo
    (model, data) for scripted demonstrators (privileged state)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(self, max_steps: int = MAX_STEPS, robot_noise_ratio: float = ROBOT_NOISE_RATIO):
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if not 0.0 <= float(robot_noise_ratio) <= 1.0:
            raise ValueError(f"robot_noise_ratio must be in [0, 1], got {robot_noise_ratio}")
        self.max_steps, self.noise_ratio = int(max_steps), float(robot_noise_ratio)
        # The port's own object noise is off (see the module docstring); termination and completion are ours.
        self._env = _port()(tasks_to_complete=list(TASKS), terminate_on_tasks_completed=False,
                            remove_task_when_completed=False, object_noise_ratio=0.0,
                            robot_noise_ratio=self.noise_ratio)
        self.model, self.data = self._env.model, self._env.data
        self.dt = float(self._env.robot_env.dt)
        self._obj_amp = _object_noise_amp(self._env)
        self.observation_space = spaces.Box(-8.0, 8.0, (OBS_DIM,), np.float32)   # DP's bounds
        self.action_space = spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32)
        self._rng = np.random.default_rng()
        self._renderer = None
        self._steps = -1

    @property
    def sim(self):
        return self.model, self.data

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng([int(seed), 7])   # object noise; the port seeds the robot noise
        obs, _ = self._env.reset(seed=None if seed is None else int(seed))
        self._steps = 0
        self._completed: list[str] = []
        return self._observe(obs["observation"]), self._info()

    def step(self, action):
        if self._steps < 0:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape != (ACTION_DIM,) or not np.isfinite(a).all():
            raise ValueError(f"action must be {ACTION_DIM} finite joint velocities in [-1, 1], got {action!r}")
        obs, _, _, _, _ = self._env.step(np.clip(a, -1.0, 1.0))
        self._steps += 1
        for t in completed_tasks(self.data.qpos):
            if t not in self._completed:
                self._completed.append(t)
        info = self._info()
        terminated = len(self._completed) == len(TASKS)
        truncated = self._steps >= self.max_steps and not terminated
        return self._observe(obs["observation"]), len(self._completed) / N_SCORE, terminated, truncated, info

    def _observe(self, port_obs: np.ndarray) -> np.ndarray:
        out = np.zeros(OBS_DIM, np.float64)
        out[OBS_SLICES["robot_qpos"]] = port_obs[:N_ROBOT]                        # noisy, as the servo targets use
        out[OBS_SLICES["object_qpos"]] = (self.data.qpos[N_ROBOT:N_ROBOT + N_OBJ]
                                          + self.noise_ratio * self._obj_amp * self._rng.uniform(-1, 1, N_OBJ))
        return out.astype(np.float32)

    def _info(self) -> dict:
        n = len(self._completed)
        return {"completed": list(self._completed), "n_completed": n,
                **{f"p{k}": n >= k for k in P_LEVELS}, "is_success": n >= 4,
                **{TASK_FLAGS[t]: t in self._completed for t in TASKS}, "steps": self._steps}

    def render(self, size: int = 256) -> np.ndarray:
        """uint8 [size, size, 3] from the port's default viewpoint (needs an offscreen GL: MUJOCO_GL=egl/osmesa)."""
        import mujoco

        if self._renderer is None or self._renderer.height != size:
            self._renderer = mujoco.Renderer(self.model, size, size)
            self._camera = mujoco.MjvCamera()
            self._camera.distance, self._camera.azimuth, self._camera.elevation = 2.2, 70.0, -35.0
            self._camera.lookat[:] = (-0.2, 0.5, 2.0)
        self._renderer.update_scene(self.data, self._camera)
        return self._renderer.render().copy()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()
