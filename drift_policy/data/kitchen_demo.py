"""The scripted Franka Kitchen demonstrator: privileged state, damped-least-squares IK, 4 subtasks per episode.

Each subtask is a short script of tool-point waypoints (the point between the finger pads) and gripper targets,
placed relative to the object's current state: the microwave's handle is pinched from above and pulled round
its hinge; the kettle's handle is pinched from behind and above, the kettle carried to the top-left burner; a
burner knob is turned like a wrench (the open fingers straddle its bar, the wrist rolls); the light switch's lever
and the slide cabinet's handle are pushed sideways with the closed fingers. A commanded pose moves toward the
current waypoint at a bounded speed; IK (damped least squares on ``mj_jacSite``, a null-space pull toward a
reference posture and away from joint limits) turns it into joint targets, limited per step (``DQ``) so the
damped position servos can follow. The action makes the env's servo target (last observed position + 0.16 x
action) equal to that joint target plus a gravity feed-forward and a lag term: the task's joint-velocity action.
For each subtask the gripper's roll (the symmetric grasp or the same grasp turned half a turn) is chosen to keep
the wrist's roll joint inside its range.

Per episode the demonstrator draws (from its own generator, seeded by the episode seed): the subtask order (see
``ORDERS``), a speed factor (0.9-1.1) and millimetre offsets of its waypoints. Its success on the evaluation
seeds is measured by ``python -m drift_policy.data.kitchen demo-eval``
(eval/results/kitchen_lowdim/default/kitchen_demonstrator.json).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..envs.kitchen import ACTION_DIM, TASK_GOALS, TASK_QPOS

__all__ = ["DEMO_TASKS", "ORDERS", "KitchenDemonstrator", "draw_order"]

# The subtasks the demonstrator performs, and the orders it draws from (uniformly): every ordered choice of 4 of
# them, so episodes differ in which subtasks they do and in what order, as the human demonstrations did.
DEMO_TASKS = ("microwave", "kettle", "bottom burner", "top burner", "light switch", "slide cabinet")
ORDERS = tuple(itertools.permutations(DEMO_TASKS, 4))
OPEN, CLOSED = 0.04, 0.0
# Gripper orientations (columns: the end_effector site's x, y = finger axis, z = approach axis, in world frame).
R_FWD = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])     # pointing +y (at the kitchen), fingers along x
MICROWAVE_HINGE = np.array([-1.128, 0.455])   # the door's vertical hinge axis (x, y)


def draw_order(rng: np.random.Generator) -> tuple[str, ...]:
    return ORDERS[int(rng.integers(len(ORDERS)))]


# Small products by einsum and square roots, not BLAS: OpenBLAS rounds some tiny products differently with
# different thread counts, and a 1-ulp difference grows, over an episode of contacts, into another trajectory.
def _mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,jk->ik", a, b)


def _mv(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("ij,j->i", a, v)


def _dot(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.einsum("i,i->", u, v))


def _norm(v: np.ndarray) -> float:
    return math.sqrt(_dot(v, v))


def _rotvec(R: np.ndarray) -> np.ndarray:
    """Rotation vector (axis x angle) of a rotation matrix."""
    import mujoco

    q = np.zeros(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(R, dtype=np.float64).reshape(-1))
    v = np.zeros(3)
    mujoco.mju_quat2Vel(v, q, 1.0)
    return v


def _rot(axis, angle: float) -> np.ndarray:
    """Rotation matrix about ``axis`` by ``angle`` (rad)."""
    axis = np.asarray(axis, np.float64)
    n = _norm(axis)
    if n < 1e-12 or abs(angle) < 1e-12:
        return np.eye(3)
    k = axis / n
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(angle) * K + (1 - np.cos(angle)) * _mm(K, K)


# The kettle's and the microwave's handles are low and near the arm's reach limits: the gripper comes at them from
# above, pitched down by PITCH about its finger axis, which keeps the joints away from their limits (checked along
# the two subtasks' waypoints with the IK below, from every other subtask's end).
PITCH = 0.8
# kettle: pointing +y and down, fingers in the y-z plane (above and below the horizontal handle bar)
R_KETTLE = _mm(_rot([1.0, 0.0, 0.0], -PITCH), np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
# microwave: along the door's normal (the door faces 0.3 rad to the left) and down, fingers horizontal
R_MICRO = _mm(_mm(_rot([np.cos(0.3), np.sin(0.3), 0.0], -PITCH), _rot([0.0, 0.0, 1.0], 0.3)), R_FWD)


class _Arm:
    """Kinematics of the arm on a scratch copy of the state (the env's own data is never written)."""

    TOOL = 0.02          # tool point: this far along the gripper axis from the end_effector site (finger pads)
    POSTURE_GAIN = 0.1   # null-space pull toward the rest posture (per IK iteration)
    MARGIN = 0.25        # joint-limit distance (rad) under which the null space pushes the joint back

    def __init__(self, model, data):
        import mujoco

        self.mj, self.m, self.d = mujoco, model, data
        self.s = mujoco.MjData(model)
        self.site = model.site("end_effector").id
        self.lo, self.hi = model.jnt_range[:7, 0] + 0.01, model.jnt_range[:7, 1] - 0.01
        # Null-space reference posture: of random postures, the one from which the IK followed every subtask's
        # waypoints with the most joint-limit clearance (a one-off search, not repeated at run time).
        self.rest = np.array([1.15, -0.93, 1.13, -2.27, -0.43, -0.19, 0.67])
        self.kp = model.actuator_gainprm[:7, 0].copy()
        self.jp, self.jr = np.zeros((3, model.nv)), np.zeros((3, model.nv))
        self.bias = np.zeros(model.nv)

    def _set(self, q: np.ndarray) -> None:
        s = self.s
        s.qpos[:] = self.d.qpos
        s.qpos[:7] = q
        s.qvel[:] = 0.0
        self.mj.mj_kinematics(self.m, s)
        self.mj.mj_comPos(self.m, s)

    def fk(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._set(q)
        R = self.s.site_xmat[self.site].reshape(3, 3).copy()
        return self.s.site_xpos[self.site] + R[:, 2] * self.TOOL, R

    def ik(self, q: np.ndarray, p_t: np.ndarray, R_t: np.ndarray, iters: int = 4, lam: float = 0.03) -> np.ndarray:
        """Damped least squares toward (p_t, R_t) from q, with a null-space pull toward ``rest``. A joint at a
        limit that the step would push further is taken out of that step (its column zeroed), so the others
        make up for it instead of the solver stalling."""
        q = q.copy()
        for _ in range(iters):
            p, R = self.fk(q)
            e = np.concatenate([p_t - p, _rotvec(_mm(R_t, R.T))])
            if _dot(e[:3], e[:3]) < 1e-8 and _dot(e[3:], e[3:]) < 1e-6:
                break
            self.mj.mj_jacSite(self.m, self.s, self.jp, self.jr, self.site)
            jr = self.jr[:, :7]
            J = np.vstack([self.jp[:, :7] - np.cross(R[:, 2] * self.TOOL, jr, axis=0), jr])
            free = np.ones(7, bool)
            for _pass in range(2):
                Jf = J * free
                chol = _mm(Jf, Jf.T)
                chol[np.diag_indices(6)] += lam * lam
                self.mj.mju_cholFactor(chol, 0.0)
                dq = _mv(Jf.T, self._solve(chol, e))                      # J+ e
                sec = self._secondary(q) * free                           # + (I - J+ J) secondary
                dq += sec - _mv(Jf.T, self._solve(chol, _mv(Jf, sec)))
                stuck = ((q <= self.lo + 1e-6) & (dq < 0)) | ((q >= self.hi - 1e-6) & (dq > 0))
                if not (stuck & free).any():
                    break
                free &= ~stuck
            q = np.clip(q + dq, self.lo, self.hi)
        return q

    def _secondary(self, q: np.ndarray) -> np.ndarray:
        """Null-space motion: toward the rest posture, and away from a joint limit closer than ``MARGIN``."""
        near_lo = np.clip(self.lo + self.MARGIN - q, 0.0, None)
        near_hi = np.clip(q - (self.hi - self.MARGIN), 0.0, None)
        return self.POSTURE_GAIN * (self.rest - q) + 0.5 * (near_lo - near_hi)

    def _solve(self, chol: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = np.zeros(len(v))
        self.mj.mju_cholSolve(out, chol, np.ascontiguousarray(v, dtype=np.float64))
        return out

    def gravity(self, q: np.ndarray) -> np.ndarray:
        """Joint-target offset that cancels gravity at posture q (the servos are pure P controllers)."""
        self._set(q)
        self.mj.mj_comVel(self.m, self.s)
        self.mj.mj_rne(self.m, self.s, 0, self.bias)
        return self.bias[:7] / self.kp


class KitchenDemonstrator:
    """``act(obs)`` -> action [9] for a ``KitchenEnv`` episode; reads the env's MuJoCo state (privileged).

    ``order``: the subtasks to do, in order (default: drawn with ``draw_order``). ``done`` is True once the
    script has run out (the demonstrator then holds still)."""

    # Joint-target change per step (rad): the servos' damping lets the shoulder and elbow follow about 1 rad/s,
    # the wrist (a tenth of the damping) nearly twice that.
    DQ = np.array([0.085, 0.085, 0.085, 0.085, 0.15, 0.15, 0.15])
    KL = 1.0             # lag compensation: servo target += KL x (joint target - true joint position)
    SPEED = 0.55         # tool speed (m/s) between waypoints
    WSPEED = 2.0         # rotation speed (rad/s)
    STILL = 0.15         # joint speed (rad/s) under which the arm counts as settled
    KNOB_ROLL = 1.7      # gripper roll (rad) that turns a burner knob past its goal: ~0.55 of play, then the knob

    def __init__(self, env, rng: np.random.Generator, order: tuple[str, ...] | None = None):
        self.rng = rng
        self.order = tuple(order) if order is not None else draw_order(rng)
        unknown = [t for t in self.order if t not in DEMO_TASKS]
        if unknown:
            raise ValueError(f"the demonstrator cannot do {unknown}; it does {list(DEMO_TASKS)}")
        self.env = env
        self.m, self.d = env.sim
        self.speed = self.SPEED * float(rng.uniform(0.9, 1.1))
        self.arm = _Arm(self.m, self.d)
        self.qc = self.d.qpos[:7].copy()
        self.pc, self.Rc = self.arm.fk(self.qc)
        self._script = self._run()
        self.done = False
        self.t = 0
        self.trace: list = []       # (step, primitive, argument) at the start of each primitive: for debugging
        self.target = (self.pc.copy(), self.Rc.copy(), OPEN, 1.0)

    # -- state helpers ---------------------------------------------------------------------------------------
    def _site(self, name: str) -> np.ndarray:
        return self.d.site_xpos[self.m.site(name).id].copy()

    def _q(self, idx: int) -> float:
        return float(self.d.qpos[idx])

    def _tool(self) -> np.ndarray:
        return self.arm.fk(self.d.qpos[:7])[0]

    def _jit(self, scale: float = 0.005) -> np.ndarray:
        return self.rng.uniform(-scale, scale, 3)

    # -- script primitives (generators of targets: (position, rotation, gripper, speed factor)) --------------
    def _move(self, p, R, grip=OPEN, tol=0.02, max_steps=40, speed=1.0, until=None, settle=False):
        """Go to (p, R); ends when the command is there and the tool within ``tol`` (with ``settle``: and the arm
        nearly still, so that a long swing does not carry it on), when ``until()`` holds, or after ``max_steps``.
        ``tol=0`` keeps commanding the pose until ``until()`` or ``max_steps`` (a push the arm may lag behind)."""
        p = np.asarray(p, np.float64)
        self.trace.append((self.t, "move", np.round(p, 3).tolist()))
        for _ in range(max_steps):
            if until is not None and until():
                return
            if (_norm(self.pc - p) < 1e-3 and _norm(_rotvec(_mm(R, self.Rc.T))) < 0.02
                    and _norm(self._tool() - p) < tol
                    and (not settle or np.abs(self.d.qvel[:7]).max() < self.STILL)):
                return
            yield p, R, grip, speed

    def _orient(self, R: np.ndarray, extra_roll: float = 0.0) -> np.ndarray:
        """R, or R turned half a turn about its approach axis (the same grasp with the fingers swapped), whichever
        leaves joint 7 (which rolls the gripper about that axis) farther from its limits, counting a roll of
        ``extra_roll`` the subtask will add (a knob's twist). Joint 7's change is predicted as the twist part of
        the rotation from the current command to R about the approach axis (after swinging that axis over)."""
        a, b = self.Rc[:, 2], R[:, 2]
        axis = np.cross(a, b)
        swing = _rot(axis, math.atan2(_norm(axis), _dot(a, b)))
        x1, x2 = _mv(swing, self.Rc[:, 0]), R[:, 0]
        twist = math.atan2(_dot(np.cross(x1, x2), b), _dot(x1, x2))
        q7 = self.qc[6] + twist
        q7_flipped = q7 - np.pi if twist > 0 else q7 + np.pi
        if max(abs(q7_flipped), abs(q7_flipped + extra_roll)) < max(abs(q7), abs(q7 + extra_roll)):
            return R * np.array([-1.0, -1.0, 1.0])
        return R

    def _grasp(self, p, R, max_steps: int = 8):
        """Close the gripper at (p, R) until the fingers stop (the damped finger servos take several steps)."""
        self.trace.append((self.t, "grasp", max_steps))
        for k in range(max_steps):
            if k >= 2 and np.abs(self.d.qvel[7:9]).max() < 0.01:
                return
            yield np.asarray(p, np.float64), R, CLOSED, 1.0

    def _hold(self, p, R, grip, steps: int):
        self.trace.append((self.t, "hold", grip))
        for _ in range(steps):
            yield np.asarray(p, np.float64), R, grip, 1.0

    # -- subtasks --------------------------------------------------------------------------------------------
    def _knob(self, task: str):
        # Turn the knob like a wrench: the open fingers straddle its bar, and the gripper rolls about the knob's
        # axis (world y). Once the bar's corners reach the fingers, the fingers' joint limits (not their damped
        # servos, as in a pinch, which slips) hold it, and the wrist's roll joint drives it.
        site = "knob2_site" if task == "bottom burner" else "knob4_site"
        joint = TASK_QPOS[task][0]
        goal = TASK_GOALS[task][0]
        c = self._site(site) + self._jit(0.003)
        at = c + [0.0, -0.015, 0.0]                  # finger tips short of the knob's base plate
        # The bottom knob is low enough that a level gripper needs the wrist's pitch joint at its limit: tilt it up.
        tilt = 0.45 if task == "bottom burner" else 0.0
        R = self._orient(_mm(_rot([1.0, 0.0, 0.0], tilt), R_FWD), extra_roll=self.KNOB_ROLL)
        front = at + [0.0, -0.1, 0.0]
        yield from self._move(front, R, OPEN, tol=0.01, settle=True)    # settled: the fingers must pass either side
        if self.qc[6] + self.KNOB_ROLL > self.arm.hi[6] - 0.1:          # too little roll left: turn the gripper
            for k in (1, 2):                                            # half a turn back first, in two quarters
                R = _mm(R, _rot([0.0, 0.0, 1.0], -np.pi / 2))
                yield from self._move(front, R, OPEN, tol=0.01, max_steps=14)
        turned = _mm(_rot([0.0, 1.0, 0.0], self.KNOB_ROLL), R)    # the knob's goal is a turn the other way about -y
        yield from self._move(at, R, OPEN, tol=0.008, max_steps=12, speed=0.6)
        yield from self._move(at, turned, OPEN, tol=0.0, max_steps=20, until=lambda: self._q(joint) < goal + 0.05)
        yield from self._move(self._tool() + [0.0, -0.1, 0.0], self.Rc.copy(), OPEN, tol=0.04, max_steps=8)

    def _light(self):
        lever = self._site("light_site") + self._jit(0.003)
        side = lever + [0.05, 0.0, 0.0]                          # closed fingers beside the lever, +x side
        R = self._orient(R_FWD)
        yield from self._move(side + [0.0, -0.1, 0.0], R, CLOSED, tol=0.02, settle=True)
        yield from self._move(side, R, CLOSED, tol=0.01, max_steps=20)
        yield from self._move(lever + [-0.05, 0.0, 0.0], R, CLOSED, max_steps=20, speed=0.5,
                              until=lambda: self._q(17) < TASK_GOALS["light switch"][0] + 0.05)
        yield from self._move(self._tool() + [0.0, -0.1, 0.0], R, CLOSED, tol=0.04, max_steps=8)

    def _slide(self):
        handle = self._site("slide_site") + self._jit(0.003)
        side = handle + [-0.05, 0.0, 0.0]                        # closed fingers beside the handle, -x side
        R = self._orient(R_FWD)
        yield from self._move(side + [0.0, -0.1, 0.0], R, CLOSED, tol=0.02, settle=True)
        yield from self._move(side, R, CLOSED, tol=0.01, max_steps=20)
        yield from self._move(side + [0.33, 0.0, 0.0], R, CLOSED, max_steps=30, speed=0.7,
                              until=lambda: self._q(19) > TASK_GOALS["slide cabinet"][0] - 0.05)
        yield from self._move(self._tool() + [0.0, -0.1, 0.0], R, CLOSED, tol=0.04, max_steps=8)

    def _microwave(self):
        # Pinch the handle bar, coming from above along the door's normal, then pull it around the hinge; the bar
        # turns inside the pinch, so the gripper keeps its orientation.
        h0 = self._site("microhandle_site") + self._jit(0.003)
        q0 = self._q(22)
        R = self._orient(R_MICRO)
        back = -R[:, 2]
        yield from self._move(h0 + 0.12 * back, R, OPEN, tol=0.015, settle=True)
        yield from self._move(h0, R, OPEN, tol=0.01, max_steps=16, speed=0.8)
        yield from self._grasp(h0, R)

        def on_arc(theta):
            r = h0[:2] - MICROWAVE_HINGE
            c, s = np.cos(theta - q0), np.sin(theta - q0)
            return np.array([*(MICROWAVE_HINGE + [c * r[0] - s * r[1], s * r[0] + c * r[1]]), h0[2]])

        for _ in range(30):
            theta = self._q(22)
            if theta < -0.75:
                break
            yield on_arc(max(theta - 0.25, -0.9)), R, CLOSED, 0.6
        yield from self._hold(self.pc, R, OPEN, 2)
        out = self._tool() + 0.08 * back
        yield from self._move(out, R, OPEN, tol=0.03, max_steps=10)
        yield from self._move(out + [0.1, 0.0, 0.12], R, OPEN, tol=0.05, max_steps=8)

    def _kettle(self):
        # Pinch the handle bar from behind and above (one finger over it, one under it, which carries the weight),
        # carry the kettle to the top-left burner, put it down, pull back along the gripper.
        h = self._site("kettle_site") + self._jit(0.002)
        goal = np.array(TASK_GOALS["kettle"][:3]) + (h - self.d.qpos[23:26])   # the handle over the goal
        R = self._orient(R_KETTLE)
        back = -R[:, 2]
        yield from self._move(h + 0.12 * back, R, OPEN, tol=0.015, settle=True)
        yield from self._move(h, R, OPEN, tol=0.01, max_steps=16, speed=0.7)
        yield from self._grasp(h, R)
        yield from self._move(h + [0.0, 0.0, 0.06], R, CLOSED, tol=0.02, max_steps=10, speed=0.6)
        yield from self._move(goal + [0.0, 0.0, 0.06], R, CLOSED, tol=0.02, max_steps=25, speed=0.8)
        yield from self._move(goal + [0.0, 0.0, 0.01], R, CLOSED, tol=0.01, max_steps=10, speed=0.5)
        yield from self._hold(goal + [0.0, 0.0, 0.01], R, OPEN, 3)
        yield from self._move(goal + 0.14 * back, R, OPEN, tol=0.03, max_steps=8)

    def _run(self):
        for task in self.order:
            self.trace.append((self.t, "task", task))
            if task in ("bottom burner", "top burner"):
                yield from self._knob(task)
            elif task == "microwave":
                yield from self._microwave()
            elif task == "kettle":
                yield from self._kettle()
            elif task == "light switch":
                yield from self._light()
            elif task == "slide cabinet":
                yield from self._slide()
            else:
                raise NotImplementedError(task)

    # -- control ---------------------------------------------------------------------------------------------
    def act(self, obs: np.ndarray) -> np.ndarray:
        self.t += 1
        if not self.done:
            try:
                self.target = next(self._script)
            except StopIteration:
                self.done = True
                self.target = (self.pc.copy(), self.Rc.copy(), self.target[2], 1.0)
        p_t, R_t, grip, speed = self.target
        dt = self.env.dt
        dp = p_t - self.pc
        n = _norm(dp)
        step = self.speed * speed * dt
        if n > step:
            dp *= step / n
        rv = _rotvec(_mm(R_t, self.Rc.T))
        a = _norm(rv)
        if a > self.WSPEED * dt:
            rv *= self.WSPEED * dt / a
        pc, Rc = self.pc + dp, _mm(_rot(rv, _norm(rv)), self.Rc)
        qn = self.arm.ik(self.qc, pc, Rc)
        dq = qn - self.qc
        big = float((np.abs(dq) / self.DQ).max())
        if big > 1.0:                       # too fast for the servos: take part of the step, where IK put it
            qn = self.qc + dq / big
            pc, Rc = self.arm.fk(qn)
        self.qc, self.pc, self.Rc = qn, pc, Rc
        target = qn + self.arm.gravity(qn) + self.KL * (qn - self.d.qpos[:7])
        action = np.zeros(ACTION_DIM)
        action[:7] = (target - obs[:7]) / (2.0 * dt)
        action[7:] = (grip - obs[7:9]) / (2.0 * dt)
        return np.clip(action, -1.0, 1.0).astype(np.float32)
