"""``drift-policy`` command line: train, resume, eval, bench.

    drift-policy train task=pusht_keypoints policy=drift_unet train.max_minutes=60
    drift-policy resume runs/<run>
    drift-policy eval checkpoint=runs/<run> [episodes=50 workers=2 videos=2 out=eval.json]
    drift-policy bench latency | bench train   (see drift_policy/bench.py)
    drift-policy export checkpoint=PATH format=onnx|torchscript out=FILE   (see drift_policy/export.py)
    drift-policy run checkpoint=PATH rate_hz=10 seconds=60 async=1 ensemble=0 backend=eager out=report.json
                                               (real-time control loop, see drift_policy/runner.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_train(overrides: list[str]) -> None:
    from .config import compose
    from .train import train

    train(compose(overrides))


def cmd_resume(args: list[str]) -> None:
    from .runs import read_config
    from .train import train

    if len(args) != 1:
        raise SystemExit("usage: drift-policy resume RUN_DIR")
    # train() reloads the config stored in the checkpoint; config.json only has to parse.
    run_dir = Path(args[0])
    train(read_config(run_dir), run_dir=run_dir, resume=True)


def cmd_eval(args: list[str]) -> None:
    from .config import compose
    from .evaluation import save_eval_json
    from .runs import load_policy_for_eval, parse_kv
    from .threads import set_threads
    from .train import evaluate_policy

    opts = parse_kv(args, {"checkpoint": str, "episodes": int, "workers": int, "videos": int, "out": str, "seed": int,
                      "threads": int, "task": str})
    if "checkpoint" not in opts:
        raise SystemExit("usage: drift-policy eval checkpoint=PATH [episodes=50 workers=2 videos=0 out=FILE]")
    set_threads(opts.get("threads", 1))
    policy, cfg = load_policy_for_eval(opts["checkpoint"])
    if "task" in opts or cfg is None:
        cfg = compose([f"task={opts['task']}"] if "task" in opts else [])   # else the default task
    ckpt = Path(opts["checkpoint"])
    out = Path(opts["out"]) if "out" in opts else (ckpt / "eval.json" if ckpt.is_dir() else ckpt.with_suffix(".eval.json"))
    res = evaluate_policy(policy, cfg, opts.get("episodes", 50), opts.get("workers", 2),
                          video_dir=out.parent / "videos" if opts.get("videos") else None,
                          n_videos=opts.get("videos", 0), seed=opts.get("seed", 0))
    res["checkpoint"] = str(opts["checkpoint"])
    save_eval_json(res, out)
    print(f"{cfg.task.name}: score {res['mean_score']:.3f}, success rate {res['success_rate']:.2f} "
          f"over {res['n_episodes']} episodes (seeds {res['start_seed']}..); written to {out}")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="drift-policy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "resume", "eval", "bench", "export", "run", "image"])
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    from .errors import USER_ERRORS

    try:
        _dispatch(ns)
    except USER_ERRORS as e:
        # A wrong key or value, or a missing or malformed data file: the message says what and where.
        parser.exit(2, f"drift-policy {ns.command}: error: {e}\n")


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
    elif ns.command == "export":
        from .export import cmd_export

        cmd_export(ns.args)
    elif ns.command == "run":
        from .runner import cmd_run

        cmd_run(ns.args)
    elif ns.command == "image":
        from .image.__main__ import main as image_main

        image_main(ns.args)


if __name__ == "__main__":
    main()
