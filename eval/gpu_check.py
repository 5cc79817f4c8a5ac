"""Issue 12's GPU check, one prepared script: train Push-T keypoints for a fixed time on one GPU with the drift
default and with the diffusion baseline (batch 256 observations; drift x G noise draws), then time
``predict_action`` on CUDA (eager, CUDA graph, compile).

    python eval/gpu_check.py part=drift minutes=4          # one part per call (a device call runs <= 10 min)
    python eval/gpu_check.py part=diffusion minutes=4
    python eval/gpu_check.py part=latency
    python eval/gpu_check.py part=all minutes=10           # everything in one go, where time allows

Time enters only here, never into a schedule: a short calibration run measures seconds per training step on
this machine, and the real run gets ``train.max_steps`` = minutes / (seconds per step), so its cosine runs over
steps like every other run (``train.max_minutes`` stays a guard at twice the time). Each part writes its records
under ``out`` (default eval/diagnostics/gpu_check/): ``<part>_calibration.json`` (the measured step time and the step count
derived from it), ``<part>.json`` / ``.md`` / ``_*.png`` (``drift-policy bench summary`` of the run: every
evaluation, max and last-k coverage and success) and ``latency_cuda.json`` (``drift-policy bench latency``).
The run folders go to ``runs`` (default runs/gpu_check/). ``evals`` evaluations of ``episodes`` test seeds each,
at equal fractions of the run; ``presets``: the generator sizes ``bench latency`` times. ``device=cpu`` with a
tiny ``minutes`` tests the script where there is no GPU (``part=drift device=cpu minutes=0.1 calib_steps=12
episodes=2 eval_workers=0 threads=1 out=/tmp/g/out runs=/tmp/g/runs``: about 3 minutes on 2 cores).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {"drift": "drift_unet", "diffusion": "diffusion_unet"}
OPTIONS = {"part": "all", "minutes": "10", "device": "cuda", "batch": "256", "calib_steps": "60", "eval_workers": "8",
           "episodes": "50", "evals": "5", "presets": "small,medium", "out": "eval/diagnostics/gpu_check", "runs": "runs/gpu_check", "threads": "4"}


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run([sys.executable, "-m", "drift_policy", *cmd], check=True)


def machine(device: str) -> str:
    """The records' one-line machine: the GPU (the CPU for device=cpu) and torch, from timing.machine_info."""
    from drift_policy.timing import machine_info

    m = machine_info(device)
    return f"{m.get('gpu') or m['cpu']}, torch {m['torch']}"


def seconds_per_step(run: Path) -> float:
    """Median seconds per step between the logged steps of a finished run's metrics.jsonl, the first
    interval (compilation, warm-up) left out."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    rates = [(b["train_minutes"] - a["train_minutes"]) * 60 / (b["step"] - a["step"])
             for a, b in zip(rows[1:], rows[2:]) if b["step"] > a["step"]]
    if not rates:
        raise SystemExit(f"{run}: too few logged steps to calibrate; raise calib_steps")
    return statistics.median(rates)


def train(part: str, o: dict) -> None:
    out, runs = Path(o["out"]), Path(o["runs"])
    out.mkdir(parents=True, exist_ok=True)
    common = ["task=pusht_keypoints", f"policy={POLICIES[part]}", f"train.device={o['device']}",
              f"train.batch_size={o['batch']}", f"train.threads={o['threads']}", "train.overwrite=true"]
    calib = runs / f"{part}_calibration"
    steps = int(o["calib_steps"])
    sh("train", *common, f"train.max_steps={steps}", f"train.log_every={max(1, steps // 6)}",
       "train.eval_fraction=0", f"train.run_dir={calib}")
    sps = seconds_per_step(calib)
    max_steps = max(10, int(float(o["minutes"]) * 60 / sps))
    (out / f"{part}_calibration.json").write_text(json.dumps(
        {"policy": POLICIES[part], "seconds_per_step": sps, "calibration_steps": steps, "minutes": float(o["minutes"]),
         "max_steps": max_steps, "batch_size": int(o["batch"]), "machine": machine(o["device"])}, indent=2))
    run = runs / part
    sh("train", *common, f"train.max_steps={max_steps}", f"train.max_minutes={2 * float(o['minutes'])}",
       f"train.eval_workers={o['eval_workers']}", f"train.eval_episodes={o['episodes']}",
       f"train.eval_fraction={1 / int(o['evals']):.6g}", f"train.run_dir={run}")
    sh("bench", "summary", f"run={run}", f"out={out / part}.json", f"machine={machine(o['device'])}")


def main(argv: list[str]) -> None:
    o = dict(OPTIONS)
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in o:
            raise SystemExit(f"usage: python eval/gpu_check.py [{' '.join(f'{k}={v}' for k, v in OPTIONS.items())}]"
                             f"\nunknown or malformed argument {a!r}")
        o[k] = v
    parts = ["drift", "diffusion", "latency"] if o["part"] == "all" else [o["part"]]
    for part in parts:
        t0 = time.time()
        if part == "latency":
            sh("bench", "latency", f"device={o['device']}", f"presets={o['presets']}", f"out={Path(o['out']) / ('latency_' + o['device'].split(':')[0] + '.json')}")  # noqa: E501
        elif part in POLICIES:
            train(part, o)
        else:
            raise SystemExit(f"part must be drift, diffusion, latency or all, got {part!r}")
        print(f"{part}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
