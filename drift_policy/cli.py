"""``drift-policy`` command line: train, resume, eval, bench.

    drift-policy train task=pusht_keypoints policy=drift_unet train.max_minutes=60
    drift-policy train --config-dir configs --config-name pusht_keypoints_drift   (an experiment of configs/)
    drift-policy resume runs/<run>
    drift-policy eval checkpoint=runs/<run> [episodes=50 workers=2 videos=2 out=eval.json]
    drift-policy bench latency | bench train | bench rescore | bench merge | bench summary   (see drift_policy/bench.py)
    drift-policy results [check=1]   (README.md's results block and docs/results/*.md from eval/results/index.yaml)
    drift-policy plot run=runs/<run> [out=DIR]   (training plots as PNGs, see drift_policy/plots.py)
    drift-policy export checkpoint=PATH format=onnx|torchscript out=FILE   (see drift_policy/export.py)
    drift-policy run checkpoint=PATH rate_hz=10 seconds=60 async=1 ensemble=0 backend=eager out=report.json
                                               (real-time control loop, see drift_policy/runner.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def train_help() -> str:
    """``train --help``: the task and policy choices, then every key with its default value."""
    import dataclasses

    from .config import compose
    from .paths import CONFIG_DIR

    names = lambda group: sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))  # noqa: E731
    cfg = compose([])
    lines = ["usage: drift-policy train [--config-dir DIR [--config-name NAME]] [task=NAME] [policy=NAME] "
             "[recipe=NAME|null] [group.key=value ...]", "",
             f"task=   {' | '.join(names('task'))}   (default {cfg.task.name})",
             f"policy= {' | '.join(names('policy'))}",
             f"recipe= {' | '.join(names('recipe'))}   (default <task>_<policy type> where it exists; null: none)",
             "--config-dir DIR --config-name NAME: compose DIR/NAME.yaml, a config that builds on the package's "
             "(the repository's configs/: one per recorded result); --config-dir DIR alone: more config folders "
             "(task/, recipe/, ...) searched after the package's", "",
             "keys with their defaults (task and policy keys: for the default task and policy; values derived from "
             "the task, such as policy.obs_dim, are set in Python):"]
    for group, obj in (("train", cfg.train), ("task", cfg.task), ("policy", cfg.policy)):
        lines += [f"  {group}.{f.name}={getattr(obj, f.name)!r}" for f in dataclasses.fields(obj)]
    return "\n".join(lines)


def config_flags(args: list[str]) -> tuple[dict, list[str]]:
    """``--config-dir DIR`` and ``--config-name NAME`` (also ``--flag=value``) as ``compose`` keywords, and the
    other arguments (the overrides)."""
    flags, rest, i = {}, [], 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in ("--config-dir", "--config-name"):
            if not eq:
                if i + 1 == len(args):
                    raise SystemExit(f"drift-policy train: {name} needs a value")
                value, i = args[i + 1], i + 1
            flags[name] = value
        else:
            rest.append(args[i])
        i += 1
    if "--config-name" in flags:           # a config of its own, in DIR (else in the package's folder)
        kw = {"config_name": flags["--config-name"], "config_dir": flags.get("--config-dir")}
    else:                                  # more config groups (task/, recipe/, ...) of one's own
        kw = {"search_path": [flags["--config-dir"]]} if "--config-dir" in flags else {}
    return kw, rest


def cmd_train(args: list[str]) -> None:
    from .runs import wants_help

    if wants_help(args):
        print(train_help())
        return
    from .config import compose
    from .train import train

    kw, overrides = config_flags(args)
    train(compose(overrides, **kw))


def cmd_resume(args: list[str]) -> None:
    from .runs import wants_help
    from .train import train

    usage = ("usage: drift-policy resume RUN_DIR\n\nContinue the run in RUN_DIR from its newest checkpoint that "
             "verifies, with the config stored in that checkpoint (no keys).")
    if wants_help(args):
        print(usage)
        return
    if len(args) != 1:
        raise SystemExit(usage)
    # train() takes the config stored in the checkpoint (config.json is not read: it may be truncated) and
    # rewrites config.json from it.
    train(None, run_dir=Path(args[0]), resume=True)


def cmd_eval(args: list[str]) -> None:
    from .config import compose
    from .errors import ConfigError
    from .evaluation import save_eval_json
    from .fileio import check_writable
    from .provenance import machine_free
    from .runs import load_policy_for_eval, parse_kv
    from .tasks import check_policy_fits_task
    from .threads import set_threads
    from .train import evaluate_policy

    usage = "usage: drift-policy eval checkpoint=PATH [episodes=50 workers=2 videos=0 seed=0 out=FILE]  (seed: the sampling noise's)"
    opts = parse_kv(args, {"checkpoint": str, "episodes": int, "workers": int, "videos": int, "out": str, "seed": int,
                           "threads": int, "task": str}, usage=usage,
                    defaults={"episodes": 50, "workers": 2, "videos": 0, "seed": 0, "threads": 1,
                              "out": "<run>/eval.json or <checkpoint>.eval.json",
                              "task": "the run's task (pusht_keypoints for a bare pretrained folder)"})
    if "checkpoint" not in opts:
        raise SystemExit(usage)
    for key, least in (("episodes", 1), ("workers", 0), ("videos", 0), ("threads", 1)):
        if opts.get(key, least) < least:
            raise ConfigError(f"{key} must be >= {least}, got {opts[key]}")
    ckpt = Path(opts["checkpoint"])
    out = Path(opts["out"]) if "out" in opts else (ckpt / "eval.json" if ckpt.is_dir() else ckpt.with_suffix(".eval.json"))
    check_writable(out, "eval out=")          # before the rollouts, not after
    set_threads(opts.get("threads", 1))
    policy, cfg = load_policy_for_eval(opts["checkpoint"])
    if "task" in opts or cfg is None:
        cfg = compose([f"task={opts['task']}"] if "task" in opts else [])   # else the default task
    check_policy_fits_task(policy.config, cfg.task)       # before the rollouts, not in the first one
    res = evaluate_policy(policy, cfg, opts.get("episodes", 50), opts.get("workers", 2),
                          video_dir=out.parent / "videos" if opts.get("videos") else None,
                          n_videos=opts.get("videos", 0), seed=opts.get("seed", 0))
    res["checkpoint"] = machine_free(opts["checkpoint"])    # a record names no folder of the machine
    res["sampling_seed"] = opts.get("seed", 0)       # the same weights and test seeds score differently per noise draw
    from .provenance import provenance

    res["provenance"] = provenance(["eval", *args])  # the commit, command and machine of this record
    # The score first: if the file cannot be written (a full disk), the episodes' result is not lost with it.
    print(f"{cfg.task.name}: score {res['mean_score']:.3f}, success rate {res['success_rate']:.2f} "
          f"over {res['n_episodes']} episodes (seeds {res['start_seed']}..)", flush=True)
    save_eval_json(res, out)
    print(f"written to {out}")


def cmd_plot(args: list[str]) -> None:
    from .plots import plot_run
    from .runs import parse_kv

    opts = parse_kv(args, {"run": str, "out": str})
    if "run" not in opts:
        raise SystemExit("usage: drift-policy plot run=RUN_DIR [out=DIR]")
    for path in plot_run(opts["run"], opts.get("out")):
        print(f"written: {path}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="drift-policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "resume", "eval", "bench", "results", "export", "run", "image",
                                                       "plot"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    from .errors import USER_ERRORS

    try:
        _dispatch(ns)
    except USER_ERRORS as e:
        # A wrong key or value, a missing or malformed data file, checkpoint or pretrained folder, a run folder in
        # use, an output path that cannot be written: the message says what and where, in one line.
        msg = " ".join(str(e).split()) or type(e).__name__
        parser.exit(2, f"drift-policy {ns.command}: error: {msg}\n")


def _dispatch(ns: argparse.Namespace) -> None:
    if ns.command == "train":
        cmd_train(ns.args)
    elif ns.command == "resume":
        cmd_resume(ns.args)
    elif ns.command == "eval":
        cmd_eval(ns.args)
    elif ns.command == "bench":
        from .bench import main as bench_main

        bench_main(ns.args)
    elif ns.command == "results":
        from .results import main as results_main

        results_main(ns.args)
    elif ns.command == "export":
        from .export import cmd_export

        cmd_export(ns.args)
    elif ns.command == "run":
        from .runner import cmd_run

        cmd_run(ns.args)
    elif ns.command == "plot":
        cmd_plot(ns.args)
    elif ns.command == "image":
        from .image.__main__ import main as image_main

        image_main(ns.args)


if __name__ == "__main__":
    main()
