"""The action-chunk contract, written once.

A policy sees the last To observations (after a reset, the first one repeated To times) and predicts a chunk
of Tp actions; the action for the current step is at index To - 1 (the earlier ones belong to steps already
taken), and Ta actions from there are executed before the next chunk is predicted (receding horizon).
``ChunkExecutor`` holds the observation history and the queue of actions to execute; ``executable`` is the
To - 1 slice. ``Policy.select_action``, the evaluation episode and the real-time runner all use it, with
torch tensors or numpy arrays alike (``stack`` says how to stack a history).

Every observation is checked on its way in (``observations.check_observation``: finite values, images in
0..255) and must keep the shapes of the history it joins: a batch-size change without ``reset()`` is a
ValueError, not a stale queued action of another batch. Every chunk is checked on its way into the queue: a
non-finite chunk is never queued (``observations.check_chunk``).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable

from .observations import check_chunk, check_observation

__all__ = ["ChunkExecutor", "executable"]


def executable(n_obs_steps: int, n_action_steps: int | None = None) -> slice:
    """The slice of a predicted chunk (along its time axis) that starts at the current step, To - 1: Ta actions,
    or all the rest when ``n_action_steps`` is None (the runner plays later actions when a chunk is late)."""
    start = n_obs_steps - 1
    return slice(start, None if n_action_steps is None else start + n_action_steps)


class ChunkExecutor:
    """Observation history (the last To steps, each a dict of arrays) and the queue of actions still to execute
    (the ``executable`` slice of the last chunk: Ta actions for a policy, whatever ``predict`` chose in
    evaluation)."""

    def __init__(self, n_obs_steps: int, *, where: str = "ChunkExecutor"):
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self.where = where                          # who is asking, for error messages
        self.history: deque[dict[str, Any]] = deque(maxlen=n_obs_steps)
        self.queue: deque[Any] = deque()

    def reset(self) -> None:
        """Forget the history and the queued actions (the start of an episode)."""
        self.history.clear()
        self.queue.clear()

    def observe(self, obs: dict[str, Any]) -> None:
        """Add one step's observation (checked first); the first after a reset fills the whole history."""
        check_observation(obs, where=self.where)
        if self.history:
            last = self.history[-1]
            for k, v in obs.items():
                old = getattr(last.get(k), "shape", None)
                if old is not None and tuple(getattr(v, "shape", ())) != tuple(old):
                    raise ValueError(f"{self.where}: observation {k!r} has shape {tuple(v.shape)}, but this "
                                     f"episode's history and queued actions are for {tuple(old)}; call reset() "
                                     f"when the number of environments (the batch size) changes")
        if not self.history:
            self.history.extend([obs] * self.n_obs_steps)
        else:
            self.history.append(obs)

    def window(self, stack: Callable[[list], Any]) -> dict[str, Any]:
        """{key: stack([oldest, ..., newest])}, the policy's input for the current step."""
        if not self.history:
            raise RuntimeError("window() before the first observe()")
        return {k: stack([h[k] for h in self.history]) for k in self.history[0]}

    @property
    def needs_chunk(self) -> bool:
        """True when the queue is empty: time to predict the next chunk."""
        return not self.queue

    def load(self, actions: Iterable[Any]) -> None:
        """Queue the executable actions of a new chunk (the ``executable`` slice), replacing what was left;
        a chunk with NaN or inf is refused and nothing is queued."""
        actions = list(actions)
        for a in actions:
            check_chunk(a, self.where)
        self.queue = deque(actions)

    def pop(self) -> Any:
        """The next action to execute."""
        return self.queue.popleft()

    def __len__(self) -> int:
        return len(self.queue)
