"""Loss-curve parity: training from a LeRobotDataset conversion of Push-T vs from the original zarr store.

Both runs use the same policy, seed, thread count and step budget, evaluation off; the LeRobot run reads
``task=lerobot task.dataset=<converted folder>`` (its default features are environment_state + state, the same
20 numbers per step in the same order as ``task=pusht_keypoints``). The record holds both loss curves from the
runs' ``metrics.jsonl`` and their largest difference.

    /work/lerobot-venv/bin/python tests/fixtures/lerobot/make_fixture.py --episodes all --no-video \
        --out /tmp/pusht_lerobot                       # the official writer, in its own venv
    python eval/lerobot_parity.py --lerobot /tmp/pusht_lerobot --steps 30 --out eval/diagnostics/lerobot_parity.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from drift_policy.provenance import machine_free  # noqa: E402


def train(run_dir: Path, task_args: list[str], steps: int, seed: int, extra: list[str]) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "drift_policy", "train", *task_args, f"train.max_steps={steps}",
           "train.max_minutes=0", "train.threads=1", "train.eval_episodes=0", "train.log_every=1",
           f"train.seed={seed}", f"train.run_dir={run_dir}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r], wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lerobot", required=True, help="LeRobotDataset folder converted from the Push-T zarr")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "lerobot_parity.json")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs (e.g. policy.backbone=tiny)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        zarr_recs, zarr_wall = train(Path(tmp) / "zarr", ["task=pusht_keypoints"], args.steps, args.seed,
                                     args.overrides)
        lr_recs, lr_wall = train(Path(tmp) / "lerobot", ["task=lerobot", f"task.dataset={args.lerobot}"],
                                 args.steps, args.seed, args.overrides)
    za, la = [r["loss"] for r in zarr_recs], [r["loss"] for r in lr_recs]
    if [r["step"] for r in zarr_recs] != [r["step"] for r in lr_recs]:
        raise SystemExit("the two runs logged different steps")
    diffs = [abs(a - b) for a, b in zip(za, la)]
    mse = {k: [r.get("train/mse_to_expert") for r in recs] for k, recs in (("zarr", zarr_recs), ("lerobot", lr_recs))}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {
        "what": "training loss per step: task=lerobot on a LeRobotDataset conversion of Push-T (official writer, "
                "lerobot-dataset 0.4.4) vs task=pusht_keypoints on the zarr store",
        "lerobot_dataset": machine_free(args.lerobot), "steps": args.steps, "seed": args.seed, "threads": 1,
        "overrides": args.overrides, "evaluation": "off",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "python": platform.python_version()},
        "git_commit": commit,
        "loss": {"zarr": za, "lerobot": la},
        "mse_to_expert": mse,
        "max_abs_loss_diff": max(diffs), "final_loss": {"zarr": za[-1], "lerobot": la[-1]},
        "identical": za == la,
        "wall_s": {"zarr": zarr_wall, "lerobot": lr_wall},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{args.steps} steps: max |loss diff| {max(diffs):.3g}, final loss zarr {za[-1]:.5f} lerobot {la[-1]:.5f}, "
          f"identical {za == la}; record {args.out}")


if __name__ == "__main__":
    main()
