"""Multi-process (DDP) training: what ``train.py`` needs to run under ``torchrun``.

The trainer is the same program on 1 or N processes. Launched by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) it becomes data-parallel:

* ``train.batch_size`` is the global batch. Every rank draws the same global batch from the same data stream
  (``data_gen``, seeded with ``train.seed`` on every rank) and keeps its own contiguous slice of
  batch_size / world_size samples; the batch size must divide evenly. The sequence of global batches is
  therefore the one a single process would draw.
* Each rank draws its own sampling noise (the generator's noise, diffusion's noise and timesteps): the global
  torch RNG is seeded with ``train.seed + rank`` after the model is built. Its per-rank states are saved in
  checkpoints, so a resumed run continues every rank's stream.
* Gradients are averaged across ranks by DistributedDataParallel (each rank's loss is the mean over its equal
  slice, so the average is the global-batch mean); every rank then takes the same optimiser and EMA step.
* Training time (which drives the cosine schedule and ``train.max_minutes``) is the slowest rank's, and a
  non-finite loss on any rank skips the step on all of them, so the ranks never disagree on what to do next.
* Only rank 0 writes: checkpoints, metrics, evaluations, the ``pretrained`` folder. At the end every rank
  hashes its parameters and EMA parameters; rank 0 writes them to ``<run_dir>/ddp.json`` and the run fails if the
  ranks drifted apart.
* Backend: ``nccl`` for ``train.device=cuda`` (one GPU per process, ``cuda:LOCAL_RANK``), ``gloo`` on CPU.

Launch (the README section)
---------------------------

One machine, 4 GPUs (global batch 256, i.e. 64 per GPU)::

    torchrun --standalone --nproc_per_node=4 -m drift_policy train train.device=cuda train.batch_size=256

One machine, CPU only, 2 processes (gloo; give each process its own threads)::

    torchrun --standalone --nproc_per_node=2 -m drift_policy train train.threads=1 train.batch_size=64

Two machines with 8 GPUs each. Run on every machine, with NODE_RANK 0 on the first and 1 on the second, and
HOST0 an address of the first machine that the second can reach (the port must be open between them)::

    torchrun --nnodes=2 --nproc_per_node=8 --node_rank=$NODE_RANK \\
        --master_addr=$HOST0 --master_port=29500 \\
        -m drift_policy train train.device=cuda train.batch_size=1024 train.run_dir=/shared/runs/pusht-ddp

(or, with a rendezvous server: ``--rdzv_backend=c10d --rdzv_endpoint=$HOST0:29500 --rdzv_id=pusht``). Every node
needs the data set (``DRIFT_POLICY_DATA_ROOT``) and the same code; ``train.run_dir`` should be on storage that
all nodes see, because resuming reads the newest checkpoint on every rank::

    torchrun ...same as above... -m drift_policy resume /shared/runs/pusht-ddp

A run may be resumed with a different number of processes (the global batch stays ``train.batch_size``); the
ranks' noise streams then restart from fresh seeds, with a warning. If one process dies, torchrun stops the
others; resume from the last checkpoint. Rank 0 evaluates while the others wait at the next step, so the process
group's timeout is long (``TIMEOUT``).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from datetime import timedelta
from pathlib import Path

import torch
from torch import Tensor, nn

TIMEOUT = timedelta(minutes=60)


class _PolicyLoss(nn.Module):
    """DDP synchronises the gradients of what runs inside its module's forward: here, ``compute_loss``."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, Tensor]):
        return self.policy.compute_loss(batch)


class Distributed:
    """Rank, world size and device of this process, plus the few collectives the training loop needs.

    With ``WORLD_SIZE`` unset or 1 every method is the single-process identity, so the loop has no branches.
    """

    def __init__(self, device: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        self.device = torch.device(device)
        if self.world_size > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", timeout=TIMEOUT)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- model and data -------------------------------------------------------------------------------------
    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` inside DistributedDataParallel when distributed (gradients averaged over ranks), else itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def loss_fn(self, policy: nn.Module):
        """``batch -> (loss, info)``: policy.compute_loss, through DistributedDataParallel when distributed."""
        if not self.enabled:
            return policy.compute_loss
        return self.wrap(_PolicyLoss(policy))

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(f"train.batch_size={batch_size} (the global batch) must be divisible by the "
                             f"number of processes ({self.world_size})")

    def shard(self, x: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch."""
        n = x.shape[0] // self.world_size
        return x[self.rank * n: (self.rank + 1) * n]

    # ---- agreement between ranks -----------------------------------------------------------------------------
    def _all_reduce(self, value: float, op) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=op)
        return float(t.item())

    def all_finite(self, loss: Tensor) -> bool:
        """Whether the loss is finite on every rank (DDP's backward is collective: all ranks must agree)."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if not self.enabled:
            return finite
        return self._all_reduce(float(finite), torch.distributed.ReduceOp.MIN) > 0

    def max(self, value: float) -> float:
        if not self.enabled:
            return value
        return self._all_reduce(value, torch.distributed.ReduceOp.MAX)

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order (a collective)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    # ---- RNG state in checkpoints ----------------------------------------------------------------------------
    def rng_states(self) -> Tensor | list[Tensor]:
        """The global torch RNG state: one tensor when single-process (the original checkpoint format), the list
        of every rank's state when distributed (a collective: every rank must call it)."""
        state = torch.get_rng_state()
        return self.gather(state) if self.enabled else state

    def restore_rng(self, saved: Tensor | list[Tensor], seed: int, step: int) -> None:
        if isinstance(saved, list) and len(saved) == self.world_size:
            torch.set_rng_state(saved[self.rank])
        elif isinstance(saved, Tensor) and self.world_size == 1:
            torch.set_rng_state(saved)
        else:
            n_saved = len(saved) if isinstance(saved, list) else 1
            warnings.warn(f"checkpoint was written by {n_saved} process(es), resuming with {self.world_size}: "
                          f"the noise streams restart from fresh seeds")
            torch.manual_seed(seed + 1000003 * (step + 1) + self.rank)

    # ---- end of training ---------------------------------------------------------------------------------------
    def check_in_sync(self, report: Path, **modules: nn.Module) -> None:
        """Every rank hashes each module's parameters; rank 0 writes them to ``report`` (a run's ``ddp.json``)
        and the run fails if any rank differs from rank 0."""
        if not self.enabled:
            return
        everyone = self.gather({name: param_digest(m) for name, m in modules.items()})
        if self.is_main:
            in_sync = all(d == everyone[0] for d in everyone)
            report.write_text(json.dumps({"world_size": self.world_size, "in_sync": in_sync,
                                          "backend": torch.distributed.get_backend(), "digests": everyone}, indent=2))
            if not in_sync:
                raise RuntimeError(f"DDP ranks ended with different parameters; see {report}")

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def param_digest(module: nn.Module) -> str:
    """SHA-256 over a module's parameters (names and exact bytes)."""
    h = hashlib.sha256()
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
