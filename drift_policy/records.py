"""Benchmark records: what a record holds, how one is read from run folders and files, and how it is written.

Two kinds of record are committed under ``eval/results/``:

- a **bench record** (``bench train``, ``bench merge``): ``{"meta", "summary", "runs"}``; ``runs`` holds one
  ``run_record`` per run (its resolved config, budget and every evaluation by sample-passes, and the run's
  ``provenance.json``), ``summary`` each variant's statistics over its seeds, ``meta`` the task, budget, seeds,
  test seeds, machine, command and commit of the code that wrote it, and the default configs that the recipe
  column is read against (``recipe_defaults``);
- a **run record** (``bench summary``): one run's evaluation history, config and max / last-k statistics.

Every path a record holds is ``machine_free`` (relative, or ``<dir>/`` and its last parts): a record names no
folder of the machine it was made on. The tables and plots drawn from records are in ``rendering.py``; the
commands that write them in ``bench.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from . import runs
from .config import TrainConfig, compose
from .errors import ConfigError
from .fileio import atomic_write_text
from .policies import config_from_dict, removed_options, with_legacy_keys
from .policies.persistence import plain
from .provenance import git_commit, machine_free, read_provenance
from .tasks import family

LOW_SCORE = 0.5          # an episode scoring under this is a failure, not an imprecise finish

# How a run was carried out rather than what it trained: runs of ``bench train`` that differ only in these (and
# in their seed) are one recipe. torch.compile computes the same function as eager (to float rounding).
HOW_RUN_KEYS = ("seed", "run_dir", "overwrite", "threads", "eval_workers", "ckpt_every_steps", "keep_checkpoints",
                "compile", "device", "wandb", "wandb_project", "log_every", "max_minutes")
# Train keys that a bench record fixes for all its runs (the budget and the evaluation, stated in its header) or
# that follow from them and the batch: not part of a variant's recipe column.
RECORD_KEYS = ("sample_passes", "max_steps", "eval_every_steps", "eval_fraction", "eval_every_minutes",
               "eval_episodes")


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def sd(xs):
    """The sample standard deviation (n - 1); NaN for fewer than two values."""
    m = mean(xs)
    return (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else float("nan")


def machine_info(jobs: int = 1) -> dict:
    """What a benchmark ran on: CPU model, cores, torch, and how many runs shared the machine."""
    import torch

    from .timing import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads_per_run": 1,
            "concurrent_runs": jobs, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ---- one run ------------------------------------------------------------------------------------------------------
def run_record(run_dir: Path) -> dict:
    """One run of ``bench train``: its resolved config, budget, every evaluation by sample-passes, and the commit,
    command and machine that trained it (the run's ``provenance.json``; None for runs trained before it existed)."""
    run_dir = Path(run_dir)
    cfg = json.loads(runs.config_path(run_dir).read_text())
    t, p = cfg["train"], cfg["policy"]
    pcfg = config_from_dict(with_legacy_keys(p, removed="quiet"))
    # Two units of training compute: generator sample-passes, and images through the encoder (0 without cameras)
    per_step, enc_per_step = t["batch_size"] * pcfg.sample_passes_per_obs, t["batch_size"] * pcfg.encoder_passes_per_obs
    evals = []
    for f in runs.eval_files(run_dir):
        r = json.loads(f.read_text())
        evals.append({"sample_passes": r["step"] * per_step, "encoder_passes": r["step"] * enc_per_step,
                      "steps": r["step"], "train_minutes": r["train_minutes"],
                      "mean_score": r["mean_score"], "success_rate": r["success_rate"], "val": r.get("val", {}),
                      # the task's episode flags (BlockPush: p1, p2 and which block first; Kitchen: p1..p4, ...)
                      "flags": {k: r[k] for k in r.get("flags", ())},
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
        e["train"] = {k: mean([r[k] for r in rows if isinstance(r.get(k), (int, float))]) for k in keys}
        prev = e["steps"]
    # What bench rescore did (source, changed keys, test seeds, last k), for a rescored run; None otherwise.
    rescored = json.loads(runs.rescored_path(run_dir).read_text()) if runs.rescored_path(run_dir).exists() else None
    # A rescored run copied its source's whole training log, but it has spent only what it has scored so far: an
    # interrupted one counts up to its last evaluation, not to the end of the source's training.
    if evals and (evals[-1]["steps"] >= step or rescored is not None):
        step, minutes = evals[-1]["steps"], evals[-1]["train_minutes"]
    scores, succ = [e["mean_score"] for e in evals], [e["success_rate"] for e in evals]
    rec = {"run_dir": machine_free(run_dir), "policy": p["type"], "seed": t["seed"],
           "budget_sample_passes": t["sample_passes"], "sample_passes": step * per_step, "steps": step,
           "max_steps": t["max_steps"], "sample_passes_per_step": per_step,
           "encoder_passes": step * enc_per_step, "encoder_passes_per_step": enc_per_step,
           "complete": runs.finished(run_dir),
           "seconds_per_step": 60 * minutes / step if step and minutes else None,
           "nfe": pcfg.nfe, "score_label": family(cfg["task"]["env"]).score_label,
           "policy_config": p, "train_config": {**t, "run_dir": machine_free(t.get("run_dir", ""))},
           "provenance": read_provenance(run_dir), "evals": evals,
           "max_score": max(scores, default=float("nan")), "last5_score": mean(scores[-5:]),
           "max_success": max(succ, default=float("nan")), "last5_success": mean(succ[-5:])}
    flags = [k for k in (evals[-1]["flags"] if evals else {}) if all(k in e["flags"] for e in evals[-5:])]
    if flags:
        rec["last5_flags"] = {k: mean([e["flags"][k] for e in evals[-5:]]) for k in flags}
    if len(evals) >= 10:                          # Diffusion Policy's metric: the mean of the last 10 checkpoints
        rec["last10_score"], rec["last10_success"] = mean(scores[-10:]), mean(succ[-10:])
    if rescored is not None:
        rec["rescored"] = {**rescored, "source": machine_free(rescored["source"])} if "source" in rescored else rescored
    return rec


def summarize_run(run_dir: Path) -> dict:
    """A run's record for ``bench summary``: every evaluation (score and success by step and training minute, and
    the task's episode flags), max and last-10 statistics."""
    rows = [json.loads(p.read_text()) for p in runs.eval_files(run_dir)]
    # "coverage_score" is the score's name on Push-T (older eval files have only it); "mean_score" on every task.
    rows = [{"step": r["step"], "train_minutes": r["train_minutes"],
             "coverage_score": r.get("mean_score", r.get("coverage_score")), "success_rate": r["success_rate"],
             **{k: r[k] for k in r.get("flags", ())}}        # the task's episode flags (BlockPush: p1, p2, ...)
            for r in rows]
    last = rows[-10:]
    cfg = json.loads(runs.config_path(run_dir).read_text())
    return {
        "run_dir": machine_free(run_dir),
        "policy": cfg["policy"],
        "evals": rows,
        "max_coverage": max((r["coverage_score"] for r in rows), default=float("nan")),
        "max_success": max((r["success_rate"] for r in rows), default=float("nan")),
        "last10_coverage": sum(r["coverage_score"] for r in last) / max(1, len(last)),
        "last10_success": sum(r["success_rate"] for r in last) / max(1, len(last)),
        "n_last": len(last),
        "final_step": rows[-1]["step"] if rows else 0,
    }


# ---- variants -----------------------------------------------------------------------------------------------------
def by_label(records: list[dict]) -> dict[str, list[dict]]:
    """The runs of a bench record grouped by variant label, in the order the labels first appear."""
    variants: dict[str, list[dict]] = {}
    for r in records:
        variants.setdefault(r["label"], []).append(r)
    return variants


def variant_summary(rs: list[dict]) -> dict:
    """A variant's statistics: the mean over its runs (seeds) of each run's max / last-k score and success, and,
    with two or more seeds, the seeds' standard deviation of last-5 (the yardstick for a gap between variants)."""
    out = {"seeds": [r["seed"] for r in rs], "complete": all(r["complete"] for r in rs),
           **{k: mean([r[k] for r in rs if k in r]) for k in
              ("max_score", "last5_score", "last10_score", "max_success", "last5_success", "last10_success")
              if any(k in r for r in rs)}}
    if len(rs) >= 2:
        out["last5_score_sd"] = sd([r["last5_score"] for r in rs])
    flags = _common_flags(rs)
    if flags:
        out["last5_flags"] = {k: mean([r["last5_flags"][k] for r in rs]) for k in flags}
    return out


def _common_flags(rs: list[dict]) -> list[str]:
    """The episode flags every run of a variant has last-5 means of, in the first run's order."""
    return [k for k in (rs[0].get("last5_flags") or {}) if all(k in (r.get("last5_flags") or {}) for r in rs)]


def summaries(records: list[dict]) -> dict[str, dict]:
    return {label: variant_summary(rs) for label, rs in by_label(records).items()}


def evaluated_to(rs: list[dict]) -> int:
    """The sample-passes up to which the variant's least advanced run was evaluated."""
    return min((r["evals"][-1]["sample_passes"] if r["evals"] else 0) for r in rs)


def equal_minutes(records: list[dict]) -> dict | None:
    """The same runs compared at equal training time: ``{"minutes": T, "variants": {label: {...}}}`` where T is the
    training minutes (evaluations excluded) that the quickest variant took for its whole budget, averaged over its
    seeds, and each variant's statistics are over its evaluations made by T: the mean over its seeds of the last such
    evaluation's score and success, of the mean of up to 5 such evaluations' scores, and of the sample-passes reached.
    ``None`` unless two or more variants are complete and every evaluation has its training minutes. It means what
    it says only for runs that trained one per core at the same time (the record's machine line says how they ran);
    a variant evaluated at no point by T has ``None`` statistics."""
    variants = by_label(records)
    if len(variants) < 2 or not all(r["complete"] and r["evals"] for r in records) or \
            any(e.get("train_minutes") is None for r in records for e in r["evals"]):
        return None
    totals = {label: mean([r["evals"][-1]["train_minutes"] for r in rs]) for label, rs in variants.items()}
    t = min(totals.values())
    out = {}
    for label, rs in variants.items():
        upto = [[e for e in r["evals"] if e["train_minutes"] <= t * (1 + 1e-9)] for r in rs]
        if not all(upto):
            out[label] = {"minutes": totals[label], "score": None, "success": None, "last5_score": None,
                          "sample_passes": None}
            continue
        out[label] = {"minutes": totals[label],
                      "score": mean([es[-1]["mean_score"] for es in upto]),
                      "success": mean([es[-1]["success_rate"] for es in upto]),
                      "last5_score": mean([mean([e["mean_score"] for e in es[-5:]]) for es in upto]),
                      "sample_passes": mean([es[-1]["sample_passes"] for es in upto])}
    return {"minutes": t, "variants": out}


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


# ---- recipes --------------------------------------------------------------------------------------------------------
# A drift config written before neighbour positives existed trained with none; DriftConfig.LEGACY does not list the
# key, so its default (-1: the task's choice, 8 on Push-T keypoints) would claim eight (eval/results 300k's runs).
_RECORD_LEGACY = {"drift": {"neighbor_positives": 0}}


def resolved_recipe(run: dict) -> dict:
    """A record run's policy and train config as this version reads them: the policy keys added since filled as the
    run was trained (``with_legacy_keys``), the train keys through ``TrainConfig``."""
    saved = {**_RECORD_LEGACY.get(run["policy_config"].get("type"), {}), **run["policy_config"]}
    # Options removed since (measured worse) are kept in the recipe where the run used them, so old lever records
    # still name what they measured.
    policy = {**config_from_dict(with_legacy_keys(saved, removed="quiet")).to_dict(), **removed_options(saved)}
    try:
        train = dataclasses.asdict(TrainConfig(**run["train_config"]))
    except TypeError as exc:
        raise SystemExit(f"run {run.get('run_dir')} has a train config this version cannot read ({exc})")
    return {"policy": policy, "train": train}


def recipe_key(run: dict) -> str:
    """A record run's recipe (``resolved_recipe`` without ``HOW_RUN_KEYS``, and the sampling seed of a run scored
    again with other sampling noise) as one canonical string: runs with the same key are one variant."""
    r = resolved_recipe(run)
    train = {k: v for k, v in r["train"].items() if k not in HOW_RUN_KEYS}
    return json.dumps({"policy": r["policy"], "train": train, "sampling_seed": _sampling_seed(run)}, sort_keys=True,
                      default=list)


def _sampling_seed(run: dict):
    """The sampling seed of a run that ``bench rescore sampling_seed=S`` scored with other noise; None when it is
    the run's own (the noise it was trained and evaluated with)."""
    s = (run.get("rescored") or {}).get("sampling_seed")
    return None if s == run.get("seed") else s


def policy_name(label: str) -> str:
    """The policy config a variant label starts from: ``drift_unet[policy.n_noise=4]`` -> ``drift_unet``."""
    return label.split("[", 1)[0].split(":", 1)[0]


def default_configs(task: str, names, budget: int, eval_fraction: float, eval_episodes: int,
                    task_overrides: list[str] = ()) -> dict[str, dict]:
    """{policy config name: {"policy_config", "train_config"}}: what ``bench train`` resolves for each policy with
    no override, at this task, budget and evaluation: the reference a recipe column names differences from."""
    out = {}
    for name in dict.fromkeys(names):
        cfg = compose([f"task={task}", f"policy={name}", *task_overrides, f"train.sample_passes={budget}",
                       "train.max_steps=0", f"train.eval_fraction={eval_fraction}", "train.eval_every_steps=0",
                       f"train.eval_episodes={eval_episodes}"]).to_dict()
        out[name] = {"policy_config": cfg["policy"], "train_config": cfg["train"]}
    return out


def recipe_defaults(meta: dict, labels, commit: str | None = None) -> dict:
    """``meta["recipe_defaults"]`` for a record of these variant labels: the commit of this code (``commit``: as
    read before the caller changed any file) and the default config of each policy the labels start from (the
    task's overrides of the command, e.g. a data file, kept)."""
    overrides = [o for o in meta.get("overrides", []) if o.startswith("task.")]
    return {"commit": commit or git_commit(),
            "configs": default_configs(meta["task"], [policy_name(x) for x in labels], meta["budget"],
                                       meta.get("eval_fraction", 0.1), meta.get("eval_episodes", 50), overrides)}


def recipe_diff(run: dict, default: dict) -> list[tuple[str, object]]:
    """[(key, value)] of every policy and train key whose resolved value differs from ``default``'s (how a run was
    carried out, and the budget and evaluation that the record states once, left out), then the sampling seed of a
    run scored again with other noise: the whole of what sets the run's variant apart, for any key, old or new."""
    mine, base = resolved_recipe(run), resolved_recipe(default)
    out = []
    for group, skip in (("policy", ()), ("train", HOW_RUN_KEYS + RECORD_KEYS)):
        for k, v in mine[group].items():
            if k not in skip and plain(v) != plain(base[group].get(k, _MISSING)):
                out.append((f"{group}.{k}", plain(v)))
    if _sampling_seed(run) is not None:
        out.append(("sampling_seed", _sampling_seed(run)))
    return out


_MISSING = object()


def format_value(v) -> str:
    """A config value as an override writes it: true, null, 0.0006, [18,19]."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    return str(v)


def recipe_text(run: dict, defaults: dict) -> str:
    """The recipe column: ``policy.n_noise=4 train.batch_size=16`` (the keys that differ from the policy's default
    for the record's task), ``defaults`` when none does."""
    default = defaults.get(policy_name(run["label"]))
    if default is None:
        return "?"
    diff = recipe_diff(run, default)
    return " ".join(f"{k}={format_value(v)}" for k, v in diff) or "defaults"


# ---- reading and writing ----------------------------------------------------------------------------------------
def record_kind(d) -> str | None:
    """"bench" (bench train / merge), "run" (bench summary) or None (any other JSON under eval/results)."""
    if isinstance(d, dict) and "meta" in d and "runs" in d and isinstance(d["runs"], list):
        return "bench"
    if isinstance(d, dict) and "evals" in d and "run_dir" in d and "config" in d:
        return "run"
    return None


def read_record(path: str | os.PathLike, kinds: tuple[str, ...] = ("bench", "run")) -> dict:
    """The record at ``path``; ConfigError naming it when it is missing or not a record of these kinds."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no record at {path}")
    d = json.loads(path.read_text())
    if record_kind(d) not in kinds:
        raise ConfigError(f"{path} is not a {' or '.join(kinds)} record")
    return d


def write_json(path: Path, d: dict) -> Path:
    return atomic_write_text(path, json.dumps(d, indent=2))


def bench_record(records: list[dict], meta: dict) -> dict:
    """The JSON of a bench record: meta, each variant's statistics over its seeds, and every run."""
    return {"meta": meta, "summary": summaries(records), "runs": records}


def variant_stats(record: dict, label: str | None = None, seeds: list[int] | None = None) -> dict:
    """What a results table shows of one variant of a record (``label``; a run record has one) or of some of its
    seeds: {"seeds", "last5", "last5_sd", "last5_success", "max", "last10", "complete", "evaluated_to", "budget",
    "episodes", "score_label", "flags"} (flags: the task's episode flags, last-5 means over the seeds for a bench
    record, the final evaluation's for a run record); ConfigError naming the record's labels when the label is not in it."""
    if record_kind(record) == "run":
        ev = record["evals"]
        t = record["config"]["train"]
        final = ev[-1] if ev else {}
        flags = {k: v for k, v in final.items() if k not in ("step", "train_minutes", "coverage_score", "success_rate")}
        try:                                  # steps x batch x samples per observation, where the config reads
            per_obs = config_from_dict(with_legacy_keys(record["config"]["policy"])).sample_passes_per_obs
        except (ConfigError, TypeError):
            per_obs = None
        return {"kind": "run", "seeds": [t["seed"]], "final": final.get("coverage_score"),
                "sample_passes": record["final_step"] * t["batch_size"] * per_obs if per_obs else None,
                "final_success": final.get("success_rate"), "max": record["max_coverage"], "flags": flags,
                "steps": record["final_step"], "minutes": final.get("train_minutes"),
                "budget": t.get("sample_passes") if not t.get("max_minutes") else None,
                "max_minutes": t.get("max_minutes") or None, "episodes": t.get("eval_episodes"),
                "task": record["config"]["task"]["name"]}
    variants = by_label(record["runs"])
    if label not in variants:
        raise ConfigError(f"no variant {label!r} in the record (its labels: {sorted(variants)})")
    rs = [r for r in variants[label] if seeds is None or r["seed"] in seeds]
    if not rs:
        raise ConfigError(f"variant {label!r} has no run of seeds {seeds}")
    last5 = [r["last5_score"] for r in rs]
    return {"kind": "bench", "seeds": [r["seed"] for r in rs], "last5": mean(last5), "last5_sd": sd(last5),
            "per_seed": last5, "last5_success": mean([r["last5_success"] for r in rs]),
            "max": mean([r["max_score"] for r in rs]),
            "last10": mean([r["last10_score"] for r in rs]) if all("last10_score" in r for r in rs) else None,
            "complete": all(r["complete"] for r in rs), "evaluated_to": evaluated_to(rs),
            "budget": record["meta"]["budget"], "episodes": record["meta"].get("eval_episodes"),
            "flags": {k: mean([r["last5_flags"][k] for r in rs]) for k in _common_flags(rs)},
            "score_label": rs[0].get("score_label", "score"), "task": record["meta"]["task"]}
