"""How long the drift policy's neighbour search takes per training step, on a task's real training windows.

    python eval/profile_neighbours.py --task kitchen_lowdim [--batch 32] [--repeats 20] [--out DIR]

``NeighborPositives.lookup`` ranks all training windows for each observation of a batch by one matrix product,
then measures the k chosen exactly. This times it against the former search (``torch.cdist`` over every window,
then the same top-k), on the same batches, in CPU seconds of this thread (so the ratio holds on a shared machine),
and checks that both choose the same neighbours. With ``--out`` it writes ``neighbours_<task>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from drift_policy.config import compose
from drift_policy.normalizer import Normalizer
from drift_policy.policies import policy_class
from drift_policy.provenance import git_commit
from drift_policy.records import machine_info
from drift_policy.tasks import family
from drift_policy.train import make_datasets


def cdist_lookup(nbp, ids: torch.Tensor) -> torch.Tensor:
    """The former search: every RMS distance by torch.cdist, then the k + 1 smallest (the window itself first)."""
    q = nbp.keys[ids]
    d = torch.cdist(q, nbp.keys).div_(q.shape[1] ** 0.5)
    if nbp.episode is not None:
        d.masked_fill_(nbp.episode[ids].unsqueeze(1) == nbp.episode.unsqueeze(0), float("inf"))
    d[torch.arange(len(ids)), ids] = -1.0
    return d.topk(nbp.k + 1, dim=1, largest=False).indices


def cpu_ms(fn, batches) -> float:
    fn(batches[0])                                                      # warm-up
    t0 = time.thread_time()
    for b in batches:
        fn(b)
    return 1000 * (time.thread_time() - t0) / len(batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", default="kitchen_lowdim")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--overrides", nargs="*", default=[])
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    cfg = compose([f"task={a.task}", "policy=drift_unet", *a.overrides])
    if not cfg.policy.neighbor_positives:
        raise SystemExit(f"the drift policy on {a.task} has no neighbour positives (policy.neighbor_positives=0)")
    train_set, _ = make_datasets(cfg)
    norm = Normalizer().fit("obs", train_set.steps("obs"), min_range=family(cfg.task).obs_min_range)
    policy_class(cfg.policy).prepare_data(cfg.policy, train_set, norm)
    nbp = train_set.neighbors
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(train_set), (a.batch,), generator=g) for _ in range(a.repeats)]
    same = all(torch.equal(nbp.lookup(b)[0].sort(1).values, cdist_lookup(nbp, b).sort(1).values) for b in batches)
    new, old = cpu_ms(nbp.lookup, batches), cpu_ms(lambda b: cdist_lookup(nbp, b), batches)
    rec = {"task": a.task, "windows": len(train_set), "key_dims": nbp.keys.shape[1], "k": nbp.k,
           "same_episode": nbp.episode is None, "batch": a.batch, "repeats": a.repeats,
           "lookup_cpu_ms": new, "cdist_cpu_ms": old, "speedup": old / new, "same_neighbours": same,
           "code_commit": git_commit(), "machine": machine_info(), "overrides": a.overrides,
           "command": f"python eval/profile_neighbours.py --task {a.task} --batch {a.batch} --repeats {a.repeats}"
                      + (" --overrides " + " ".join(a.overrides) if a.overrides else "")}
    line = (f"{a.task}: {rec['windows']:,} windows x {rec['key_dims']} dims, k {nbp.k}, batch {a.batch}: lookup "
            f"{new:.1f} ms, cdist {old:.1f} ms of CPU per step ({rec['speedup']:.1f}x), same neighbours: {same}")
    print(line)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"neighbours_{a.task}.json").write_text(json.dumps(rec, indent=1) + "\n")
        m = rec["machine"]
        (a.out / f"neighbours_{a.task}.md").write_text(
            f"# Neighbour search per drift training step: {a.task}\n\nWritten by `{rec['command']}` at commit "
            f"{rec['code_commit']} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}, 1 thread; CPU time of the "
            f"thread, mean over {a.repeats} batches).\n\n{line}.\n")


if __name__ == "__main__":
    main()
