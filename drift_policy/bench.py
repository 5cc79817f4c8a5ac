"""The benchmark commands: ``drift-policy bench train``, ``bench rescore``, ``bench merge``, ``bench latency`` and
``bench summary``. What a record holds is in ``records.py``, its tables and plots in ``rendering.py``.

bench train compares policies at equal TRAINING COMPUTE, counted in generator sample-passes (one forward and
backward of one action chunk through the backbone): the drift policy pays batch_size * n_noise per step, the
diffusion baseline batch_size. Each variant and seed gets ``budget`` sample-passes, i.e. its own max_steps, with
its cosine schedule over those steps (never over wall-clock), and is evaluated at the same fractions of the
budget. Runs go ``jobs`` at a time with one thread each; the record is rewritten after every poll, and a rerun
skips finished runs and resumes interrupted ones. Stopping the bench (Ctrl-C, kill, even kill -9) stops its runs.

    drift-policy bench train budget=1200000 seeds=0,1 policies=drift_unet,diffusion_unet
    drift-policy bench train budget=300000 policies=drift_unet,drift_unet:policy.n_noise=8+policy.neighbor_positives=0
    -> <out>/<task>.json (+ .md table, .png score vs sample-passes and vs minutes); out= defaults to
       <runs>/record, beside the run folders (a record is committed under eval/results/<task>/ by naming it)

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

from . import runs
from .errors import ConfigError, RunFolderError
from .fileio import atomic_write_text
from .provenance import command_line, git_commit, machine_free, read_provenance, write_provenance
from .records import (
    bench_record,
    evaluated_alike,
    machine_info,
    recipe_defaults,
    recipe_key,
    run_record,
    summarize_run,
    write_json,
)
from .rendering import bench_markdown, bench_plot, run_markdown
from .runs import parse_kv as _kv


def write_bench_record(records: list[dict], out: Path, meta: dict) -> Path:
    """``<out>/<task>.json`` (+ ``.md``, ``.png``): every run, and each variant's statistics over its seeds. The
    defaults that the recipe column is read against are those of this code, stored with the record."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "recipe_defaults": recipe_defaults(meta, [r["label"] for r in records])}
    record = bench_record(records, meta)
    path = write_json(out / f"{meta['task']}.json", record)
    atomic_write_text(path.with_suffix(".md"), bench_markdown(record))
    bench_plot(record, path.with_suffix(".png"))
    return path


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
                "out": "", "runs": "", "overrides": "",
                "report_only": 0}
    opts = {**defaults, **_kv(args, {k: type(v) for k, v in defaults.items()},
                              usage="usage: drift-policy bench train [budget=1200000 seeds=0,1 "
                                    "policies=drift_unet,diffusion_unet ...] (runs='': runs/compute_matched-<task>-<budget>; "
                                    "out='': <runs>/record)",
                              defaults=defaults)}
    budget, task = opts["budget"], opts["task"]
    variants = _variants(opts["policies"])
    seeds = [int(s) for s in opts["seeds"].split(",")]
    n_evals, jobs, episodes = opts["evals"], opts["jobs"], opts["episodes"]
    run_root = Path(opts["runs"] or Path("runs") / f"compute_matched-{task}-{budget}")
    out = Path(opts["out"] or run_root / "record")      # committing a record under eval/results is a choice
    extra = opts["overrides"].split()
    meta = {"task": task, "budget": budget, "seeds": seeds, "eval_fraction": 1 / n_evals, "eval_episodes": episodes,
            "start_seed": 100000, "machine": machine_info(jobs), "runs_dir": machine_free(run_root),
            "command": command_line(["bench", "train", *args]), "code_commit": git_commit(), "overrides": extra,
            "report_only": bool(opts["report_only"])}
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
        return write_bench_record(recs, out, meta)

    if not opts["report_only"]:
        run_root.mkdir(parents=True, exist_ok=True)
        pending, active = list(todo), {}
        while pending or active:
            while pending and len(active) < jobs:
                label, pol, ov, seed = pending.pop(0)
                d = run_root / _folder(label, seed)
                if runs.finished(d):
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
                active[(label, seed)] = launch_child(cmd, log)
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


def _die_with_parent() -> None:
    """In the child, before exec (Linux only): ask the kernel to send SIGTERM when the bench process dies, however
    it dies. Without it, a bench stopped by ``kill`` or ``kill -9`` leaves its runs training unseen, holding the
    cores; a run stopped so resumes from its last checkpoint (checkpoints are written atomically). Elsewhere Ctrl-C
    still stops the whole process group."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))           # 1 = PR_SET_PDEATHSIG


def launch_child(cmd: list[str], log) -> subprocess.Popen:
    """One run of a bench, one thread, its output appended to ``log``; it stops when the bench process dies."""
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


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
        raise RunFolderError(f"bench rescore: {src} is not a run folder (no config.json)")
    evals = [(json.loads(f.read_text()), f) for f in runs.eval_files(src)]
    if not evals:
        raise SystemExit(f"bench rescore: {src} has no evaluation to score again")
    evals = evals[-last:] if last else evals
    missing = [e["step"] for e, _ in evals if not runs.checkpoint_path(src, e["step"]).exists()]
    if missing:
        raise SystemExit(f"bench rescore: {src} kept no checkpoint for the evaluations at steps {missing}; train "
                         f"with train.ckpt_every_steps dividing the evaluation interval and train.keep_checkpoints "
                         f">= the number of evaluations")
    # The full source path stays in the run folder (it tells a resumed rescore from another); records shorten it.
    rescored = {"source": str(src.resolve()), "set": {f"policy.{k}": v for k, v in changes.items()},
                **({"episodes": episodes} if episodes else {}), **({"last": last} if last else {}),
                **({"sampling_seed": sampling_seed} if sampling_seed is not None else {})}
    prov_path = runs.rescored_path(dst)
    resuming = prov_path.exists() and {k: v for k, v in json.loads(prov_path.read_text()).items()
                                       if k != "source_provenance"} == rescored
    with runs.claim_run_dir(dst, resume=resuming):
        if not resuming:
            cfg = runs.read_config(src)                # the source's config with the changes: no weights to load
            cfg.policy = with_inference(cfg.policy, changes)
            if episodes:
                cfg.train.eval_episodes = episodes
            runs.write_config(dst, cfg)
            if runs.metrics_path(src).exists():       # the training log is the source's: the same training
                shutil.copyfile(runs.metrics_path(src), runs.metrics_path(dst))
            # The source's training commit and command, beside this run's own provenance (the rescoring code's).
            atomic_write_text(prov_path, json.dumps({**rescored, "source_provenance": read_provenance(src)}, indent=2))
            write_provenance(dst)
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
                       rescored_from=machine_free(f.resolve()))
            save_eval_json(res, out)
            print(f"{dst.name} step {ev['step']}: score {res['mean_score']:.3f}, success {res['success_rate']:.2f} "
                  f"(source {ev['mean_score']:.3f}, {ev['success_rate']:.2f})", flush=True)
        if runs.finished(src) and not runs.pretrained_dir(dst).exists():
            runs.load_policy_for_eval(runs.pretrained_dir(src), inference=changes)[0].save_pretrained(
                runs.pretrained_dir(dst))
    return dst


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
        sources.append((machine_free(path), {**rec["meta"], "committed_at": rec.get("committed_at")}))
        picked += [(machine_free(path), rec["meta"], r) for r in rec["runs"] if not wanted or r["label"] in wanted]
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
    meta = {"task": metas[0]["task"], "budget": picked[0][1]["budget"],
            "seeds": sorted({r["seed"] for r in records}), "start_seed": picked[0][1]["start_seed"],
            **evaluation, "machine": {**machine, "threads_per_run": 1, "concurrent_runs": None, "gpu": None},
            "command": command_line(["bench", "merge", *args]), "code_commit": git_commit(), "report_only": True,
            "sources": [{"record": p, "command": m.get("command"),
                         "commit": m.get("code_commit") or m.get("committed_at")} for p, m in sources]}
    path = write_bench_record(records, Path(opts["out"]), meta)
    print(path.with_suffix(".md").read_text())
    return path


def run_summary(args: list[str]) -> dict:
    """``drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]``: a run's evaluation history (every
    eval/step_*.json: score and success by step and training minute), its config and max / last-k statistics, and
    the commit, command and machine that trained it (its ``provenance.json``), as a Markdown table on stdout.
    With ``out=`` also as JSON and ``.md``, and its training plots (``plots``: PNG paths relative to the JSON,
    written beside it as <stem>_<plot>.png), for committing a run's record next to the README's numbers. Without
    it nothing is written, not even into the run folder (which may be read-only)."""
    usage = "usage: drift-policy bench summary run=DIR [out=FILE.json] [machine=TEXT]"
    opts = _kv(args, {"run": str, "out": str, "machine": str}, usage=usage,
               defaults={"out": "(stdout only)", "machine": "<cores>-core CPU"})
    if "run" not in opts:
        raise ConfigError(f"bench summary: run= is required ({usage})")
    run = Path(opts["run"])
    if not runs.config_path(run).exists():
        raise RunFolderError(f"{run}: not a run folder (no config.json)")
    s = summarize_run(run)
    s["config"] = json.loads(runs.config_path(run).read_text())
    s["config"]["train"]["run_dir"] = machine_free(s["config"]["train"].get("run_dir", ""))
    s["machine"] = opts.get("machine", f"{os.cpu_count()}-core CPU")
    s["seed"], s["budget_sample_passes"] = s["config"]["train"]["seed"], s["config"]["train"].get("sample_passes")
    s["provenance"] = read_provenance(run)
    s["code_commit"], s["command"] = git_commit(), command_line(["bench", "summary", *args])
    out = Path(opts["out"]) if "out" in opts else None
    s["plots"] = []
    if out:
        from .plots import plot_run

        try:                                  # the run's training plots (plots.py), next to the record
            pngs = plot_run(run, out.parent, prefix=f"{out.stem}_")
        except RunFolderError:                # a run with no metrics and no evaluations yet: nothing to plot
            pngs = []
        s["plots"] = [os.path.relpath(p, out.parent) for p in pngs]
    text = run_markdown(s)
    print(text, end="")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json(out, s)
        atomic_write_text(out.with_suffix(".md"), text)
    return s


def bench_headline(args: list[str]) -> Path:
    """``drift-policy bench headline runs=DIR policies=drift_unet,diffusion_unet seeds=0,1 episodes=200
    sampling_seeds=1000,1001 out=DIR``: the final weights of finished ``bench train`` runs scored on more test seeds
    with several sampling seeds, with 95 % intervals and the paired difference (``headline.py``)."""
    from .headline import headline
    from .provenance import command_line

    defaults = {"runs": "", "policies": "drift_unet,diffusion_unet", "seeds": "0,1", "episodes": 200,
                "sampling_seeds": "1000,1001", "out": "", "task": "pusht_keypoints", "budget": 1_200_000}
    opts = {**defaults, **_kv(args, {k: type(v) for k, v in defaults.items()},
                              usage="usage: drift-policy bench headline runs=DIR [policies=drift_unet,diffusion_unet "
                                    "seeds=0,1 episodes=200 sampling_seeds=1000,1001 out=DIR]", defaults=defaults)}
    run_root = Path(opts["runs"] or Path("runs") / f"compute_matched-{opts['task']}-{opts['budget']}")
    variants = {label: _folder(label, 0)[:-3] for label in _variants(opts["policies"])}
    path = headline(run_root, variants, [int(x) for x in opts["seeds"].split(",")],
                    Path(opts["out"] or run_root / "headline"), episodes=opts["episodes"],
                    sampling_seeds=tuple(int(x) for x in opts["sampling_seeds"].split(",")),
                    command=command_line(["bench", "headline", *args]))
    print(path.with_suffix(".md").read_text())
    return path


def bench_reach(args: list[str]) -> Path:
    """``drift-policy bench reach records=A.json[,B.json] labels=drift_unet,diffusion_unet target=0.95 out=DIR``: the
    sample-passes at which each variant's mean score over its seeds first reaches, and then holds, ``target``
    (``reach.py``), with its plot."""
    from .fileio import atomic_write_text
    from .provenance import command_line, git_commit
    from .reach import compute_to_target, plot_reach

    defaults = {"records": "", "labels": "", "target": 0.95, "out": ""}
    opts = {**defaults, **_kv(args, {"records": str, "labels": str, "target": float, "out": str},
                              usage="usage: drift-policy bench reach records=A.json[,B.json] labels=L1,L2 target=0.95 "
                                    "out=DIR", defaults=defaults)}
    if not opts["records"] or not opts["out"]:
        raise ConfigError("bench reach needs records=A.json[,B.json] and out=DIR")
    records = opts["records"].split(",")
    labels = [x for x in _split_outside_brackets(opts["labels"], ",") if x] or None
    try:
        result = compute_to_target(records, opts["target"], labels)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(opts["out"])
    names = list(result)
    lines = [f"# Training compute to reach and hold {opts['target']:g}", "",
             f"Mean score over each variant's seeds at every evaluation; written by `{command_line(['bench', 'reach', *args])}` "
             f"at {git_commit()}.", "", "| variant | seeds | first reaches | reaches and holds |", "|---|---|---|---|"]
    for name, r in result.items():
        f = lambda v: "never" if v is None else f"{v / 1e6:.2f}M"  # noqa: E731
        lines.append(f"| {name} | {','.join(map(str, r['seeds']))} | {f(r['first'])} | {f(r['held'])} |")
    if len(names) >= 2 and all(result[n]["held"] for n in names[:2]):
        lines += ["", f"Ratio {names[0]} / {names[1]} (reaches and holds): "
                      f"{result[names[0]]['held'] / result[names[1]]['held']:.2f}; the evaluations every 10 % of the "
                      f"budget bound its resolution."]
    atomic_write_text(out / "reach.json", json.dumps({"target": opts["target"], "records": records,
                                                       "command": command_line(["bench", "reach", *args]),
                                                       "code_commit": git_commit(), "result": result}, indent=2) + "\n")
    atomic_write_text(out / "reach.md", "\n".join(lines) + "\n")
    plot_reach(result, opts["target"], out / "reach.png")
    print("\n".join(lines))
    return out / "reach.json"


def main(args: list[str]) -> None:
    usage = ("usage: drift-policy bench {train,rescore,merge,headline,reach,latency,summary} [key=value ...]\n"
             "  drift-policy bench <train|rescore|merge|headline|reach|latency|summary> --help   lists that benchmark's "
             "keys and defaults")
    if args and args[0] in ("-h", "--help", "help"):
        print(usage)
        return
    if not args or args[0] not in ("train", "rescore", "merge", "headline", "reach", "latency", "summary"):
        raise ConfigError(usage.replace("\n", "; "))
    if args[0] == "reach":
        bench_reach(args[1:])
    elif args[0] == "headline":
        bench_headline(args[1:])
    elif args[0] == "summary":
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
