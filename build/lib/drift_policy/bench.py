"""Benchmarks: ``drift-policy bench train`` and ``drift-policy bench latency``.

bench train: trains several policies with the same training-time budget on the same machine, at the same time
(one thread each), evaluates each on the 50 test seeds at fixed training-time intervals, and writes a table
(Markdown + JSON) and a plot of coverage score against training time into eval/results/.

    drift-policy bench train minutes=30 eval_every=3 policies=drift_unet,diffusion_unet [out=eval/results]
    drift-policy bench train policies=drift_unet,drift_transformer,diffusion_unet,diffusion_transformer \
        overrides="task=pusht_image policy.vision_backbone=resnet18_half"     # both backbones, images

(The score columns are the task's mean score, named by its family: coverage on Push-T, success on robomimic;
the JSON keeps the historical key ``coverage_score`` for it.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .paths import REPO_ROOT
from .policies import config_from_dict
from .runs import parse_kv as _kv


def summarize_run(run_dir: Path) -> dict:
    evals = sorted((run_dir / "eval").glob("step_*.json"))
    rows = [json.loads(p.read_text()) for p in evals]
    # "coverage_score" is the score's name on Push-T (older eval files have only it); "mean_score" on every task.
    rows = [{"step": r["step"], "train_minutes": r["train_minutes"],
             "coverage_score": r.get("mean_score", r.get("coverage_score")), "success_rate": r["success_rate"]}
            for r in rows]
    last = rows[-10:]
    cfg = json.loads((run_dir / "config.json").read_text())
    return {
        "run_dir": str(run_dir),
        "policy": cfg["policy"],
        "evals": rows,
        "max_coverage": max((r["coverage_score"] for r in rows), default=float("nan")),
        "max_success": max((r["success_rate"] for r in rows), default=float("nan")),
        "last10_coverage": sum(r["coverage_score"] for r in last) / max(1, len(last)),
        "last10_success": sum(r["success_rate"] for r in last) / max(1, len(last)),
        "n_last": len(last),
        "final_step": rows[-1]["step"] if rows else 0,
    }


def write_report(summaries: dict[str, dict], out: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps({"meta": meta, "runs": summaries}, indent=2))
    task, score = _task_labels(summaries)
    lines = [f"{task}, {meta['minutes']} training minutes per policy, {meta['machine']}; "
             f"50 test seeds ({meta['start_seed']}..{meta['start_seed'] + 49}), evaluated every "
             f"{meta['eval_every']} training minutes.", "",
             f"| policy | NFE | train min | steps | {score} max | {score} mean last-k (k) | success max | success mean last-k |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        p = s["policy"]
        nfe = config_from_dict(p).nfe
        minutes_run = s["evals"][-1]["train_minutes"] if s["evals"] else 0.0
        lines.append(f"| {name} | {nfe} | {minutes_run:.0f} | {s['final_step']} | {s['max_coverage']:.3f} | {s['last10_coverage']:.3f} "
                     f"({s['n_last']}) | {s['max_success']:.2f} | {s['last10_success']:.2f} |")
    (out / "bench_train.md").write_text("\n".join(lines) + "\n")
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, s in summaries.items():
        ax.plot([r["train_minutes"] for r in s["evals"]], [r["coverage_score"] for r in s["evals"]], "o-", label=name)
        ax2.plot([r["step"] for r in s["evals"]], [r["coverage_score"] for r in s["evals"]], "o-", label=name)
    ax.set_xlabel("training time (minutes, excluding evaluation)")
    ax2.set_xlabel("optimizer steps")
    ax2.set_xscale("log")
    ax2.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylabel(f"{score} score (50 seeds)")
    ax.set_ylim(0, 1)
    for a in (ax, ax2):
        a.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(f"{task}: {score} at equal training time (left) and per optimizer step (right)")
    fig.tight_layout()
    fig.savefig(out / "bench_train.png", dpi=120)
    print("\n".join(lines))


def _task_labels(summaries: dict[str, dict]) -> tuple[str, str]:
    """(task name, what its score measures) of the benchmarked runs, for the table and the plot."""
    from .runs import config_path
    from .tasks import family

    tasks = [json.loads(config_path(s["run_dir"]).read_text())["task"] for s in summaries.values()]
    names = sorted({t["name"] for t in tasks})
    labels = sorted({family(t["env"]).score_label for t in tasks})
    return " / ".join(names) or "no runs", " / ".join(labels) or "score"


def bench_train(args: list[str]) -> None:
    opts = _kv(args, {"minutes": float, "eval_every": float, "policies": str, "out": str, "runs": str,
                      "machine": str, "overrides": str, "report_only": int})
    minutes = opts.get("minutes", 30.0)
    eval_every = opts.get("eval_every", 3.0)
    policies = opts.get("policies", "drift_unet,diffusion_unet").split(",")
    out = Path(opts.get("out", REPO_ROOT / "eval" / "results"))
    runs = Path(opts.get("runs", Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"))
    machine = opts.get("machine", f"{os.cpu_count()}-core CPU, 1 thread per policy")
    extra = opts.get("overrides", "").split() if opts.get("overrides") else []
    names = {}
    for spec in policies:
        # "drift_unet" or "drift_unet:policy.drift_groups=chunk" (name:override,override)
        pol, _, ov = spec.partition(":")
        name = pol + ("-" + ov.split("=")[-1] if ov else "")
        names[name] = (pol, [o for o in ov.split("+") if o])
    if not opts.get("report_only"):
        procs = {}
        for name, (pol, ov) in names.items():
            cmd = [sys.executable, "-m", "drift_policy", "train", f"policy={pol}", *ov, *extra,
                   f"train.max_minutes={minutes}", "train.max_steps=1000000", f"train.eval_every_minutes={eval_every}",
                   "train.eval_every_steps=0", "train.threads=1", "train.eval_workers=0",
                   f"train.run_dir={runs / name}"]
            print("launch:", " ".join(cmd))
            log = open(runs.mkdir(parents=True, exist_ok=True) or runs / f"{name}.log", "w")
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        for name, p in procs.items():
            if p.wait() != 0:
                raise SystemExit(f"{name} failed; see {runs / (name + '.log')}")
    summaries = {name: summarize_run(runs / name) for name in names}
    write_report(summaries, out, {"minutes": minutes, "eval_every": eval_every, "machine": machine,
                                  "start_seed": 100000, "runs": str(runs)})


def run_summary(args: list[str]) -> dict:
    """``drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]``: a run's evaluation history (every
    eval/step_*.json: score and success by step and training minute), its config and max / last-k statistics,
    as JSON plus a Markdown table on stdout; for committing a run's record next to the README's numbers."""
    opts = _kv(args, {"run": str, "out": str, "machine": str})
    if "run" not in opts:
        raise SystemExit("usage: drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]")
    run = Path(opts["run"])
    if not (run / "config.json").exists():
        raise SystemExit(f"{run}: not a run folder (no config.json)")
    s = summarize_run(run)
    s["config"] = json.loads((run / "config.json").read_text())
    s["machine"] = opts.get("machine", f"{os.cpu_count()}-core CPU")
    lines = [f"{s['config']['task']['name']}, {s['policy']['type']} policy ({s['policy']['architecture']} "
             f"{s['policy']['backbone']}), {s['machine']}", "",
             "| step | train min | score | success |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['train_minutes']:.1f} | {r['coverage_score']:.3f} | {r['success_rate']:.2f} |"
              for r in s["evals"]]
    lines += ["", f"max score {s['max_coverage']:.3f}, mean of the last {s['n_last']} evaluations "
                  f"{s['last10_coverage']:.3f} (success {s['last10_success']:.2f})"]
    print("\n".join(lines))
    if "out" in opts:
        out = Path(opts["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(s, indent=2))
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return s


def main(args: list[str]) -> None:
    if not args or args[0] not in ("train", "latency", "summary"):
        raise SystemExit("usage: drift-policy bench {train,latency,summary} [key=value ...]")
    if args[0] == "summary":
        run_summary(args[1:])
    elif args[0] == "train":
        bench_train(args[1:])
    else:
        from .bench_latency import main as latency_main

        latency_main(args[1:])
