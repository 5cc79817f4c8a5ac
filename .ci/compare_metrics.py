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
    print(f"{len(ra)} records, every field but {sorted(TIMING)} identical (loss at the last: {ra[-1].get('loss')!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
