"""The run folder: what it holds, and who may write it.

Layout: ``config.json`` (the validated config), ``metrics.jsonl``, ``checkpoints/step_*.pt`` (+ ``.json``
checksums), ``eval/step_*.json`` and, at the end, ``pretrained/`` (``save_pretrained``).

Guarantees (see ``claim_run_dir``):

* exclusive: a training holds an ``fcntl.flock`` on ``<run>/.lock`` for its whole life; a second training or
  resume of the same folder fails at once with a clear error instead of writing the same files;
* never overwritten by accident: a folder that already holds a run (any of ``RUN_ENTRIES``) is refused unless
  the training resumes it or asks for ``train.overwrite=true`` (which clears the old run's files first);
* ``config.json`` is written atomically (``fileio``), so a crash never leaves it truncated.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .fileio import atomic_write_text

RUN_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "eval", "pretrained")
LOCK_NAME = ".lock"


class RunDirError(RuntimeError):
    """The run folder is in use, or holds a run that would be overwritten; the message says what to do."""


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

        self.path = Path(run_dir) / LOCK_NAME
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


def write_run_config(run_dir: str | os.PathLike, config: dict) -> Path:
    return atomic_write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2))
