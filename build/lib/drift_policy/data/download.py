"""Downloading a data file: one place for every loader (Push-T's zip, robomimic's hdf5 files)."""
from __future__ import annotations

import os
from pathlib import Path


def fetch(url: str, dest: Path, hint: str) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part`` (renamed when complete); without network, a RuntimeError
    that says what failed and ``hint`` (how to get the file by hand)."""
    import urllib.error
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"could not download {url} ({e}). {hint}") from e
    os.replace(tmp, dest)
    return dest
