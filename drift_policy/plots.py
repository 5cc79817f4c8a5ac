"""Training plots of a run folder: ``drift-policy plot run=runs/<run> [out=DIR]``.

Reads the run's evaluation records (``eval/step_*.json``) and ``metrics.jsonl`` and writes PNGs (matplotlib's
Agg backend, no display needed):

- ``score_steps.png``: evaluation score and success rate against optimizer steps;
- ``score_sample_passes.png``: the same against sample passes (training samples seen / training windows), when
  the records carry ``sample_passes`` (an eval record's own field, else the metrics line of the same step);
- ``loss.png``, ``mse_to_expert.png`` (``train/mse_to_expert``) and ``drift_v2.png`` (``train/v2_tau*``,
  mean squared drift field per temperature: the drift loss itself stays near constant by construction, V^2
  is its convergence signal), each only when the metrics have the key.

Training writes the same plots into ``<run>/plots/`` when it ends; ``bench summary`` writes them next to its record.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import runs
from .errors import RunFolderError

PathLike = str | os.PathLike


def read_metrics(run_dir: PathLike) -> list[dict]:
    """The records of metrics.jsonl (a last line cut short by a crash is skipped); [] if there is none."""
    path = runs.metrics_path(run_dir)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            out.append(rec)
    return out


def read_evals(run_dir: PathLike, metrics: list[dict] | None = None) -> list[dict]:
    """{"step", "score", "success_rate", "sample_passes" (or None)} per evaluation record, by step."""
    passes_at = {r["step"]: r["sample_passes"] for r in (metrics or []) if r.get("sample_passes") is not None}
    rows = []
    for path in runs.eval_files(run_dir):
        r = json.loads(Path(path).read_text())
        rows.append({"step": r["step"], "score": r.get("mean_score", r.get("coverage_score")),
                     "success_rate": r.get("success_rate"),
                     "sample_passes": r.get("sample_passes", passes_at.get(r["step"]))})
    return sorted(rows, key=lambda r: r["step"])


def plot_run(run_dir: PathLike, out_dir: PathLike | None = None, prefix: str = "") -> list[Path]:
    """Write the run's PNGs into ``out_dir`` (default ``<run>/plots``) as ``<prefix><name>.png``; return their paths.

    RunFolderError if ``run_dir`` is not a run folder (no config.json) or has neither metrics nor evaluations.
    """
    run_dir = Path(run_dir)
    if not runs.config_path(run_dir).exists():
        raise RunFolderError(f"{run_dir}: not a run folder (no {runs.CONFIG_FILE}); "
                             f"expected the folder that `drift-policy train` wrote")
    metrics = read_metrics(run_dir)
    evals = read_evals(run_dir, metrics)
    if not metrics and not evals:
        raise RunFolderError(f"{run_dir}: nothing to plot (no {runs.METRICS_FILE} records, no eval/step_*.json)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir) if out_dir is not None else runs.plots_dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = run_dir.name
    written = []

    def save(fig, name):
        path = out_dir / f"{prefix}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def score_plot(xs, xlabel, name):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(xs, [r["score"] for r in rows], "o-", label="score")
        if any(r["success_rate"] is not None for r in rows):
            ax.plot(xs, [r["success_rate"] for r in rows], "s--", label="success rate")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("evaluation")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{title}: evaluation")
        save(fig, name)

    rows = [r for r in evals if r["score"] is not None]
    if rows:
        score_plot([r["step"] for r in rows], "optimizer steps", "score_steps")
        if all(r["sample_passes"] is not None for r in rows):
            score_plot([r["sample_passes"] for r in rows], "sample passes (samples seen / training windows)",
                       "score_sample_passes")

    def curve(keys, name, ylabel, log):
        series = {k: [(r["step"], r[k]) for r in metrics if isinstance(r.get(k), (int, float))] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, pts in series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
        if log and all(p[1] > 0 for pts in series.values() for p in pts):
            ax.set_yscale("log")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"{title}: {ylabel}")
        save(fig, name)

    curve(["loss"], "loss", "training loss", log=False)
    curve(["train/mse_to_expert"], "mse_to_expert", "mse to the expert chunk (normalised)", log=True)
    v2 = sorted({k for r in metrics for k in r if k.startswith("train/v2_tau")}, key=_tau)
    curve(v2, "drift_v2", "drift field mean V^2 per temperature", log=True)
    return written


def _tau(key: str) -> float:
    try:
        return float(key[len("train/v2_tau"):])
    except ValueError:
        return float("inf")
