"""Are the test episodes that fail outright the ones whose initial state the demonstrations do not cover? (issue 12)

    python eval/failure_coverage.py --records eval/results/pusht_keypoints/levers/more_levers/pusht_keypoints.json ... \
        [--dims 0:18] [--last 5] [--out eval/diagnostics/pusht_keypoints/failure_coverage_pusht_keypoints.json]

For each test seed of the records' task (the records' ``start_seed`` and ``eval_episodes``), the initial
observation of the evaluation environment is compared with every training-split observation: ``nearest`` is the
distance to the closest one, as the mean Euclidean distance per 2-d point over the ``--dims`` slice (Push-T
keypoints: 0:18, the block's 9 keypoints, in pixels; the agent's start is random and free to move). For every
run of the records, the seed's outright failures (``low_score_seeds``: score under 0.5) are counted over the
run's last ``--last`` evaluations. The summary splits the seeds into thirds by ``nearest`` and gives each
policy kind's failure rate per third, and the rank correlation of ``nearest`` with the failure count.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from drift_policy.config import compose
from drift_policy.provenance import machine_free
from drift_policy.records import machine_info
from drift_policy.tasks import env_spec, make_env
from drift_policy.train import make_datasets


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x))
    for v in np.unique(x):                      # average ranks of ties
        m = x == v
        r[m] = r[m].mean()
    return r


def spearman(a, b) -> float | None:
    a, b = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", nargs="+", required=True, help="bench train record JSONs (one task)")
    ap.add_argument("--dims", default=None, help="obs slice lo:hi of 2-d points to compare (default: all dims)")
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    recs = [json.loads(Path(p).read_text()) for p in a.records]
    tasks = {r["meta"]["task"] for r in recs}
    starts = {(r["meta"]["start_seed"], r["meta"]["eval_episodes"]) for r in recs}
    if len(tasks) != 1 or len(starts) != 1:
        raise SystemExit(f"the records must share one task and test seeds, got {sorted(tasks)} and {sorted(starts)}")
    task, (start, n) = tasks.pop(), starts.pop()
    cfg = compose([f"task={task}"])
    train, _ = make_datasets(cfg)
    obs = train.steps("obs").numpy()
    lo, hi = (int(v) for v in a.dims.split(":")) if a.dims else (0, obs.shape[1])
    if (hi - lo) % 2:
        raise SystemExit(f"--dims {lo}:{hi} must span whole 2-d points")
    pts = obs[:, lo:hi].reshape(len(obs), -1, 2)
    env = make_env(env_spec(cfg.task), max_steps=cfg.task.max_steps)
    seeds = list(range(start, start + n))
    nearest = []
    for s in seeds:
        o, _ = env.reset(seed=s)
        o = np.asarray(o["obs"] if isinstance(o, dict) else o, np.float32)
        q = o[lo:hi].reshape(-1, 2)
        nearest.append(float(np.sqrt(((pts - q) ** 2).sum(-1)).mean(-1).min()))
    env.close()
    nearest = np.asarray(nearest)

    runs = []
    for path, r in zip(a.records, recs):
        for run in r["runs"]:
            evals = [e for e in run["evals"] if "low_score_seeds" in e][-a.last:]
            if not evals:
                continue
            fails = {s: sum(s in e["low_score_seeds"] for e in evals) for s in seeds}
            runs.append({"record": path, "label": run["label"], "policy": run["policy"], "seed": run["seed"],
                         "evals": len(evals), "failures": [fails[s] for s in seeds]})
    thirds = np.array_split(np.argsort(nearest, kind="stable"), 3)
    summary = {}
    for kind in sorted({r["policy"] for r in runs}):
        rs = [r for r in runs if r["policy"] == kind]
        f = np.sum([r["failures"] for r in rs], axis=0)             # per seed, over the runs
        ev = sum(r["evals"] for r in rs)
        summary[kind] = {"runs": len(rs), "episodes_per_seed": ev,
                         "failure_rate_by_third": [float(f[t].sum() / (ev * len(t))) for t in thirds],
                         "nearest_px_by_third": [[float(nearest[t].min()), float(nearest[t].max())] for t in thirds],
                         "spearman_nearest_vs_failures": spearman(nearest, f),
                         "most_failed": [[seeds[i], int(f[i]), round(float(nearest[i]), 1)]
                                         for i in np.argsort(-f, kind="stable")[:8] if f[i] > 0]}
    rec = {"task": task, "test_seeds": seeds, "dims": [lo, hi], "last": a.last,
           "records": [machine_free(p) for p in a.records],
           "nearest": nearest.round(2).tolist(), "runs": runs, "summary": summary, "machine": machine_info()}
    out = Path(a.out or f"eval/diagnostics/{task}/failure_coverage_{task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=1) + "\n")
    for kind, s in summary.items():
        print(f"{kind}: {s['runs']} runs; failure rate by third of nearest distance (near -> far): "
              + ", ".join(f"{v:.3f}" for v in s["failure_rate_by_third"])
              + f"; spearman {s['spearman_nearest_vs_failures']}; most failed {s['most_failed'][:5]}")
    print(f"thirds (px): {summary[next(iter(summary))]['nearest_px_by_third'] if summary else None}; written to {out}")
    return out


if __name__ == "__main__":
    main()
