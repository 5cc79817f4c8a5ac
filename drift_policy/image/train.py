"""Class-conditional 1-NFE image generator trained with the drift loss in feature space.

One step (per rank):
  1. push a fresh real batch into the per-class and global queues;
  2. pick G class labels, draw alpha_g ~ alpha^-k on [1, alpha_max], generate N samples per label;
  3. encode generated (with gradient through the frozen encoder), P positives per label and M
     unconditional negatives; build feature sets (per location, global mean/std, patch stats, raw output);
  4. loss = sum over feature sets of the drift loss, with CFG weight (alpha_g - 1)(N - 1)/M on the negatives;
  5. AdamW(0.9, 0.95), linear warm-up then constant (or cosine) lr, grad clip, EMA.

Data: a small set in memory (Fashion-MNIST, MNIST, a folder), or an on-disk store written by ``image encode``
(``data.name=store``), streamed through a ``DistributedSampler`` (``store.StoreStream``), never held whole.

Schedule: ``train.steps`` is the run's length. ``train.max_steps`` and ``train.minutes`` are guards that end a
launch early; every launch ends with a checkpoint that ``train.resume=true`` continues bit-exactly: model, EMA,
optimiser, step, the label RNG (<out>/checkpoint.pt, rank 0), and each rank's noise RNG, queues and data position
(<out>/state/rank<r>.pt). N steps straight and N/2 + resume + N/2 give bitwise equal weights (tested).

DDP: run under torchrun; ``drift.labels_per_step`` (N_c) is global, each rank takes a disjoint slice of the same
label draw, has its own data share, queues and noise; DDP averages the gradients (``distributed.Distributed``,
the robot trainer's). Checkpoints are ``checkpoint.py``'s (atomic, verified), the EMA is ``ema.py``'s, and
relative paths (``train.out``, ``encoder.path``, ...) are relative to the working directory.
"""
from __future__ import annotations

import copy
import json
import math
import time
import warnings
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import Distributed
from ..drift import cfg_neg_weight
from ..ema import ema_update
from ..errors import ConfigError
from ..threads import set_threads
from .config import load_config
from .data import load_dataset
from .dit import build_dit
from .encoder import ResNetEncoder, feature_sets, pretrain_mae
from .loss import feature_drift_loss, sample_alpha
from .queues import ClassQueues

__all__ = ["train", "build_generator", "load_encoder", "prepare_data", "encode_features", "open_train_data", "open_store",
           "lr_at"]


def build_generator(cfg: dict, image_shape) -> torch.nn.Module:
    m = {k: v for k, v in cfg["model"].items() if v is not None}
    preset = m.pop("preset")
    C, H, W = image_shape
    return build_dit(preset, image_size=H, in_channels=C, num_classes=cfg["data"]["num_classes"], **m)


def prepare_data(cfg: dict, split: str = "train", log=print):
    """(x, y, codec): x in the generator's space (pixels, or normalised latents); codec decodes to pixels."""
    if cfg["data"]["name"] == "store":
        raise ConfigError("data.name=store is streamed from disk (open_train_data), not loaded whole")
    kw = {"size": cfg["data"]["image_size"]} if cfg["data"]["name"] == "folder" else {}
    x, y = load_dataset(cfg["data"]["name"], split, cfg["data"]["root"], **kw)
    kind = cfg["latent"]["kind"]
    if kind == "none":
        return x, y, None
    from .latent import make_codec

    codec = make_codec(cfg, x, log=log)
    return codec.encode_all(x), y, codec


class _MemoryStream:
    """A small training set in memory; batches drawn with replacement from the rank's generator."""

    raw_dtype = torch.float32

    def __init__(self, x, y, batch: int, gen: torch.Generator):
        self.x, self.y, self.batch, self.gen = x, y, batch, gen
        self.shape = tuple(x.shape[1:])
        self.mae_source = x

    def next(self):
        idx = torch.randint(0, len(self.x), (self.batch,), generator=self.gen)
        return self.x[idx], self.y[idx]

    @staticmethod
    def to_model(x):
        return x

    def state(self) -> dict:
        return {}                                 # its position is the generator's state (saved with the rank)

    def load_state(self, s: dict) -> None:
        pass


def open_store(cfg: dict):
    """The ``ShardStore`` at data.root, checked against the config (latent kind, number of classes)."""
    from .store import ShardStore

    d = cfg["data"]
    if not d["root"]:
        raise ConfigError("data.name=store needs data.root = the folder written by `drift-policy image encode`")
    store = ShardStore(d["root"])
    want = {"latent": "kl", "pixel": "none"}[store.kind]
    if cfg["latent"]["kind"] != want:
        raise ConfigError(f"the store {d['root']} holds {store.kind}s: set latent.kind={want}")
    if store.index["num_classes"] != d["num_classes"]:
        raise ConfigError(f"the store has {store.index['num_classes']} classes, data.num_classes is {d['num_classes']}")
    return store


def open_train_data(cfg: dict, rank: int, world: int, gen: torch.Generator, log=print):
    """The training stream: ``.next() -> (raw x, y)``, ``.to_model(raw)``, ``.raw_dtype``, ``.shape``,
    ``.mae_source`` (what MAE pretraining draws from), ``.state()`` / ``.load_state()``."""
    d = cfg["data"]
    if d["name"] != "store":
        x, y, _ = prepare_data(cfg, "train", log)
        return _MemoryStream(x, y, cfg["drift"]["push_per_step"], gen)
    from .store import StoreStream

    store = open_store(cfg)
    stream = StoreStream(store, cfg["drift"]["push_per_step"], rank, world, cfg["train"]["seed"], d["workers"])
    stream.raw_dtype, stream.shape, stream.to_model = store.raw_dtype, store.shape, store.to_model
    stream.mae_source = store.draw
    log(f"store {d['root']}: {len(store)} {store.kind}s {store.shape} ({store.index['dtype']}), "
        f"{stream.sampler.num_samples} per rank and epoch")
    return stream


def load_encoder(cfg: dict, in_channels: int, x_train=None, log=print) -> ResNetEncoder | None:
    """The frozen feature encoder; pretrained (MAE) on ``x_train`` (a tensor, or a ``(n, generator) -> batch``
    callable) and cached at encoder.path if absent."""
    e = cfg["encoder"]
    if not e["use"]:
        return None
    enc = ResNetEncoder(in_channels, e["widths"], e["blocks"] or e["blocks_per_stage"])
    path = Path(e["path"])
    if path.exists():
        enc.load_state_dict(load_checkpoint(path)["encoder"])
    else:
        if x_train is None:
            raise FileNotFoundError(f"encoder checkpoint {path} not found")
        log(f"pretraining the MAE encoder for {e['mae_minutes']} min -> {path}")
        stats = pretrain_mae(enc, x_train, minutes=e["mae_minutes"], max_steps=e["mae_max_steps"],
                             mask_ratio=e["mae_mask_ratio"], patch=e["mae_patch"], lr=e["mae_lr"],
                             batch=e["mae_batch"], log=log)
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
        if e["input_x2"]:
            out["x2"] = x.pow(2).mean(dim=(2, 3)).unsqueeze(1)                  # [B, 1, C]
    if cfg["drift"]["raw"] or enc is None:
        out["raw"] = x.flatten(1).unsqueeze(1)                            # [B, 1, C*H*W]
    return out


def lr_at(cfg: dict, step: int) -> float:
    """Linear warm-up over optim.warmup_steps, then constant, or cosine to 0 at train.steps."""
    o = cfg["optim"]
    warm = max(o["warmup_steps"], 1)
    if o["decay"] == "cosine" and step >= warm:
        frac = min(1.0, (step - warm) / max(cfg["train"]["steps"] - warm, 1))
        return o["lr"] * 0.5 * (1 + math.cos(math.pi * frac))
    return o["lr"] * min(1.0, (step + 1) / warm)


def _check(cfg: dict, world: int) -> None:
    t, d = cfg["train"], cfg["drift"]
    if t["steps"] is not None and not (isinstance(t["steps"], int) and not isinstance(t["steps"], bool)
                                       and t["steps"] >= 1):
        raise ConfigError(f"train.steps must be a positive integer or null, got {t['steps']!r}")
    if cfg["optim"]["decay"] not in ("constant", "cosine"):
        raise ConfigError(f"optim.decay must be constant or cosine, got {cfg['optim']['decay']!r}")
    if cfg["optim"]["decay"] == "cosine" and t["steps"] is None:
        raise ConfigError("optim.decay=cosine needs train.steps (the length the lr decays over)")
    if d["labels_per_step"] % world or d["labels_per_step"] > cfg["data"]["num_classes"]:
        raise ConfigError(f"drift.labels_per_step={d['labels_per_step']} (global N_c) must be at most "
                          f"data.num_classes={cfg['data']['num_classes']} and divisible by the {world} processes")


def _rank_file(out: Path, rank: int) -> Path:
    return out / "state" / f"rank{rank}.pt"


def train(cfg: dict, *, log=None) -> dict:
    D = Distributed("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = D.rank, D.world_size, D.device
    log = log or (print if rank == 0 else (lambda *a, **k: None))
    _check(cfg, world)
    set_threads(cfg["train"]["threads"])
    seed, t_cfg = cfg["train"]["seed"], cfg["train"]
    torch.manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed * 1000 + 17 + rank)   # own data/noise stream per rank
    gen_labels = torch.Generator().manual_seed(seed * 1000 + 29)      # the same on every rank: one global draw
    out = Path(t_cfg["out"])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))

    data = open_train_data(cfg, rank, world, gen_cpu, log)
    shape = data.shape
    if rank == 0:
        enc = load_encoder(cfg, shape[0], data.mae_source, log)
    D.barrier()                                               # rank 0 may have pretrained and cached it
    if rank != 0:
        enc = load_encoder(cfg, shape[0], None, log)
    enc = enc.to(device) if enc is not None else None

    torch.manual_seed(seed)            # the same init on every rank, whether or not the encoder was just pretrained
    model = build_generator(cfg, shape).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    net = D.wrap(model)
    o, d = cfg["optim"], cfg["drift"]
    opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
    n_params = sum(p.numel() for p in model.parameters())

    C = cfg["data"]["num_classes"]
    queues = ClassQueues(C, d["per_class_queue"], d["global_queue"], shape, dtype=data.raw_dtype)
    step, hist, seconds_before = 0, [], 0.0
    if t_cfg["resume"] and (out / "checkpoint.pt").exists():
        step, hist, seconds_before = _resume(out, cfg, model, ema, opt, gen_labels, gen_cpu, queues, data, rank,
                                             world, log)
    else:
        while not queues.ready(d["n_pos"], d["n_unc"]):
            queues.push(*data.next())
    log(f"generator {n_params / 1e6:.2f}M params, data {shape}, world {world}, from step {step}")

    G = d["labels_per_step"] // world
    N, P, M = d["n_gen"], d["n_pos"], d["n_unc"]
    taus = tuple(d["temperatures"])
    stop_at = min(t_cfg["steps"] or 10 ** 18, t_cfg["max_steps"])
    budget = t_cfg["minutes"] * 60 if t_cfg["minutes"] > 0 else float("inf")   # <= 0: no time guard
    t0 = last_save = time.time()
    save = lambda: _save_all(D, out, model, ema, opt, cfg, shape, step, hist, gen_labels, gen_cpu, queues, data,
                             seconds_before + time.time() - t0)
    while True:
        # Every rank stops (and saves) at the same step.
        if D.max(float(step >= stop_at or time.time() - t0 >= budget)):
            break
        queues.push(*data.next())
        labels = torch.randperm(C, generator=gen_labels)[:G * world][rank * G:(rank + 1) * G]          # [G]
        alpha = (sample_alpha(G, d["alpha_k"], 1.0, d["alpha_max"], gen_cpu, d["alpha_one_prob"]) if d["cfg"]
                 else torch.ones(G))
        eps = torch.randn(G * N, *shape, generator=gen_cpu).to(device)                     # [G*N, C, H, W]
        style = torch.randint(0, model.style_codebook, (G * N, model.n_style), generator=gen_cpu).to(device)
        x = net(eps, labels.repeat_interleave(N).to(device), alpha.repeat_interleave(N).to(device), style)
        pos = data.to_model(queues.positives(labels, P, gen_cpu)).to(device)              # [G, P, C, H, W]
        with torch.no_grad():
            f_pos = encode_features(enc, pos.flatten(0, 1), cfg)
            f_unc = (encode_features(enc, data.to_model(queues.unconditional(M, gen_cpu)).to(device), cfg)
                     if d["cfg"] else None)
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
        rec = {"step": step, "t": round(seconds_before + time.time() - t0, 1), "loss": round(loss.item(), 4),
               "grad_norm": round(gnorm.item(), 3), "v2_raw": round(float(v2.get("raw", 0.0)), 5),
               "v2_feat": round(float(sum(v for k, v in v2.items() if k != "raw")), 5)}
        hist.append(rec)
        if step % t_cfg["log_every"] == 0:
            log(json.dumps(rec))
        if rank == 0 and (step + 1) in t_cfg["snapshot_steps"]:
            (out / f"step{step + 1}").mkdir(exist_ok=True)
            _save(out / f"step{step + 1}", model, ema, cfg, shape, step + 1, hist)
        step += 1
        due = ((t_cfg["save_every"] > 0 and step % t_cfg["save_every"] == 0)
               or time.time() - last_save > t_cfg["save_every_minutes"] * 60)
        if D.max(float(due)) and step < stop_at:
            save()
            last_save = time.time()
    result = {"steps": step, "seconds": time.time() - t0, "history": hist, "model": model, "ema": ema, "out": out}
    if world > 1:
        # Check: DDP kept the replicas identical, while each rank drew its own data into its own queues.
        flat = torch.cat([p.detach().flatten().cpu() for p in model.parameters()])
        flats = D.gather(flat)
        result["ddp"] = {"param_max_diff": max((f - flat).abs().max().item() for f in flats),
                         "queue_sums": D.gather(queues.glob.buf.float().sum().item()), "world": world}
        log("ddp check " + json.dumps(result["ddp"]))
    save()
    log(f"done: step {step} ({time.time() - t0:.0f}s this launch) -> {out}")
    D.barrier()
    D.close()
    return result


def _save(out: Path, model, ema, cfg, shape, step, hist, extra: dict | None = None):
    save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict(), "config": cfg, "shape": shape,
                     "step": step, **(extra or {})}, out / "checkpoint.pt")
    with open(out / "history.jsonl", "w") as f:
        for r in hist:
            f.write(json.dumps(r) + "\n")


def _save_all(D, out, model, ema, opt, cfg, shape, step, hist, gen_labels, gen_cpu, queues, data, seconds):
    """Every rank writes its own state first; then rank 0 the checkpoint (whose step a rank state must match)."""
    save_checkpoint({"step": step, "world": D.world_size, "gen": gen_cpu.get_state(),
                     "torch_rng": torch.get_rng_state(), "queues": queues.state_dict(), "data": data.state()},
                    _rank_file(out, D.rank))
    D.barrier()
    if D.rank == 0:
        _save(out, model, ema, cfg, shape, step, hist,
              {"optim": opt.state_dict(), "label_rng": gen_labels.get_state(), "seconds": seconds,
               "world": D.world_size})
    D.barrier()


def _resume(out, cfg, model, ema, opt, gen_labels, gen_cpu, queues, data, rank, world, log):
    ck = load_checkpoint(out / "checkpoint.pt")
    if "optim" not in ck:
        raise ConfigError(f"{out}/checkpoint.pt has no optimiser state (a snapshot, or written before resumable "
                          f"checkpoints); start a new train.out")
    model.load_state_dict(ck["model"])
    ema.load_state_dict(ck["ema"])
    opt.load_state_dict(ck["optim"])
    gen_labels.set_state(ck["label_rng"])
    step = int(ck["step"])
    hist = []
    if (out / "history.jsonl").exists():
        hist = [r for r in map(json.loads, (out / "history.jsonl").read_text().splitlines()) if r["step"] < step]
    rs_path = _rank_file(out, rank)
    rs = load_checkpoint(rs_path) if rs_path.exists() else None
    if rs is not None and rs["step"] == step and rs["world"] == world:
        gen_cpu.set_state(rs["gen"])
        torch.set_rng_state(rs["torch_rng"])
        queues.load_state_dict(rs["queues"])
        data.load_state(rs["data"])
    else:
        why = "missing" if rs is None else f"from step {rs['step']} with {rs['world']} processes"
        warnings.warn(f"rank {rank}: resume state {rs_path} is {why} (checkpoint: step {step}, {ck['world']} "
                      f"processes, now {world}): refilling the queues with fresh noise; not bit-exact")
        gen_cpu.manual_seed(cfg["train"]["seed"] * 1000 + 17 + rank + 7919 * (step + 1))
        while not queues.ready(cfg["drift"]["n_pos"], cfg["drift"]["n_unc"]):
            queues.push(*data.next())
    log(f"resumed {out}/checkpoint.pt at step {step}")
    return step, hist, float(ck.get("seconds", 0.0))


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
