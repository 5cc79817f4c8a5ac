"""Class-conditional 1-NFE image generator trained with the drift loss in feature space.

One step (per rank):
  1. push a fresh real batch into the per-class and global queues;
  2. pick G class labels, draw alpha_g ~ alpha^-k on [1, alpha_max], generate N samples per label;
  3. encode generated (with gradient through the frozen encoder), P positives per label and M
     unconditional negatives; build feature sets (per location, global mean/std, patch stats, raw output);
  4. loss = sum over feature sets of the drift loss, with CFG weight (alpha_g - 1)(N - 1)/M on the negatives;
  5. AdamW(0.9, 0.95), linear warm-up then constant lr, grad clip, EMA.

DDP: run under torchrun; each rank has its own data stream and queues, gradients are averaged by DDP
(``distributed.Distributed``, the robot trainer's). Checkpoints are ``checkpoint.py``'s (atomic, verified), the
EMA is ``ema.py``'s, and relative paths (``train.out``, ``encoder.path``, ...) are relative to the working
directory, like a robot run's ``train.run_dir``.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import Distributed
from ..drift import cfg_neg_weight
from ..ema import ema_update
from ..threads import set_threads
from .config import load_config
from .data import load_dataset
from .dit import build_dit
from .encoder import ResNetEncoder, feature_sets, pretrain_mae
from .loss import feature_drift_loss, sample_alpha
from .queues import ClassQueues

__all__ = ["train", "build_generator", "load_encoder", "prepare_data", "encode_features"]


def build_generator(cfg: dict, image_shape) -> torch.nn.Module:
    m = {k: v for k, v in cfg["model"].items() if v is not None}
    preset = m.pop("preset")
    C, H, W = image_shape
    return build_dit(preset, image_size=H, in_channels=C, num_classes=cfg["data"]["num_classes"], **m)


def prepare_data(cfg: dict, split: str = "train", log=print):
    """(x, y, codec): x in the generator's space (pixels, or normalised latents); codec decodes to pixels."""
    kw = {"size": cfg["data"]["image_size"]} if cfg["data"]["name"] == "folder" else {}
    x, y = load_dataset(cfg["data"]["name"], split, cfg["data"]["root"], **kw)
    kind = cfg["latent"]["kind"]
    if kind == "none":
        return x, y, None
    from .latent import make_codec

    codec = make_codec(cfg, x, log=log)
    return codec.encode_all(x), y, codec


def load_encoder(cfg: dict, in_channels: int, x_train: torch.Tensor | None = None, log=print) -> ResNetEncoder | None:
    """The frozen feature encoder; pretrained (MAE) on ``x_train`` and cached at encoder.path if absent."""
    e = cfg["encoder"]
    if not e["use"]:
        return None
    enc = ResNetEncoder(in_channels, e["widths"], e["blocks_per_stage"])
    path = Path(e["path"])
    if path.exists():
        enc.load_state_dict(load_checkpoint(path)["encoder"])
    else:
        if x_train is None:
            raise FileNotFoundError(f"encoder checkpoint {path} not found")
        log(f"pretraining the MAE encoder for {e['mae_minutes']} min -> {path}")
        stats = pretrain_mae(enc, x_train, minutes=e["mae_minutes"], max_steps=e["mae_max_steps"],
                             mask_ratio=e["mae_mask_ratio"], log=log)
        save_checkpoint({"encoder": enc.state_dict(), "widths": e["widths"], "stats": stats}, path)
        log(f"MAE: {stats}")
    enc.eval().requires_grad_(False)
    return enc


def encode_features(enc, x: torch.Tensor, cfg: dict) -> dict[str, torch.Tensor]:
    """x [B, C, H, W] -> {name: [B, K, D]} (encoder feature sets + the raw sample)."""
    e, out = cfg["encoder"], {}
    if enc is not None:
        out = feature_sets(enc(x), e["stages"], e["loc_stages"], e["patches"], e["max_groups"],
                           e["global_stats"])
    if cfg["drift"]["raw"] or enc is None:
        out["raw"] = x.flatten(1).unsqueeze(1)                            # [B, 1, C*H*W]
    return out


def lr_at(cfg: dict, step: int) -> float:
    o = cfg["optim"]
    return o["lr"] * min(1.0, (step + 1) / max(o["warmup_steps"], 1))


def train(cfg: dict, *, log=None) -> dict:
    D = Distributed("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = D.rank, D.world_size, D.device
    log = log or (print if rank == 0 else (lambda *a, **k: None))
    set_threads(cfg["train"]["threads"])
    seed = cfg["train"]["seed"]
    torch.manual_seed(seed)                                   # same init on every rank
    gen_cpu = torch.Generator().manual_seed(seed * 1000 + 17 + rank)   # own data/noise stream per rank
    out = Path(cfg["train"]["out"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))

    x_all, y_all, codec = prepare_data(cfg, "train", log)
    if rank == 0:
        enc = load_encoder(cfg, x_all.shape[1], x_all, log)
    D.barrier()                                               # rank 0 may have pretrained and cached it
    if rank != 0:
        enc = load_encoder(cfg, x_all.shape[1], None, log)
    enc = enc.to(device) if enc is not None else None

    shape = tuple(x_all.shape[1:])
    model = build_generator(cfg, shape).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = D.wrap(model)
    o, d = cfg["optim"], cfg["drift"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    n_params = sum(p.numel() for p in model.parameters())
    log(f"generator {n_params / 1e6:.2f}M params, data {tuple(x_all.shape)}, world {world}")

    C = cfg["data"]["num_classes"]
    queues = ClassQueues(C, d["per_class_queue"], d["global_queue"], shape)
    while not queues.ready(d["n_pos"], d["n_unc"]):
        idx = torch.randint(0, len(x_all), (d["push_per_step"],), generator=gen_cpu)
        queues.push(x_all[idx], y_all[idx])

    G, N, P, M = d["labels_per_step"], d["n_gen"], d["n_pos"], d["n_unc"]
    taus = tuple(d["temperatures"])
    hist, t0, step, last_save = [], time.time(), 0, time.time()
    budget = cfg["train"]["minutes"] * 60 if cfg["train"]["minutes"] > 0 else float("inf")   # <= 0: steps only
    while True:
        # Every rank stops at the same step.
        if D.max(float(step >= cfg["train"]["max_steps"] or time.time() - t0 >= budget)):
            break
        idx = torch.randint(0, len(x_all), (d["push_per_step"],), generator=gen_cpu)
        queues.push(x_all[idx], y_all[idx])
        labels = torch.randperm(C, generator=gen_cpu)[:G]                                    # [G]
        alpha = (sample_alpha(G, d["alpha_k"], 1.0, d["alpha_max"], gen_cpu) if d["cfg"] else torch.ones(G))
        eps = torch.randn(G * N, *shape, generator=gen_cpu).to(device)                     # [G*N, C, H, W]
        style = torch.randint(0, model.style_codebook, (G * N, model.n_style), generator=gen_cpu).to(device)
        x = net(eps, labels.repeat_interleave(N).to(device), alpha.repeat_interleave(N).to(device), style)
        pos = queues.positives(labels, P, gen_cpu).to(device)                              # [G, P, C, H, W]
        with torch.no_grad():
            f_pos = encode_features(enc, pos.flatten(0, 1), cfg)
            f_unc = encode_features(enc, queues.unconditional(M, gen_cpu).to(device), cfg) if d["cfg"] else None
        f_gen = encode_features(enc, x, cfg)
        gen_f = {k: v.view(G, N, *v.shape[1:]) for k, v in f_gen.items()}                    # [G, N, K, D]
        pos_f = {k: v.view(G, P, *v.shape[1:]) for k, v in f_pos.items()}                    # [G, P, K, D]
        w = cfg_neg_weight(alpha, N, M).to(device) if d["cfg"] else None
        loss, per, v2 = feature_drift_loss(gen_f, pos_f, f_unc, w, temperatures=taus, attraction=d["attraction"])
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        opt.step()
        ema_update(ema, model, step, o["ema"])
        rec = {"step": step, "t": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
               "grad_norm": round(gnorm.item(), 3), "v2_raw": round(float(v2.get("raw", 0.0)), 5),
               "v2_feat": round(float(sum(v for k, v in v2.items() if k != "raw")), 5)}
        hist.append(rec)
        if step % cfg["train"]["log_every"] == 0:
            log(json.dumps(rec))
        if rank == 0 and (step + 1) in cfg["train"]["snapshot_steps"]:
            (out / f"step{step + 1}").mkdir(exist_ok=True)
            _save(out / f"step{step + 1}", model, ema, cfg, shape, step + 1, hist)
        if rank == 0 and time.time() - last_save > cfg["train"]["save_every_minutes"] * 60:
            _save(out, model, ema, cfg, shape, step, hist)
            last_save = time.time()
        step += 1
    result = {"steps": step, "seconds": time.time() - t0, "history": hist, "model": model, "ema": ema, "out": out}
    if world > 1:
        # Check: DDP kept the replicas identical, while each rank drew its own data into its own queues.
        flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        flats = D.gather(flat)
        result["ddp"] = {"param_max_diff": max((f - flat).abs().max().item() for f in flats),
                         "queue_sums": D.gather(queues.glob.buf.sum().item()), "world": world}
        log("ddp check " + json.dumps(result["ddp"]))
    if rank == 0:
        _save(out, model, ema, cfg, shape, step, hist)
        log(f"done: {step} steps in {time.time() - t0:.0f}s -> {out}")
    D.barrier()
    D.close()
    return result


def _save(out: Path, model, ema, cfg, shape, step, hist):
    save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg, "shape": shape,
                     "step": step}, out / "checkpoint.pt")
    with open(out / "history.jsonl", "w") as f:
        for r in hist:
            f.write(json.dumps(r) + "\n")


def load_generator(run_dir, use_ema: bool = True):
    ck = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    model = build_generator(ck["config"], ck["shape"])
    model.load_state_dict(ck["ema" if use_ema else "model"])
    return model.eval(), ck["config"]


if __name__ == "__main__":
    import sys

    args = sys.argv[1:]
    name = args.pop(0) if args and "=" not in args[0] else None
    train(load_config(name, args))
