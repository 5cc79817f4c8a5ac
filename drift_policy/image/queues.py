"""Sample queues: per-class FIFO queues of recent real samples (positives) and one global FIFO queue
(unconditional real negatives for CFG). Each DDP rank keeps its own queues, fed by its own data shard.

Items are stored as tensors of any fixed shape (images, latents). A queue is a ring buffer; ``sample`` draws
without replacement from what is currently stored (with replacement only if asked for more than stored).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RingQueue", "ClassQueues"]


class RingQueue:
    def __init__(self, capacity: int, item_shape, dtype=torch.float32):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.buf = torch.zeros(capacity, *item_shape, dtype=dtype)
        self.ptr = 0        # next write position
        self.size = 0       # number of valid items

    def push(self, items: Tensor) -> None:
        """Append [n, *item_shape]; the oldest items are overwritten once full."""
        items = items.detach().to(self.buf.dtype)
        if len(items) >= self.capacity:
            items = items[-self.capacity:]
        n = len(items)
        idx = (self.ptr + torch.arange(n)) % self.capacity
        self.buf[idx] = items
        self.ptr = (self.ptr + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.size == 0:
            raise RuntimeError("sampling from an empty queue; push data first (see ClassQueues.ready)")
        if n <= self.size:
            idx = torch.randperm(self.size, generator=generator)[:n]
        else:
            idx = torch.randint(0, self.size, (n,), generator=generator)
        return self.buf[idx]

    def state_dict(self) -> dict:
        return {"buf": self.buf.clone(), "ptr": self.ptr, "size": self.size}

    def load_state_dict(self, s: dict) -> None:
        if tuple(s["buf"].shape) != tuple(self.buf.shape) or s["buf"].dtype != self.buf.dtype:
            raise ValueError(f"queue state {tuple(s['buf'].shape)} {s['buf'].dtype} does not fit this queue "
                             f"{tuple(self.buf.shape)} {self.buf.dtype}")
        self.buf.copy_(s["buf"])
        self.ptr, self.size = int(s["ptr"]), int(s["size"])

    def items(self) -> Tensor:
        """Stored items, oldest first."""
        if self.size < self.capacity:
            return self.buf[: self.size]
        return torch.cat([self.buf[self.ptr:], self.buf[: self.ptr]])


class ClassQueues:
    """One ``RingQueue`` per class plus a global one, all fed by ``push(x, y)`` with a real data batch."""

    def __init__(self, num_classes: int, per_class: int, global_size: int, item_shape, dtype=torch.float32):
        self.num_classes = num_classes
        self.cls = [RingQueue(per_class, item_shape, dtype) for _ in range(num_classes)]
        self.glob = RingQueue(global_size, item_shape, dtype)

    def push(self, x: Tensor, y: Tensor) -> None:
        y = y.long().cpu()
        for c in y.unique().tolist():
            self.cls[c].push(x[y == c])
        self.glob.push(x)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to draw exactly what an uninterrupted one would."""
        return {"cls": [q.state_dict() for q in self.cls], "glob": self.glob.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        if len(s["cls"]) != self.num_classes:
            raise ValueError(f"queue state has {len(s['cls'])} classes, these queues {self.num_classes}")
        for q, qs in zip(self.cls, s["cls"]):
            q.load_state_dict(qs)
        self.glob.load_state_dict(s["glob"])

    def ready(self, min_per_class: int, min_global: int = 1) -> bool:
        return all(q.size >= min_per_class for q in self.cls) and self.glob.size >= min_global

    def positives(self, labels, n: int, generator=None) -> Tensor:
        """[G, n, *item] positives for each label in ``labels`` [G]."""
        return torch.stack([self.cls[int(c)].sample(n, generator) for c in labels])

    def unconditional(self, n: int, generator=None) -> Tensor:
        """[n, *item] recent real samples of any class."""
        return self.glob.sample(n, generator)
