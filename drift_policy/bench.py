"""Benchmarks: ``drift-policy bench train``, ``bench rescore``, ``bench merge``, ``bench latency`` and ``bench summary``.

bench train compares policies at equal TRAINING COMPUTE, counted in generator sample-passes (one forward and
backward of one action chunk through the backbone): the drift policy pays batch_size * n_noise per step, the
diffusion baseline batch_size. Each variant and seed gets ``budget`` sample-passes, i.e. its own max_steps, with
its cosine schedule over those steps (never over wall-clock), and is evaluated at the same fractions of the
budget. Runs go ``jobs`` at a time with one thread each; the record is rewritten after every poll, and a rerun
skips finished runs and resumes interrupted ones.

    drift-policy bench train budget=1200000 seeds=0,1 policies=drift_unet,diffusion_unet
    drift-policy bench train budget=300000 policies=drift_unet,drift_unet:policy.n_noise=8+policy.neighbor_positives=0
    -> eval/results/compute_matched/<task>.json (+ .md table, .png score vs sample-passes and vs minutes)

bench merge writes one record from the runs of several records (seeds trained in different sessions, whose run
folders are gone), grouping runs by their resolved recipe rather than by label.

bench rescore scores such runs again, from the checkpoint of every evaluation, with inference-only policy keys
changed (drift's sampling noise scale, diffusion's sampler, the executed actions per chunk): no retraining.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .config import TrainConfig
from .errors import ConfigError
from .fileio import atomic_write_text
from .policies import DriftConfig, PolicyConfig, config_from_dict
from . import runs
from .runs import parse_kv as _kv
from .tasks import family


def summarize_run(run_dir: Path) -> dict:
    evals = sorted((run_dir / "eval").glob("step_*.json"))
    rows = [json.loads(p.read_text()) for p in evals]
    # "coverage_score" is the score's name on Push-T (older eval files have only it); "mean_score" on every task.
    rows = [{"step": r["step"], "train_minutes": r["train_minutes"],
             "coverage_score": r.get("mean_score", r.get("coverage_score")), "success_rate": r["success_rate"],
             **{k: r[k] for k in r.get("flags", ())}}        # the task's episode flags (BlockPush: p1, p2, ...)
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


def machine_info(jobs: int = 1) -> dict:
    """What a benchmark ran on: CPU model, cores, torch, and how many runs shared the machine."""
    import torch

    from .timing import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads_per_run": 1,
            "concurrent_runs": jobs, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs):
    """The sample standard deviation (n - 1)."""
    m = _mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")


LOW_SCORE = 0.5          # an episode scoring under this is a failure, not an imprecise finish


def run_record(run_dir: Path) -> dict:
    """One run of ``bench train``: its resolved config, budget and every evaluation, by sample-passes."""
    cfg = json.loads(runs.config_path(run_dir).read_text())
    t, p = cfg["train"], cfg["policy"]
    per_step = t["batch_size"] * config_from_dict(p).sample_passes_per_obs
    evals = []
    for f in runs.eval_files(run_dir):
        r = json.loads(f.read_text())
        evals.append({"sample_passes": r["step"] * per_step, "steps": r["step"], "train_minutes": r["train_minutes"],
                      "mean_score": r["mean_score"], "success_rate": r["success_rate"], "val": r.get("val", {}),
                      "eval_seconds": r.get("wall_s"),      # the rollouts' wall-clock, and their env steps
                      "env_steps": sum(e["steps"] for e in r["per_episode"]) if "per_episode" in r else None,
                      # which test seeds failed outright (score < LOW_SCORE): a mean hides whether a policy is
                      # imprecise everywhere or fails on a few initial states
                      "low_score_seeds": ([e["seed"] for e in r["per_episode"] if e["max_reward"] < LOW_SCORE]
                                          if "per_episode" in r else None)})
    step, minutes, logged = 0, 0.0, []
    metrics = runs.metrics_path(run_dir)
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue                          # a line cut short by a crash
            if "loss" in rec:
                step, minutes = rec["step"], rec["train_minutes"]
                logged.append(rec)
    # The training signals behind each evaluation: every logged value (loss, grad_norm, train/...), averaged over
    # the log lines since the previous evaluation, so that a record shows what the curves cannot (drift's
    # mse_to_expert and sample_std, diffusion's eps_mse) without the run folder.
    prev = 0
    for e in evals:
        rows = [r for r in logged if prev < r["step"] <= e["steps"]]
        keys = [k for k in (rows[0] if rows else {}) if k in ("loss", "grad_norm") or k.startswith("train/")]
        e["train"] = {k: _mean([r[k] for r in rows if isinstance(r.get(k), (int, float))]) for k in keys}
        prev = e["steps"]
    # What bench rescore did (source, changed keys, test seeds, last k), for a rescored run; None otherwise.
    rescored = json.loads(runs.rescored_path(run_dir).read_text()) if runs.rescored_path(run_dir).exists() else None
    # A rescored run copied its source's whole training log, but it has spent only what it has scored so far: an
    # interrupted one counts up to its last evaluation, not to the end of the source's training.
    if evals and (evals[-1]["steps"] >= step or rescored is not None):
        step, minutes = evals[-1]["steps"], evals[-1]["train_minutes"]
    scores, succ = [e["mean_score"] for e in evals], [e["success_rate"] for e in evals]
    rec = {"run_dir": str(run_dir), "policy": p["type"], "seed": t["seed"], "budget_sample_passes": t["sample_passes"],
           "sample_passes": step * per_step, "steps": step, "max_steps": t["max_steps"],
           "sample_passes_per_step": per_step, "complete": (runs.pretrained_dir(run_dir) / "model.safetensors").exists(),
           "seconds_per_step": 60 * minutes / step if step and minutes else None,
           "nfe": config_from_dict(p).nfe, "score_label": family(cfg["task"]["env"]).score_label,
           "policy_config": p, "train_config": t, "evals": evals,
           "max_score": max(scores, default=float("nan")), "last5_score": _mean(scores[-5:]),
           "max_success": max(succ, default=float("nan")), "last5_success": _mean(succ[-5:])}
    if len(evals) >= 10:                          # Diffusion Policy's metric: the mean of the last 10 checkpoints
        rec["last10_score"], rec["last10_success"] = _mean(scores[-10:]), _mean(succ[-10:])
    if rescored is not None:
        rec["rescored"] = rescored
    return rec


_SIGNALS = ("mse_to_expert", "sample_std", "eps_mse")   # the .md's training-signal lines


def _signal(e: dict, part: str, k: str):
    """An evaluation's logged signal ``k``: its training mean (``part="train"``) or its held-out value ("val")."""
    v = e.get(part, {}).get(("train/" if part == "train" else "") + k)
    return None if v is None or v != v else v


def _recipe(r: dict) -> str:
    """The settings that tell a run's variant apart, from its resolved config: "batch 128 x G 4, 8 neighbours, ..."."""
    p, t = r["policy_config"], r["train_config"]
    parts = [f"batch {t['batch_size']}" + (f" x G {p['n_noise']}" if "n_noise" in p else "")]
    if p.get("neighbor_positives"):
        parts.append(f"{p['neighbor_positives']} neighbours" + ("" if p.get("neighbor_same_episode", True) else " (other episodes)")
                     + (" (own anchor)" if p.get("neighbor_own_anchor") and p.get("action_anchor") else "")
                     + (f" (bandwidth {p['neighbor_bandwidth']:g})"
                        if p.get("neighbor_bandwidth", DriftConfig.neighbor_bandwidth) != DriftConfig.neighbor_bandwidth else ""))
    if p.get("neighbor_negatives"):
        parts.append(f"negatives from {p['neighbor_negatives']} neighbour mate{'s' * (p['neighbor_negatives'] > 1)}")
    groups = {"chunk": "flat chunk", "both": "per-step + chunk groups"}.get(p.get("drift_groups"))
    if groups:
        parts.append(groups)
    if "temperatures" in p and tuple(p["temperatures"]) != DriftConfig.temperatures:
        parts.append("temperatures " + " / ".join(f"{t:g}" for t in p["temperatures"]))
    if p.get("per_dim_scale"):
        parts.append("per-dim kernel scale")
    if p.get("kernel_scale", "batch") != "batch":
        parts.append(f"kernel scale per {p['kernel_scale']}")
    if p.get("obs_origin"):
        parts.append(f"obs also relative to dims {','.join(map(str, p['obs_origin']))}")
    if p.get("cond_mlp"):
        parts.append(f"cond MLP {p['cond_mlp']}")
    if p.get("noise_scale", 1) != 1:
        parts.append(f"sampling noise x {p['noise_scale']:g}")
    if (r.get("rescored") or {}).get("sampling_seed") is not None:
        parts.append(f"sampling seed {r['rescored']['sampling_seed']} (training seed {r['seed']})")
    if p.get("n_action_steps", PolicyConfig.n_action_steps) != PolicyConfig.n_action_steps:
        parts.append(f"executes {p['n_action_steps']} of {p.get('horizon', PolicyConfig.horizon)} steps")
    if p.get("guidance", 1) > 1:
        parts.append(f"guidance {p['guidance']:g}")
    if "num_inference_steps" in p:
        parts.append(f"{p.get('scheduler', 'ddpm').upper()}-{p['num_inference_steps']}")
    if p.get("obs_noise"):
        parts.append(f"obs noise {p['obs_noise']:g}")
    if p.get("action_anchor"):
        parts.append(f"actions relative to obs dims {','.join(map(str, p['action_anchor']))}")
    default_wd = TrainConfig.weight_decay                     # the dataclass default, not a copy of it
    if t.get("weight_decay", default_wd) != default_wd:
        parts.append(f"weight decay {t['weight_decay']:g}")
    if t.get("grad_clip", TrainConfig.grad_clip) != TrainConfig.grad_clip:
        parts.append(f"gradient clip {t['grad_clip']:g}" if t["grad_clip"] > 0 else "no gradient clip")
    parts += [p.get("backbone", "?"), f"lr {t['lr']:g}", f"warm-up {t['warmup_steps']}", f"EMA {t['ema_decay']:g}"
              + (f" (warm-up w {t['ema_warmup']})" if t.get("ema_warmup", TrainConfig.ema_warmup) != TrainConfig.ema_warmup
                 else "")]
    return ", ".join(parts)


def evaluated_alike(records: list[dict], command: str) -> dict:
    """{"eval_episodes": n, "eval_fraction": f} shared by every run record (empty without runs); SystemExit naming
    the key when they differ, since one record compares runs evaluated alike."""
    out = {}
    for key in ("eval_episodes", "eval_fraction"):
        used = sorted({r["train_config"][key] for r in records})
        if len(used) > 1:
            raise SystemExit(f"{command}: the runs were evaluated with different train.{key} ({used}); "
                             f"one record compares runs evaluated alike")
        if used:
            out[key] = used[0]
    return out


def write_compute_matched(records: list[dict], out: Path, meta: dict) -> Path:
    """``<out>/<task>.json`` (+ ``.md``, ``.png``): every run, and each variant's statistics over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    variants: dict[str, list[dict]] = {}
    for r in records:
        variants.setdefault(r["label"], []).append(r)
    summary = {}
    for label, rs in variants.items():
        summary[label] = {"seeds": [r["seed"] for r in rs], "complete": all(r["complete"] for r in rs),
                          **{k: _mean([r[k] for r in rs if k in r]) for k in
                             ("max_score", "last5_score", "last10_score", "max_success", "last5_success", "last10_success")
                             if any(k in r for r in rs)}}
        if len(rs) >= 2:            # how far apart the seeds are: the yardstick for a gap between two variants
            summary[label]["last5_score_sd"] = _sd([r["last5_score"] for r in rs])
    path = out / f"{meta['task']}.json"
    atomic_write_text(path, json.dumps({"meta": meta, "summary": summary, "runs": records}, indent=2))

    m = meta["machine"]
    # A report_only record is rewritten from run folders that may have been trained at different concurrencies.
    at_once = None if meta.get("report_only") else f"{m['concurrent_runs']} runs at a time"
    lines = [f"# {meta['task']}: drift vs diffusion at equal training compute", "",
             f"Budget {meta['budget']:,} generator sample-passes per run (one forward + backward of one action chunk; "
             f"drift pays batch x n_noise per step, diffusion batch). Evaluated every {meta['eval_fraction']:.0%} of the "
             f"budget on {meta['eval_episodes']} test seeds from {meta['start_seed']}. Machine: {m['cpu']}, "
             f"{m['cores']} cores, torch {m['torch']}, 1 thread per run, {at_once or 'runs trained earlier, at the concurrency their commands set'}. "
             f"Written by `{meta['command']}`.", "",
             "A variant is named by the overrides its runs were given, over the defaults of the commit they ran at; "
             "its recipe column is read from the runs' resolved configs, so it holds whatever those defaults were. "
             "Statistics are means over the seeds (score last-5: ± the standard deviation of the seeds' last-5 means, "
             "where there are two or more); a variant not done (stopped early, or still training) has them over "
             "the evaluations it has, up to the sample-passes its done column names.", ""]
    if meta.get("sources"):
        lines += ["Merged by `bench merge` from the records " + ", ".join(f"`{s['record']}`" for s in meta["sources"])
                  + ". Runs of one recipe (the same resolved policy and training config, but for the seed and how they "
                  "ran: threads, checkpoints, torch.compile) are one variant, named by its first run's label; the "
                  "JSON keeps each run's source record and label.", ""]
    partial = sorted({f"{r['label']} (last {r['rescored']['last']})" for r in records if r.get("rescored", {}).get("last")})
    if partial:
        lines += ["Scored again by `bench rescore` at their source's last evaluations only, so their max is over those "
                  "and their last-10 is not defined: " + ", ".join(partial) + ".", ""]
    lines += ["| variant | recipe | NFE | seeds | steps | sample-passes | score max | score last-5 | score last-10 | "
             "success max | success last-5 | s/step | done |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda v, d=3: "-" if v is None or v != v else f"{v:.{d}f}"
    for label, rs in variants.items():
        s = summary[label]
        passes = "/".join(f"{r['sample_passes']:,}" for r in rs)
        lines.append(f"| {label} | {_recipe(rs[0])} | {rs[0]['nfe']} | {','.join(map(str, s['seeds']))} | "
                     f"{'/'.join(str(r['steps']) for r in rs)} | {passes} | "
                     f"{f(s.get('max_score'))} | {f(s.get('last5_score'))}"
                     f"{'' if s.get('last5_score_sd') is None else ' ± ' + f(s['last5_score_sd'])} | {f(s.get('last10_score'))} | "
                     f"{f(s.get('max_success'), 2)} | {f(s.get('last5_success'), 2)} | "
                     f"{'/'.join(f(r['seconds_per_step'], 2) for r in rs)} | {_done(s, rs)} |")
    lines += ["", "Per run (seed): score at each evaluation, by sample-passes.", ""]
    for r in records:
        pts = ", ".join(f"{e['sample_passes'] / 1e6:.2f}M: {e['mean_score']:.3f}/{e['success_rate']:.2f}" for e in r["evals"])
        lines.append(f"- {r['label']} seed {r['seed']}: {pts or 'no evaluation yet'}")
    failing = [r for r in records if r["evals"] and all(e.get("low_score_seeds") is not None for e in r["evals"][-5:])]
    if failing:
        lines += ["", f"Per run (seed): episodes scoring under {LOW_SCORE} in the last 5 evaluations (failures rather than "
                  "imprecise finishes), and the test seeds that failed most often (times failed).", ""]
        for r in failing:
            last = r["evals"][-5:]
            seeds = [s for e in last for s in e["low_score_seeds"]]
            n_ep = r["train_config"]["eval_episodes"] * len(last)
            top = sorted(set(seeds), key=lambda s: (-seeds.count(s), s))[:8]
            lines.append(f"- {r['label']} seed {r['seed']}: {len(seeds)} of {n_ep} episodes; "
                         + (", ".join(f"{s} ({seeds.count(s)})" for s in top) or "none"))
    signals = [(r, part, k) for r in records for k in _SIGNALS for part in ("train", "val")
               if any(_signal(e, part, k) is not None for e in r["evals"])]
    if signals:
        lines += ["", "Per run (seed): training signals at each evaluation, in normalised action units (drift: the mse "
                  "of the generated chunks to the expert chunk, and the spread of an observation's G chunks; "
                  "diffusion: the noise-prediction mse). train: the mean over the log lines since the previous "
                  "evaluation; val: the EMA policy on 256 fixed held-out windows.", ""]
        for r, part, k in signals:
            pts = ", ".join(f"{e['sample_passes'] / 1e6:.2f}M: {f(_signal(e, part, k), 4)}" for e in r["evals"]
                            if _signal(e, part, k) is not None)
            lines.append(f"- {r['label']} seed {r['seed']}, {part} {k}: {pts}")
    atomic_write_text(path.with_suffix(".md"), "\n".join(lines) + "\n")

    legend_h = 0.2 + 0.16 * ((len(records) + 1) // 2)                   # inches: the legend goes below the axes
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2 + legend_h), sharey=True)
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")      # one distinct colour per variant
    colors = {label: cmap(i % cmap.N) for i, label in enumerate(variants)}
    for r in records:
        style = dict(color=colors[r["label"]], ls=["-", "--", ":", "-."][r["seed"] % 4], marker="o", ms=3,
                     label=f"{r['label']} s{r['seed']}")
        axes[0].plot([e["sample_passes"] / 1e6 for e in r["evals"]], [e["mean_score"] for e in r["evals"]], **style)
        axes[1].plot([e["train_minutes"] for e in r["evals"]], [e["mean_score"] for e in r["evals"]], **style)
    axes[0].set_xlabel("generator sample-passes (millions)")
    axes[1].set_xlabel("training minutes on this machine (1 thread per run" + (f", {at_once})" if at_once else ")"))
    axes[0].set_ylabel(" / ".join(sorted({r["score_label"] for r in records})) + f" ({meta['eval_episodes']} seeds)")
    for a in axes:
        a.grid(alpha=0.3)
        a.set_ylim(0, 1)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"{meta['task']}: equal training compute, {meta['budget']:,} sample-passes")
    fig.tight_layout(rect=(0, legend_h / (4.2 + legend_h), 1, 1))
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)
    return path


def _done(s: dict, rs: list[dict]) -> str:
    """The done column: yes, or how far the variant's least advanced run was evaluated (its last-5 is not the last
    5 of the budget then)."""
    if s["complete"]:
        return "yes"
    reached = min((r["evals"][-1]["sample_passes"] if r["evals"] else 0) for r in rs)
    return f"no: evaluated to {reached:,}"


def _split_outside_brackets(s: str, sep: str) -> list[str]:
    """``s`` split at each ``sep`` that is not inside [...], so a list value such as [0.02,0.05] stays whole."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch == "[") - (ch == "]")
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ConfigError(f"policies: unbalanced brackets in {s!r}")
    return parts + [cur]


def _variants(spec: str) -> dict[str, tuple[str, list[str]]]:
    """"drift_unet,diffusion_unet,drift_unet:policy.n_noise=4+train.batch_size=128" -> {label: (policy, overrides)}.
    Commas inside brackets belong to a list value: "drift_unet:policy.temperatures=[0.01,0.05]" is one variant."""
    out = {}
    for item in _split_outside_brackets(spec, ","):
        pol, _, ov = item.partition(":")
        overrides = [o for o in _split_outside_brackets(ov, "+") if o]
        out[pol + (f"[{' '.join(overrides)}]" if overrides else "")] = (pol, overrides)
    return out


def _folder(label: str, seed: int) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") + f"-s{seed}"


def bench_train(args: list[str]) -> Path:
    """``drift-policy bench train budget=N ...``: every variant and seed trained for the same number of generator
    sample-passes, with its cosine schedule over the resulting steps, evaluated at the same budget fractions."""
    defaults = {"budget": 1_200_000, "policies": "drift_unet,diffusion_unet", "seeds": "0,1",
                "task": "pusht_keypoints", "evals": 10, "jobs": 2, "episodes": 50,
                "out": str(Path("eval") / "results" / "compute_matched"), "runs": "", "overrides": "",
                "report_only": 0}
    opts = {**defaults, **_kv(args, {k: type(v) for k, v in defaults.items()},
                              usage="usage: drift-policy bench train [budget=1200000 seeds=0,1 "
                                    "policies=drift_unet,diffusion_unet ...] (runs='': runs/compute_matched-<task>-<budget>)",
                              defaults=defaults)}
    budget, task = opts["budget"], opts["task"]
    variants = _variants(opts["policies"])
    seeds = [int(s) for s in opts["seeds"].split(",")]
    n_evals, jobs, episodes = opts["evals"], opts["jobs"], opts["episodes"]
    out = Path(opts["out"])
    run_root = Path(opts["runs"] or Path("runs") / f"compute_matched-{task}-{budget}")
    extra = opts["overrides"].split()
    meta = {"task": task, "budget": budget, "eval_fraction": 1 / n_evals, "eval_episodes": episodes,
            "start_seed": 100000, "machine": machine_info(jobs), "runs_dir": str(run_root),
            "command": "drift-policy bench train " + " ".join(args), "report_only": bool(opts["report_only"])}
    todo = [(label, pol, ov, seed) for label, (pol, ov) in variants.items() for seed in seeds]

    def record() -> Path:
        recs = []
        for label, _, _, seed in todo:
            d = run_root / _folder(label, seed)
            if runs.config_path(d).exists():
                recs.append({"label": label, **run_record(d)})
        # How the runs were evaluated is read from the runs themselves, so a report_only record cannot claim the
        # options of the command that rewrote it.
        meta.update(evaluated_alike(recs, "bench train"))
        return write_compute_matched(recs, out, meta)

    if not opts["report_only"]:
        run_root.mkdir(parents=True, exist_ok=True)
        pending, active = list(todo), {}
        while pending or active:
            while pending and len(active) < jobs:
                label, pol, ov, seed = pending.pop(0)
                d = run_root / _folder(label, seed)
                if (runs.pretrained_dir(d) / "model.safetensors").exists():
                    continue                                      # finished earlier: the bench can be rerun
                if runs.list_checkpoints(d):
                    cmd = [sys.executable, "-m", "drift_policy", "resume", str(d)]   # interrupted earlier
                else:
                    cmd = [sys.executable, "-m", "drift_policy", "train", f"task={task}", f"policy={pol}", *ov, *extra,
                           f"train.seed={seed}", f"train.sample_passes={budget}", "train.max_steps=0",
                           f"train.eval_fraction={1 / n_evals}", "train.eval_every_steps=0",
                           "train.eval_every_minutes=0", "train.max_minutes=0", f"train.eval_episodes={episodes}",
                           "train.threads=1", "train.eval_workers=0", f"train.run_dir={d}"]
                print("launch:", " ".join(cmd), flush=True)
                log = open(run_root / f"{_folder(label, seed)}.log", "a")
                active[(label, seed)] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                         env={**os.environ, "OMP_NUM_THREADS": "1"})
            time.sleep(30)
            for key, proc in list(active.items()):
                if proc.poll() is not None:
                    del active[key]
                    if proc.returncode != 0:
                        print(f"{key[0]} seed {key[1]} failed (exit {proc.returncode}); see its log in {run_root}", flush=True)
            record()                                              # a partial record after every poll: nothing lost
    path = record()
    print(path.with_suffix(".md").read_text())
    return path


def bench_rescore(args: list[str]) -> list[Path]:
    """``drift-policy bench rescore runs=DIR policies=... seeds=0,1 set=policy.noise_scale=1``: runs of ``bench train``
    scored again at every evaluation, with inference-only policy keys changed (``PolicyConfig.INFERENCE``), and/or
    on more test seeds (``episodes=200``: seeds start_seed.., the first ones the source's), optionally only at the
    last k evaluations (``last=5``: the last-5 statistics on a larger test set, at a fraction of the cost).

    Each evaluation reloads the EMA weights of that step's checkpoint and replays the same test seeds with the same
    sampling seed, so the new run differs from its source only in how the trained policy acts (an unchanged policy
    reproduces the source's scores exactly). The new run goes beside its source, named as the variant with ``set``
    added to its overrides, so ``bench train report_only=1`` records it like any other run. It needs the checkpoint
    of every evaluation: train with ``train.ckpt_every_steps`` dividing the evaluation interval and
    ``train.keep_checkpoints`` at least the number of evaluations. Interrupted, it continues where it stopped."""
    from .threads import set_threads

    defaults = {"policies": "drift_unet", "seeds": "0,1", "task": "pusht_keypoints", "budget": 1_200_000,
                "runs": "", "set": "", "episodes": 0, "last": 0, "sampling_seed": -1}
    opts = {**defaults, **_kv(args, {k: type(v) for k, v in defaults.items()},
                              usage="usage: drift-policy bench rescore runs=DIR policies=... seeds=0,1 "
                                    "set=policy.noise_scale=1[+policy.KEY=VALUE ...] [episodes=N] [last=K] "
                                    "[sampling_seed=S]",
                              defaults=defaults)}
    items = [o for o in _split_outside_brackets(opts["set"], "+") if o]
    changes = {}
    for o in items:
        key, eq, value = o.partition("=")
        if not (key.startswith("policy.") and eq):
            raise ConfigError(f"set: {o!r} must be policy.KEY=VALUE (only inference-only policy keys can change)")
        changes[key[len("policy."):]] = value
    if opts["episodes"] < 0 or opts["last"] < 0:
        raise ConfigError(f"episodes and last must be >= 0 (0: the source's test seeds / every evaluation), got "
                          f"{opts['episodes']} and {opts['last']}")
    if opts["sampling_seed"] < -1:
        raise ConfigError(f"sampling_seed must be >= 0 (-1: the run's training seed, as when it was trained), got "
                          f"{opts['sampling_seed']}")
    sampling_seed = opts["sampling_seed"] if opts["sampling_seed"] >= 0 else None
    if not changes and not opts["episodes"] and sampling_seed is None:
        raise ConfigError("set: name at least one inference-only policy key to change, e.g. set=policy.noise_scale=1, "
                          "or score on more test seeds with episodes=N, or with other sampling noise (sampling_seed=S)")
    if opts["episodes"]:
        items.append(f"train.eval_episodes={opts['episodes']}")        # in the new run's name, as an override
    if sampling_seed is not None:
        items.append(f"sampling_seed={sampling_seed}")                 # in the new run's name (not a config key)
    run_root = Path(opts["runs"] or Path("runs") / f"compute_matched-{opts['task']}-{opts['budget']}")
    set_threads(1)
    written = []
    for label, (pol, ov) in _variants(opts["policies"]).items():
        for seed in (int(x) for x in opts["seeds"].split(",")):
            src = run_root / _folder(label, seed)
            dst = run_root / _folder(f"{pol}[{' '.join([*ov, *items])}]", seed)
            written.append(_rescore_run(src, dst, changes, opts["episodes"], opts["last"], sampling_seed))
    return written


def _rescore_run(src: Path, dst: Path, changes: dict, episodes: int = 0, last: int = 0,
                 sampling_seed: int | None = None) -> Path:
    """One run of ``bench rescore``: ``dst`` holds ``src``'s training log and config with ``changes`` (and
    ``episodes`` test seeds, if not 0), and every evaluation of ``src`` (or its ``last`` ones) replayed from its
    checkpoint, with the sampling noise seeded by ``sampling_seed`` (None: the run's training seed, as in
    training)."""
    from .evaluation import save_eval_json
    from .policies import with_inference
    from .train import evaluate_policy

    if not runs.config_path(src).exists():
        raise SystemExit(f"bench rescore: {src} is not a run folder (no config.json)")
    evals = [(json.loads(f.read_text()), f) for f in runs.eval_files(src)]
    if not evals:
        raise SystemExit(f"bench rescore: {src} has no evaluation to score again")
    evals = evals[-last:] if last else evals
    missing = [e["step"] for e, _ in evals if not runs.checkpoint_path(src, e["step"]).exists()]
    if missing:
        raise SystemExit(f"bench rescore: {src} kept no checkpoint for the evaluations at steps {missing}; train "
                         f"with train.ckpt_every_steps dividing the evaluation interval and train.keep_checkpoints "
                         f">= the number of evaluations")
    provenance = {"source": str(src.resolve()), "set": {f"policy.{k}": v for k, v in changes.items()},
                  **({"episodes": episodes} if episodes else {}), **({"last": last} if last else {}),
                  **({"sampling_seed": sampling_seed} if sampling_seed is not None else {})}
    prov_path = runs.rescored_path(dst)
    resuming = prov_path.exists() and json.loads(prov_path.read_text()) == provenance
    with runs.claim_run_dir(dst, resume=resuming):
        if not resuming:
            cfg = runs.read_config(src)                # the source's config with the changes: no weights to load
            cfg.policy = with_inference(cfg.policy, changes)
            if episodes:
                cfg.train.eval_episodes = episodes
            runs.write_config(dst, cfg)
            if runs.metrics_path(src).exists():       # the training log is the source's: the same training
                shutil.copyfile(runs.metrics_path(src), runs.metrics_path(dst))
            atomic_write_text(prov_path, json.dumps(provenance, indent=2))
        for ev, f in evals:
            out = runs.eval_path(dst, ev["step"])
            if out.exists():
                continue
            policy, cfg = runs.load_policy_for_eval(runs.checkpoint_path(src, ev["step"]), inference=changes)
            t = cfg.train
            res = evaluate_policy(policy, cfg, episodes or t.eval_episodes, 0, progress=False,
                                  seed=t.seed if sampling_seed is None else sampling_seed)
            # Training time, budget and held-out signals are the source's (compute_loss reads no inference key).
            res.update({k: ev[k] for k in ("step", "sample_passes", "train_minutes", "val") if k in ev},
                       rescored_from=str(f.resolve()))
            save_eval_json(res, out)
            print(f"{dst.name} step {ev['step']}: score {res['mean_score']:.3f}, success {res['success_rate']:.2f} "
                  f"(source {ev['mean_score']:.3f}, {ev['success_rate']:.2f})", flush=True)
        if (runs.pretrained_dir(src) / "model.safetensors").exists() and not runs.pretrained_dir(dst).exists():
            runs.load_policy_for_eval(runs.pretrained_dir(src), inference=changes)[0].save_pretrained(
                runs.pretrained_dir(dst))
    return dst


# How a run was carried out rather than what it trained: runs of ``bench train`` that differ only in these (and
# in their seed) are one recipe. torch.compile computes the same function as eager (to float rounding).
HOW_RUN_KEYS = ("seed", "run_dir", "overwrite", "threads", "eval_workers", "ckpt_every_steps", "keep_checkpoints",
                "compile", "device", "wandb", "wandb_project", "log_every", "max_minutes")


def recipe_key(run: dict) -> str:
    """A record run's recipe: its policy config with the keys added since filled as it was trained
    (``with_legacy_keys``), and its train config without ``HOW_RUN_KEYS``, as one canonical string."""
    import dataclasses

    from .policies import removed_options, with_legacy_keys

    policy = {**config_from_dict(with_legacy_keys(run["policy_config"], removed="quiet")).to_dict(), **removed_options(run["policy_config"])}
    try:
        train = dataclasses.asdict(TrainConfig(**run["train_config"]))
    except TypeError as exc:
        raise SystemExit(f"bench merge: run {run.get('run_dir')} has a train config this version cannot read ({exc})")
    train = {k: v for k, v in train.items() if k not in HOW_RUN_KEYS}
    # The same weights scored with other sampling noise (bench rescore sampling_seed=S) are another measurement.
    sampling = (run.get("rescored") or {}).get("sampling_seed")
    sampling = None if sampling == run.get("seed") else sampling     # the run's own seed: the same noise as trained
    return json.dumps({"policy": policy, "train": train, "sampling_seed": sampling}, sort_keys=True, default=list)


def bench_merge(args: list[str]) -> Path:
    """``drift-policy bench merge records=A.json,B.json=LABEL;LABEL out=DIR``: one record from the runs of
    committed ``bench train`` records, so that seeds trained in different sessions (whose run folders are gone)
    are compared as one variant. Each entry of ``records`` is a record's path, with ``=LABEL;LABEL...`` to take
    only the runs of those variants (a label means what its record's command meant: ``drift_unet`` is the default
    of the commit that record ran at). Runs of one recipe (``recipe_key``: the same resolved policy and training
    config but for the seed and how they ran) form one variant, named by its first run's label; each keeps its
    source record and label. The same run found in two records is kept once; two different runs of one recipe and
    seed, or runs trained for another budget or evaluated on other test seeds, are refused."""
    defaults = {"records": "", "out": ""}
    usage = "usage: drift-policy bench merge records=A.json[=LABEL;LABEL...],B.json[=...] out=DIR"
    opts = {**defaults, **_kv(args, {k: str for k in defaults}, usage=usage, defaults=defaults)}
    if not opts["records"] or not opts["out"]:
        raise ConfigError(f"bench merge: records and out are required ({usage})")
    sources, picked = [], []
    for entry in (e for e in _split_outside_brackets(opts["records"], ",") if e):
        name, _, chosen = entry.partition("=")
        wanted = [x for x in chosen.split(";") if x]
        path = Path(name)
        if not path.is_file():
            raise SystemExit(f"bench merge: no record at {path}")
        rec = json.loads(path.read_text())
        if "runs" not in rec or "meta" not in rec:
            raise SystemExit(f"bench merge: {path} is not a bench train record (no meta and runs)")
        labels = {r["label"] for r in rec["runs"]}
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise SystemExit(f"bench merge: {path} has no run labelled {missing} (its labels: {sorted(labels)})")
        sources.append((str(path), rec["meta"]))
        picked += [(str(path), rec["meta"], r) for r in rec["runs"] if not wanted or r["label"] in wanted]
    if not picked:
        raise SystemExit("bench merge: the records hold no run")
    # One comparison: the same task, budget and test seeds for every run.
    for key in ("task", "budget", "start_seed"):
        used = sorted({str(meta[key]) for _, meta, _ in picked})
        if len(used) > 1:
            raise SystemExit(f"bench merge: the runs come from records with different {key} ({used}); one record "
                             f"compares runs alike")
    evaluation = evaluated_alike([r for _, _, r in picked], "bench merge")
    label_of, records, kept = {}, [], {}
    for path, _, r in picked:
        key = recipe_key(r)
        label = label_of.setdefault(key, r["label"])
        trace = [(e["steps"], e["mean_score"], e["success_rate"]) for e in r["evals"]]
        if (key, r["seed"]) in kept:
            first_path, first_label, first_trace = kept[(key, r["seed"])]
            if first_trace != trace:
                raise SystemExit(f"bench merge: two different runs of one recipe with seed {r['seed']}: "
                                 f"{first_label!r} in {first_path} and {r['label']!r} in {path}")
            continue                                              # the same run, recorded twice
        kept[(key, r["seed"])] = (path, r["label"], trace)
        records.append({**r, "label": label, "source_label": r["label"], "source_record": path})
    metas = [meta for _, meta in sources]
    machine = {k: " / ".join(dict.fromkeys(str(m["machine"][k]) for m in metas)) for k in ("cpu", "cores", "torch")}
    meta = {"task": metas[0]["task"], "budget": picked[0][1]["budget"], "start_seed": picked[0][1]["start_seed"],
            **evaluation, "machine": {**machine, "threads_per_run": 1, "concurrent_runs": None, "gpu": None},
            "command": "drift-policy bench merge " + " ".join(args), "report_only": True,
            "sources": [{"record": p, "command": m.get("command")} for p, m in sources]}
    path = write_compute_matched(records, Path(opts["out"]), meta)
    print(path.with_suffix(".md").read_text())
    return path


def run_summary(args: list[str]) -> dict:
    """``drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]``: a run's evaluation history (every
    eval/step_*.json: score and success by step and training minute), its config and max / last-k statistics,
    as JSON plus a Markdown table on stdout, and its training plots (``plots``: PNG paths relative to the JSON,
    written beside it as <stem>_<plot>.png; without out=, into <run>/plots); for committing a run's record
    next to the README's numbers."""
    usage = "usage: drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]"
    opts = _kv(args, {"run": str, "out": str, "machine": str}, usage=usage,
               defaults={"out": "(stdout only)", "machine": "<cores>-core CPU"})
    if "run" not in opts:
        raise SystemExit(usage)
    run = Path(opts["run"])
    if not (run / "config.json").exists():
        raise SystemExit(f"{run}: not a run folder (no config.json)")
    s = summarize_run(run)
    s["config"] = json.loads((run / "config.json").read_text())
    s["machine"] = opts.get("machine", f"{os.cpu_count()}-core CPU")
    flags = [k for k in (s["evals"][-1] if s["evals"] else {}) if k not in
             ("step", "train_minutes", "coverage_score", "success_rate")]
    lines = [f"{s['config']['task']['name']}, {s['policy']['type']} policy ({s['policy']['architecture']} "
             f"{s['policy']['backbone']}), {s['machine']}", "",
             "| step | train min | score | success |" + "".join(f" {k} |" for k in flags),
             "|---|---|---|---|" + "---|" * len(flags)]
    lines += [f"| {r['step']} | {r['train_minutes']:.1f} | {r['coverage_score']:.3f} | {r['success_rate']:.2f} |"
              + "".join(f" {r.get(k, float('nan')):.2f} |" for k in flags) for r in s["evals"]]
    lines += ["", f"max score {s['max_coverage']:.3f}, mean of the last {s['n_last']} evaluations "
                  f"{s['last10_coverage']:.3f} (success {s['last10_success']:.2f})"]
    # The run's training plots (plots.py): next to the record as <out stem>_<plot>.png, else in <run>/plots.
    from .errors import RunFolderError
    from .plots import plot_run

    out = Path(opts["out"]) if "out" in opts else None
    try:
        pngs = plot_run(run, out.parent, prefix=f"{out.stem}_") if out else plot_run(run)
    except RunFolderError:                    # a run with no metrics and no evaluations yet: nothing to plot
        pngs = []
    base = out.parent if out else run
    s["plots"] = [os.path.relpath(p, base) for p in pngs]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in s["plots"]]
    print("\n".join(lines))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(s, indent=2))
        atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    return s


def main(args: list[str]) -> None:
    usage = ("usage: drift-policy bench {train,rescore,merge,latency,summary} [key=value ...]\n"
             "  drift-policy bench <train|rescore|merge|latency|summary> --help   lists that benchmark's keys and defaults")
    if args and args[0] in ("-h", "--help", "help"):
        print(usage)
        return
    if not args or args[0] not in ("train", "rescore", "merge", "latency", "summary"):
        raise SystemExit(usage)
    if args[0] == "summary":
        run_summary(args[1:])
    elif args[0] == "rescore":
        for d in bench_rescore(args[1:]):
            print(f"rescored: {d}")
    elif args[0] == "train":
        bench_train(args[1:])
    elif args[0] == "merge":
        bench_merge(args[1:])
    else:
        from .bench_latency import main as latency_main

        latency_main(args[1:])
