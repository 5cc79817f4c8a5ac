"""MAE pre-training of the feature encoder, data-parallel under torchrun (issue 43 item 5).

    torchrun --standalone --nproc_per_node=8 -m drift_policy.image encoder imagenet256_b2 data.root=/data/in256_sdvae

The same program on 1 or N processes (gloo on CPU, nccl on GPUs):

* Data: each rank reads its own disjoint share of every epoch through a ``DistributedSampler``
  (``store.StoreStream``, exactly as training reads the store), encoder.mae_batch / world items a step. An
  in-memory set (Fashion-MNIST, MNIST) is read the same way.
* Every rank masks its own batch (its own generator); DistributedDataParallel averages the gradients, so the
  replicas stay equal (checked at the end: ``mae ddp check`` in the log).
* Schedule: encoder.mae_max_steps steps; encoder.mae_minutes is a time budget (<= 0: steps only) after which the
  encoder is finished as it is (the single-process behaviour). encoder.mae_launch_steps ends this launch early;
  with encoder.mae_save_every it makes the run resumable: the state (encoder, decoder, optimiser, step; each rank's
  generator and data position) is kept in ``<encoder.path>.resume/`` and the same command continues from it,
  bit-exactly. Rank 0 writes the encoder file (the format ``train.load_encoder`` reads) and removes the state.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..distributed import Distributed
from ..errors import ConfigError
from .encoder import MAE, ResNetEncoder, mae_optimizer, random_patch_mask

__all__ = ["pretrain_encoder", "resume_dir"]


def resume_dir(path) -> Path:
    return Path(str(path) + ".resume")


def _stream(cfg: dict, batch: int, rank: int, world: int):
    """(StoreStream over this rank's share, raw -> model-space function, item shape)."""
    from torch.utils.data import TensorDataset

    from .store import StoreStream
    from .train import open_store, prepare_data

    seed, workers = cfg["train"]["seed"], cfg["data"]["workers"]
    if cfg["data"]["name"] == "store":
        store = open_store(cfg)
        return StoreStream(store, batch, rank, world, seed, workers), store.to_model, store.shape
    x, y, _ = prepare_data(cfg, "train", log=lambda *a: None)          # in memory, already in the model's space
    return StoreStream(TensorDataset(x, y), batch, rank, world, seed, workers), (lambda v: v), tuple(x.shape[1:])


def _check(e: dict, world: int) -> None:
    if e["mae_batch"] % world:
        raise ConfigError(f"encoder.mae_batch={e['mae_batch']} (the global batch) must be divisible by the {world} "
                          f"processes")
    launch = e["mae_launch_steps"]
    if launch is not None and (not isinstance(launch, int) or isinstance(launch, bool) or launch < 1):
        raise ConfigError(f"encoder.mae_launch_steps must be a positive integer or null, got {launch!r}")


def pretrain_encoder(cfg: dict, *, log=None) -> dict | None:
    """Pretrain the MAE encoder of ``cfg`` and write encoder.path (rank 0). Returns its stats, or None when the
    file already exists or this launch stopped early (a resume state is left)."""
    e = cfg["encoder"]
    _check(e, int(os.environ.get("WORLD_SIZE", "1")))          # on every rank, before the process group
    D = Distributed("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = D.rank, D.world_size
    log = log or (print if rank == 0 else (lambda *a, **k: None))
    path = Path(e["path"])
    if path.exists():
        log(f"{path} exists: nothing to do (delete it to pretrain again)")
        D.close()
        return None
    launch = e["mae_launch_steps"]
    batch = e["mae_batch"] // world
    data, to_model, shape = _stream(cfg, batch, rank, world)
    gen = torch.Generator().manual_seed(cfg["train"]["seed"] * 1000 + 31 + rank)        # this rank's masks
    torch.manual_seed(cfg["train"]["seed"])                                             # the same init everywhere
    mae = MAE(ResNetEncoder(shape[0], e["widths"], e["blocks"] or e["blocks_per_stage"])).to(D.device)
    opt = mae_optimizer(mae, e["mae_lr"])
    net = D.wrap(mae)
    state = resume_dir(path)
    step, hist, seconds_before = 0, [], 0.0
    if (state / "mae.pt").exists():
        step, hist, seconds_before = _resume(state, mae, opt, gen, data, rank, world)
        log(f"resumed {state} at step {step}")
    stop_at = e["mae_max_steps"] if launch is None else min(e["mae_max_steps"], step + launch)
    budget = e["mae_minutes"] * 60 if e["mae_minutes"] > 0 else float("inf")
    log(f"MAE pretraining: {world} process(es), {batch} items each a step, steps {step} -> {stop_at} of "
        f"{e['mae_max_steps']} -> {path}")
    seen0: list[int] = []                                    # items this rank read in epoch 0 (the ddp check)
    save_every, t0 = e["mae_save_every"], time.time()
    mae.train()
    while True:
        # every rank stops at the same step
        if D.max(float(step >= stop_at or seconds_before + time.time() - t0 >= budget)):
            break
        raw, _ = data.next()
        if data.epoch == 0 and len(seen0) < 100_000:
            seen0 += data.last_indices
        x = to_model(raw).to(D.device)
        m = random_patch_mask(len(x), x.shape[-2], x.shape[-1], e["mae_patch"], e["mae_mask_ratio"],
                              generator=gen).to(D.device)
        loss = net(x, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append(round(loss.item(), 5))
        if step % 100 == 0:
            log(f"mae step {step} loss {loss.item():.4f} ({seconds_before + time.time() - t0:.0f}s)")
        step += 1
        if save_every > 0 and step % save_every == 0 and step < stop_at:
            _save_state(D, state, mae, opt, gen, data, step, hist, seconds_before + time.time() - t0)
    seconds = seconds_before + time.time() - t0
    if world > 1:
        flat = torch.cat([p.detach().flatten().cpu() for p in mae.parameters()])
        seen = D.gather(sorted(seen0))
        overlap = len(set(seen[0]).intersection(*map(set, seen[1:])))
        check = {"world": world, "param_max_diff": max((f - flat).abs().max().item() for f in D.gather(flat)),
                 "epoch0_items": [len(s) for s in seen], "epoch0_overlap": overlap}
        log("mae ddp check " + json.dumps(check))
    finished = step >= e["mae_max_steps"] or seconds >= budget
    if not finished:
        _save_state(D, state, mae, opt, gen, data, step, hist, seconds)
        log(f"stopped at step {step} of {e['mae_max_steps']} (encoder.mae_launch_steps); the state is in {state}: "
            f"run the same command to continue")
        D.close()
        return None
    tail = hist[-50:]
    stats = {"steps": step, "seconds": seconds, "world": world, "batch": e["mae_batch"],
             "loss_first": hist[0] if hist else None, "loss_last50": sum(tail) / max(len(tail), 1)}
    if rank == 0:
        save_checkpoint({"encoder": mae.encoder.state_dict(), "widths": e["widths"], "stats": stats}, path)
        shutil.rmtree(state, ignore_errors=True)
        log(f"MAE: {stats} -> {path}")
    D.barrier()
    D.close()
    return stats


def _save_state(D, state: Path, mae, opt, gen, data, step, hist, seconds) -> None:
    """Each rank its generator and data position, then rank 0 the weights (whose step a rank file must match)."""
    state.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"step": step, "world": D.world_size, "gen": gen.get_state(), "data": data.state()},
                    state / f"rank{D.rank}.pt")
    D.barrier()
    if D.rank == 0:
        save_checkpoint({"mae": mae.state_dict(), "optim": opt.state_dict(), "step": step, "hist": hist,
                         "seconds": seconds, "world": D.world_size}, state / "mae.pt")
    D.barrier()


def _resume(state: Path, mae, opt, gen, data, rank: int, world: int):
    ck = load_checkpoint(state / "mae.pt")
    rs_path = state / f"rank{rank}.pt"
    rs = load_checkpoint(rs_path) if rs_path.exists() else None
    if rs is None or rs["step"] != ck["step"] or ck["world"] != world:
        raise ConfigError(f"{state} was written at step {ck['step']} by {ck['world']} processes; resume it with "
                          f"{ck['world']} processes, or delete it to start over")
    mae.load_state_dict(ck["mae"])
    opt.load_state_dict(ck["optim"])
    gen.set_state(rs["gen"])
    data.load_state(rs["data"])
    return int(ck["step"]), list(ck["hist"]), float(ck["seconds"])
