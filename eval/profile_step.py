"""Where one training step's time goes, for the drift policy and the diffusion baseline (issue 12).

    python eval/profile_step.py [--steps 6] [--compile] [--out eval/diagnostics/profile_step/profile_step_cpu.json]

Times, per step on the real Push-T batch, on 1 thread: the generator's forward, the drift field and loss (the
kernel), the backward and the optimiser step, plus seconds per sample-pass. With --compile it also times the
same step with the backbone under torch.compile. The record names the machine; on a shared CPU the absolute
times vary with the load, so compare shares and variants measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from drift_policy.config import compose
from drift_policy.normalizer import Normalizer
from drift_policy.policies import make_policy, policy_class
from drift_policy.records import machine_info
from drift_policy.train import make_datasets


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def drift_step(policy, batch, opt):
    """The body of DriftPolicy.compute_loss, split into its parts (same math; see policies/drift.py)."""
    c = policy.config
    times = {}

    def forward():
        act_n = policy.normalize_action(batch["action"], batch["obs"])
        B = act_n.shape[0]
        cond = policy.condition(batch).repeat_interleave(c.n_noise, dim=0)
        x = policy.model(policy._noise(B * c.n_noise, None), cond).view(B, c.n_noise, c.horizon, c.action_dim)
        return act_n, x

    (act_n, x), times["forward"] = _timed(forward)

    def kernel():
        return policy.drift_loss(x, act_n, batch)[0].mean()

    loss, times["drift_kernel"] = _timed(kernel)
    _, times["backward"] = _timed(lambda: (opt.zero_grad(set_to_none=True), loss.backward()))
    _, times["optimizer"] = _timed(opt.step)
    return times


def generic_step(policy, batch, opt):
    times = {}
    (loss, _), times["forward_and_loss"] = _timed(lambda: policy.compute_loss(batch))
    _, times["backward"] = _timed(lambda: (opt.zero_grad(set_to_none=True), loss.backward()))
    _, times["optimizer"] = _timed(opt.step)
    return times


def profile(variant: str, overrides: list[str], steps: int, compiled: bool) -> dict:
    cfg = compose(overrides)
    train_set, _ = make_datasets(cfg)
    norm = Normalizer().fit("obs", train_set.steps("obs")).fit("action", train_set.steps("action"))
    policy_class(cfg.policy).prepare_data(cfg.policy, train_set, norm)
    torch.manual_seed(0)
    policy = make_policy(cfg.policy, norm).train()
    if compiled:
        policy.model = torch.compile(policy.model)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    step_fn = drift_step if cfg.policy.type == "drift" else generic_step
    rows = []
    for i in range(steps + 2):                     # 2 warm-up steps (compilation happens there)
        batch = train_set.sample(cfg.train.batch_size, gen)
        t0 = time.perf_counter()
        parts = step_fn(policy, batch, opt)
        parts["total"] = time.perf_counter() - t0
        if i >= 2:
            rows.append(parts)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    per_step = cfg.sample_passes_per_step
    rec = {"variant": variant, "compiled": compiled, "overrides": overrides, "steps_timed": steps,
           "sample_passes_per_step": per_step, "median_seconds": med,
           "share": {k: v / med["total"] for k, v in med.items() if k != "total"},
           "ms_per_sample_pass": 1000 * med["total"] / per_step}
    print(f"{variant}{' (compiled)' if compiled else ''}: {med['total']:.3f} s/step, "
          f"{rec['ms_per_sample_pass']:.2f} ms per sample-pass; shares " +
          ", ".join(f"{k} {v:.0%}" for k, v in rec["share"].items()), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="also time each variant with the backbone compiled")
    ap.add_argument("--variants", default="", help="comma-separated subset of the variant names (default: all)")
    ap.add_argument("--out", default="eval/diagnostics/profile_step/profile_step_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    variants = {"drift B=32 x G=2 (default)": ["policy=drift_unet"],
                "drift B=128 x G=4": ["policy=drift_unet", "policy.n_noise=4", "train.batch_size=128"],
                "drift B=64 x G=8, no neighbours": ["policy=drift_unet", "policy.n_noise=8", "train.batch_size=64",
                                                    "policy.neighbor_positives=0"],
                "diffusion B=64": ["policy=diffusion_unet"],
                "diffusion B=256": ["policy=diffusion_unet", "train.batch_size=256"]}
    if args.variants:
        unknown = set(args.variants.split(",")) - set(variants)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    recs = [profile(name, ov, args.steps, False) for name, ov in variants.items()]
    if args.compile:
        recs += [profile(name, ov, args.steps, True) for name, ov in variants.items()]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine_info(jobs=1), "command": "python eval/profile_step.py "
                               + " ".join(f"--{k}={v!r}" for k, v in vars(args).items()), "rows": recs}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
