"""Atomic file writes: one home for "write a temporary file, fsync, rename into place".

A crash (even ``kill -9``) leaves either the old file or the complete new one, never a truncated one. The
temporary file has a unique name (``mkstemp`` in the target's folder, so the rename stays on one file system):
two writers of the same path never write into each other's temporary file. Its mode respects the umask (0644
under the usual 022), as a file made by ``open()`` would, not mkstemp's 0600. A failed write (a full disk, a
read-only folder) raises an OSError that names the file it was writing (``write_error``), never only
"[Errno 27] File too large".
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_error(e: OSError, path: str | os.PathLike) -> OSError:
    """``e`` as an error that names the file being written: "[Errno 27] cannot write PATH: File too large" (a
    write error of its own names no file, or a temporary one). The errno, and so the class (PermissionError,
    ...), is kept."""
    if e.errno:
        return OSError(e.errno, f"cannot write {path}: {e.strerror or e}")
    return OSError(f"cannot write {path}: {e}")


def _umask() -> int:
    """The process's umask: from /proc where there is one (os.umask can only read it by setting it, which races
    with other threads creating files), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path, suffix: str) -> tuple[int, str]:
    """A new, uniquely named file beside ``path`` (fd, name), with the mode a plain ``open()`` would give it
    (0666 minus the umask). mkstemp makes 0600 files: renamed into place, a released policy, a config or an
    eval record could then be read by no other user or container."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temp_file(path, ".tmp")
    except OSError as e:
        raise write_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise write_error(e, path) from e
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (a log such as metrics.jsonl); an error names the file."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise write_error(e, path) from e


def unique_temp_path(path: str | os.PathLike) -> Path:
    """A new, uniquely named empty file beside ``path``, for writers that need a file name (torch.jit.save,
    ONNX export, h5py): write it, then ``os.replace`` it onto ``path``; two writers never share it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_file(path, ".tmp")
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
