"""The GPU check (issues 12 and 42), one prepared script for a session that is lent a GPU: Push-T keypoints
trained for a fixed time with the drift default and with the diffusion baseline (batch 256 observations; drift x
G noise draws), training throughput of both policies eager and compiled, and ``predict_action`` latency on CUDA
(eager, CUDA graphs, torch.compile) at batch 1 and 256.

    python eval/gpu_check.py part=all minutes=2            # everything in one device call (keep it < 10 min)
    python eval/gpu_check.py part=drift minutes=10         # or one part per call (a device call runs <= 10 min)
    python eval/gpu_check.py part=diffusion minutes=10
    python eval/gpu_check.py part=throughput
    python eval/gpu_check.py part=latency
    python eval/gpu_check.py part=all tiny=1               # the whole script on the CPU in ~6 min (2 cores)

Time enters only here, never into a schedule: a short calibration run measures seconds per training step on
this machine, and the real run gets ``train.max_steps`` = minutes / (seconds per step), so its cosine runs over
steps like every other run (``train.max_minutes`` stays a guard at twice the time). Each part writes its records
under ``out`` (default eval/diagnostics/gpu_check/):

* ``drift`` / ``diffusion``: ``<part>_calibration.json`` (the measured step time and the step count derived from
  it), ``<part>.json`` / ``.md`` / ``_*.png`` (``drift-policy bench summary`` of the run: every evaluation on the
  test seeds, max and last-k coverage and success, scored like the CPU records);
* ``throughput``: ``throughput.json`` / ``.md``: sample-passes per second (one generated chunk's forward and
  backward; drift pays batch x G per step, diffusion batch) of both policies, eager and ``train.compile=true``,
  from ``calib_steps`` training steps each (the first logged interval, compilation and warm-up, left out);
* ``latency``: ``latency_<device>.json`` / ``.md`` (``drift-policy bench latency``: the methods at batch 1 and
  256, and the default drift policy under every backend of the device, CUDA graphs included, at batch 1 and 256).

The run folders go to ``runs`` (default runs/gpu_check/). ``evals`` evaluations of ``episodes`` test seeds each,
at equal fractions of the run; ``presets``: the generator sizes ``bench latency`` times. ``tiny=1`` tests the
script where there is no GPU: device cpu, a few steps, 2 episodes, the tiny preset, eager throughput only
(``compile_modes=eager``; compiling the training step takes minutes on 2 cores), out/runs under /tmp/gpu_check_tiny
unless given.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

POLICIES = {"drift": "drift_unet", "diffusion": "diffusion_unet"}
PARTS = ("drift", "diffusion", "throughput", "latency")
OPTIONS = {"part": "all", "minutes": "10", "device": "cuda", "batch": "256", "calib_steps": "60", "eval_workers": "8",
           "episodes": "50", "evals": "5", "presets": "small,medium", "out": "eval/diagnostics/gpu_check", "runs": "runs/gpu_check",
           "threads": "4", "compile_modes": "eager,compiled", "latency_batches": "1,256", "latency_budget_s": "3",
           "latency_backends": "", "tiny": "0"}
# tiny=1: every part in a few minutes on a CPU (values given on the command line still win).
TINY = {"device": "cpu", "minutes": "0.1", "batch": "8", "calib_steps": "12", "eval_workers": "0", "episodes": "2",
        "evals": "1", "presets": "tiny", "threads": "1", "compile_modes": "eager", "latency_batches": "1,4",
        "latency_budget_s": "0.05", "latency_backends": "eager,fast_trace,reference",
        "out": "/tmp/gpu_check_tiny/out", "runs": "/tmp/gpu_check_tiny/runs"}


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


def sample_passes_per_step(policy: str, batch: int) -> int:
    """Generated chunks (forward + backward) per training step of ``policy`` at ``batch`` observations."""
    from drift_policy.config import compose

    return batch * compose([f"policy={policy}", "task=pusht_keypoints"]).policy.sample_passes_per_obs


def throughput(o: dict) -> dict:
    """Sample-passes per second of both policies, eager and compiled, from ``calib_steps`` training steps each."""
    out, runs = Path(o["out"]), Path(o["runs"])
    out.mkdir(parents=True, exist_ok=True)
    steps, batch = int(o["calib_steps"]), int(o["batch"])
    rows = []
    for name, policy in POLICIES.items():
        for mode in [m.strip() for m in o["compile_modes"].split(",") if m.strip()]:
            if mode not in ("eager", "compiled"):
                raise SystemExit(f"compile_modes: expected eager and/or compiled, got {mode!r}")
            run = runs / f"throughput_{name}_{mode}"
            t0 = time.time()
            sh("train", "task=pusht_keypoints", f"policy={policy}", f"train.device={o['device']}",
               f"train.batch_size={batch}", f"train.threads={o['threads']}", "train.overwrite=true",
               f"train.compile={'true' if mode == 'compiled' else 'false'}", f"train.max_steps={steps}",
               f"train.log_every={max(1, steps // 6)}", "train.eval_fraction=0", f"train.run_dir={run}")
            sps = seconds_per_step(run)
            per_step = sample_passes_per_step(policy, batch)
            rows.append({"policy": policy, "mode": mode, "batch_obs": batch, "sample_passes_per_step": per_step,
                         "seconds_per_step": sps, "sample_passes_per_s": per_step / sps, "steps": steps,
                         "wall_s": time.time() - t0})
    rec = {"machine": machine(o["device"]), "device": o["device"], "rows": rows,
           "what": "sample-passes per second = generated chunks (forward + backward) per step / median seconds per "
                   "step over the logged intervals after the first (compilation, warm-up)"}
    (out / "throughput.json").write_text(json.dumps(rec, indent=2))
    lines = [f"Training throughput, Push-T keypoints, {rec['machine']}, device {o['device']}", "",
             "| policy | mode | batch (obs) | sample-passes / step | s / step | sample-passes / s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['mode']} | {r['batch_obs']} | {r['sample_passes_per_step']} | "
              f"{r['seconds_per_step']:.4f} | {r['sample_passes_per_s']:,.0f} |" for r in rows]
    (out / "throughput.md").write_text("\n".join(lines) + "\n")
    return rec


def latency(o: dict) -> None:
    dev = o["device"].split(":")[0]
    sh("bench", "latency", f"device={o['device']}", f"presets={o['presets']}", f"batches={o['latency_batches']}",
       f"backend_batches={o['latency_batches']}", "backend_threads=1", "threads=1", f"budget_s={o['latency_budget_s']}",
       "task_policies=", "profile=0", f"out={Path(o['out']) / ('latency_' + dev + '.json')}",
       *([f"backends={o['latency_backends']}"] if o["latency_backends"] else []))   # empty: all of the device's


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
    given = {}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in OPTIONS:
            raise SystemExit(f"usage: python eval/gpu_check.py [{' '.join(f'{k}={v}' for k, v in OPTIONS.items())}]"
                             f"\nunknown or malformed argument {a!r}")
        given[k] = v
    o = {**OPTIONS, **(TINY if given.get("tiny", "0") not in ("0", "false", "") else {}), **given}
    parts = list(PARTS) if o["part"] == "all" else [o["part"]]
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"part must be one of {', '.join(PARTS)} or all, got {part!r}")
    times = {}
    for part in parts:
        t0 = time.time()
        if part == "latency":
            latency(o)
        elif part == "throughput":
            throughput(o)
        else:
            train(part, o)
        times[part] = time.time() - t0
        print(f"{part}: {times[part]:.0f} s", flush=True)
    print("parts: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
