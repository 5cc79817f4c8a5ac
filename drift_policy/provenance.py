"""Where a result came from: the code's git commit, the command line and the machine, written beside each run.

Every record of a result names the commit and machine it was made at (records are built from run folders), so a
number can always be traced to the code that produced it. Nothing here names a folder of the machine.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath

PROVENANCE_FILE = "provenance.json"
# An absolute path inside free text (a command line, a record's note): it starts the text or follows a space, "=",
# a quote, a bracket, a comma or a backtick, and runs to the next space, quote or backtick. "//" (a URL's host) and
# a lone "/" (as in "0.02 / 0.05") are not paths.
_PATH_IN_TEXT = re.compile(r"(?:(?<=^)|(?<=[\s='\"(\[,`]))(?:~/|/(?!/))[^\s'\"`]+")


def machine_free(path: str | os.PathLike) -> str:
    """``path`` as a record may hold it, naming no folder of the machine: a relative path unchanged, an absolute
    one relative to the working directory when inside it, else ``<dir>/`` and its last two parts
    (``/work/runs/r19/drift_unet-s2`` -> ``<dir>/r19/drift_unet-s2``)."""
    text = os.fspath(path)
    if not (text.startswith("/") or text.startswith("~")):
        return text
    p = Path(text).expanduser()
    try:
        return PurePosixPath(p.resolve().relative_to(Path.cwd().resolve())).as_posix() or "."
    except (ValueError, OSError):
        pass
    parts = [x for x in PurePosixPath(text).parts if x not in ("/", "~")]
    return "<dir>/" + "/".join(parts[-2:]) if parts else "<dir>"


def machine_free_text(text: str) -> str:
    """Every absolute path inside ``text`` made ``machine_free``."""
    return _PATH_IN_TEXT.sub(lambda m: machine_free(m.group(0)), text)


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the checkout holding ``path`` (default: this package), with ``+dirty`` when tracked files
    differ from it; None outside a git checkout (an installed wheel)."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "")


def machine() -> dict:
    """CPU model, cores, torch version, threads and GPU of this process's machine."""
    import torch

    from .timing import cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line(argv: list[str] | None = None) -> str:
    """The command as a user would type it: ``drift-policy <args>``, with every absolute path made
    ``machine_free`` (a record must not name a folder of the machine it was made on)."""
    def clean(a: str) -> str:
        key, eq, value = a.rpartition("=")
        if len(value) > 2 and value[1] == ":" and value[2] in "/\\":       # a Windows drive
            return f"{key}{eq}<dir>/{PurePosixPath(value.replace(chr(92), '/')).name}"
        return machine_free_text(a)

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["drift-policy", *(clean(a) for a in args)])


def provenance(argv: list[str] | None = None) -> dict:
    import drift_policy  # its __version__ (``from . import __version__`` would read as a private name)

    return {"commit": git_commit(), "version": drift_policy.__version__, "command": command_line(argv), "machine": machine()}


def write_provenance(run_dir: str | os.PathLike, argv: list[str] | None = None) -> Path:
    from .fileio import atomic_write_text

    path = Path(run_dir) / PROVENANCE_FILE
    atomic_write_text(path, json.dumps(provenance(argv), indent=2) + "\n")
    return path


def read_provenance(run_dir: str | os.PathLike) -> dict | None:
    path = Path(run_dir) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else None
