"""FID / IS of a trained generator over N samples, and reference statistics; both split across torchrun ranks.

    drift-policy image fid RUN_DIR inception=FILE ref=REF [n=50000] [alphas=[1.0]] [batch=250] [head=FILE]
                                   [seed=0] [ema=true] [out=FILE.json]
    drift-policy image fid-ref SRC inception=FILE out=FILE.npz [size=256] [batch=250]

REF is an .npz with mu / sigma (ADM's reference batch, or one written by ``fid-ref``), an image folder (ImageNet
layout or flat; center-cropped to ``ref_size``, default the run's data.image_size), or ``train`` / ``test``: that
split of the run's own data set (Fashion-MNIST, MNIST). Sample i (0 <= i < n) has label i mod num_classes, and the
noise of each batch of ``batch`` samples comes from its own seed, so the samples (and the numbers) do not depend
on the number of processes. Rank 0 writes the record (default RUN_DIR/fid.json).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .fid import InceptionFID, Moments, fid_from_stats, file_sha256, inception_score, load_ref_stats_meta, pad_to, save_stats

__all__ = ["run_fid", "reference_stats"]


def _image_files(src: Path) -> list[Path]:
    from .store import IMAGE_SUFFIXES, list_image_folder

    if any(d.is_dir() for d in src.iterdir()):
        return [src / p for p, _ in list_image_folder(src)[0]]
    return sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _folder_moments(src: Path, net: InceptionFID, size: int, batch: int, rank: int, world: int,
                    pad: int | None = None) -> Moments:
    from .store import load_image

    files = _image_files(src)
    if len(files) < 2:
        raise ConfigError(f"reference folder {src} has {len(files)} images; FID needs at least 2")
    mom = Moments()
    mine = files[rank::world]
    for i in range(0, len(mine), batch):
        img = np.stack([load_image(p, size) for p in mine[i:i + batch]])               # [b, H, W, 3] uint8
        mom.add(net(pad_to(torch.from_numpy(img).permute(0, 3, 1, 2).float().div(127.5).sub(1), pad))[0])
    return mom


def reference_stats(ref, net: InceptionFID, *, cfg: dict | None = None, size: int | None = None, batch: int = 250,
                    rank: int = 0, world: int = 1, pad: int | None = None,
                    subset: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of REF (see the module doc; n = -1 for an .npz that does not say); a collective under torchrun
    unless REF is an .npz. ``pad``: images centered on a black pad x pad canvas first (not applied to an .npz).
    ``subset``: of a train / test split, a fixed random ``subset`` of its images (seed 0), when the whole split
    costs more Inception time than there is (MNIST's test set is ordered: its halves come from different writers,
    so a prefix would not do)."""
    if str(ref) in ("train", "test"):
        if cfg is None or cfg["data"]["name"] in ("store", "folder"):
            raise ConfigError(f"ref={ref} needs a run on an in-memory data set; for a store or folder pass the image "
                              f"folder or an .npz")
        from .data import load_dataset

        x, _ = load_dataset(cfg["data"]["name"], str(ref), cfg["data"]["root"])
        if subset:
            x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:subset].sort().values]
        mom = Moments()
        mine = x[rank::world]
        for i in range(0, len(mine), batch):
            mom.add(net(pad_to(mine[i:i + batch], pad))[0])
    else:
        p = Path(ref)
        if p.is_file():
            mu, sigma, meta = load_ref_stats_meta(p)
            return mu, sigma, int(meta.get("n", -1))
        if not p.is_dir():
            raise FileNotFoundError(f"FID reference {ref!r} is neither an .npz, an image folder, train nor test")
        size = size or (cfg["data"]["image_size"] if cfg else None)
        if not size:
            raise ConfigError("a reference folder needs size=<pixels> (the generated images' size)")
        mom = _folder_moments(p, net, size, batch, rank, world, pad)
    mom.all_reduce()
    mu, sigma = mom.stats()
    return mu, sigma, mom.n


def _decoder(cfg: dict, device):
    """Latents -> pixels for latent runs (the VAE of latent.path, or the one the store was encoded with)."""
    kind = cfg["latent"]["kind"]
    if kind == "none":
        return None
    if kind == "kl":
        from .latent import KLCodec

        path = cfg["latent"]["path"]
        if path is None and cfg["data"]["name"] == "store":
            from .store import read_index

            path = read_index(cfg["data"]["root"]).get("vae_path")
        return KLCodec(path, cfg["latent"]["scale"], device=device)
    from .train import prepare_data  # tiny autoencoder: cached at latent.path

    return prepare_data(cfg, "train", log=lambda *a: None)[2]


@torch.no_grad()
def _samples(model, labels: torch.Tensor, alpha: float, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.image_size, model.image_size)
    eps = torch.randn(len(labels), *shape, generator=g)
    style = torch.randint(0, model.style_codebook, (len(labels), model.n_style), generator=g)
    return model(eps.to(device), labels.to(device), alpha, style.to(device)).float().cpu()


def run_fid(run_dir, *, inception, ref, n: int = 50000, alphas=(1.0,), batch: int = 250, head=None, seed: int = 0,
            use_ema: bool = True, out=None, ref_size: int | None = None, device: str | None = None,
            pad: int | None = None, ref_out=None, ref_n: int | None = None, command: str | None = None,
            log=print) -> dict:
    """FID (and IS) of the run at each alpha; see the module doc. ``pad``: generated and reference images are
    centered on a black pad x pad canvas before the Inception's resize (MNIST: 28 -> 32). ``ref_out``: also save
    the reference statistics computed here as an .npz, for ``ref=`` of later calls. ``ref_n``: a fixed random
    subset of a train / test split as the reference (``reference_stats``). The record names no folder of
    the machine (``provenance.machine_free``)."""
    from ..checkpoint import load_checkpoint
    from ..distributed import Distributed
    from ..provenance import git_commit, machine, machine_free, machine_free_text
    from .train import load_generator

    commit = git_commit()             # now: the code that runs, whatever changes in the checkout while it does
    D = Distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = log if D.is_main else (lambda *a, **k: None)
    net = InceptionFID(inception, head, device=D.device)                # fails fast when the file is missing
    sha = file_sha256(inception)
    model, cfg = load_generator(run_dir, use_ema=use_ema)
    model = model.to(D.device)
    codec = _decoder(cfg, D.device)
    C = cfg["data"]["num_classes"]
    ref_meta = None
    if Path(str(ref)).is_file():
        ref_meta = load_ref_stats_meta(ref)[2]
        if ref_meta.get("inception_sha256") not in (None, sha):
            raise ConfigError(f"{ref} was computed with another Inception file (sha256 {ref_meta['inception_sha256']})")
        if "pad" in ref_meta:                                            # save_stats keeps metadata as text
            ref_meta["pad"] = int(ref_meta["pad"])
        if "pad" in ref_meta and (ref_meta["pad"] or None) != (pad or None):
            raise ConfigError(f"{ref} was computed with pad={ref_meta['pad'] or None}, this call has pad={pad}")
    t0 = time.time()
    mu_r, sig_r, n_ref = reference_stats(ref, net, cfg=cfg, size=ref_size, batch=batch, rank=D.rank,
                                         world=D.world_size, pad=pad, subset=ref_n)
    ref_seconds = time.time() - t0
    if ref_out and ref_meta is None and D.is_main:
        source = f"{cfg['data']['name']} {ref} split" if str(ref) in ("train", "test") else machine_free(ref)
        source += f" (random {n_ref}, seed 0)" if ref_n and str(ref) in ("train", "test") else ""
        save_stats(ref_out, mu_r, sig_r, n_ref, source=source, pad=pad or 0, inception_sha256=sha)
        log(f"reference statistics ({n_ref} images) written: {ref_out}")
    ck = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    res = {"run": machine_free(run_dir), "run_step": int(ck["step"]), "run_seconds": ck.get("seconds"),
           "data": cfg["data"]["name"], "n": n,
           "ref": machine_free(ref), "ref_n": n_ref, "ref_meta": ref_meta, "ref_seconds": round(ref_seconds, 1),
           "image_size": [model.image_size, model.image_size], "pad": pad, "inception_input": [3, 299, 299],
           "inception": Path(inception).name, "inception_sha256": sha, "head": Path(head).name if head else None,
           "seed": seed, "ema": use_ema, "world": D.world_size, "labels": "i mod num_classes", "batch": batch,
           "command": machine_free_text(command) if command else None, "code_commit": commit, "machine": machine(),
           "alphas": {}}
    n_batches = -(-n // batch)
    for a in alphas:
        mom, probs, t0 = Moments(), [], time.time()
        for b in range(D.rank, n_batches, D.world_size):
            idx = torch.arange(b * batch, min((b + 1) * batch, n))
            x = _samples(model, idx % C, float(a), seed * 1_000_003 + b, D.device)
            if codec is not None:
                x = codec.decode(x)
            f, p = net(pad_to(x, pad))
            mom.add(f)
            if p is not None:
                probs.append((b, p.float().numpy()))
        mom.all_reduce()
        mu, sigma = mom.stats()
        rec = {"fid": fid_from_stats(mu, sigma, mu_r, sig_r), "seconds": round(time.time() - t0, 1)}
        if head:
            everyone = [bp for part in D.gather(probs) for bp in part]
            p_all = torch.from_numpy(np.concatenate([p for _, p in sorted(everyone, key=lambda t: t[0])]))
            rec["is"], rec["is_std"] = inception_score(p_all)
        res["alphas"][f"{float(a):g}"] = rec
        log(f"alpha {float(a):g}: " + json.dumps(rec))
    if D.is_main:
        out = Path(out) if out else Path(run_dir) / "fid.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        log(f"written: {out}")
    D.barrier()
    D.close()
    return res


def ref_main(src, *, inception, out, size: int = 256, batch: int = 250, device: str | None = None, log=print) -> Path:
    """Reference statistics of an image folder -> .npz (mu, sigma, n)."""
    from ..distributed import Distributed

    D = Distributed(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = InceptionFID(inception, device=D.device)
    mu, sigma, n = reference_stats(src, net, size=size, batch=batch, rank=D.rank, world=D.world_size)
    path = Path(out)
    if D.is_main:
        from ..provenance import machine_free

        save_stats(path, mu, sigma, n, source=machine_free(Path(src).resolve()), size=size,
                   inception_sha256=file_sha256(inception))
        log(f"written: {path} ({n} images)")
    D.barrier()
    D.close()
    return path


def pytorch_fid_check(inception, out=None, n: int = 32, seed: int = 0, log=print) -> dict:
    """The one check that needs the internet: our extractor against pytorch-fid's (``pip install pytorch-fid``; it
    downloads its weights, pt_inception-2015-12-05, at first use) on one fixed batch of 299x299 images, so neither
    side resizes. pytorch-fid scales [0, 1] input by 2x - 1, so it is given x / 256: the same network input as
    TF's (x - 128) / 128. Writes the feature difference and both FIDs between the batch's two halves."""
    try:
        from pytorch_fid.inception import InceptionV3
    except ImportError as e:
        raise ImportError("fid-check compares with pytorch-fid: `pip install pytorch-fid` (it downloads its Inception "
                          "weights on first use, so this check needs the internet)") from e
    net = InceptionFID(inception)
    x = torch.randint(0, 256, (n, 3, 299, 299), generator=torch.Generator().manual_seed(seed)).float()
    ours = net(x / 127.5 - 1)[0]
    with torch.no_grad():
        theirs = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()(x / 256)[0].flatten(1).double()

    def halves_fid(f):
        a, b = Moments(), Moments()
        a.add(f[: n // 2])
        b.add(f[n // 2:])
        return fid_from_stats(*a.stats(), *b.stats())

    res = {"n": n, "seed": seed, "inception_sha256": file_sha256(inception),
           "feature_max_abs_diff": float((ours - theirs).abs().max()), "feature_mean_abs": float(ours.abs().mean()),
           "fid_halves_ours": halves_fid(ours), "fid_halves_pytorch_fid": halves_fid(theirs)}
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(res, indent=2))
    log(json.dumps(res))
    return res
