"""Where one training step's time goes on Push-T from pixels (task=pusht_image), for both policies (issue 39).

    python eval/profile_image_step.py [--policies drift_unet,diffusion_unet] [--variants default,bf16,...]
        [--steps 3] [--batch-scale 1] [--merge] [--out eval/diagnostics/profile_step_pusht_image/profile_step_pusht_image.json]

Each step of the real training batch (the task's default batch: drift 32 observations x G=2, diffusion 64) is
split into its parts, the same math as ``compute_loss`` and the training loop: the data (the gather of the
batch from the uint8 frames, the random crop, uint8 to float), the encoder's forward, the generator's forward,
the loss (drift: the kernel and field; diffusion: the noise regression), the generator's backward, the
encoder's backward (the features' gradient pushed through the encoder), the optimiser (gradient clip, AdamW)
and the EMA update. The variants of one policy are stepped in turn (A, B, C, A, B, C, ...) in one process, so
that a change of the machine's load falls on all of them alike; their ratios are what to read on a shared CPU.

Times are CPU seconds of the one thread that runs the step (``time.thread_time``, 1 intra-op thread), which a
busy neighbour slows much less than wall-clock; the wall-clock is recorded beside them. ``--batch-scale`` < 1
times smaller batches (both policies alike) when the CPU cannot spare minutes; the record states the batch.
``--merge`` keeps the rows of other policies or variants already in the record (one command per policy).

Variants: ``default`` (the training step of the defaults: ResNet-18, float32), ``channels_last`` (its trunk in
channels-last layout, the same function), ``bf16`` (``train.encoder_bf16=true``: bfloat16 autocast, channels-last),
``bf16_contiguous`` (the same in the contiguous layout), and the cheaper encoders ``resnet18_half`` and ``shallow`` (``policy.vision_backbone``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from drift_policy.config import compose
from drift_policy.ema import ema_update
from drift_policy.fileio import atomic_write_text
from drift_policy.normalizer import Normalizer
from drift_policy.policies import make_policy, policy_class
from drift_policy.provenance import git_commit
from drift_policy.records import machine_info
from drift_policy.train import make_datasets

PARTS = ("data_gather", "crop", "to_float", "encoder_forward", "generator_forward", "loss", "generator_backward",
         "encoder_backward", "optimizer", "ema")
VARIANTS = {   # name -> (overrides, channels-last trunk, bf16 autocast)
    "default": ([], False, False),
    "channels_last": ([], True, False),
    "bf16": (["train.encoder_bf16=true"], True, True),              # as the training loop sets it
    "bf16_contiguous": (["train.encoder_bf16=true"], False, True),
    "resnet18_half": (["policy.vision_backbone=resnet18_half"], False, False),
    "shallow": (["policy.vision_backbone=shallow"], False, False),
}
DEFAULT_OUT = "eval/diagnostics/profile_step_pusht_image/profile_step_pusht_image.json"


class Timer:
    """Accumulates CPU (this thread) and wall seconds per part of one step."""

    def __init__(self):
        self.cpu, self.wall = {}, {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        c0, w0 = time.thread_time(), time.perf_counter()
        yield
        self.cpu[part] = self.cpu.get(part, 0.0) + time.thread_time() - c0
        self.wall[part] = self.wall.get(part, 0.0) + time.perf_counter() - w0


class Subject:
    """One variant of one policy: its config, policy, EMA copy, optimiser and data."""

    def __init__(self, policy_name: str, variant: str, batch_scale: float, data_cache: dict, extra=()):
        overrides, channels_last, bf16 = VARIANTS[variant]
        self.cfg = compose(["task=pusht_image", f"policy={policy_name}", *extra, *overrides])
        t = self.cfg.train
        self.batch = max(1, round(t.batch_size * batch_scale))
        p = self.cfg.policy
        key = (p.horizon, p.n_obs_steps, p.n_action_steps)
        if key not in data_cache:
            data_cache[key] = make_datasets(self.cfg)[0]
        self.data = data_cache[key]
        norm = Normalizer().fit("obs", self.data.steps("obs"))
        norm.fit("action", self.data.action_targets(p.action_anchor))
        policy_class(p).prepare_data(p, self.data, norm)
        torch.manual_seed(0)
        self.policy = make_policy(p, norm).train()
        self.ema = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.policy.obs_encoder.set_autocast(torch.bfloat16 if bf16 else None).set_channels_last(channels_last)
        self.opt = torch.optim.AdamW(self.policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.gen = torch.Generator().manual_seed(0)
        self.step_i = 0

    def step(self) -> Timer:
        T, pol, t = Timer(), self.policy, self.cfg.train
        with T("data_gather"):
            batch = self.data.sample(self.batch, self.gen)
        loss, feats, leaf = forward_parts(pol, batch, T)
        self.opt.zero_grad(set_to_none=True)
        with T("generator_backward"):
            loss.backward()
        with T("encoder_backward"):
            feats.backward(leaf.grad)
        with T("optimizer"):
            torch.nn.utils.clip_grad_norm_(pol.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
            self.opt.step()
        with T("ema"):
            ema_update(self.ema, pol, self.step_i, t.ema_decay, t.ema_warmup)
        self.step_i += 1
        return T


def forward_parts(pol, batch: dict, T: Timer):
    """``pol.compute_loss(batch)``'s loss, its parts timed by ``T``: (loss, image features [B, To, cams * F], the
    detached leaf the generator's graph starts from). ``loss.backward()`` then ``feats.backward(leaf.grad)`` give
    every parameter the gradient of ``compute_loss`` (tests/test_eval_scripts.py checks it)."""
    c = pol.config
    B, To, keys = batch["obs"].shape[0], c.n_obs_steps, c.image_keys
    encs = pol.obs_encoder.encoders
    with T("crop"):
        xs = {k: encs[k].crop(batch[k][:, -To:].flatten(0, 1)) for k in keys}              # [B*To, 3, h, w] uint8
    with T("to_float"):
        xs = {k: encs[k].scale(x) for k, x in xs.items()}                                  # float in [-1, 1]
    with T("encoder_forward"):
        feats = torch.cat([encs[k].features(xs[k]) for k in keys], dim=-1).view(B, To, -1)  # [B, To, cams*F]
    leaf = feats.detach().requires_grad_()         # the generator's part of the graph starts here
    with T("generator_forward"):
        act_n = pol.normalize_action(batch["action"], batch["obs"])
        if c.type == "drift":
            cond = pol.condition(batch, features=leaf).repeat_interleave(c.n_noise, dim=0)
            x = pol.model(pol._noise(B * c.n_noise, None), cond).view(B, c.n_noise, c.horizon, c.action_dim)
        else:
            noise = torch.randn_like(act_n)
            ts = torch.randint(0, c.num_train_timesteps, (B,), device=act_n.device)
            pred = pol.model(pol.noise_scheduler.add_noise(act_n, noise, ts), pol.condition(batch, features=leaf), ts)
    with T("loss"):
        loss = pol.drift_loss(x, act_n, batch)[0] if c.type == "drift" else (pred - noise).pow(2).mean()
    return loss, feats, leaf


def profile(policy_name: str, variants: list[str], steps: int, batch_scale: float, data_cache: dict,
            extra=()) -> list[dict]:
    subjects = {v: Subject(policy_name, v, batch_scale, data_cache, extra) for v in variants}
    timers = {v: [] for v in variants}
    for i in range(steps + 1):                                  # the first round warms up (oneDNN primitives)
        for v, s in subjects.items():
            c0, w0 = time.thread_time(), time.perf_counter()
            T = s.step()
            T.cpu["total"], T.wall["total"] = time.thread_time() - c0, time.perf_counter() - w0
            if i:
                timers[v].append(T)
            print(f"{policy_name} {v} step {i}: {T.cpu['total']:.2f} cpu-s, {T.wall['total']:.2f} wall-s", flush=True)
    rows = []
    for v, s in subjects.items():
        med_cpu = {k: statistics.median(T.cpu[k] for T in timers[v]) for k in (*PARTS, "total")}
        med_wall = {k: statistics.median(T.wall[k] for T in timers[v]) for k in (*PARTS, "total")}
        cfg = s.cfg
        rows.append({"policy": policy_name, "variant": v, "overrides": VARIANTS[v][0],
                     "vision_backbone": cfg.policy.vision_backbone, "channels_last": VARIANTS[v][1],
                     "encoder_bf16": VARIANTS[v][2], "batch_size": s.batch,
                     "default_batch_size": cfg.train.batch_size, "steps_timed": steps,
                     "sample_passes_per_step": s.batch * cfg.policy.sample_passes_per_obs,
                     "encoder_passes_per_step": s.batch * cfg.policy.encoder_passes_per_obs,
                     "encoder_params": sum(p.numel() for p in s.policy.obs_encoder.parameters()),
                     "cpu_seconds": med_cpu, "wall_seconds": med_wall,
                     "cpu_seconds_each_step": [T.cpu["total"] for T in timers[v]],
                     "cpu_share": {k: med_cpu[k] / med_cpu["total"] for k in PARTS}})
    return rows


def render(rec: dict) -> str:
    """The record's tables: per policy, each part's median CPU seconds per step under each variant."""
    f3 = "{:.3f}".format
    lines = ["# One training step of Push-T from pixels (task=pusht_image), by part", "",
             "Written by `eval/profile_image_step.py` (issue 39). Median CPU seconds per step of the one thread that "
             "runs it (1 intra-op thread) over the timed steps; the variants of a policy were stepped in turn in one "
             "process, so their ratios hold on a loaded machine (the wall-clock is in the JSON). Speed-up: the "
             "`default` total over the variant's.", ""]
    for i, run in enumerate(rec["runs"]):
        m = run["machine"]
        lines.append(f"- run {i}: `{run['command']}` at code commit {run['code_commit']}; {m['cpu']}, {m['cores']} "
                     f"cores, torch {m['torch']}, 1 thread; {run['note']}")
    lines.append("")
    for pol in dict.fromkeys(r["policy"] for r in rec["rows"]):
        rows = [r for r in rec["rows"] if r["policy"] == pol]
        base = next((r for r in rows if r["variant"] == "default"), None)
        lines += [f"## {pol}", "", "| part | " + " | ".join(r["variant"] for r in rows) + " |",
                  "|---|" + "---|" * len(rows)]
        for k in PARTS:
            lines.append(f"| {k} | " + " | ".join(f"{f3(r['cpu_seconds'][k])} ({r['cpu_share'][k]:.0%})" for r in rows) + " |")
        lines.append("| **total (cpu-s/step)** | " + " | ".join(f"**{f3(r['cpu_seconds']['total'])}**" for r in rows) + " |")
        lines.append("| wall-s/step | " + " | ".join(f3(r["wall_seconds"]["total"]) for r in rows) + " |")
        if base:
            lines.append("| speed-up vs default | " + " | ".join(
                f"{base['cpu_seconds']['total'] / r['cpu_seconds']['total']:.2f}x" for r in rows) + " |")
        lines.append("| batch (default) | " + " | ".join(f"{r['batch_size']} ({r['default_batch_size']})" for r in rows) + " |")
        lines.append("| sample-passes / encoder passes per step | " + " | ".join(
            f"{r['sample_passes_per_step']} / {r['encoder_passes_per_step']}" for r in rows) + " |")
        lines.append("| ms per encoder pass (encoder fwd + bwd) | " + " | ".join(
            f"{1000 * (r['cpu_seconds']['encoder_forward'] + r['cpu_seconds']['encoder_backward']) / r['encoder_passes_per_step']:.1f}"
            for r in rows) + " |")
        lines.append("| encoder parameters | " + " | ".join(f"{r['encoder_params'] / 1e6:.2f}M" for r in rows) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policies", default="drift_unet,diffusion_unet")
    ap.add_argument("--variants", default="default,channels_last,bf16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up round)")
    ap.add_argument("--batch-scale", type=float, default=1.0, help="fraction of the default batch (both policies)")
    ap.add_argument("--merge", action="store_true", help="keep the record's rows of other (policy, variant)")
    ap.add_argument("--extra", default="", help="space-separated config overrides for every variant (tests)")
    ap.add_argument("--note", default="", help="what the machine was doing besides (stated in the record)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or args.steps < 1 or not 0 < args.batch_scale <= 1:
        ap.error(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})" if unknown
                 else "--steps must be >= 1 and --batch-scale in (0, 1]")
    torch.set_num_threads(1)
    data_cache: dict = {}
    extra = args.extra.split()
    rows = [r for p in args.policies.split(",")
            for r in profile(p, variants, args.steps, args.batch_scale, data_cache, extra)]
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.merge and out.exists() else {"runs": [], "rows": []}
    # The command without --out (a path of this machine when it is not the default)
    cmd = [f"--policies={args.policies}", f"--variants={args.variants}", f"--steps={args.steps}",
           f"--batch-scale={args.batch_scale:g}", *(["--merge"] if args.merge else []),
           *([f"--extra='{args.extra}'"] if args.extra else [])]
    run = {"command": "python eval/profile_image_step.py " + " ".join(cmd),
           "code_commit": git_commit(), "machine": machine_info(jobs=1), "note": args.note or "no note"}
    for r in rows:
        r["run"] = len(old["runs"])
    new = {(r["policy"], r["variant"]) for r in rows}
    # code_commit: the newest command's (each run keeps its own), so the record names the code it was last written at
    rec = {"code_commit": run["code_commit"], "runs": [*old["runs"], run],
           "rows": [r for r in old["rows"] if (r["policy"], r["variant"]) not in new] + rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(rec, indent=2) + "\n")
    atomic_write_text(out.with_suffix(".md"), render(rec) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return out


if __name__ == "__main__":
    main()
