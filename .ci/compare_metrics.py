"""Compare two runs' metrics.jsonl record by record, exactly, ignoring timing fields.

    python .ci/compare_metrics.py RUN_A RUN_B        (exit 0: identical; 1: a difference, printed)

Used to check that a refactor leaves a fixed-seed training run unchanged (same losses, gradients, statistics).
"""
import json
import sys
from pathlib import Path

TIMING = {"train_minutes"}        # wall-clock fields: differ between any two runs


def records(run: str) -> list[dict]:
    lines = Path(run, "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines if line.strip()]


def main(a: str, b: str) -> int:
    ra, rb = records(a), records(b)
    if len(ra) != len(rb):
        print(f"{len(ra)} records in {a}, {len(rb)} in {b}")
        return 1
    for x, y in zip(ra, rb):
        if x != y:
            keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            print(f"step {x.get('step')}: " + ", ".join(f"{k}: {x.get(k)!r} vs {y.get(k)!r}" for k in keys))
            return 1
    losses = [r["loss"] for r in ra if "loss" in r]
    evals = [r["eval/mean_score"] for r in ra if "eval/mean_score" in r]
    print(f"{len(ra)} records, every field but {sorted(TIMING)} identical; {len(losses)} losses (last "
          f"{losses[-1] if losses else None!r}), {len(evals)} evaluations (last score {evals[-1] if evals else None!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
