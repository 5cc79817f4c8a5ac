"""The headline comparison: ``drift-policy bench headline runs=DIR policies=drift_unet,diffusion_unet seeds=0,1``.

One 50-episode evaluation cannot rank recipes 0.01 apart: the same weights on the same test seeds move by about
that much with the sampling noise alone. So the headline scores each finished run's final weights (its
``pretrained/``: what a user gets) on ``episodes`` test seeds (200 by default) with each of several sampling seeds,
and states a 95 % interval. For every test seed the score is averaged over the training seeds and sampling seeds
of a variant; the interval is a bootstrap over test seeds (the episodes' start states are the sample that varies
most), and the difference between two variants is paired by test seed.

Each evaluation is saved as its own file (``<out>/<variant>-s<seed>/sampling<k>.json``, with every episode's
score), so an interrupted run continues where it stopped and the record can be rebuilt from the files.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import runs
from .errors import ConfigError

PathLike = str | os.PathLike
N_BOOT = 10_000                    # bootstrap resamples of the test seeds: the interval's ends move < 0.001 with more


def bootstrap_ci(per_seed: np.ndarray, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``per_seed`` [S] (resampling its entries)."""
    per_seed = np.asarray(per_seed, dtype=np.float64)
    if per_seed.ndim != 1 or len(per_seed) < 2:
        raise ValueError(f"need a 1-D array of at least 2 per-test-seed scores, got shape {per_seed.shape}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_seed), size=(n_boot, len(per_seed)))
    means = per_seed[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def per_test_seed(evals: list[dict], key: str = "max_reward") -> tuple[list[int], np.ndarray]:
    """(test seeds, [E, S] scores) of evaluations that share their test seeds (each an eval record with
    ``per_episode``); ``key`` "max_reward" (the score) or "success"."""
    if not evals:
        raise ValueError("no evaluations")
    seeds = [e["seed"] for e in evals[0]["per_episode"]]
    rows = []
    for ev in evals:
        if [e["seed"] for e in ev["per_episode"]] != seeds:
            raise ValueError("evaluations on different test seeds cannot be paired")
        rows.append([float(e[key]) for e in ev["per_episode"]])
    return seeds, np.array(rows)


def summarize(variants: dict[str, list[dict]], level: float = 0.95) -> dict:
    """{variant: {mean, ci, success, success_ci, n_evals, per_eval}} and, for the first variant against each other,
    the paired difference ``diff[other]`` with its interval."""
    out: dict = {"variants": {}, "differences": {}}
    scores = {}
    for name, evals in variants.items():
        _, s = per_test_seed(evals)
        _, w = per_test_seed(evals, "success")
        scores[name] = s.mean(axis=0)
        out["variants"][name] = {
            "mean": float(s.mean()), "ci": bootstrap_ci(s.mean(axis=0), level),
            "success": float(w.mean()), "success_ci": bootstrap_ci(w.mean(axis=0), level),
            "n_evals": len(evals), "n_test_seeds": int(s.shape[1]),
            "per_eval": [{"train_seed": ev["train_seed"], "sampling_seed": ev["sampling_seed"],
                          "mean": float(np.mean([e["max_reward"] for e in ev["per_episode"]]))} for ev in evals]}
    names = list(variants)
    for other in names[1:]:
        d = scores[names[0]] - scores[other]
        out["differences"][f"{names[0]} - {other}"] = {"mean": float(d.mean()), "ci": bootstrap_ci(d, level)}
    out["level"] = level
    return out


def render(summary: dict, meta: dict) -> str:
    lv = int(round(100 * summary["level"]))
    lines = [f"# Headline: final weights, {meta['episodes']} test seeds x sampling seeds {meta['sampling_seeds']}", "",
             f"Task `{meta['task']}`, budget {meta['budget']:,} sample-passes, test seeds from {meta['start_seed']}, "
             f"placement {meta.get('placement', '-')}. Written by `{meta['command']}` at {meta['code_commit']}.", "",
             f"| variant | training seeds | evaluations | score (mean, {lv} % CI) | success (mean, {lv} % CI) |",
             "|---|---|---|---|---|"]
    for name, v in summary["variants"].items():
        seeds = sorted({e["train_seed"] for e in v["per_eval"]})
        lines.append(f"| {name} | {','.join(map(str, seeds))} | {v['n_evals']} x {v['n_test_seeds']} episodes | "
                     f"{v['mean']:.3f} [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}] | "
                     f"{v['success']:.2f} [{v['success_ci'][0]:.2f}, {v['success_ci'][1]:.2f}] |")
    for name, d in summary["differences"].items():
        lines += ["", f"Paired by test seed, {name}: {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]."]
    lines += ["", "Per evaluation (training seed, sampling seed: mean score):", ""]
    for name, v in summary["variants"].items():
        lines.append(f"- {name}: " + "; ".join(f"s{e['train_seed']}/{e['sampling_seed']}: {e['mean']:.3f}"
                                               for e in v["per_eval"]))
    return "\n".join(lines) + "\n"


def headline(run_root: PathLike, variants: dict[str, str], seeds: list[int], out: PathLike, episodes: int = 200,
             sampling_seeds: tuple[int, ...] = (1000, 1001), command: str = "", workers: int = 0) -> Path:
    """Score every ``variants`` label's runs ``<run_root>/<folder>-s<seed>`` (``variants``: label -> run folder
    prefix) and write ``<out>/headline.{json,md}``; returns the json path."""
    from .evaluation import save_eval_json
    from .provenance import git_commit, machine, read_provenance
    from .threads import set_threads
    from .train import evaluate_policy

    if episodes < 2 or not sampling_seeds:
        raise ConfigError(f"episodes must be >= 2 and sampling_seeds non-empty, got {episodes} and {sampling_seeds}")
    set_threads(1)
    out = Path(out)
    collected: dict[str, list[dict]] = {}
    meta: dict = {"episodes": episodes, "sampling_seeds": list(sampling_seeds), "command": command,
                  "code_commit": git_commit(), "machine": machine(), "runs": {}}
    for label, prefix in variants.items():
        for seed in seeds:
            run = Path(run_root) / f"{prefix}-s{seed}"
            if not run.exists():                 # a seed this variant was not trained with: the record lists the runs
                continue
            pre = runs.pretrained_dir(run)
            if not (pre / "model.safetensors").exists():
                raise SystemExit(f"bench headline: {run.name} has no final weights (pretrained/); finish its training "
                                 f"first")
            policy, cfg = runs.load_policy_for_eval(pre)
            meta.update(task=cfg.task.name, budget=cfg.train.sample_passes, start_seed=cfg.task.start_seed)
            meta["runs"][run.name] = {"provenance": read_provenance(run), "steps": cfg.train.max_steps}
            for k in sampling_seeds:
                path = out / run.name / f"sampling{k}.json"
                if path.exists():
                    res = json.loads(path.read_text())
                else:
                    res = evaluate_policy(policy, cfg, episodes, workers, progress=False, seed=k)
                    res.update(train_seed=seed, sampling_seed=k, weights=f"{run.name}/pretrained",
                               code_commit=meta["code_commit"])
                    save_eval_json(res, path)
                    print(f"{run.name} sampling seed {k}: score {res['mean_score']:.3f}, success "
                          f"{res['success_rate']:.2f} ({res['wall_s']:.0f}s)", flush=True)
                meta["placement"] = res.get("placement", "-")
                collected.setdefault(label, []).append(res)
    missing = [label for label in variants if label not in collected]
    if missing:
        raise SystemExit(f"bench headline: no run of {missing} under {run_root} for seeds {seeds}")
    summary = summarize(collected)
    from .fileio import atomic_write_text

    atomic_write_text(out / "headline.json", json.dumps({"meta": meta, "summary": summary}, indent=2) + "\n")
    atomic_write_text(out / "headline.md", render(summary, meta))
    return out / "headline.json"
