"""Timing and statistics, in one place for every benchmark and the real-time runner.

``time_call`` is the latency benchmark's measurement (warm-up, then as many timed calls as fit a budget, GC
off, CUDA synchronised around each call); ``percentile`` / ``summarize_times`` / ``latency_stats`` summarise
samples; ``cpu_model`` / ``machine_info`` describe the machine a record was made on.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

__all__ = ["MIN_REPEATS", "cpu_model", "machine_info", "sync", "time_call", "percentile", "summarize_times",
           "latency_stats"]

MIN_REPEATS = 3


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "torch_num_threads": torch.get_num_threads(), "torch_num_interop_threads": torch.get_num_interop_threads(),
            "hostname": platform.node(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        info["load_avg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_call(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 200, budget_s: float = 5.0,
              warmup: int = 10, min_repeats: int = MIN_REPEATS, inference_mode: bool = True) -> dict:
    """Warm up, then time ``fn()`` n times: as many as fit in ``budget_s``, at most ``repeats``, at least
    ``min(min_repeats, repeats)``.

    Returns {"median_ms", "p90_ms", "min_ms", "mean_ms", "n_repeats", "n_warmup", "times_ms"}.
    """
    ctx = torch.inference_mode if inference_mode else contextlib.nullcontext
    with ctx():
        # Warm-up: at least one call; stop early when half the budget is spent (slow cells).
        n_warm, t_warm0, first_s = 0, time.perf_counter(), None
        while n_warm < max(1, warmup):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            first_s = time.perf_counter() - t0     # the last warm-up call: the estimate for the timed ones
            n_warm += 1
            if time.perf_counter() - t_warm0 > budget_s / 2:
                break
        floor = min(min_repeats, repeats)                  # repeats below MIN_REPEATS: exactly that many
        n = int(min(repeats, max(floor, budget_s / max(first_s, 1e-9))))
        times = []
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(n):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()
    return {**summarize_times(times), "n_warmup": n_warm, "times_ms": times}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_times(times_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(times_ms), "p90_ms": percentile(times_ms, 90), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms), "n_repeats": len(times_ms)}


def latency_stats(values, scale: float = 1.0) -> dict:
    """{"p50", "p99", "max", "mean", "n"} of ``values`` times ``scale`` (e.g. 1e3: seconds to ms); {} if empty."""
    if len(values) == 0:
        return {}
    a = [float(v) * scale for v in values]
    return {"p50": percentile(a, 50), "p99": percentile(a, 99), "max": max(a), "mean": statistics.fmean(a),
            "n": len(a)}
