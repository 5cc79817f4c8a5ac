"""Kitchen (issue 41): in which orders the policies' rollouts do their subtasks, beside the demonstrator's.

    python eval/kitchen_orders.py --runs RUNS_DIR [RUNS_DIR ...] [--last 5] [--store kitchen/demos_1000.zarr] \
        [--demonstrator eval/results/kitchen_lowdim/default/kitchen_demonstrator.json] --out RECORD.json

Each RUNS_DIR is a ``bench train`` folder (one run folder per variant and seed, ``<label>-s<seed>``). For each variant
the episodes of each finished run's last ``--last`` evaluations are pooled (each evaluation file lists, per episode, the
subtasks completed in the order the env saw them) and summarised as the demonstrator's evaluation on the same
test seeds is: p1..p4, which subtask came first, how often each subtask was done, how many distinct orders the
episodes with 4 or more subtasks followed, and how many of those orders occur in the training store (an order no
demonstration shows is the policy composing subtasks on its own). Writes RECORD.json and RECORD.md.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from drift_policy import runs
from drift_policy.envs.kitchen import TASKS
from drift_policy.fileio import atomic_write_text
from drift_policy.provenance import git_commit, machine_free, machine_free_text
from drift_policy.records import machine_info


def order_stats(completed: list[list[str]], store_orders: set[tuple[str, ...]] | None = None) -> dict:
    """Statistics of episodes given as their completed subtasks, in order."""
    n = len(completed)
    if n == 0:
        raise ValueError("no episodes to summarise")
    counts = np.array([len(c) for c in completed])
    four = [tuple(c[:4]) for c in completed if len(c) >= 4]
    orders = Counter(four)
    out = {"episodes": n, "mean_completed": float(counts.mean()),
           **{f"p{k}": float(np.mean(counts >= k)) for k in (1, 2, 3, 4)},
           "first_task": {t: float(np.mean([bool(c) and c[0] == t for c in completed])) for t in TASKS},
           "task_share": {t: float(np.mean([t in c for c in completed])) for t in TASKS},
           "distinct_orders": len(orders),
           "top_orders": [[" > ".join(o), k] for o, k in orders.most_common(3)]}
    out["first_task"]["none"] = float(np.mean(counts == 0))
    if store_orders is not None:
        out["orders_in_store"] = float(np.mean([o in store_orders for o in four])) if four else None
    return out


def _store_orders(path: Path) -> set[tuple[str, ...]]:
    import zarr

    from drift_policy.data.kitchen import load_kitchen

    load_kitchen(path)                                     # a clear error on a missing or bad store
    return {tuple(TASKS[i] for i in row) for row in zarr.open_group(str(path), mode="r")["meta/order"][:]}


def run_episodes(run_dir: Path, last: int) -> tuple[list[list[str]], list[int]]:
    files = runs.eval_files(run_dir)[-last:]
    if not files:
        raise ValueError(f"{run_dir}: no evaluation files")
    rows = [json.loads(p.read_text()) for p in files]
    if any(r.get("task") != "kitchen_lowdim" for r in rows):
        raise ValueError(f"{run_dir}: not a kitchen_lowdim run")
    return [e["completed"] for r in rows for e in r["per_episode"]], [r["step"] for r in rows]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, nargs="+", help="bench train folders")
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--store", default=None, help="the training store, for the share of orders it shows")
    ap.add_argument("--demonstrator", default="eval/results/kitchen_lowdim/default/kitchen_demonstrator.json")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    store = None
    if a.store:
        from drift_policy.paths import data_root

        path = Path(a.store)
        store = _store_orders(path if path.is_absolute() or path.exists() else data_root() / path)
    missing = [r for r in a.runs if not Path(r).is_dir()]
    if missing:
        sys.exit(f"error: no kitchen run folders with evaluations in {missing[0]}: not a folder")
    variants: dict[str, dict] = {}
    for d in sorted(p for r in a.runs for p in Path(r).iterdir()):
        m = re.fullmatch(r"(.+)-s(\d+)", d.name)
        if not (m and d.is_dir() and runs.config_path(d).exists() and runs.eval_files(d)):
            continue
        if not runs.finished(d):
            print(f"skipped, still training or stopped early: {d.name}", file=sys.stderr)
            continue
        eps, steps = run_episodes(d, a.last)
        v = variants.setdefault(m.group(1), {"seeds": [], "steps": {}, "episodes": []})
        v["seeds"].append(int(m.group(2)))
        v["steps"][m.group(2)] = steps
        v["episodes"] += eps
    if not variants:
        sys.exit(f"error: no kitchen run folders with evaluations in {' '.join(a.runs)}")
    demo = json.loads(Path(a.demonstrator).read_text())
    rec = {"task": "kitchen_lowdim", "last": a.last,
           "demonstrator": {"source": machine_free(a.demonstrator),
                            **order_stats([e["completed"] for e in demo["per_episode"]], store)},
           "variants": {k: {"seeds": v["seeds"], "eval_steps": v["steps"], **order_stats(v["episodes"], store)}
                        for k, v in variants.items()},
           "runs_dirs": [machine_free(r) for r in a.runs],
           "command": "python eval/kitchen_orders.py " + machine_free_text(" ".join(sys.argv[1:] if argv is None else argv)),
           "code_commit": git_commit(), "machine": machine_info(1)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rec, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render(rec))
    print(render(rec))
    return out


def render(rec: dict) -> str:
    rows = {"demonstrator (scripted, 200 test seeds)": rec["demonstrator"],
            **{f"{k} (seeds {', '.join(map(str, v['seeds']))}; last {rec['last']} evaluations pooled)": v
               for k, v in rec["variants"].items()}}
    short = {t: t.replace(" burner", " brn").replace(" cabinet", " cab") for t in TASKS}
    lines = ["# Kitchen: subtask orders of the rollouts beside the demonstrator's", "",
             f"Written by `{rec['command']}` at {rec['code_commit']} ({rec['machine']['cpu']}, {rec['machine']['cores']} cores).", "",
             "| who | episodes | p1 | p2 | p3 | p4 | subtasks per episode | distinct orders (4+ done) | in the store | "
             "most frequent orders |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        store = "–" if s.get("orders_in_store") is None else f"{s['orders_in_store']:.2f}"
        top = "; ".join(f"{o} ({k})" for o, k in s["top_orders"]) or "–"
        lines.append(f"| {name} | {s['episodes']} | {s['p1']:.2f} | {s['p2']:.2f} | {s['p3']:.2f} | {s['p4']:.2f} | "
                     f"{s['mean_completed']:.2f} | {s['distinct_orders']} | {store} | {top} |")
    lines += ["", "Share of episodes by the subtask done first (none: no subtask), and by subtask done at all:", "",
              "| who | " + " | ".join(f"first: {short[t]}" for t in TASKS) + " | first: none | "
              + " | ".join(f"done: {short[t]}" for t in TASKS) + " |",
              "|---|" + "---|" * (2 * len(TASKS) + 1)]
    for name, s in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{s['first_task'][t]:.2f}" for t in TASKS)
                     + f" | {s['first_task']['none']:.2f} | " + " | ".join(f"{s['task_share'][t]:.2f}" for t in TASKS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
