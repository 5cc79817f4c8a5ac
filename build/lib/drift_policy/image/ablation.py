"""Miniature ablation on the synthetic 16x16 task (seconds per run on one CPU thread).

Every variant trains the same small generator for the same number of steps; we report
  agreement   fraction of samples whose nearest class template (mean real image of a class) is their label
  fd_pixels   Fréchet distance between generated and real images of each class (256-d pixels), mean over classes
  spread      within-class per-pixel std of the samples / that of real images (1 = right diversity, <1 = collapse)

    python -m drift_policy.image ablate-synthetic [steps=200] [seeds=2] [out=FILE.json]
"""
from __future__ import annotations

import json
import tempfile
import time

import torch

from .config import load_config
from .data import synthetic
from .evaluate import generate
from .metrics import frechet_distance
from .train import train

BASE = ["data.name=synthetic", "model.patch=4", "model.hidden=64", "model.depth=2", "model.n_context_tokens=2",
        "encoder.widths=[8,16]", "encoder.stages=[]", "encoder.loc_stages=[1]", "encoder.mae_max_steps=200",
        "encoder.max_groups=64", "drift.labels_per_step=10", "drift.n_gen=8", "drift.n_pos=8", "drift.n_unc=8",
        "drift.per_class_queue=16", "drift.global_queue=64", "drift.push_per_step=64", "optim.lr=2e-3",
        "optim.warmup_steps=10", "train.threads=1", "train.log_every=100000"]

VARIANTS = {
    "baseline (loc feats + raw, 3 taus)": [],
    "attraction x1.5": ["drift.attraction=1.5"],
    "single tau 0.05": ["drift.temperatures=[0.05]"],
    "single tau 0.02": ["drift.temperatures=[0.02]"],
    "single tau 0.2": ["drift.temperatures=[0.2]"],
    "raw pixels only": ["encoder.use=false"],
    "+ paper stats (mean/std/patch)": ["encoder.stages=[0,1]"],
}


def _measure(model, x, y, n_per_class=100, seed=0) -> dict:
    C = 10
    templates = torch.stack([x[y == c].mean(0).flatten() for c in range(C)])
    labels = torch.arange(C).repeat_interleave(n_per_class)
    s = generate(model, labels, 1.0, seed=seed).flatten(1)
    agree = (torch.cdist(s, templates).argmin(1) == labels).float().mean().item()
    fds, spreads = [], []
    for c in range(C):
        g, r = s[labels == c].double(), x[y == c].flatten(1).double()
        fds.append(frechet_distance(g, r))
        spreads.append((g.std(0).mean() / r.std(0).mean()).item())
    return {"agreement": agree, "fd_pixels": sum(fds) / C, "spread": sum(spreads) / C}


def run(steps: int = 200, seeds: int = 2, variants=None, log=print) -> dict:
    x, y = synthetic(2000, size=16, seed=1)      # held-out real samples (training uses seed 0)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        enc = f"{tmp}/enc.pt"                      # one MAE encoder shared by every variant
        for name, over in (variants or VARIANTS).items():
            rows = []
            for seed in range(seeds):
                cfg = load_config(None, BASE + [f"encoder.path={enc}", f"train.out={tmp}/run", f"train.seed={seed}",
                                                f"train.max_steps={steps}", "train.minutes=1000"] + over)
                torch.manual_seed(seed)
                t0 = time.time()
                res = train(cfg, log=lambda *a: None)
                m = _measure(res["ema"], x, y, seed=seed)
                m["seconds"] = time.time() - t0
                rows.append(m)
            out[name] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            out[name]["per_seed"] = rows
            log(f"{name}: " + json.dumps({k: round(v, 3) for k, v in out[name].items() if k != "per_seed"}))
    return out


def table(res: dict) -> str:
    rows = ["| variant | template agreement | pixel FD per class | spread (1 = real) | s/run |", "|---|---|---|---|---|"]
    for k, v in res.items():
        rows.append(f"| {k} | {v['agreement']:.3f} | {v['fd_pixels']:.2f} | {v['spread']:.2f} | {v['seconds']:.0f} |")
    return "\n".join(rows)
