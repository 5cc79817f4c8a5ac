"""Where a drift policy's chunk error sits, per action dim and chunk step, and what sampling noise is worth.

    python eval/chunk_errors.py CHECKPOINT [--draws 4] [--noise-scales 1,0] [--episodes 20] [--neighbours 8]
                                [--out FILE.json]

On 256 fixed windows of the training and the held-out split (the run's config), in normalised action units: the
mse of the generated chunks to the expert chunk per action dim and per chunk step, the spread of the draws per
dim, and the data's own spread per dim. For a binary action dim (every expert value -1 or +1, a gripper): how
often a draw has the other sign, overall and in windows whose expert chunk never switches; and, with
--neighbours K, the share of the positives' kernel weight (own chunk + K neighbours, the policy's bandwidth) that
has the other sign than the own chunk (these with the checkpoint's own ``policy.noise_scale``). Then closed-loop
scores with ``policy.noise_scale`` set to each scale (0: a deterministic f(0, obs); --noise-scales "" for none).
The record names the machine and the checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from drift_policy.fileio import atomic_write_text
from drift_policy.provenance import machine_free
from drift_policy.records import machine_info
from drift_policy.runs import load_policy_for_eval
from drift_policy.threads import set_threads
from drift_policy.train import evaluate_policy, make_datasets

WINDOWS = 256      # fixed windows per split, drawn with seed 0


def chunk_errors(policy, ds, draws: int) -> dict:
    b = ds.sample(WINDOWS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        act_n = policy.normalize_action(b["action"], b["obs"])                        # [B, Tp, Da]
        cond = policy.condition(b)
        xs = torch.stack([policy.sample(cond, torch.Generator().manual_seed(i)) for i in range(draws)], 1)
    err = (xs - act_n.unsqueeze(1)).pow(2)                                             # [B, draws, Tp, Da]
    r = lambda t: [round(float(v), 4) for v in t]                                      # noqa: E731
    out = {"mse": round(float(err.mean()), 4), "mse_per_dim": r(err.mean((0, 1, 2))),
           "mse_per_step": r(err.mean((0, 1, 3))), "draw_std_per_dim": r(xs.std(1).mean((0, 1))),
           "data_std_per_dim": r(act_n.flatten(0, 1).std(0))}
    out["binary_dims"] = {}
    for d in binary_dims(act_n):
        sign = torch.sign(act_n[..., d])                                               # [B, Tp]
        wrong = (torch.sign(xs[..., d]) != sign.unsqueeze(1)).float()                  # [B, draws, Tp]
        steady = (sign == sign[:, :1]).all(1)                                          # [B]: no switch in the chunk
        out["binary_dims"][str(d)] = {"wrong_sign": round(float(wrong.mean()), 4),
                                      "wrong_sign_no_switch": round(float(wrong[steady].mean()), 4),
                                      "windows_with_switch": round(float(1 - steady.float().mean()), 4)}
    return out


def binary_dims(act_n: torch.Tensor) -> list[int]:
    """The action dims whose every expert value is -1 or +1 (normalised units, to 1e-4): grippers."""
    flat = act_n.flatten(0, -2)
    return [d for d in range(flat.shape[1]) if bool(((flat[:, d].abs() - 1).abs() < 1e-4).all())]


def neighbour_sign_share(policy, cfg, ds, k: int) -> dict:
    """For each binary dim: the share of the positives' kernel weight (own chunk + k neighbours) whose sign differs
    from the own chunk's, per chunk step, on WINDOWS fixed training windows."""
    cfg.policy.neighbor_positives = k
    type(policy).prepare_data(cfg.policy, ds, policy.normalizer)                     # the drift policy's neighbours
    b = ds.sample(WINDOWS, torch.Generator().manual_seed(0))
    with torch.no_grad():
        pos = policy.normalize_action(b["pos_action"], b["obs"])                       # [B, 1+k, Tp, Da]
    w = (b["pos_weight"] / b["pos_weight"].sum(1, keepdim=True)).unsqueeze(-1)         # [B, 1+k, 1]
    act_n = pos[:, 0]
    return {str(d): round(float(((torch.sign(pos[..., d]) != torch.sign(act_n[:, None, :, d])) * w).sum(1).mean()), 4)
            for d in binary_dims(act_n)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--noise-scales", default="1,0")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--neighbours", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    set_threads(1)
    policy, cfg = load_policy_for_eval(a.checkpoint)
    if policy.config.type != "drift":
        raise SystemExit(f"{a.checkpoint}: a {policy.config.type} policy; this diagnosis is for drift")
    train_set, val_set = make_datasets(cfg)
    rec = {"checkpoint": machine_free(a.checkpoint), "task": cfg.task.name, "machine": machine_info(),
           "windows": WINDOWS, "draws": a.draws, "train": chunk_errors(policy, train_set, a.draws)}
    if val_set is not None and len(val_set):
        rec["val"] = chunk_errors(policy, val_set, a.draws)
    if a.neighbours:
        rec["neighbours"] = {"k": a.neighbours, "bandwidth": cfg.policy.neighbor_bandwidth,
                             "same_episode": cfg.policy.neighbor_same_episode,
                             "other_sign_weight_share": neighbour_sign_share(policy, cfg, train_set, a.neighbours)}
    rec["noise_scale"] = []
    rec["config_noise_scale"] = policy.config.noise_scale
    for s in (float(v) for v in a.noise_scales.split(",") if v):
        policy.config.noise_scale = s                             # the same seeded draws, times s
        res = evaluate_policy(policy, cfg, a.episodes, 0, progress=False)
        rec["noise_scale"].append({"scale": s, "episodes": a.episodes, "mean_score": res["mean_score"],
                                   "success_rate": res["success_rate"]})
        print(f"noise x {s:g}: score {res['mean_score']:.3f}, success {res['success_rate']:.2f}", flush=True)
    out = Path(a.out or Path(a.checkpoint).with_suffix(".chunk_errors.json"))
    atomic_write_text(out, json.dumps(rec, indent=1))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
