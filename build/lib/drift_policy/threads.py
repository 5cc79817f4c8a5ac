"""Explicit thread control: training beside rollout workers on few cores must not oversubscribe."""
from __future__ import annotations

import os


def set_threads(n: int) -> None:
    """Pin torch's intra-op (and inter-op, once) thread pools and the BLAS pools of child processes."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process; torch allows it only before parallel work starts
