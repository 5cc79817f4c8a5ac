"""The one training loop, for every policy and task. Read it top to bottom.

A policy brings ``compute_loss`` and ``predict_action``; everything else (data, normaliser, optimiser, EMA,
evaluation, checkpoints, logging) is shared, so the drift policy and the diffusion baseline differ only in
their loss and sampler. Under ``torchrun`` the same loop is data-parallel (DDP): see ``distributed.py``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import runs
from .checkpoint import non_finite_tensors, save_checkpoint
from .config import Config
from .distributed import Distributed
from .ema import ema_update
from .errors import ConfigError, DivergenceError, RunDirError
from .fileio import append_text, atomic_write_text
from .normalizer import Normalizer
from .policies import Policy, make_policy, policy_class
from .provenance import write_provenance
from .threads import set_threads


# ---- task plumbing --------------------------------------------------------------------------------------------
def make_datasets(cfg: Config):
    from .data.windows import make_windows
    from .tasks import dataset_path, load_data

    p = cfg.policy
    return make_windows(load_data(cfg.task), p.horizon, p.n_obs_steps, p.n_action_steps,
                        val_ratio=cfg.task.val_ratio, seed=42, source=str(dataset_path(cfg.task)))


def evaluate_policy(policy: Policy, cfg: Config, n_episodes: int, num_workers: int, *, video_dir=None,
                    n_videos: int = 0, progress: bool = True, seed: int = 0) -> dict:
    """Closed-loop rollouts on the task's test seeds. Sampling noise is seeded, so results are reproducible."""
    from .evaluation import evaluate
    from .tasks import env_spec

    gen = torch.Generator(device=policy.device).manual_seed(seed)

    def predict(obs: dict[str, np.ndarray]) -> np.ndarray:
        obs = {k: torch.from_numpy(v) for k, v in obs.items()}
        return policy.predict_action(obs, generator=gen)["action"].cpu().numpy()

    policy.eval()
    return evaluate(predict, env_spec(cfg.task), n_episodes=n_episodes, start_seed=cfg.task.start_seed,
                    n_obs_steps=policy.config.n_obs_steps, max_steps=cfg.task.max_steps,
                    num_workers=num_workers, video_dir=video_dir, n_videos=n_videos, progress=progress,
                    action_dim=policy.config.action_dim)


def validation_signals(policy: Policy, val_set, n: int = 256) -> dict[str, float]:
    """The policy's training signals (``compute_loss``'s info: drift's mse_to_expert and sample_std, diffusion's
    eps_mse) on a fixed draw of held-out windows. Beside the training values they tell over-fitting from
    under-fitting, which the closed-loop score alone cannot. The draw and the noise are seeded, and the global RNG
    is restored afterwards, so the training stream (and resume) is unchanged."""
    if val_set is None or len(val_set) == 0:
        return {}
    batch = {k: v.to(policy.device) for k, v in val_set.sample(n, torch.Generator().manual_seed(0)).items()}
    with torch.no_grad(), torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
        torch.manual_seed(0)
        _, info = policy.compute_loss(batch)
    return {k: float(v) for k, v in info.items()}


# ---- schedule and EMA -------------------------------------------------------------------------------------------
def lr_at(cfg: Config, step: int) -> float:
    """Linear warm-up, then cosine decay to 0 at max_steps. A function of the step alone: the same config gives
    the same schedule on any machine, and a resumed run continues it exactly."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- logging ----------------------------------------------------------------------------------------------------
class Logger:
    """metrics.jsonl in the run folder, plus wandb (offline or disabled by default: no network needed)."""

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None = None):
        self.path = runs.metrics_path(run_dir)
        if resume_step is not None and self.path.exists():
            # Steps after the checkpoint are trained again: drop their records (and a line cut short by a crash).
            keep = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        keep.append(line + "\n")
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass
            atomic_write_text(self.path, "".join(keep))
        self.wandb = None
        if cfg.train.wandb != "disabled":
            import wandb

            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), mode=cfg.train.wandb,
                                    config=cfg.to_dict(), name=run_dir.name, resume="allow", id=run_dir.name)

    def log(self, record: dict) -> None:
        append_text(self.path, json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


# ---- the loop ---------------------------------------------------------------------------------------------------
def train(cfg: Config | None, run_dir: str | os.PathLike | None = None, resume: bool = False,
          progress: bool = True) -> Path:
    """Train ``cfg`` into a new run folder, or (``resume``) continue the run in ``run_dir`` from its newest good
    checkpoint, with the config stored in that checkpoint (``cfg`` may then be None). The folder is claimed
    exclusively for the run's life (``runs.claim_run_dir``)."""
    with contextlib.ExitStack() as hold:
        return _train(cfg, run_dir, resume, progress, hold)


def _train(cfg: Config | None, run_dir, resume: bool, progress: bool, hold: contextlib.ExitStack) -> Path:
    if cfg is None and not (resume and run_dir):
        raise ValueError("train() needs a config, or resume=True and the run_dir to resume")
    run_dir = Path(run_dir or cfg.train.run_dir or cfg.default_run_dir())

    cfg, ckpt = _config_and_checkpoint(cfg, run_dir, resume)
    t = cfg.train
    if t.encoder_bf16 and not cfg.policy.image_keys:
        raise ConfigError(f"train.encoder_bf16 needs a task with cameras; task {cfg.task.name} has none")
    set_threads(t.threads)
    # One process, or one of several under torchrun (then only rank 0 writes files).
    dist = Distributed(t.device)
    dist.check_batch_size(t.batch_size)
    device, is_main = dist.device, dist.is_main
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)

    # Data and normaliser (fitted on the training split only). Validation comes before anything is written: a
    # run that fails on bad data leaves the folder as it was.
    train_set, val_set = make_datasets(cfg)
    from .tasks import family

    normalizer = Normalizer().fit("obs", train_set.steps("obs"), min_range=family(cfg.task).obs_min_range)
    normalizer.fit("action", train_set.action_targets(cfg.policy.action_anchor))
    policy_class(cfg.policy).prepare_data(cfg.policy, train_set, normalizer)    # what its loss reads (drift: neighbours)
    _claim_run_folder(run_dir, cfg, resume, dist, hold)

    policy, loss_fn, ema, opt, data_gen = _build(cfg, normalizer, dist)
    step, train_seconds, next_eval_minutes = 0, 0.0, t.eval_every_minutes
    if ckpt is not None:
        step, train_seconds, next_eval_minutes = _restore(ckpt, policy, ema, opt, data_gen, dist, t.seed)
    evaluating = _evaluating(cfg, is_main)
    n_params = sum(p.numel() for p in policy.parameters())
    per_step, enc_per_step = cfg.sample_passes_per_step, cfg.encoder_passes_per_step
    print(f"{cfg.policy.type} policy, {cfg.policy.backbone} backbone: {n_params / 1e6:.2f}M parameters; "
          f"{len(train_set)} training windows; budget {t.sample_passes:,} sample-passes = {t.max_steps} steps of "
          f"{per_step}" + (f" and {enc_per_step} encoder passes (images)" if enc_per_step else "") +
          f"; run folder {run_dir}")

    logger = Logger(run_dir, cfg, resume_step=step if ckpt is not None else None) if is_main else None

    lower_lr = f"; train again with a lower train.lr (this run: {t.lr:g})"   # what to do when it diverges

    def checkpoint():
        _save_checkpoint(run_dir, cfg, dist, policy, ema, opt, data_gen,
                         {"step": step, "train_seconds": train_seconds, "next_eval_minutes": next_eval_minutes},
                         lower_lr)

    def evaluate():
        _evaluate(run_dir, cfg, ema, val_set, logger, bar, step, train_seconds)

    def out_of_budget():
        return step >= t.max_steps or (t.max_minutes > 0 and train_seconds >= 60 * t.max_minutes)

    from .progress import TrainProgress

    # A step budget shows the ETA to max_steps; a time budget, training minutes against the budget.
    bar = TrainProgress(t.max_steps, t.max_minutes, step, train_seconds, disable=not (progress and is_main))
    bad_steps = 0
    policy.train()
    while not out_of_budget():
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        batch = {k: dist.shard(v).to(device) for k, v in train_set.sample(t.batch_size, data_gen).items()}
        loss, info = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        grad_norm = torch.tensor(float("nan"))
        finite = dist.all_finite(loss)        # on every rank: then all ranks take the same branch
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
        if not (finite and torch.isfinite(grad_norm)):
            # Skip the update, keep the weights; a run that keeps producing non-finite values is broken.
            bad_steps += 1
            warnings.warn(f"step {step}: non-finite loss or gradient ({float(loss)}, {float(grad_norm)}); step skipped")
            if bad_steps >= t.max_bad_steps:
                bar.close()                   # the error goes on a line of its own
                checkpoint()                  # skipped steps left the weights as they were: save them if finite
                raise DivergenceError(f"training diverged: {bad_steps} consecutive non-finite steps at step {step}; "
                                      f"aborting (last good weights saved in "
                                      f"{runs.checkpoint_path(run_dir, step).parent}){lower_lr}")
            continue
        bad_steps = 0
        opt.step()
        ema_update(ema, policy, step, t.ema_decay, t.ema_warmup)
        step += 1
        train_seconds += dist.max(time.perf_counter() - t0)   # the slowest rank's time: one schedule for all
        bar.update(step, train_seconds)

        if is_main and step % t.log_every == 0:
            rec = {"step": step, "sample_passes": step * per_step, "encoder_passes": step * enc_per_step, "train_minutes": train_seconds / 60, "loss": float(loss.detach()), "lr": opt.param_groups[0]["lr"],  # noqa: E501
                   "grad_norm": float(grad_norm), **{f"train/{k}": v for k, v in info.items()}}
            logger.log(rec)
            bar.set_train(float(loss.detach()), info.get("mse_to_expert"))
        if is_main and evaluating and ((t.eval_every_steps and step % t.eval_every_steps == 0) or
                                            (t.eval_every_minutes and train_seconds >= 60 * next_eval_minutes)):
            while t.eval_every_minutes and train_seconds >= 60 * next_eval_minutes:
                next_eval_minutes += t.eval_every_minutes
            evaluate()
            policy.train()
        if step % t.ckpt_every_steps == 0:
            checkpoint()

    bar.close()
    if step < t.max_steps:
        warnings.warn(f"train.max_minutes={t.max_minutes} stopped training at step {step} of {t.max_steps}: the "
                      f"learning-rate schedule did not finish")
    checkpoint()
    dist.check_in_sync(runs.ddp_path(run_dir), model=policy, ema=ema)
    dist.close()
    if not is_main:
        return run_dir
    if evaluating and not runs.eval_path(run_dir, step).exists():
        evaluate()
    ema.save_pretrained(runs.pretrained_dir(run_dir))
    logger.close()
    _write_plots(run_dir)
    print(f"done: {step} steps in {train_seconds / 60:.1f} training minutes; EMA policy saved to {runs.pretrained_dir(run_dir)}")
    return run_dir


def _save_checkpoint(run_dir: Path, cfg: Config, dist: Distributed, policy, ema, opt, data_gen, progress: dict,
                     lower_lr: str) -> None:
    """A checkpoint of everything a bit-exact resume needs. Weights with NaN or inf are never stored as "good"
    (resume and eval would pick them): the newest checkpoint on disk stays the newest good one."""
    torch_rng = dist.rng_states()             # every rank's noise stream (a collective: all ranks get here)
    step = progress["step"]
    bad = non_finite_tensors(policy.state_dict()) + non_finite_tensors(ema.state_dict())
    if bad:
        newest = runs.newest_verified_checkpoint(run_dir)
        raise DivergenceError(f"training diverged: step {step}: the weights hold NaN or inf ({bad[0]}); not "
                              f"saved. Newest good checkpoint: {newest or 'none'}{lower_lr}")
    if not dist.is_main:
        return
    save_checkpoint({"model": policy.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                     **progress, "config": cfg.to_dict(), "data_rng": data_gen.get_state(),
                     "torch_rng": torch_rng}, runs.checkpoint_path(run_dir, step))
    runs.prune_checkpoints(run_dir, cfg.train.keep_checkpoints)


def _evaluate(run_dir: Path, cfg: Config, ema, val_set, logger, bar, step: int, train_seconds: float) -> None:
    """Closed-loop evaluation of the EMA weights and the held-out signals, saved as eval/step_<step>.json."""
    from .evaluation import save_eval_json

    t, per_step, enc_per_step = cfg.train, cfg.sample_passes_per_step, cfg.encoder_passes_per_step
    res = evaluate_policy(ema, cfg, t.eval_episodes, t.eval_workers, progress=False, seed=t.seed)
    res.update(step=step, sample_passes=step * per_step, encoder_passes=step * enc_per_step,
               train_minutes=train_seconds / 60, val=validation_signals(ema, val_set))
    save_eval_json(res, runs.eval_path(run_dir, step))
    logger.log({"step": step, "sample_passes": step * per_step, "encoder_passes": step * enc_per_step,
                "train_minutes": train_seconds / 60,
                "eval/mean_score": res["mean_score"], "eval/success_rate": res["success_rate"],
                **{f"val/{k}": v for k, v in res["val"].items()}})
    bar.write(f"step {step}: score {res['mean_score']:.3f}, success {res['success_rate']:.2f} "
              f"({train_seconds / 60:.1f} train-min, eval {res['wall_s']:.0f}s)")
    bar.set_eval(res["mean_score"], step)


def _config_and_checkpoint(cfg: Config | None, run_dir: Path, resume: bool) -> tuple[Config, dict | None]:
    """The run's config and, when resuming, its newest good checkpoint. Resuming takes the config saved with the
    checkpoint, so a resumed run is the same run (and a truncated or edited config.json does not matter); a new run
    first checks that its folder is free (before loading data; writes nothing)."""
    if not resume:
        runs.check_run_dir_free(run_dir, cfg.train.overwrite)
        return cfg, None
    found = runs.latest_good_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no usable checkpoint to resume from")
    ckpt_path, ckpt = found
    print(f"resuming {run_dir} from {ckpt_path.name} (step {ckpt['step']})")
    return Config.from_dict(ckpt["config"], where=str(ckpt_path)), ckpt


def _claim_run_folder(run_dir: Path, cfg: Config, resume: bool, dist: Distributed, hold: contextlib.ExitStack) -> None:
    """Rank 0 claims the folder for the run's life and writes config.json and provenance.json (the commit, command
    and machine that trained it, for its records); under torchrun every rank stops if it cannot, none hangs."""
    refused = None
    if dist.is_main:
        try:
            hold.enter_context(runs.claim_run_dir(run_dir, resume=resume, overwrite=cfg.train.overwrite))
            runs.write_config(run_dir, cfg)
            if not resume:
                write_provenance(run_dir)
        except (RunDirError, OSError) as e:
            refused = e
    if dist.max(float(refused is not None)) > 0:     # a collective: every rank takes the same branch
        raise refused or RunDirError(f"{run_dir}: rank 0 could not claim the run folder")


def _build(cfg: Config, normalizer: Normalizer, dist: Distributed):
    """(policy, its loss through DDP when distributed, EMA copy, AdamW, the data stream's generator)."""
    t = cfg.train
    policy = make_policy(cfg.policy, normalizer).to(dist.device)
    loss_fn = dist.loss_fn(policy)
    ema = copy.deepcopy(policy).requires_grad_(False).eval()
    if t.encoder_bf16:                         # training only: the EMA copy (evaluated, saved) stays float32
        policy.obs_encoder.set_autocast(torch.bfloat16)
    if t.compile:
        policy.model.compile()                 # in place: parameter names, checkpoints and the EMA copy unchanged
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
    data_gen = torch.Generator().manual_seed(t.seed)   # the same data stream on every rank
    if dist.enabled:
        torch.manual_seed(t.seed + dist.rank)  # but each rank its own sampling noise
    return policy, loss_fn, ema, opt, data_gen


def _restore(ckpt: dict, policy, ema, opt, data_gen, dist: Distributed, seed: int) -> tuple[int, float, float]:
    """Weights, optimiser and every random stream from a checkpoint; returns (step, train_seconds, next eval)."""
    policy.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["optimizer"])
    data_gen.set_state(ckpt["data_rng"])
    dist.restore_rng(ckpt["torch_rng"], seed, ckpt["step"])
    return ckpt["step"], ckpt["train_seconds"], ckpt["next_eval_minutes"]


def _evaluating(cfg: Config, is_main: bool) -> bool:
    from .tasks import family, has_env

    t = cfg.train
    evaluating = t.eval_episodes > 0 and has_env(cfg.task)
    if t.eval_episodes and not evaluating and is_main:
        print(f"note: task {cfg.task.name} has no evaluation environment ({family(cfg.task).no_env_hint}); "
              f"training without evaluation (train.eval_episodes={t.eval_episodes} is ignored)")
    return evaluating


def _write_plots(run_dir: Path) -> None:
    """The run's training plots (plots.py) into <run>/plots; a plotting failure never fails a finished run."""
    from .plots import plot_run

    try:
        paths = plot_run(run_dir)
    except Exception as e:                    # e.g. a broken matplotlib install: the run itself is complete
        warnings.warn(f"{run_dir}: training plots not written ({type(e).__name__}: {e})")
        return
    print(f"plots: {', '.join(p.name for p in paths)} in {runs.plots_dir(run_dir)}")
