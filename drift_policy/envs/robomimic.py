"""robomimic's manipulation tasks (Lift, Can, Square, Tool Hang) in robosuite, built from a dataset's env metadata.

Requirements and why:

* ``robosuite==1.5.2`` with ``mujoco==3.3.7``: robosuite 1.5.2 pins its MuJoCo bindings loosely, but mujoco 4
  crashes at ``env.reset()``; 3.3.7 is the newest version that works.
* We do not depend on the ``robomimic`` package: its 0.3.0 release pulls a CUDA build of torch and mujoco_py.
  What robomimic's ``EnvRobosuite`` does (build the env from ``data.attrs["env_args"]``, flip images, flatten
  the MuJoCo state) is reimplemented here.
* robomimic v0.1 datasets were written by robosuite 1.2, whose ``controller_configs`` is a single OSC_POSE
  part config acting in the world frame. robosuite 1.5 wants a composite config and defaults the OSC's
  ``input_ref_frame`` to the robot base; ``convert_controller_config`` maps the old dict to the new format with
  ``input_ref_frame="world"`` so delta and absolute actions mean what they meant when the data was recorded.
* Headless rendering uses ``MUJOCO_GL=egl`` (set as the default here; EGL works with Mesa's software
  renderer, ``libegl1`` + ``libgl1-mesa-dri`` on Debian/Ubuntu). ``osmesa`` needs ``libosmesa6``.

Install with ``pip install -e ".[robomimic]"``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from typing import Any, Sequence

if sys.platform.startswith("linux"):
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless by default; must be set before mujoco is imported

import numpy as np  # noqa: E402

try:  # noqa: E402
    import robosuite
    from robosuite import macros as _rs_macros
    from robosuite.controllers.composite.composite_controller_factory import (
        is_part_controller_config,
        load_composite_controller_config,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        f"drift_policy.envs.robomimic needs robosuite 1.5.2 and mujoco 3.3.7 ({e}); "
        'install them with `pip install -e ".[robomimic]"`'
    ) from e

__all__ = [
    "TASK_ENV_NAMES",
    "MAX_STEPS",
    "RobomimicEnv",
    "default_env_meta",
    "convert_controller_config",
    "robosuite_obs_key",
    "camera_name",
    "rot6d_to_matrix",
    "matrix_to_rot6d",
    "offscreen_renderer_error",
]

TASK_ENV_NAMES = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare", "tool_hang": "ToolHang"}
MAX_STEPS = {"lift": 400, "can": 400, "square": 400, "tool_hang": 700}

# robomimic v0.1's OSC_POSE config (robosuite 1.2 format), as stored in its datasets' env_args.
OSC_POSE_V01 = {
    "type": "OSC_POSE",
    "input_max": 1,
    "input_min": -1,
    "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5],
    "kp": 150,
    "damping": 1,
    "impedance_mode": "fixed",
    "kp_limits": [0, 300],
    "damping_limits": [0, 10],
    "position_limits": None,
    "orientation_limits": None,
    "uncouple_pos_ori": True,
    "control_delta": True,
    "interpolation": None,
    "ramp_ratio": 0.2,
}


def offscreen_renderer_error() -> str | None:
    """None when MuJoCo can open an offscreen OpenGL context with the ``MUJOCO_GL`` backend (what camera
    observations and ``render`` need), else the reason. Lets callers (and the tests) tell "no renderer on this
    machine" apart from every other failure."""
    try:
        import mujoco

        ctx = mujoco.GLContext(8, 8)
        ctx.make_current()
        ctx.free()
    except Exception as e:  # missing libEGL / libOSMesa / display: each backend fails its own way
        return f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}: {type(e).__name__}: {e}"
    return None


def default_env_meta(task: str) -> dict:
    """env_args as robomimic v0.1 stores them for ``task`` (robosuite 1.2 style controller config)."""
    if task not in TASK_ENV_NAMES:
        raise ValueError(f"unknown robomimic task {task!r}; expected one of {sorted(TASK_ENV_NAMES)}")
    return {
        "env_name": TASK_ENV_NAMES[task],
        "type": 1,  # robomimic's EnvType.ROBOSUITE_TYPE
        "env_kwargs": {
            "has_renderer": False,
            "has_offscreen_renderer": False,
            "ignore_done": True,
            "use_object_obs": True,
            "use_camera_obs": False,
            "control_freq": 20,
            "controller_configs": copy.deepcopy(OSC_POSE_V01),
            "robots": ["Panda"],
            "camera_depths": False,
            "camera_heights": 84,
            "camera_widths": 84,
            "reward_shaping": False,
        },
    }


def convert_controller_config(cfg: dict, robot: str = "Panda", abs_action: bool = False) -> dict:
    """A robosuite 1.5 composite controller config from either format.

    An old (robosuite <= 1.4) part config becomes the robot's default composite config with the arm replaced:
    ``damping``/``damping_limits`` are renamed ``damping_ratio``/``damping_ratio_limits``, ``control_delta``
    becomes ``input_type`` and the reference frame is the world, as in robosuite 1.2. ``abs_action`` switches
    the arm to absolute targets (position + axis-angle, world frame).
    """
    cfg = copy.deepcopy(cfg)
    if is_part_controller_config(cfg):
        part = cfg
        if "damping" in part:
            part.setdefault("damping_ratio", part.pop("damping"))
        if "damping_limits" in part:
            part.setdefault("damping_ratio_limits", part.pop("damping_limits"))
        if "control_delta" in part:
            part.setdefault("input_type", "delta" if part.pop("control_delta") else "absolute")
        part.setdefault("input_ref_frame", "world")
        part["gripper"] = {"type": "GRIP"}
        cfg = load_composite_controller_config(robot=robot)
        cfg["body_parts"]["right"] = part
    if "body_parts" not in cfg:
        raise ValueError(f"controller_configs is neither a part nor a composite config: {json.dumps(cfg)[:200]}")
    if abs_action:
        for name, part in cfg["body_parts"].items():
            if isinstance(part, dict) and part.get("type") == "OSC_POSE":
                part["input_type"] = "absolute"
                part["input_ref_frame"] = "world"
    return cfg


def robosuite_obs_key(key: str) -> str:
    """robomimic's low-dim key -> robosuite's observation key ("object" is robosuite's "object-state")."""
    return "object-state" if key == "object" else key


def camera_name(image_key: str) -> str:
    """``agentview_image`` -> ``agentview``, ``robot0_eye_in_hand_image`` -> ``robot0_eye_in_hand``."""
    if not image_key.endswith("_image"):
        raise ValueError(f"image key {image_key!r} must end with '_image' (e.g. 'agentview_image')")
    return image_key[: -len("_image")]


def rot6d_to_matrix(rot6d: np.ndarray) -> np.ndarray:
    """[..., 6] (first two columns of R, column-major: c1 then c2) -> [..., 3, 3] via Gram-Schmidt."""
    rot6d = np.asarray(rot6d, dtype=np.float64)
    a1, a2 = rot6d[..., :3], rot6d[..., 3:6]
    b1 = a1 / np.linalg.norm(a1, axis=-1, keepdims=True)
    a2 = a2 - np.sum(b1 * a2, axis=-1, keepdims=True) * b1
    b2 = a2 / np.linalg.norm(a2, axis=-1, keepdims=True)
    b3 = np.cross(b1, b2)
    return np.stack([b1, b2, b3], axis=-1)


def matrix_to_rot6d(mat: np.ndarray) -> np.ndarray:
    """[..., 3, 3] -> [..., 6]: the first column then the second column."""
    mat = np.asarray(mat, dtype=np.float64)
    return np.concatenate([mat[..., :, 0], mat[..., :, 1]], axis=-1)


def _matrix_to_rotvec(mat: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(mat).as_rotvec()


class RobomimicEnv:
    """A robosuite task as robomimic evaluates it, with gymnasium-style ``reset``/``step`` and dict observations.

    Observation: ``{"obs": float32 [D] (obs_keys concatenated in order), <image_key>: uint8 [3, H, W]}`` with
    images oriented like robomimic's stored images. ``abs_action=True`` takes 10-d absolute actions
    (world-frame eef target position 3, rotation 6-D 6, gripper 1) instead of robomimic's 7-d deltas.
    """

    def __init__(
        self,
        env_meta: dict,
        obs_keys: Sequence[str],
        image_keys: Sequence[str] = (),
        image_size: int = 84,
        max_steps: int = 400,
        *,
        abs_action: bool = False,
        render: bool = False,
        hard_reset: bool = False,
    ) -> None:
        if not isinstance(env_meta, dict) or "env_name" not in env_meta:
            raise ValueError(f"env_meta must be a dict with 'env_name' and 'env_kwargs', got {env_meta!r:.200}")
        if int(max_steps) <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")
        self.env_meta = copy.deepcopy(env_meta)
        self.obs_keys = list(obs_keys)
        self.image_keys = list(image_keys)
        self.image_size = int(image_size)
        self.max_steps = int(max_steps)
        self.abs_action = bool(abs_action)
        self._render_enabled = bool(render)
        kwargs = dict(self.env_meta.get("env_kwargs", {}))
        robots = kwargs.get("robots", ["Panda"])
        robots = [robots] if isinstance(robots, str) else list(robots)
        kwargs["robots"] = robots
        if "controller_configs" in kwargs and kwargs["controller_configs"] is not None:
            kwargs["controller_configs"] = convert_controller_config(
                kwargs["controller_configs"], robots[0], abs_action=self.abs_action)
        else:
            kwargs["controller_configs"] = convert_controller_config(OSC_POSE_V01, robots[0], self.abs_action)
        cams = [camera_name(k) for k in self.image_keys]
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=bool(cams) or self._render_enabled,
            use_camera_obs=bool(cams),
            ignore_done=True,
            reward_shaping=False,
            control_freq=20,
            hard_reset=hard_reset,
        )
        # robosuite draws model parameters (e.g. Lift's cube size) from env.rng at construction: fix them so
        # every env built from the same metadata has the same model (reset(seed) reseeds placements).
        kwargs.setdefault("seed", 0)
        if cams:
            kwargs.update(camera_names=cams, camera_heights=self.image_size, camera_widths=self.image_size,
                          camera_depths=False)
        else:
            for k in ("camera_names", "camera_heights", "camera_widths", "camera_depths", "camera_segmentations"):
                kwargs.pop(k, None)
        try:
            self._env = robosuite.make(self.env_meta["env_name"], **kwargs)
        except Exception as e:
            raise ValueError(f"could not create robosuite env {self.env_meta['env_name']!r} from env_meta: {e}") from e
        self._flip = _rs_macros.IMAGE_CONVENTION == "opengl"  # robomimic stores images upright (opencv order)
        self.action_dim = 10 if self.abs_action else int(self._env.action_dim)
        self._elapsed = 0
        raw = self._env.reset()
        self.last_raw_obs: dict[str, Any] = raw  # robosuite's full observation dict, for scripted demonstrators
        missing = [k for k in self.obs_keys if robosuite_obs_key(k) not in raw]
        if missing:
            available = sorted(raw)
            self.close()
            raise ValueError(f"obs keys {missing} not in {self.env_meta['env_name']}'s observations {available}")
        self.obs_dim = int(sum(np.asarray(raw[robosuite_obs_key(k)]).size for k in self.obs_keys))

    @property
    def unwrapped(self):
        """The robosuite env."""
        return self._env

    def _obs(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
        out = {"obs": np.concatenate(
            [np.asarray(raw[robosuite_obs_key(k)], dtype=np.float32).reshape(-1) for k in self.obs_keys]
        ) if self.obs_keys else np.zeros(0, np.float32)}
        for k in self.image_keys:
            img = np.asarray(raw[k])
            if self._flip:
                img = img[::-1]
            out[k] = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.uint8, copy=False)
        return out

    def _raw_obs(self) -> dict[str, Any]:
        return self._env._get_observations(force_update=True)

    def reset(self, seed: int | None = None) -> tuple[dict[str, np.ndarray], dict]:
        """Reset; a given seed fixes the initial placement (robosuite draws it from ``env.rng``)."""
        if seed is not None:
            # the placement samplers hold a reference to env.rng, so reseed it in place
            self._env.rng.bit_generator.state = np.random.default_rng(int(seed)).bit_generator.state
        raw = self._env.reset()
        self.last_raw_obs = raw
        self._elapsed = 0
        return self._obs(raw), {"success": False, "elapsed_steps": 0}

    def _to_env_action(self, action: np.ndarray) -> np.ndarray:
        if not self.abs_action:
            return action
        rotvec = _matrix_to_rotvec(rot6d_to_matrix(action[3:9]))
        return np.concatenate([action[:3], rotvec, action[9:10]])

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        """Apply one 20 Hz action; ``terminated`` is task success, ``truncated`` is ``max_steps`` reached."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action}")
        raw, reward, _, _ = self._env.step(self._to_env_action(action))
        self.last_raw_obs = raw
        self._elapsed += 1
        success = bool(self._env._check_success())
        info = {"success": success, "elapsed_steps": self._elapsed}
        return self._obs(raw), float(reward), success, self._elapsed >= self.max_steps, info

    def is_success(self) -> bool:
        return bool(self._env._check_success())

    def get_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), as robomimic stores in ``states``."""
        return np.array(self._env.sim.get_state().flatten())

    def reset_to(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Set the flattened MuJoCo state (as robomimic's ``reset_to``) and return its observation."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        expected = self.get_state().shape[0]
        if state.shape[0] != expected:
            raise ValueError(
                f"state must have {expected} numbers for {self.env_meta['env_name']}, got {state.shape[0]}")
        self._env.sim.set_state_from_flattened(state)
        self._env.sim.forward()
        if hasattr(self._env, "update_state"):
            self._env.update_state()
        self._elapsed = 0
        self.last_raw_obs = self._raw_obs()
        return self._obs(self.last_raw_obs)

    def render(self, size: int = 256) -> np.ndarray:
        """uint8 [size, size, 3] upright frame from the agentview camera (needs ``render=True`` or image keys)."""
        if not self._env.has_offscreen_renderer:
            raise RuntimeError("RobomimicEnv.render needs the offscreen renderer: create the env with render=True")
        img = self._env.sim.render(width=size, height=size, camera_name="agentview")
        img = img[::-1] if self._flip else img
        return np.ascontiguousarray(img).astype(np.uint8, copy=False)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            try:
                env.close()
            except Exception:  # closing a headless renderer twice raises in some mujoco builds
                pass
            self._env = None
