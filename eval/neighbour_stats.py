"""Which training windows the drift policy's neighbour positives are (issue 12): own episode or other demonstrations.

    python eval/neighbour_stats.py [--k 8] [--queries 2000] [--out eval/diagnostics/pusht_keypoints/neighbour_stats_pusht_keypoints.json]

For ``--queries`` training windows drawn with a fixed seed, the k nearest training observations (normalised
units, ``data/windows.py`` ``NeighborPositives``, the default ``neighbor_bandwidth``) are looked up twice: as the
``neighbor_same_episode=true`` does (any window; the record's "default", the Push-T keypoints default until its
drift recipe chose other episodes) and with ``neighbor_same_episode=false`` (other episodes only).
The record gives the share of the any-window neighbours that lie in the query's own episode, their time offsets,
and the kernel weights of both kinds: how much of the "extra positives" are the same demonstration shifted in time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drift_policy.config import compose
from drift_policy.data.windows import NeighborPositives
from drift_policy.normalizer import Normalizer
from drift_policy.records import machine_info
from drift_policy.train import make_datasets


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="pusht_keypoints")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = compose([f"task={a.task}", "policy=drift_unet"])
    train, _ = make_datasets(cfg)
    norm = Normalizer().fit("obs", train.steps("obs"))
    bw = cfg.policy.neighbor_bandwidth

    def normalize(o):
        return norm.normalize("obs", o)

    ids = torch.randint(0, len(train), (a.queries,), generator=torch.Generator().manual_seed(a.seed))
    own = train.episode[ids].unsqueeze(1)
    nb, w = NeighborPositives(train, normalize, a.k, bw).lookup(ids)
    same = train.episode[nb[:, 1:]] == own                                   # [Q, k]
    dt = (train.index[nb[:, 1:], 0] - train.index[ids, 0].unsqueeze(1)).abs()
    nb_o, w_o = NeighborPositives(train, normalize, a.k, bw, same_episode=False).lookup(ids)
    assert not (train.episode[nb_o[:, 1:]] == own).any()

    def q(x):
        x = x.float()
        return {"mean": float(x.mean()), "p10": float(x.quantile(0.1)), "median": float(x.median()),
                "p90": float(x.quantile(0.9))}

    rec = {
        "task": a.task, "k": a.k, "neighbor_bandwidth": bw, "queries": a.queries, "seed": a.seed,
        "training_windows": len(train), "training_episodes": int(train.episode.unique().numel()),
        "default": {"share_own_episode": float(same.float().mean()),
                    "own_episode_step_offset": q(dt[same]),
                    "weight_own_episode": q(w[:, 1:][same]),
                    "weight_other_episodes": q(w[:, 1:][~same]) if (~same).any() else None},
        "other_episodes_only": {"weight": q(w_o[:, 1:])},
        "machine": machine_info(),
    }
    out = Path(a.out or f"eval/diagnostics/{a.task}/neighbour_stats_{a.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec, indent=2) + "\n")
    d = rec["default"]
    print(f"{out}: default k={a.k}: {d['share_own_episode']:.2f} of the neighbours in the own episode, "
          f"median {d['own_episode_step_offset']['median']:g} steps away; other-episodes-only weight mean "
          f"{rec['other_episodes_only']['weight']['mean']:.2f}")
    return out


if __name__ == "__main__":
    main()
