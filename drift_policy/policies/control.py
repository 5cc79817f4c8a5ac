"""The LeRobot-style control API of a policy: ``reset`` at the start of an episode, then ``select_action`` once per
control step; the generator runs once every ``n_action_steps`` calls (``executor.ChunkExecutor``)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..executor import ChunkExecutor
from ..observations import check_image_step


class ControlAPI:
    """Mixed into ``Policy``: uses its ``config``, ``device`` and ``predict_action``."""

    # ---- LeRobot-style control API ----------------------------------------------------------------------
    def predict_action_chunk(self, obs, generator: torch.Generator | None = None) -> Tensor:
        """The executable chunk [B, Ta, Da] for obs [B, To, obs_dim]."""
        return self.predict_action(obs, generator)["action"]

    def reset(self) -> None:
        """Forget queued actions and observation history (call at the start of every episode)."""
        self.executor = ChunkExecutor(self.config.n_obs_steps, where="select_action")

    @torch.no_grad()
    def select_action(self, obs, generator: torch.Generator | None = None) -> Tensor:
        """One action [B, Da] for the latest single-step obs [B, obs_dim] (or {"obs": [B, D], <camera>: [B, 3, H, W]}).

        Keeps the last To observations (the first one repeated after ``reset``) and a queue of the current chunk's
        actions; the generator runs only when the queue is empty, i.e. once every Ta calls. Every step is checked
        (``observations.check_observation``: finite values, images in 0..255) before it enters the history, even
        when the action comes from the queue. The batch size is fixed between ``reset`` calls: a step with another
        number of rows than the queued actions is a ValueError (call ``reset()`` when the environments change).
        """
        if getattr(self, "executor", None) is None:
            self.reset()
        c = self.config
        step = dict(obs) if isinstance(obs, dict) else {"obs": obs}
        step["obs"] = torch.as_tensor(step["obs"], dtype=torch.float32, device=self.device)
        if step["obs"].dim() == 1:
            step = {k: torch.as_tensor(v).unsqueeze(0) for k, v in step.items()}
        if step["obs"].dim() != 2 or step["obs"].shape[1] != c.obs_dim:
            raise ValueError(f"select_action takes one step of obs [B, {c.obs_dim}], got {tuple(step['obs'].shape)}")
        for k in c.image_keys:
            if k not in step:
                raise ValueError(f"observation is missing {k!r} (this policy needs {['obs', *c.image_keys]})")
            step[k] = torch.as_tensor(step[k], device=self.device)
            check_image_step(step[k], k, c.image_shape, step["obs"].shape[0])   # before it enters the history
        step = {k: step[k] for k in ("obs", *c.image_keys)}      # what the policy reads (extra keys ignored)
        ex = self.executor
        ex.observe(step)
        if ex.needs_chunk:
            window = ex.window(lambda steps: torch.stack([torch.as_tensor(s) for s in steps], dim=1))
            ex.load(self.predict_action_chunk(window, generator).unbind(dim=1))              # Ta x [B, Da]
        return ex.pop()
