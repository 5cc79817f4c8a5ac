"""Image-track config: ``DEFAULTS``, then a YAML file (drift_policy/configs/image/*.yaml), then ``a.b=value``
overrides.

Kept as plain dicts on purpose: the image track has its own small set of keys (see ``DEFAULTS``, the one place
their defaults are written). A YAML file holds only what differs; ``base: <name>`` starts from another file.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..paths import CONFIG_DIR

__all__ = ["DEFAULTS", "load_config", "apply_overrides", "check_types"]

DEFAULTS: dict = {
    # name: fashion_mnist | mnist | folder (in memory) | store (an `image encode` store at root, streamed from disk)
    # image_size: folder, and the size FID reference folders are cropped to; workers: store DataLoader workers
    "data": {"name": "fashion_mnist", "root": None, "num_classes": 10, "image_size": 64, "workers": 0},
    # latent: none (pixel space) | tiny (autoencoder trained here) | kl (diffusers AutoencoderKL at `path`)
    "latent": {"kind": "none", "path": None, "scale": None, "tiny_minutes": 3.0},
    # hidden/depth/heads/mlp_ratio: None = the preset's value
    "model": {"preset": "tiny", "patch": 4, "n_context_tokens": 4, "n_style": 32, "style_codebook": 64,
              "noise_skip": False, "head_init_std": None, "ada_init_std": 0.0, "class_init_std": 1.0, "hidden": None, "depth": None, "heads": None, "mlp_ratio": None},  # noqa: E501
    "encoder": {"use": True, "path": "runs/image/encoder_fmnist.pt", "widths": [16, 32, 64], "blocks_per_stage": 1,
                "mae_minutes": 3.0, "mae_max_steps": 10 ** 9, "mae_mask_ratio": 0.5, "stages": [0, 1, 2], "loc_stages": [2],
                "patches": [2, 4], "max_groups": 64, "global_stats": True,
                "blocks": None,        # one count per stage (ResNet-34: [3, 4, 6, 3]); None: blocks_per_stage
                "input_x2": False,     # also the per-channel mean of x^2 of the encoder's input (paper A.5)
                "mae_patch": 4, "mae_lr": 2e-3, "mae_batch": 128,   # mae_batch: global (all processes)
                # the `encoder` command (mae.py): end this launch after N steps / keep a resume state every N steps
                "mae_launch_steps": None, "mae_save_every": 0},
    # labels_per_step is the global N_c: under torchrun each rank takes its own labels_per_step / world of them.
    "drift": {"labels_per_step": 10, "n_gen": 16, "n_pos": 32, "n_unc": 16, "per_class_queue": 128,
              "global_queue": 1000, "push_per_step": 128, "temperatures": [0.02, 0.05, 0.2], "raw": True,
              "attraction": 1.0, "cfg": True, "alpha_k": 3.0, "alpha_max": 4.0,
              "alpha_one_prob": 0.0},  # share of labels trained at alpha = 1 exactly (the rest ~ alpha^-k)
    # decay after the linear warm-up: constant | cosine (to 0 at train.steps)
    "optim": {"lr": 1e-3, "warmup_steps": 100, "betas": [0.9, 0.95], "weight_decay": 0.0, "grad_clip": 2.0,
              "ema": 0.999, "decay": "constant"},
    # steps: the run's length (the schedule; None: until a guard stops it). Guards that end this launch early,
    # with a resumable checkpoint: max_steps (a step count) and minutes (<= 0: off). resume: continue from
    # <out>/checkpoint.pt when it exists (so one command both starts and restarts a run).
    "train": {"steps": None, "minutes": 25.0, "max_steps": 10 ** 9, "seed": 0, "threads": 1, "log_every": 50,
              "out": "runs/image/fmnist", "save_every": 0, "save_every_minutes": 5.0, "resume": False,
              "snapshot_steps": []},   # also keep <out>/step<N>/checkpoint.pt at these steps (budget-matched ablations)
    "eval": {"classifier": "runs/image/classifier_fmnist.pt", "classifier_minutes": 3.0, "classifier_epochs": 2.0, "n_per_class": 1000, "alphas": [1.0, 1.5, 2.0],  # noqa: E501
             "grid_per_class": 10,
             "inception": None, "fid_ref": None},   # the `fid` command's defaults for inception= and ref=
}


def _merge(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (new or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse(val: str):
    v = yaml.safe_load(val)
    if isinstance(v, str):          # YAML 1.1 reads "2e-3" as a string
        try:
            return float(v)
        except ValueError:
            pass
    return v


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"expected key=value override, got {o!r}")
        key, val = o.split("=", 1)
        parts = key.split(".")
        d = cfg
        for p in parts[:-1]:
            if p not in d or not isinstance(d[p], dict):
                raise ConfigError(f"unknown config section {p!r} in {key!r}")
            d = d[p]
        if parts[-1] not in d:
            raise ConfigError(f"unknown config key {key!r} (known: {', '.join(d)})")
        d[parts[-1]] = _parse(val)
    return cfg


def _read(name_or_path: str, seen: tuple = ()) -> dict:
    """A YAML file (a path, or a name under configs/image/) merged onto its ``base`` chain."""
    p = Path(name_or_path)
    if not p.exists():
        p = CONFIG_DIR / "image" / (name_or_path if name_or_path.endswith(".yaml") else name_or_path + ".yaml")
    if not p.exists():
        raise FileNotFoundError(f"config {name_or_path!r} not found (looked in {CONFIG_DIR / 'image'})")
    if p.resolve() in seen:
        raise ValueError(f"config {p} is its own base")
    d = yaml.safe_load(p.read_text()) or {}
    base = d.pop("base", None)
    return _merge(_read(base, (*seen, p.resolve())), d) if base else d


def check_types(cfg: dict, defaults: dict = DEFAULTS, prefix: str = "") -> None:
    """ConfigError naming the key and the expected type when a value's type differs from its default's (an int
    is a number; None, or a default of None, accepts anything; numbers must be finite), so ``train.minutes=abc`` stops here
    instead of as a TypeError deep in training."""
    import math

    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string", list: "a list",
             dict: "a section"}
    for k, default in defaults.items():
        if k not in cfg or default is None or cfg[k] is None:     # None: "the preset's value" / "off"
            continue
        v, key = cfg[k], prefix + k
        if isinstance(default, dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key} must be {names[dict]}, got {v!r}")
            check_types(v, default, key + ".")
            continue
        want = type(default)
        ok = (isinstance(v, bool) if want is bool else
              isinstance(v, int) and not isinstance(v, bool) if want is int else
              isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if want is float else
              isinstance(v, (list, tuple)) if want is list else isinstance(v, want))
        if not ok:
            raise ConfigError(f"{key} must be {names.get(want, want.__name__)}, got {v!r}")


def load_config(name_or_path: str | None = None, overrides: list[str] | None = None) -> dict:
    """DEFAULTS <- YAML file (a path, or a name under configs/image/, with its ``base`` chain) <- overrides, then
    every value type-checked against its default (``check_types``)."""
    cfg = _merge(DEFAULTS, _read(name_or_path)) if name_or_path else DEFAULTS
    cfg = apply_overrides(cfg, overrides or [])
    check_types(cfg)
    return cfg
