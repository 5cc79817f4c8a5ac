"""Evaluate a trained generator: own-classifier label agreement, feature-space FD / KID / precision-recall
against held-out real images (with the real-vs-real reference next to it), and PNG sample grids per class."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from .classifier import SmallCNN, accuracy, train_classifier
from .data import load_dataset
from .metrics import extract, frechet_distance, kid, precision_recall
from .train import load_generator

__all__ = ["ensure_classifier", "generate", "evaluate", "save_grid"]


def ensure_classifier(cfg: dict, path=None, minutes: float | None = None, epochs: float | None = None,
                      log=print) -> SmallCNN:
    path = Path(path or cfg["eval"]["classifier"])
    minutes = minutes if minutes is not None else cfg["eval"].get("classifier_minutes", 3.0)
    epochs = epochs if epochs is not None else cfg["eval"].get("classifier_epochs", 2.0)
    x, y = load_dataset(cfg["data"]["name"], "train", cfg["data"]["root"])
    model = SmallCNN(x.shape[1], cfg["data"]["num_classes"])
    if path.exists():
        model.load_state_dict(load_checkpoint(path)["model"])
        return model.eval()
    model = train_classifier(x, y, epochs=epochs, minutes=minutes, num_classes=cfg["data"]["num_classes"], log=log)
    xt, yt = load_dataset(cfg["data"]["name"], "test", cfg["data"]["root"])
    acc = accuracy(model, xt, yt)
    log(f"classifier test accuracy {acc:.4f} -> {path}")
    save_checkpoint({"model": model.state_dict(), "test_acc": acc}, path)
    return model


@torch.no_grad()
def generate(model, labels: torch.Tensor, alpha: float, seed: int = 0, batch: int = 500) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (model.in_channels, model.image_size, model.image_size)
    out = []
    for i in range(0, len(labels), batch):
        y = labels[i:i + batch]
        eps = torch.randn(len(y), *shape, generator=g)
        style = torch.randint(0, model.style_codebook, (len(y), model.n_style), generator=g)
        out.append(model(eps, y, alpha, style))
    return torch.cat(out)


def save_grid(x: torch.Tensor, path, nrow: int) -> None:
    """x [n*nrow, C, H, W] in [-1, 1], row-major (one class per row) -> PNG."""
    from PIL import Image

    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte()
    n, C, H, W = x.shape
    rows = n // nrow
    pad = 2
    canvas = torch.full((C, rows * (H + pad) + pad, nrow * (W + pad) + pad), 255, dtype=torch.uint8)
    for i in range(rows * nrow):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = x[i]
    a = canvas.permute(1, 2, 0).numpy()
    Image.fromarray(a[..., 0] if C == 1 else a).resize((a.shape[1] * 3, a.shape[0] * 3), Image.NEAREST).save(path)


def evaluate(run_dir, *, n_per_class: int | None = None, alphas=None, out_dir=None, n_pr: int = 3000,
             seed: int = 1234, log=print) -> dict:
    model, cfg = load_generator(run_dir)
    e = cfg["eval"]
    n_per_class = n_per_class or e["n_per_class"]
    alphas = alphas or e["alphas"]
    out_dir = Path(out_dir) if out_dir else Path(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    C = cfg["data"]["num_classes"]
    clf = ensure_classifier(cfg, log=log)
    codec = None
    if cfg["latent"]["kind"] != "none":
        from .train import prepare_data

        _, _, codec = prepare_data(cfg, "train", log)
    xt, yt = load_dataset(cfg["data"]["name"], "test", cfg["data"]["root"])
    xr, _ = load_dataset(cfg["data"]["name"], "train", cfg["data"]["root"])
    g = torch.Generator().manual_seed(seed)
    n = min(len(xt), n_per_class * C)
    xr = xr[torch.randperm(len(xr), generator=g)[:n]]
    f_test, f_real = extract(clf.features, xt), extract(clf.features, xr)
    res = {"run": str(run_dir), "step": None, "n_generated": n_per_class * C, "n_test": len(xt),
           "classifier_test_acc": accuracy(clf, xt, yt),
           "reference_train_vs_test": {"fd": frechet_distance(f_real, f_test), "kid": kid(f_real, f_test)[0],
                                       "precision_recall": precision_recall(f_test[:n_pr], f_real[:n_pr])}}
    ck = load_checkpoint(Path(run_dir) / "checkpoint.pt")
    res["step"] = ck["step"]
    hist = Path(run_dir) / "history.jsonl"
    if hist.exists():
        lines = hist.read_text().splitlines()
        res["train_seconds"] = json.loads(lines[-1])["t"] if lines else None
    labels = torch.arange(C).repeat_interleave(n_per_class)
    for a in alphas:
        x = generate(model, labels, a, seed=seed)
        if codec is not None:
            x = codec.decode(x)
        with torch.no_grad():
            pred = torch.cat([clf(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
        f = extract(clf.features, x)
        sub = torch.randperm(len(f), generator=g)[:n_pr]
        per_class = [(pred[labels == c] == c).float().mean().item() for c in range(C)]
        res[f"alpha{a:g}"] = {"label_agreement": (pred == labels).float().mean().item(),
                              "label_agreement_per_class": [round(v, 4) for v in per_class],
                              "fd_vs_test": frechet_distance(f, f_test), "kid_vs_test": kid(f, f_test)[0],
                              "precision_recall": precision_recall(f_test[:n_pr], f[sub]),
                              "pixel_std": x.std(0).mean().item()}
        k = e["grid_per_class"]
        idx = torch.cat([torch.nonzero(labels == c).flatten()[:k] for c in range(C)])
        save_grid(x[idx], out_dir / f"samples_alpha{a:g}.png", k)
        log(f"alpha {a:g}: " + json.dumps({kk: v for kk, v in res[f'alpha{a:g}'].items() if kk != 'label_agreement_per_class'}))
    idx = torch.cat([torch.nonzero(yt == c).flatten()[:e['grid_per_class']] for c in range(C)])
    save_grid(xt[idx], out_dir / "real_test.png", e["grid_per_class"])
    (out_dir / "eval.json").write_text(json.dumps(res, indent=2))
    return res


def summarize(runs: dict[str, str], alphas=(1.0, 1.5)) -> str:
    """Markdown table of eval.json files: {label: folder containing eval.json}."""
    rows = ["| run | steps | train s | alpha | label agreement | FD (clf feats) | KID | precision | recall |",
            "|---|---|---|---|---|---|---|---|---|"]
    ref = None
    for label, folder in runs.items():
        p = Path(folder) / "eval.json"
        if not p.exists():
            rows.append(f"| {label} | (missing) | | | | | | | |")
            continue
        r = json.loads(p.read_text())
        ref = ref or r
        for a in alphas:
            m = r.get(f"alpha{a:g}")
            if m:
                pr = m["precision_recall"]
                rows.append(f"| {label} | {r['step']} | {r.get('train_seconds', '')} | {a:g} | {m['label_agreement']:.3f} | "
                            f"{m['fd_vs_test']:.2f} | {m['kid_vs_test']:.3f} | {pr[0]:.3f} | {pr[1]:.3f} |")
    if ref:
        t = ref["reference_train_vs_test"]
        rows.append(f"| real train vs real test (reference) | | | | {ref['classifier_test_acc']:.3f} (clf acc) | "
                    f"{t['fd']:.2f} | {t['kid']:.3f} | {t['precision_recall'][0]:.3f} | {t['precision_recall'][1]:.3f} |")
    return "\n".join(rows)
