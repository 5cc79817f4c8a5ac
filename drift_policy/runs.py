"""A run folder: the one place that knows its layout, and loading a trained policy from it.

    <run>/config.json                the validated config (``Config.to_dict``), written when the run starts
    <run>/metrics.jsonl              one JSON record per logged step (and per evaluation)
    <run>/checkpoints/step_N.pt      atomic, verified checkpoints (``checkpoint.py``), newest kept
    <run>/eval/step_N.json           closed-loop evaluations during training
    <run>/pretrained/                the final EMA policy (``Policy.save_pretrained``)
    <run>/ddp.json                   DDP runs: every rank's parameter digest at the end
    <run>/plots/*.png                training plots, written when training ends (``plots.py``)
    <run>/rescored.json              a run scored again from another run's checkpoints (``bench rescore``): the
                                     source and the inference-only keys changed

Guarantees (see ``claim_run_dir``):

* exclusive: a training holds an ``fcntl.flock`` on ``<run>/.lock`` for its whole life; a second training or
  resume of the same folder fails at once with a clear error instead of writing the same files;
* never overwritten by accident: a folder that already holds a run (any of ``RUN_ENTRIES``) is refused unless
  the training resumes it or asks for ``train.overwrite=true`` (which clears the old run's files first);
* ``config.json`` is written atomically (``fileio``), so a crash never leaves it truncated;
* pruning keeps the newest *verified* checkpoints: a corrupt file never takes a keep slot.

Also here: ``parse_kv``, the key=value option parser of the eval, export, run and bench commands (a library
function, so no module needs the command line).
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from .checkpoint import is_verified, load_checkpoint
from .errors import CheckpointError, ConfigError, RunDirError
from .fileio import atomic_write_text

__all__ = ["CONFIG_FILE", "METRICS_FILE", "CHECKPOINTS_DIR", "EVAL_DIR", "PRETRAINED_DIR", "DDP_FILE", "PLOTS_DIR",
           "config_path", "metrics_path", "checkpoint_path", "eval_path", "eval_files", "pretrained_dir", "ddp_path",
           "plots_dir", "RESCORED_FILE", "rescored_path",
           "write_config", "read_config", "list_checkpoints", "latest_good_checkpoint", "prune_checkpoints",
           "load_policy_for_eval", "parse_kv", "flag", "comma_list", "RUN_ENTRIES", "existing_run_entries",
           "check_run_dir_free", "RunLock", "claim_run_dir", "RunDirError", "wants_help", "help_text"]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"
PRETRAINED_DIR = "pretrained"
DDP_FILE = "ddp.json"
PLOTS_DIR = "plots"
LOCK_FILE = ".lock"
RESCORED_FILE = "rescored.json"
# What makes a folder "a run": training into a folder holding any of these needs resume or train.overwrite=true.
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, CHECKPOINTS_DIR, EVAL_DIR, PRETRAINED_DIR, DDP_FILE, RESCORED_FILE)
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


def finished(run_dir: PathLike) -> bool:
    """Whether the run trained to its end: training saves the EMA policy into ``pretrained/`` last."""
    return (pretrained_dir(run_dir) / "model.safetensors").exists()


def ddp_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / DDP_FILE


def plots_dir(run_dir: PathLike) -> Path:
    """Where training and ``drift-policy plot`` write the run's PNGs (drift_policy/plots.py)."""
    return Path(run_dir) / PLOTS_DIR


def rescored_path(run_dir: PathLike) -> Path:
    return Path(run_dir) / RESCORED_FILE


def write_config(run_dir: PathLike, config) -> Path:
    """config.json, written atomically: a crash never leaves it truncated."""
    return atomic_write_text(config_path(run_dir), json.dumps(config.to_dict(), indent=2))


def read_config(run_dir: PathLike):
    """The run's validated ``Config`` (ConfigError naming the file if it has none)."""
    from .config import Config

    path = config_path(run_dir)
    if not path.exists():
        raise ConfigError(f"{run_dir}: not a run folder (no {CONFIG_FILE})")
    return Config.from_dict(json.loads(path.read_text()), where=str(path))


# ---- checkpoints of a run ----------------------------------------------------------------------------------------
def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """Checkpoints of a run, newest step first."""
    ckpts = [p for p in Path(run_dir, CHECKPOINTS_DIR).glob("step_*.pt") if p.stem.split("_")[1].isdigit()]
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
    """Keep the ``keep`` newest verified checkpoints; delete older verified ones. Files that do not verify are
    left in place for inspection and never count toward ``keep``, so the newest good checkpoint survives."""
    kept = 0
    for p in list_checkpoints(run_dir):
        if not is_verified(p):
            continue
        if kept < max(1, keep):
            kept += 1
            continue
        p.unlink(missing_ok=True)
        p.with_name(p.name + ".json").unlink(missing_ok=True)


def newest_verified_checkpoint(run_dir: PathLike) -> Path | None:
    return next((p for p in list_checkpoints(run_dir) if is_verified(p)), None)


# ---- claiming a run folder ----------------------------------------------------------------------------------------
def existing_run_entries(run_dir: str | os.PathLike) -> list[str]:
    run_dir = Path(run_dir)
    return [e for e in RUN_ENTRIES if (run_dir / e).exists()]


def check_run_dir_free(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise RunDirError when ``run_dir`` holds a run and ``overwrite`` is not set (reads only, writes nothing)."""
    found = existing_run_entries(run_dir)
    if found and not overwrite:
        raise RunDirError(f"{run_dir} already holds a run ({', '.join(found)}): resume it with "
                          f"`drift-policy resume {run_dir}`, choose another train.run_dir, or pass "
                          f"train.overwrite=true to replace it")


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run>/.lock``, released by ``release`` or at process exit
    (the kernel drops it when the process dies, even by kill -9: a stale lock file never blocks a resume)."""

    def __init__(self, run_dir: str | os.PathLike):
        import fcntl

        self.path = Path(run_dir) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RunDirError(f"{self.path.parent} is in use by another training or resume (it holds "
                              f"{self.path}); wait for it to finish or choose another train.run_dir") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)        # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim_run_dir(run_dir: str | os.PathLike, *, resume: bool = False, overwrite: bool = False) -> RunLock:
    """Take the folder for one training: lock it, then (not resuming) refuse an existing run unless
    ``overwrite``, in which case the old run's files are removed. Call it only after the config and the data
    have been validated: until then nothing in the folder is touched."""
    run_dir = Path(run_dir)
    if not resume:
        check_run_dir_free(run_dir, overwrite)   # before creating anything, so a refusal leaves no trace
    lock = RunLock(run_dir)
    try:
        if not resume:
            check_run_dir_free(run_dir, overwrite)   # again under the lock: another process may have started
            for e in existing_run_entries(run_dir):
                p = run_dir / e
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    except BaseException:
        lock.release()
        raise
    return lock


# ---- a trained policy -------------------------------------------------------------------------------------------
def load_policy_for_eval(path: PathLike, device: str = "cpu", inference: dict | None = None):
    """(policy in eval mode, its run's Config or None) from a run folder (its newest good checkpoint's EMA
    weights), a checkpoint file, or a save_pretrained folder (with the run's config when it is a run's
    ``pretrained/``). ``inference``: inference-only policy keys to change (``with_inference``), e.g.
    ``{"noise_scale": 1.0}``; both the policy and the returned Config carry the new values."""
    from .config import Config
    from .normalizer import Normalizer
    from .policies import Policy, make_policy, with_inference
    from .policies.base import load_state

    path = Path(path)
    if inference:
        policy, cfg = load_policy_for_eval(path, "cpu")
        pc = with_inference(policy.config, inference)
        changed = make_policy(pc, policy.normalizer)
        load_state(changed, policy.state_dict(), str(path))   # the same weights
        if cfg is not None:
            cfg.policy = pc
        return changed.to(device).eval(), cfg
    if (path / "model.safetensors").exists():
        policy = Policy.from_pretrained(path, device)
        run = path.parent                                  # a run's pretrained/ folder: the run knows its task
        return policy, (read_config(run) if config_path(run).exists() else None)
    if path.is_dir():
        found = latest_good_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no usable checkpoint (no checkpoints/step_*.pt that verifies, and no "
                                  f"model.safetensors)")
        ckpt = found[1]
    else:
        ckpt = load_checkpoint(path)
    cfg = Config.from_dict(ckpt["config"], where=str(path))
    norm = Normalizer.from_state_dict({k[len("normalizer."):]: v for k, v in ckpt["ema"].items()
                                       if k.startswith("normalizer.")})
    policy = make_policy(cfg.policy, norm)
    load_state(policy, ckpt["ema"], str(path))
    return policy.to(device).eval(), cfg


# ---- key=value options ----------------------------------------------------------------------------------------
HELP_FLAGS = ("-h", "--help", "help")


def wants_help(args: list[str]) -> bool:
    return any(a in HELP_FLAGS for a in args)


def help_text(usage: str, allowed: dict[str, Callable[[str], Any]], defaults: dict | None = None) -> str:
    """Usage and one line per key: its type and default (or what it defaults to)."""
    defaults = defaults or {}
    lines = [usage, "", "keys (key=value):"]
    for k, kind in allowed.items():
        default = defaults.get(k, "required" if k in ("checkpoint", "run") else "-")
        name = getattr(kind, "__name__", "value").strip("_<>") or "value"
        lines.append(f"  {k:<16} {name:<9} default: {default}")
    return "\n".join(lines)


def parse_kv(args: list[str], allowed: dict[str, Callable[[str], Any]], *, usage: str = "",
             defaults: dict | None = None) -> dict:
    """``["k=v", ...]`` -> {k: allowed[k](v)}; ConfigError naming the option for an unknown key, a missing
    ``=`` or a value its parser rejects. ``--help`` (or ``-h``, ``help``) prints ``usage`` and every key with its
    type and default, then exits with status 0."""
    if wants_help(args):
        print(help_text(usage or "keys: " + ", ".join(allowed), allowed, defaults))
        raise SystemExit(0)
    out = {}
    for a in args:
        if "=" not in a:
            raise ConfigError(f"expected key=value, got {a!r} (keys: {', '.join(allowed)}; --help lists defaults)")
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
    parse.__name__ = f"list[{getattr(kind, '__name__', 'value')}]"     # what --help shows
    return parse
