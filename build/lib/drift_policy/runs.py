"""A run folder: the one place that knows its layout, and loading a trained policy from it.

    <run>/config.json                the validated config (``Config.to_dict``), written when the run starts
    <run>/metrics.jsonl              one JSON record per logged step (and per evaluation)
    <run>/checkpoints/step_N.pt      atomic, verified checkpoints (``checkpoint.py``), newest kept
    <run>/eval/step_N.json           closed-loop evaluations during training
    <run>/pretrained/                the final EMA policy (``Policy.save_pretrained``)
    <run>/ddp.json                   DDP runs: every rank's parameter digest at the end

Also here: ``parse_kv``, the key=value option parser of the eval, export, run and bench commands (a library
function, so no module needs the command line).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable

from .checkpoint import load_checkpoint
from .errors import CheckpointError, ConfigError

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CHECKPOINTS_DIR", "EVAL_DIR", "PRETRAINED_DIR", "DDP_FILE",
           "config_path", "metrics_path", "checkpoint_path", "eval_path", "eval_files", "pretrained_dir", "ddp_path",
           "write_config", "read_config", "list_checkpoints", "latest_good_checkpoint", "prune_checkpoints",
           "load_policy_for_eval", "parse_kv", "flag", "comma_list"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
PRETRAINED_DIR = "pretrained"
DDP_FILE = "ddp.json"
PathLike = str | os.PathLike


# ---- layout ----------------------------------------------------------------------------------------------------
def config_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / CONFIG_FILE


def metrics_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / METRICS_FILE


def checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}.pt"


def eval_path(run_dir: PathLike, step: int) -> Path:
    return Path(run_dir) / EVAL_DIR / f"step_{step:08d}.json"


def eval_files(run_dir: PathLike) -> list[Path]:
    """The run's evaluation records, oldest step first."""
    return sorted(Path(run_dir, EVAL_DIR).glob("step_*.json"))


def pretrained_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / PRETRAINED_DIR


def ddp_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / DDP_FILE


def write_config(run_dir: PathLike, config) -> Path:
    path = config_path(run_dir)
    path.write_text(json.dumps(config.to_dict(), indent=2))
    return path


def read_config(run_dir: PathLike):
    """The run's validated ``Config`` (ConfigError naming the file if it has none)."""
    from .config import Config

    path = config_path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    return Config.from_dict(json.loads(path.read_text()))


# ---- checkpoints of a run ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Checkpoints of a run, newest step first."""
    ckpts = Path(run_dir, CHECKPOINTS_DIR).glob("step_*.pt")
    return sorted(ckpts, key=lambda p: int(p.stem.split("_")[1]), reverse=True)


def latest_good_checkpoint(run_dir: PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; corrupted ones are reported and skipped, never deleted."""
    for p in list_checkpoints(run_dir):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            warnings.warn(f"skipping bad checkpoint: {e}")
    return None


def prune_checkpoints(run_dir: PathLike, keep: int) -> None:
    for p in list_checkpoints(run_dir)[keep:]:
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".json").unlink(missing_ok=True)


# ---- a trained policy -------------------------------------------------------------------------------------------
def load_policy_for_eval(path: PathLike, device: str = "cpu"):
    """(policy in eval mode, its run's Config or None) from a run folder (its newest good checkpoint's EMA
    weights), a checkpoint file, or a save_pretrained folder (with the run's config when it is a run's
    ``pretrained/``)."""
    from .config import Config
    from .normalizer import Normalizer
    from .policies import Policy, make_policy

    path = Path(path)
    if (path / "model.safetensors").exists():
        policy = Policy.from_pretrained(path, device)
        run = path.parent                                  # a run's pretrained/ folder: the run knows its task
        return policy, (read_config(run) if config_path(run).exists() else None)
    if path.is_dir():
        found = latest_good_checkpoint(path)
        if found is None:
            raise SystemExit(f"{path}: no usable checkpoint")
        ckpt = found[1]
    else:
        ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"])
    norm = Normalizer.from_state_dict({k[len("normalizer."):]: v for k, v in ckpt["ema"].items()
                                       if k.startswith("normalizer.")})
    policy = make_policy(cfg.policy, norm)
    policy.load_state_dict(ckpt["ema"])
    return policy.to(device).eval(), cfg


# ---- key=value options ----------------------------------------------------------------------------------------
def parse_kv(args: list[str], allowed: dict[str, Callable[[str], Any]]) -> dict:
    """``["k=v", ...]`` -> {k: allowed[k](v)}; ConfigError naming the option for an unknown key, a missing
    ``=`` or a value its parser rejects."""
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (keys: {', '.join(allowed)})")
        k, v = a.split("=", 1)
        if k not in allowed:
            raise ConfigError(f"unknown option {k!r} (keys: {', '.join(allowed)})")
        try:
            out[k] = allowed[k](v)
        except ValueError as e:
            raise ConfigError(f"{k}: {e} (bad option value {v!r})") from None
    return out


def flag(v: str) -> bool:
    """An on/off option: 1/0, true/false, yes/no, on/off."""
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a flag 0/1, got {v!r}")


def comma_list(kind: Callable[[str], Any]) -> Callable[[str], list]:
    """A comma-separated list option, each item parsed by ``kind``."""
    def parse(v: str) -> list:
        try:
            return [kind(s.strip()) for s in v.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"expected a comma-separated list of {getattr(kind, '__name__', 'values')}, "
                             f"got {v!r}") from None
    return parse
