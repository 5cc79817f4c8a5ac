"""The training progress bar: what is left of the budget, the latest loss and the latest evaluation.

- Step budget (``train.max_minutes`` <= 0): a bar over ``max_steps`` steps; tqdm shows the rate and the ETA.
- Time budget (``train.max_minutes`` > 0): a bar over the budget's training seconds (evaluation excluded, the
  same clock as the budget), shown as elapsed / total minutes, with the step count beside it.

The postfix carries the latest training loss (and mse to the expert when the policy reports it) and the latest
evaluation ``eval=<score>@<step>``, so the last score stays in view between evaluations.
"""
from __future__ import annotations

from tqdm import tqdm


class TrainProgress:
    def __init__(self, max_steps: int, max_minutes: float, step: int = 0, train_seconds: float = 0.0,
                 disable: bool = False, file=None):
        self.time_budget = max_minutes > 0
        self.max_steps, self.step = max_steps, step
        self._postfix: dict[str, str] = {}
        self.closed, self.file = False, file
        if self.time_budget:
            # n counts training seconds; the description shows them as minutes against the budget.
            total = round(60 * max_minutes)
            self.bar = tqdm(total=total, initial=min(round(train_seconds), total), disable=disable,
                            dynamic_ncols=True, file=file, bar_format="{desc} |{bar}| {percentage:3.0f}%{postfix}")
            self._describe(train_seconds)
        else:
            self.bar = tqdm(total=max_steps, initial=step, disable=disable, dynamic_ncols=True, desc="train",
                            unit="step", file=file)

    def update(self, step: int, train_seconds: float) -> None:
        """After an optimizer step: ``step`` steps done, ``train_seconds`` of the budget used."""
        self.step = step
        if self.time_budget:
            self.bar.n = min(round(train_seconds), self.bar.total)
            self._postfix["step"] = str(step)
            self._describe(train_seconds)
            self._show()
        else:
            self.bar.update(step - self.bar.n)

    def set_train(self, loss: float, mse_to_expert: float | None = None) -> None:
        self._postfix["loss"] = f"{loss:.3f}"
        if mse_to_expert is not None:
            self._postfix["mse"] = f"{mse_to_expert:.4f}"
        self._show()

    def set_eval(self, score: float, step: int) -> None:
        self._postfix["eval"] = f"{score:.3f}@{step}"
        self._show()

    def write(self, msg: str) -> None:
        tqdm.write(msg, file=self.file)

    def close(self) -> None:
        self.bar.close()
        self.closed = True

    def _show(self) -> None:
        if not self.closed:                   # the final evaluation comes after the bar is closed
            self.bar.set_postfix(self._postfix, refresh=True)

    def _describe(self, train_seconds: float) -> None:
        self.bar.set_description_str(f"train {train_seconds / 60:.1f}/{self.bar.total / 60:.1f} min", refresh=False)

