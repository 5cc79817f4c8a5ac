"""The deployment API's input contract, checked in one place: ``Policy.predict_action`` (its observation
window) and ``executor.ChunkExecutor`` (every step that enters the history, and every chunk that enters the
queue: ``select_action``, the evaluation episode and the real-time runner) call these.

* Low-dim observations (``"obs"``) must be finite: one NaN or inf gives NaN actions, and a chunk computed from
  it would be served for the next Ta - 1 steps too.
* Every other key is a camera image: RGB, channels first, in 0..255: ``uint8`` (what the environments and data
  loaders produce), or a float or integer array with values in 0..255. A float image whose values all lie in
  (0, 1] is refused: it is almost certainly a [0, 1] image, which would be read as nearly black. Convert it with
  ``img * 255`` or pass uint8. An all-zero frame is the same in both conventions and accepted.
* A chunk with NaN or inf is never returned or queued (``check_chunk``).

Works on torch tensors and numpy arrays alike, without importing torch (evaluation workers stay torch-free).
"""
from __future__ import annotations

import numpy as np

__all__ = ["check_observation", "check_image", "check_image_step", "check_chunk"]


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _all_finite(x) -> bool:
    return bool(x.isfinite().all()) if hasattr(x, "isfinite") else bool(np.isfinite(np.asarray(x)).all())


def _is_float(x) -> bool:
    return x.is_floating_point() if hasattr(x, "is_floating_point") else np.issubdtype(np.asarray(x).dtype, np.floating)


def check_observation(obs: dict, image_keys=None, where: str = "predict_action") -> None:
    """ValueError naming the key (and the first bad batch rows) when an observation breaks the contract above.
    ``image_keys``: the camera keys (default: every key but "obs")."""
    low = obs["obs"]
    if not _all_finite(low):
        x = _numpy(low)
        rows = np.nonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(1))[0].tolist() if x.ndim > 1 else []
        at = f" (batch rows {rows[:5]})" if rows else ""
        raise ValueError(f"{where}: observation 'obs' holds NaN or inf{at}; refusing to compute actions from it")
    for k in (image_keys if image_keys is not None else [k for k in obs if k != "obs"]):
        check_image(obs[k], k, where)


def check_image(img, key: str, where: str = "predict_action") -> None:
    dtype = str(img.dtype).replace("torch.", "")
    if dtype == "uint8":
        return
    if dtype == "bool" or "complex" in dtype or not (_is_float(img) or "int" in dtype):
        raise ValueError(f"{where}: image {key!r} must be uint8 or a number array in 0..255, got dtype {dtype}")
    if img.numel() == 0 if hasattr(img, "numel") else np.asarray(img).size == 0:
        return
    if _is_float(img) and not _all_finite(img):
        raise ValueError(f"{where}: image {key!r} holds NaN or inf")
    lo, hi = float(img.min()), float(img.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{where}: image {key!r} has values in [{lo:g}, {hi:g}]; images must be in 0..255 "
                         f"(uint8, or float 0..255)")
    if _is_float(img) and 0 < hi <= 1.0:
        raise ValueError(f"{where}: image {key!r} is float with values in [{lo:g}, {hi:g}]: that looks like a [0, 1] "
                         f"image, but images are read as 0..255. Pass uint8, or multiply by 255")


def check_image_step(img, key: str, image_shape, batch: int, where: str = "select_action") -> None:
    """ValueError unless one step of camera ``key`` is [batch, *image_shape] (channels first). Checked before the
    step joins a history: a refused step must leave nothing behind that later correct steps would be compared
    with."""
    shape, image_shape = tuple(img.shape), tuple(image_shape)
    if shape == (batch, *image_shape):
        return
    hint = ""
    if len(shape) == 4 and shape[1:] == (*image_shape[1:], image_shape[0]):
        hint = "; that is channels last (H, W, C): pass channels first, e.g. img.permute(0, 3, 1, 2)"
    raise ValueError(f"{where}: {key!r} must be one step [B={batch}, {', '.join(map(str, image_shape))}] "
                     f"(channels first), got {shape}{hint}")


def check_chunk(chunk, where: str = "predict_action"):
    """The chunk itself, or FloatingPointError when it holds NaN or inf (never queue it)."""
    if not _all_finite(chunk):
        raise FloatingPointError(f"{where}: the policy produced NaN or inf actions from a finite observation "
                                 f"(broken weights?); nothing was queued")
    return chunk
