"""Training compute to reach a score: ``drift-policy bench reach records=A.json[,B.json] target=0.95``.

For each variant of the committed bench records (the same recipe's runs pooled over the records given), the
score curve is the mean over its seeds at each evaluated budget fraction. Two budgets are reported:

- ``first``: the fewest sample-passes at which the mean curve reaches ``target``;
- ``held``: the fewest at which it reaches ``target`` and stays at or above it at every later evaluation
  (what a user who stops anywhere after that point gets).

A variant that never reaches (or never holds) the target gets None. The ratio of two variants' budgets is the
training-compute headline (drift against the baseline), stated exactly as the records show it: evaluation every
10 % of the budget bounds its resolution to one evaluation interval.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike


def mean_curve(runs: list[dict]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(sample_passes [E], mean score over seeds [E], seeds) of one variant's runs, which must share their
    evaluation points (bench runs of one budget do); only the evaluations every seed has are kept."""
    if not runs:
        raise ValueError("no runs")
    common = set.intersection(*({int(e["sample_passes"]) for e in r["evals"]} for r in runs))
    if not common:
        raise ValueError(f"the runs of {runs[0].get('label')!r} share no evaluation point")
    sp = np.array(sorted(common))
    scores = []
    for r in runs:
        by = {int(e["sample_passes"]): float(e["mean_score"]) for e in r["evals"]}
        scores.append([by[s] for s in sp])
    return sp, np.mean(scores, axis=0), sorted(int(r["seed"]) for r in runs)


def reach(sp: np.ndarray, score: np.ndarray, target: float) -> dict:
    """``first`` and ``held`` sample-passes of one mean curve (None where never)."""
    above = score >= target
    first = int(sp[np.argmax(above)]) if above.any() else None
    held = None
    for i in range(len(sp)):
        if above[i:].all():
            held = int(sp[i])
            break
    return {"first": first, "held": held}


def load_runs(records: list[PathLike]) -> dict[str, list[dict]]:
    """The runs of the records grouped by label; a (label, seed) given twice keeps the first."""
    out: dict[str, list[dict]] = {}
    for path in records:
        rec = json.loads(Path(path).read_text())
        for r in rec["runs"]:
            have = {x["seed"] for x in out.get(r["label"], [])}
            if r["seed"] not in have and r.get("evals"):
                out.setdefault(r["label"], []).append(r)
    return out


def compute_to_target(records: list[PathLike], target: float = 0.95, labels: list[str] | None = None) -> dict:
    """{label: {seeds, sample_passes, mean_score, first, held}} for the runs of ``records`` (``labels``: only
    these, in this order)."""
    runs = load_runs(records)
    if labels:
        missing = [lb for lb in labels if lb not in runs]
        if missing:
            raise ValueError(f"no runs labelled {missing} in {[str(r) for r in records]}; labels there: {sorted(runs)}")
        runs = {lb: runs[lb] for lb in labels}
    out = {}
    for label, rs in runs.items():
        sp, score, seeds = mean_curve(rs)
        out[label] = {"seeds": seeds, "sample_passes": sp.tolist(), "mean_score": score.tolist(),
                      **reach(sp, score, target)}
    return out


def plot_reach(result: dict, target: float, path: PathLike, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, r in result.items():
        line, = ax.plot(np.array(r["sample_passes"]) / 1e6, r["mean_score"], marker="o", ms=3,
                        label=f"{label} (seeds {','.join(map(str, r['seeds']))})")
        if r["held"] is not None:
            ax.axvline(r["held"] / 1e6, color=line.get_color(), ls=":", lw=1)
    ax.axhline(target, color="grey", ls="--", lw=1)
    ax.set_xlabel("generator sample-passes (millions)")
    ax.set_ylabel("score (mean over seeds)")
    ax.set_title(title or f"compute to reach and hold {target:g}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
