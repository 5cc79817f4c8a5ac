"""A sharded on-disk store of encoded images, and the streaming loader that training reads it through (issue 43).

``encode_folder`` turns an ImageNet-layout folder (``root/<class>/<image>``, classes sorted by name) into

    OUT/plan.json            settings and the source file list's hash; written first, checked on every resume
    OUT/files.txt            the source files (relative path <TAB> label), in shard order
    OUT/shard_000000.x.npy   [n, C, H, W]: VAE latents (float16, times the VAE's scaling_factor) or pixels (uint8)
    OUT/shard_000000.y.npy   [n] int64 labels
    OUT/shard_000000.json    written last: marks the shard finished (count); a shard without it is redone
    OUT/index.json           written once every shard is finished: what ``ShardStore`` reads

Shard i holds source files [i*S, (i+1)*S) and, with ``flip``, their horizontal mirrors (each image encoded twice,
as the mirror image, not as a mirrored latent: a VAE latent is not flip-equivariant). Under torchrun rank r
encodes the shards i with i % world == r; a rerun skips the finished shards, so a killed job is resumed by
running the same command again. Images are preprocessed as ADM / DiT do (box-downsample while the short side is
at least twice the target, bicubic resize of the short side to the target, center crop), the preprocessing of
the FID reference batches.

Training never holds the set in memory: ``ShardStore`` memory-maps the shards, and ``StoreStream`` draws batches
through a ``DistributedSampler`` (each rank its own disjoint share of every epoch) and can restart mid-epoch
(resume).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..errors import ConfigError, DatasetError

__all__ = ["IMAGE_SUFFIXES", "list_image_folder", "center_crop", "load_image", "encode_folder", "ShardStore",
           "StoreStream", "read_index"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
INDEX = "index.json"


def list_image_folder(root: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """[(path relative to root, label)] sorted by class then file name, and the sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected root/<class>/<image>, the ImageNet layout)")
    files = [(f"{c}/{p.name}", ci) for ci, c in enumerate(classes)
             for p in sorted((root / c).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}/<class>/")
    return files, classes


def center_crop(im, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3]: ADM's center_crop_arr (the preprocessing of its FID reference batches)."""
    from PIL import Image

    im = im.convert("RGB")
    while min(im.size) >= 2 * size:
        im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
    scale = size / min(im.size)
    im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
    a = np.asarray(im)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


def load_image(path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return center_crop(im, size)


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _shard_done(out: Path, name: str, count: int) -> bool:
    """Finished = its marker says ``count`` items and both arrays are there with that many rows."""
    marker = out / f"{name}.json"
    try:
        if json.loads(marker.read_text())["count"] != count:
            return False
        x = np.load(out / f"{name}.x.npy", mmap_mode="r")
        y = np.load(out / f"{name}.y.npy", mmap_mode="r")
        return len(x) == count and len(y) == count
    except (OSError, ValueError, KeyError, TypeError):
        return False


class _VAEEncoder:
    """Pixels in [-1, 1] -> scaled latent means with a local diffusers AutoencoderKL (``latent.KLCodec``)."""

    def __init__(self, path, device):
        from .latent import KLCodec

        if not path or not Path(path).is_dir():
            raise FileNotFoundError(f"encode kind=latent needs vae = a local diffusers AutoencoderKL folder "
                                    f"(config.json + diffusion_pytorch_model.safetensors), got {path!r}; nothing is "
                                    f"downloaded here (docs/image_track.md says where to get SD-VAE)")
        self.codec = KLCodec(path, device=device)
        self.scale = self.codec.scale

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        # The posterior mean, not a sample: deterministic, so a redone shard is bit-identical (our choice).
        return (self.codec._encode(x) * self.scale).numpy().astype(np.float16)


def encode_folder(src, out, *, kind: str = "latent", vae=None, size: int = 256, shard_size: int = 1000,
                  flip: bool = True, batch: int = 32, device: str | None = None, log=print) -> dict:
    """Encode ``src`` into a store at ``out`` (see the module doc); under torchrun each rank takes its shards.
    Returns the index (on every rank)."""
    from ..distributed import Distributed

    if kind not in ("latent", "pixel"):
        raise ConfigError(f"encode kind must be 'latent' or 'pixel', got {kind!r}")
    if shard_size < 1 or batch < 1 or size < 8:
        raise ConfigError(f"encode needs shard >= 1, batch >= 1 and size >= 8 (got {shard_size}, {batch}, {size})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    D = Distributed(device)
    out = Path(out)
    enc = _VAEEncoder(vae, D.device) if kind == "latent" else None   # fails fast, before any file is written
    files, classes = list_image_folder(src)
    listing = "".join(f"{p}\t{y}\n" for p, y in files)
    plan = {"kind": kind, "size": size, "shard_size": shard_size, "flip": flip, "n_files": len(files),
            "classes": classes, "files_sha256": hashlib.sha256(listing.encode()).hexdigest(),
            "vae_path": str(Path(vae).resolve()) if vae else None, "scale": enc.scale if enc else None}
    if D.is_main and not (out / "plan.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(out / "files.txt", listing)
        _atomic_write_text(out / "plan.json", json.dumps(plan, indent=1))
    D.barrier()
    # Every rank checks (so that all of them stop, none waits at a barrier for one that raised).
    old = json.loads((out / "plan.json").read_text())
    diff = sorted(k for k in plan if old.get(k) != plan[k])
    if diff:
        raise ConfigError(f"{out} holds a store made with other settings or source files ({', '.join(diff)} "
                          f"differ); encode into a new folder")
    n_shards = -(-len(files) // shard_size)
    per_copy = 2 if flip else 1
    mine = [i for i in range(n_shards) if i % D.world_size == D.rank]
    done = redone = 0
    for i in mine:
        name = f"shard_{i:06d}"
        part = files[i * shard_size: (i + 1) * shard_size]
        if _shard_done(out, name, per_copy * len(part)):
            done += 1
            continue
        xs, ys = [], []
        for b in range(0, len(part), batch):
            chunk = part[b: b + batch]
            img = np.stack([load_image(Path(src) / p, size) for p, _ in chunk])          # [b, H, W, 3] uint8
            img = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()                # [b, 3, H, W]
            views = [img, img.flip(-1)] if flip else [img]
            for v in views:
                xs.append(enc(v.float().div(127.5).sub(1)) if enc else v.numpy())
                ys.append(np.array([y for _, y in chunk], dtype=np.int64))
        # originals and mirrors interleaved per batch; the sampler shuffles anyway
        _atomic_save_npy(out / f"{name}.x.npy", np.concatenate(xs))
        _atomic_save_npy(out / f"{name}.y.npy", np.concatenate(ys))
        _atomic_write_text(out / f"{name}.json", json.dumps({"count": per_copy * len(part)}))
        redone += 1
        log(f"rank {D.rank}: {name} ({per_copy * len(part)} items) written")
    log(f"rank {D.rank}: {redone} shards encoded, {done} already finished")
    D.barrier()
    counts = [per_copy * len(files[i * shard_size: (i + 1) * shard_size]) for i in range(n_shards)]
    missing = [i for i in range(n_shards) if not _shard_done(out, f"shard_{i:06d}", counts[i])]
    if missing:
        raise DatasetError(f"{out}: shards {missing[:5]} are not finished; run the same encode command again")
    if D.is_main:
        x0 = np.load(out / "shard_000000.x.npy", mmap_mode="r")
        index = {**plan, "shape": list(x0.shape[1:]), "dtype": str(x0.dtype), "count": sum(counts),
                 "num_classes": len(classes), "source": str(Path(src).resolve()),
                 "shards": [{"name": f"shard_{i:06d}", "count": c} for i, c in enumerate(counts)]}
        _atomic_write_text(out / INDEX, json.dumps(index, indent=1))
    D.barrier()
    index = read_index(out)
    D.close()
    return index


def read_index(root) -> dict:
    p = Path(root) / INDEX
    if not p.exists():
        raise DatasetError(f"{root} is not a finished image store ({INDEX} missing): run "
                           f"`drift-policy image encode SRC {root} ...` (again, if it was interrupted)")
    return json.loads(p.read_text())


class ShardStore(Dataset):
    """Items of a store as (raw tensor, label): float16 latents or uint8 pixels, as stored. ``to_model`` turns a
    batch of raw items into the generator's space (float32; pixels to [-1, 1]). Shards are memory-mapped lazily
    (per DataLoader worker); only the labels (8 bytes an item) are read into memory."""

    def __init__(self, root):
        self.root = Path(root)
        self.index = read_index(root)
        self.kind = self.index["kind"]
        self.shape = tuple(self.index["shape"])
        self.names = [s["name"] for s in self.index["shards"]]
        counts = [s["count"] for s in self.index["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).tolist()
        self.labels = np.concatenate([np.load(self.root / f"{n}.y.npy") for n in self.names])
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._maps:
            self._maps[s] = np.load(self.root / f"{self.names[s]}.x.npy", mmap_mode="r")
        return self._maps[s]

    def __getitem__(self, i: int):
        s = bisect.bisect_right(self.offsets, i) - 1
        return torch.from_numpy(np.array(self._shard(s)[i - self.offsets[s]])), int(self.labels[i])

    def __getstate__(self):                     # DataLoader workers open their own memory maps
        return {**self.__dict__, "_maps": {}}

    @property
    def raw_dtype(self) -> torch.dtype:
        return torch.uint8 if self.kind == "pixel" else torch.float16

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().div(127.5).sub(1) if self.kind == "pixel" else x.float()

    def draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n random items in the generator's space (MAE pretraining: random access, no epoch order)."""
        idx = torch.randint(0, len(self), (n,), generator=generator).tolist()
        return self.to_model(torch.stack([self[i][0] for i in idx]))


class StoreStream:
    """Endless batches of one rank's share of a store: a ``DistributedSampler`` (shuffled, seeded, drop_last) per
    epoch, and ``state()`` / ``load_state()`` = (epoch, batches taken) so a resumed run continues the same order."""

    def __init__(self, store: ShardStore, batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 workers: int = 0):
        self.store, self.batch, self.workers = store, batch, workers
        self.sampler = DistributedSampler(store, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                          drop_last=True)
        if self.sampler.num_samples < batch:
            raise ConfigError(f"the store {getattr(store, 'root', '')} has {len(store)} items: fewer than one batch "
                              f"of {batch} per process ({world} processes)")
        self.epoch, self.taken, self._it = 0, 0, None
        self.last_indices: list[int] = []             # the items of the latest batch (the MAE's disjointness check)

    def _open(self):
        self.sampler.set_epoch(self.epoch)
        self._order = list(self.sampler)
        order = self._order[self.taken * self.batch:]
        # Own generator: the DataLoader must not draw from the global RNG (bit-exact resume).
        self._it = iter(DataLoader(self.store, batch_size=self.batch, sampler=order, drop_last=True,
                                   num_workers=self.workers, generator=torch.Generator()))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self._open()
            try:
                x, y = next(self._it)
                self.last_indices = self._order[self.taken * self.batch:(self.taken + 1) * self.batch]
                self.taken += 1
                return x, y
            except StopIteration:
                self.epoch, self.taken, self._it = self.epoch + 1, 0, None

    def state(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state(self, s: dict) -> None:
        self.epoch, self.taken, self._it = int(s["epoch"]), int(s["taken"]), None
