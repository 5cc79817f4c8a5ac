"""Atomic file writes: one home for "write a temporary file, fsync, rename into place".

A crash (even ``kill -9``) leaves either the old file or the complete new one, never a truncated one. The
temporary file has a unique name (``mkstemp`` in the target's folder, so the rename stays on one file system):
two writers of the same path never write into each other's temporary file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def unique_temp_path(path: str | os.PathLike) -> Path:
    """A new, uniquely named empty file beside ``path``, for writers that need a file name (torch.jit.save,
    ONNX export, h5py): write it, then ``os.replace`` it onto ``path``; two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Fail now, not after the work, when ``path`` cannot be written, and leave nothing behind: the missing
    folders are created, probed with a temporary file, and removed again. Raises OSError naming the path (the
    CLI turns it into a one-line error)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} path {path} is a folder, expected a file name")
    created = []
    try:
        for d in reversed([path.parent, *path.parent.parents]):
            if not d.exists():
                d.mkdir()
                created.append(d)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OSError(f"{what} path {path} is not writable ({e.strerror or e})") from e
    finally:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
    return path
