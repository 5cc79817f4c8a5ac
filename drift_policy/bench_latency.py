"""``drift-policy bench latency``: time one ``predict_action`` call (observation in, action chunk out).

For each backbone size preset and batch size it times the drift policy (1 NFE), Diffusion Policy with DDIM-10
and with DDPM-100 on the same backbone, and reports the speed ratios DDPM-100 / drift and DDIM-10 / drift.
A second, smaller table times the default drift policy (``policy=drift_unet``) under several inference
backends (``eager`` = the default path as shipped, ``reference`` = the U-Net's layers as written, i.e. the old
eager path, TorchScript, torch.compile, ONNX Runtime; CUDA graphs on a GPU) and thread counts, each with its
speed-up over ``reference`` measured in the same run, and ``onnx_file``: the file ``drift-policy export
format=onnx`` writes (generator + normaliser, dynamic batch), run by ONNX Runtime on numpy arrays.

    drift-policy bench latency [key=value ...]      # keys and defaults: drift-policy bench latency --help

Measurement: weights are random (latency does not depend on their values); observations are random numbers
in data units. Each cell is warmed up first (``warmup`` calls, at most ~``budget_s / 2`` seconds, at least
one call), then timed ``n`` times with ``time.perf_counter`` under ``torch.inference_mode`` with the garbage
collector off; on CUDA the device is synchronised before and after every call. ``n`` adapts to the cell:
as many calls as fit in ``budget_s`` seconds, at most ``repeats`` and at least ``MIN_REPEATS`` (3; fewer
only if ``repeats`` itself is smaller, e.g. in tests). Reported:
median and p90 (and min/mean) in milliseconds, and ``n``. The CPU may be shared: ``meta`` records the 1-minute
load average at the start and the end; the min is the least contended call.

Backends (``drift_policy/backends.py``) never change the model's math: ``accelerated_policy`` swaps only the
backbone call inside the unchanged ``predict_action`` (same noise draw from the same generator, same
normaliser, same scheduler), and the table reports the largest absolute difference of its actions from eager
PyTorch. Timing is ``timing.time_call``; rows, targets and tables are ``latency_report.py``.
"""
from __future__ import annotations

import gc
import os
import tempfile
import time

import torch
from torch import Tensor, nn

from .backends import BACKEND_NOTES, CPU_BACKENDS, CUDA_BACKENDS, accelerated_policy, max_abs_diff
from .errors import ConfigError
from .latency_report import check_backend_targets, check_targets, format_report, make_rows, write_results
from .paths import REPO_ROOT
from .provenance import git_commit
from .runs import comma_list, flag, parse_kv
from .timing import MIN_REPEATS, machine_info, profile_ops, time_call

__all__ = ["METHODS", "TASK_POLICIES", "RESULT_KEYS", "BenchOptionError", "bench_latency", "bench_backends",
           "bench_task_policies", "profile_default", "build_policy", "random_obs", "n_params", "main"]

# method key -> (label, config overrides); the network evaluations per chunk come from the config (``nfe``)
METHODS: dict[str, tuple[str, list[str]]] = {
    "drift": ("drift 1-NFE", ["policy=drift_unet"]),
    "ddim10": ("DDIM-10", ["policy=diffusion_unet", "policy.scheduler=ddim", "policy.num_inference_steps=10"]),
    "ddpm100": ("DDPM-100", ["policy=diffusion_unet", "policy.scheduler=ddpm", "policy.num_inference_steps=100"]),
}
# Whole policies per task (backbone and image encoder as configured): name -> config overrides.
TASK_POLICIES: dict[str, list[str]] = {
    "pusht_keypoints/drift_unet": ["task=pusht_keypoints", "policy=drift_unet"],
    "pusht_keypoints/drift_transformer": ["task=pusht_keypoints", "policy=drift_transformer"],
    "pusht_image/drift_unet": ["task=pusht_image", "policy=drift_unet"],
    "pusht_image/drift_unet, resnet18_half": ["task=pusht_image", "policy=drift_unet",
                                              "policy.vision_backbone=resnet18_half"],
    "pusht_image/drift_transformer": ["task=pusht_image", "policy=drift_transformer"],
    "pusht_image/diffusion_unet (DDPM-100)": ["task=pusht_image", "policy=diffusion_unet"],
}
DEFAULT_PRESETS = ("small", "medium", "large")
DEFAULT_BATCHES = (1, 50)
RESULT_KEYS = ("preset", "method", "label", "nfe", "batch", "params_m", "median_ms", "p90_ms", "min_ms", "mean_ms",
               "n_repeats", "backend")


class BenchOptionError(ConfigError):
    """An option of the latency benchmark is wrong; the message names it and the allowed values."""


TIMED_KEYS = ("median_ms", "p90_ms", "min_ms", "mean_ms", "n_repeats", "cpu_median_ms")
# Besides the backends of backends.py: the exported ONNX file (not a backbone backend, a whole policy).
ONNX_FILE = "onnx_file"
ONNX_FILE_NOTE = ("the file `drift-policy export format=onnx` writes (generator + normaliser, dynamic batch), "
                  "ONNX Runtime on numpy obs and noise; noise drawn with numpy inside the timed call")
AOTI_FILE = "aoti_file"
AOTI_FILE_NOTE = ("the package `drift-policy export format=aoti` writes (torch.export + AOTInductor, generator + "
                  "normaliser, weights inside, dynamic batch, compiled at the first thread count), run by "
                  "torch's AOTI loader on tensors; noise drawn inside the timed call")
FILE_BACKENDS = (ONNX_FILE, AOTI_FILE)
BENCH_CPU_BACKENDS = (*CPU_BACKENDS, *FILE_BACKENDS)


# -- building policies -------------------------------------------------------------------------------------------
def build_policy(method: str, preset: str, device: str = "cpu", seed: int = 0):
    """A randomly initialised policy of ``method`` (key of METHODS) on backbone ``preset``, in eval mode."""
    from .config import compose
    from .policies import make_policy

    if method not in METHODS:
        raise BenchOptionError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    cfg = compose([*METHODS[method][1], f"policy.backbone={preset}"])
    torch.manual_seed(seed)
    return make_policy(cfg.policy).to(device).eval()


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_obs(policy, batch: int, seed: int = 0) -> Tensor | dict[str, Tensor]:
    """Random observation windows; a dict with uint8 frames for image policies."""
    c = policy.config
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, c.n_obs_steps, c.obs_dim, generator=g).to(policy.device)
    if not c.image_keys:
        return low
    return {"obs": low, **{k: torch.randint(0, 256, (batch, c.n_obs_steps, *c.image_shape), generator=g,
                                            dtype=torch.uint8).to(policy.device) for k in c.image_keys}}


# -- the benchmark ---------------------------------------------------------------------------------------------
def _check_options(presets, batches, methods, threads, repeats, device, backend, backends, budget_s, warmup,
                   backend_threads, backend_batches) -> None:
    from .models.unet1d import UNET_PRESETS

    if not presets:
        raise BenchOptionError("presets must name at least one backbone preset")
    for p in presets:
        if p not in UNET_PRESETS:
            raise BenchOptionError(f"presets: unknown backbone preset {p!r}; known: {list(UNET_PRESETS)}")
    if not methods:
        raise BenchOptionError("methods must name at least one of " + ",".join(METHODS))
    for m in methods:
        if m not in METHODS:
            raise BenchOptionError(f"methods: unknown method {m!r}; known: {','.join(METHODS)}")
    if not batches or any(int(b) < 1 for b in batches):
        raise BenchOptionError(f"batches must be integers >= 1, got {list(batches)}")
    for name, vals in (("threads", [threads]), ("backend_threads", backend_threads)):
        if any(int(t) < 1 for t in vals):
            raise BenchOptionError(f"{name} must be >= 1, got {vals}")
    if any(int(b) < 1 for b in backend_batches):
        raise BenchOptionError(f"backend_batches must be integers >= 1, got {list(backend_batches)}")
    if repeats < 1:
        raise BenchOptionError(f"repeats must be >= 1 (the most timed calls per cell; at least {MIN_REPEATS} are "
                               f"made unless repeats is smaller), got {repeats}")
    if not budget_s > 0:
        raise BenchOptionError(f"budget_s must be > 0, got {budget_s}")
    if warmup < 1:
        raise BenchOptionError(f"warmup must be >= 1, got {warmup}")
    if device != "cpu" and not device.startswith("cuda"):
        raise BenchOptionError(f"device must be 'cpu' or 'cuda[:i]', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchOptionError(f"device={device} but torch.cuda.is_available() is False on this machine")
    allowed = CUDA_BACKENDS if device.startswith("cuda") else BENCH_CPU_BACKENDS
    for b in [backend, *backends]:
        if b not in allowed:
            raise BenchOptionError(f"backend {b!r} is not available on {device}; choose from {list(allowed)}")


def bench_task_policies(names=tuple(TASK_POLICIES), batch: int = 1, *, device: str = "cpu", seed: int = 0,
                        say=print, **timing_kw) -> list[dict]:
    """predict_action of whole policies per task, with the image encoder's share timed on its own."""
    from .config import compose
    from .policies import make_policy

    rows = []
    for name in names:
        if name not in TASK_POLICIES:
            raise BenchOptionError(f"task policy must be one of {sorted(TASK_POLICIES)}, got {name!r}")
        cfg = compose(TASK_POLICIES[name])
        torch.manual_seed(seed)
        policy = make_policy(cfg.policy).to(device).eval()
        obs = random_obs(policy, batch, seed)
        t = time_call(lambda: policy.predict_action(obs), **timing_kw)  # noqa: F821
        row = {"name": name, "batch": batch, "params_m": n_params(policy) / 1e6, "predict_ms": t["median_ms"],
               "predict_p90_ms": t["p90_ms"], "n_repeats": t["n_repeats"], "encoder_ms": None,
               "encoder_params_m": None, "nfe": cfg.policy.nfe}
        if policy.obs_encoder is not None:
            c = cfg.policy
            frames = {k: v[:, -c.n_obs_steps:].flatten(0, 1) for k, v in obs.items() if k in c.image_keys}
            e = time_call(lambda: policy.obs_encoder(frames), **timing_kw)  # noqa: F821
            row.update(encoder_ms=e["median_ms"], encoder_params_m=n_params(policy.obs_encoder) / 1e6)
        rows.append(row)
        say(f"  {name:>40} batch {batch}: predict {row['predict_ms']:9.3f} ms"
            + (f" (image encoder {row['encoder_ms']:.3f} ms)" if row["encoder_ms"] is not None else ""), flush=True)
        del policy
        gc.collect()
    return rows


def bench_latency(presets=DEFAULT_PRESETS, batches=DEFAULT_BATCHES, methods=tuple(METHODS), threads: int = 1,
                  repeats: int = 200, budget_s: float = 5.0, warmup: int = 10, device: str = "cpu",
                  backend: str = "eager", backends=(), backend_batches=(1,), backend_threads=(1, 2),
                  profile: int = 0, verbose: bool = True, seed: int = 0, task_policies=()) -> dict:
    """Time predict_action for every (preset, batch, method); return the documented result dict.

    Keys: ``meta`` (machine, threads, torch version, options), ``results`` (one dict per timed cell, keys
    RESULT_KEYS), ``rows`` (one per (preset, batch), keys ROW_KEYS, ratios = baseline ms / drift ms, None
    where a method was not run), ``targets`` (the issue's targets and whether they are met), ``backends`` (the
    default drift policy under each backend and thread count; empty unless ``backends`` is given) and
    ``floor`` (the default drift policy's matrix-product FLOPs per call and this CPU's SGEMM rate measured in the
    run, which give each backend row's ``floor_ms`` and ``over_floor``; None without backends or on CUDA),
    ``profile`` / ``profile_reference`` (top ops of the default drift policy at batch 1 over ``profile`` calls,
    default path / reference layers; None if 0) and
    ``task_policies`` (whole policies per task at batch 1, image encoder timed separately; see TASK_POLICIES).
    """
    from .threads import set_threads

    presets, batches, methods = list(presets), [int(b) for b in batches], list(methods)
    backends, backend_batches, backend_threads = list(backends), [int(b) for b in backend_batches], \
        [int(t) for t in backend_threads]
    _check_options(presets, batches, methods, threads, repeats, device, backend, backends, budget_s, warmup,
                   backend_threads, backend_batches)
    set_threads(threads)
    say = print if verbose else (lambda *a, **k: None)
    meta = machine_info(device)
    meta.update({"code_commit": git_commit(), "threads_option": threads, "repeats_max": repeats, "min_repeats": min(MIN_REPEATS, repeats),
                 "budget_s": budget_s,
                 "warmup": warmup, "backend": backend, "presets": presets, "batches": batches, "methods": methods,
                 "timing": "median/p90 of n timed predict_action calls after warm-up, torch.inference_mode, gc off, "
                           "device synchronised around each call; n = calls fitting in budget_s, "
                           "in [min(3, repeats), repeats]"})
    timing_kw = dict(device=device, repeats=repeats, budget_s=budget_s, warmup=warmup)

    results = []
    params = {}
    for preset in presets:
        for method in methods:
            policy = accelerated_policy(build_policy(method, preset, device, seed), backend, threads)
            params[(preset, method)] = n_params(getattr(policy.model, "inner", policy.model))
            for batch in batches:
                obs = random_obs(policy, batch, seed)
                torch.manual_seed(seed)
                t = time_call(lambda: policy.predict_action(obs), inference_mode=backend != "eager_no_grad",  # noqa: F821
                              **timing_kw)
                label = METHODS[method][0]
                cell = {"preset": preset, "method": method, "label": label, "nfe": policy.config.nfe, "batch": batch,
                        "params_m": params[(preset, method)] / 1e6, "backend": backend,
                        **{k: t[k] for k in TIMED_KEYS}}
                results.append(cell)
                say(f"  {preset:>6} {label:>11} batch {batch:>3}: median {t['median_ms']:9.3f} ms  "
                    f"p90 {t['p90_ms']:9.3f} ms  (n={t['n_repeats']})", flush=True)
            del policy
            gc.collect()

    out = {"meta": meta, "results": results, "rows": make_rows(results), "backends": [], "floor": None,
           "profile": None, "profile_reference": None,
           "task_policies": bench_task_policies(task_policies, 1, seed=seed, say=say, **timing_kw)
           if task_policies else []}
    out["targets"] = check_targets(out["rows"])
    if profile:   # where the time goes: the default path, and the reference layers it replaces
        out["profile"] = profile_default(device, threads, seed, calls=int(profile))
        out["profile_reference"] = profile_default(device, threads, seed, calls=int(profile), backend="reference")
    if backends:
        kw = {k: v for k, v in timing_kw.items() if k != "device"}
        out["backends"] = bench_backends([b for b in backends if b not in FILE_BACKENDS], backend_batches,
                                         backend_threads, device=device, seed=seed, say=say, **kw)
        if ONNX_FILE in backends:
            out["backends"] += bench_onnx_file(backend_batches, backend_threads, seed=seed, say=say, **kw)
        if AOTI_FILE in backends:
            out["backends"] += bench_aoti_file(backend_batches, backend_threads, seed=seed, say=say, **kw)
        if device == "cpu":
            out["floor"] = gemm_floor(backend_batches, backend_threads, seed=seed, say=say)
            add_floor_ratios(out["backends"], out["floor"])
        set_threads(threads)
        out["targets"].update(check_backend_targets(out["backends"]))
    meta["torch_num_threads"] = torch.get_num_threads()
    try:
        meta["load_avg_1min_at_end"] = os.getloadavg()[0]
    except OSError:
        pass
    return out


def _default_drift_policy(device: str, seed: int):
    from .config import compose
    from .policies import make_policy

    cfg = compose([])
    if cfg.policy.nfe != 1:
        raise RuntimeError(f"the default config's policy is {cfg.policy.type!r} ({cfg.policy.nfe} NFE), expected "
                           f"the one-step drift policy")
    torch.manual_seed(seed)
    return make_policy(cfg.policy).to(device).eval()


def bench_backends(backends, batches, threads_list, *, device="cpu", seed=0, say=print, **timing_kw) -> list[dict]:
    """The default drift policy (``compose([])``) under each backend x thread count x batch size."""
    policy = _default_drift_policy(device, seed)
    reference = accelerated_policy(policy, "reference")        # every row's actions are compared with these
    rows = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for backend in backends:
            t0 = time.perf_counter()
            row = {"backend": backend, "threads": threads, "backbone": policy.config.backbone,
                   "params_m": n_params(policy.model) / 1e6, "note": BACKEND_NOTES.get(backend, "")}
            done = []
            try:
                fast = accelerated_policy(policy, backend, threads)
                for batch in batches:
                    obs = random_obs(policy, batch, seed)
                    t1 = time.perf_counter()
                    diff = max_abs_diff(reference, fast, obs, seed)  # also builds/compiles for this shape
                    setup_s = time.perf_counter() - t1 + (t1 - t0)
                    t = time_call(lambda: fast.predict_action(obs), device=device,
                                  inference_mode=backend != "eager_no_grad", **timing_kw)
                    r = {**row, "batch": batch, "setup_s": setup_s, "max_abs_diff": diff, "error": None,
                         **{k: t[k] for k in TIMED_KEYS}}
                    rows.append(r)
                    done.append(batch)
                    say(f"  backend {backend:>17} threads {threads} batch {batch:>3}: median {r['median_ms']:8.3f} ms"
                        f"  p90 {r['p90_ms']:8.3f} ms  max|diff| {diff:.1e}  setup {setup_s:.1f} s", flush=True)
                    t0 = time.perf_counter()
            except Exception as e:                             # a backend that does not work here is a result too
                rows += _error_rows(row, [threads], [b for b in batches if b not in done], e, say)
            if backend.startswith("compile"):
                torch._dynamo.reset()                          # drop compiled graphs between rows
    return rows


def _error_rows(row: dict, threads_list, batches, e: Exception, say) -> list[dict]:
    msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    say(f"  backend {row['backend']:>17} threads {threads_list}: unavailable ({msg})", flush=True)
    empty = {**dict.fromkeys(TIMED_KEYS), "n_repeats": 0}
    return [{**row, "threads": t, "batch": b, "setup_s": None, "max_abs_diff": None, "error": msg, **empty}
            for t in threads_list for b in batches]


def bench_onnx_file(batches, threads_list, *, seed=0, say=print, **timing_kw) -> list[dict]:
    """The default drift policy exported with ``export.export_policy`` (what ``drift-policy export format=onnx``
    writes: one file, generator + normaliser, dynamic batch), timed per thread count and batch size.

    ``max_abs_diff``: against the reference layers (backends' ``reference``) on the same obs and noise."""
    import numpy as np

    from .export import ExportablePolicy, OnnxPolicy, export_policy

    policy = _default_drift_policy("cpu", seed)
    reference = ExportablePolicy(accelerated_policy(policy, "reference"))
    c = policy.config
    rows = []
    base = {"backend": ONNX_FILE, "backbone": c.backbone, "params_m": n_params(policy.model) / 1e6,
            "note": ONNX_FILE_NOTE}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        try:
            path = export_policy(policy, os.path.join(tmp, "policy.onnx"), "onnx")
        except Exception as e:                                 # e.g. the export extra is not installed
            return _error_rows(base, threads_list, batches, e, say)
        export_s = time.perf_counter() - t0
        for threads in threads_list:
            torch.set_num_threads(threads)
            t1 = time.perf_counter()
            onnx_policy = OnnxPolicy(path, threads)
            session_s = time.perf_counter() - t1
            for batch in batches:
                obs = random_obs(policy, batch, seed)
                noise = torch.randn(batch, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    ref = reference(obs, noise)[1]
                diff = float(np.abs(onnx_policy(obs.numpy(), noise.numpy())[1] - ref.numpy()).max())
                obs_np, rng = obs.numpy(), np.random.default_rng(seed)
                shape = (batch, c.horizon, c.action_dim)
                t = time_call(lambda: onnx_policy(obs_np, rng.standard_normal(shape, dtype=np.float32)),
                              inference_mode=False, **timing_kw)
                r = {**base, "threads": threads, "batch": batch, "setup_s": export_s + session_s,
                     "max_abs_diff": diff, "error": None,
                     **{k: t[k] for k in TIMED_KEYS}}
                rows.append(r)
                say(f"  backend {ONNX_FILE:>17} threads {threads} batch {batch:>3}: median {r['median_ms']:8.3f} ms"
                    f"  p90 {r['p90_ms']:8.3f} ms  max|diff| {diff:.1e}", flush=True)
    return rows


def bench_aoti_file(batches, threads_list, *, seed=0, say=print, **timing_kw) -> list[dict]:
    """The default drift policy exported by ``drift-policy export format=aoti`` (one .pt2: generator +
    normaliser, dynamic batch), timed per thread count and batch size; ``max_abs_diff`` against the reference
    layers on the same obs and noise."""
    from .export import AotiPolicy, ExportablePolicy, export_policy

    policy = _default_drift_policy("cpu", seed)
    reference = ExportablePolicy(accelerated_policy(policy, "reference"))
    c = policy.config
    base = {"backend": AOTI_FILE, "backbone": c.backbone, "params_m": n_params(policy.model) / 1e6,
            "note": AOTI_FILE_NOTE}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.set_num_threads(threads_list[0])
        t0 = time.perf_counter()
        try:
            model = AotiPolicy(export_policy(policy, os.path.join(tmp, "policy.pt2"), "aoti"))
        except Exception as e:                                 # no C++ compiler, an op AOTInductor cannot lower
            return _error_rows(base, threads_list, batches, e, say)
        setup_s = time.perf_counter() - t0
        for threads in threads_list:
            torch.set_num_threads(threads)
            for batch in batches:
                obs = random_obs(policy, batch, seed)
                noise = torch.randn(batch, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    diff = float((model(obs, noise)[1] - reference(obs, noise)[1]).abs().max())
                g = torch.Generator().manual_seed(seed)
                shape = (batch, c.horizon, c.action_dim)
                t = time_call(lambda: model(obs, torch.randn(shape, generator=g)), **timing_kw)
                r = {**base, "threads": threads, "batch": batch, "setup_s": setup_s, "max_abs_diff": diff,
                     "error": None, **{k: t[k] for k in TIMED_KEYS}}
                rows.append(r)
                say(f"  backend {AOTI_FILE:>17} threads {threads} batch {batch:>3}: median {r['median_ms']:8.3f} ms"
                    f"  p90 {r['p90_ms']:8.3f} ms  max|diff| {diff:.1e}", flush=True)
    return rows


def sgemm_gflops(threads: int, n: int = 1024, calls: int = 10) -> float:
    """This CPU's SGEMM rate at ``threads`` threads: the median of ``calls`` n x n x n float32 products, GFLOP/s."""
    from .threads import set_threads

    set_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_call(lambda: torch.mm(a, b), repeats=calls, budget_s=60.0, warmup=2)
    return 2 * n ** 3 / (t["median_ms"] * 1e-3) / 1e9


def read_gbs(nbytes: int, threads: int, calls: int = 10) -> float:
    """This CPU's rate of reading a float32 buffer of ``nbytes`` once (a sum over it; median of ``calls``), GB/s.
    A buffer far larger than the last-level cache gives the memory's rate; one the size of the weights, read over
    and over, the rate at which they come from cache when nothing else evicts them."""
    from .threads import set_threads

    set_threads(threads)
    x = torch.rand(max(1, nbytes // 4))
    t = time_call(lambda: x.sum(), repeats=calls, budget_s=60.0, warmup=2)
    return x.numel() * 4 / (t["median_ms"] * 1e-3) / 1e9


def policy_flops(policy, batch: int) -> int:
    """Multiply-add FLOPs (2 per MAC) of the matrix products in one backbone call of ``policy`` at ``batch``
    (the U-Net's gemm formulation: the same products as its convolutions; pointwise work not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = policy.config
    obs = random_obs(policy, batch)
    with torch.no_grad():
        cond = policy.condition(policy._obs(obs))
        noise = torch.zeros(batch, c.horizon, c.action_dim)
        net = policy.model
        fwd = getattr(net, "gemm_forward", net)
        with FlopCounterMode(display=False) as counter:
            fwd(noise, cond)
    return int(counter.get_total_flops())


def gemm_floor(batches, threads_list, *, seed: int = 0, say=print) -> dict:
    """The default drift policy's compute floor: its matrix-product FLOPs per call / the SGEMM rate measured now."""
    policy = _default_drift_policy("cpu", seed)
    # At batch 1 each weight is used for a few time steps only, so a call also has to read every weight once:
    # the weights' bytes over the read rate is a second floor, from memory (a 256 MB buffer) or from cache.
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    t1 = min(threads_list)
    floor = {"flops_per_call": {str(b): policy_flops(policy, b) for b in batches},
             "sgemm_gflops": {str(t): sgemm_gflops(t) for t in threads_list},
             "weight_bytes": weight_bytes,
             "read_gbs": {"memory": read_gbs(256 * 2 ** 20, t1), "cache": read_gbs(weight_bytes, t1)},
             "what": "floor_ms = matrix-product FLOPs per call / SGEMM rate (1024^3 float32 torch.mm, median of 10, "
                     "measured in the same run at that thread count); read_gbs: the rate of one sum over a 256 MB "
                     "buffer (memory) and over a warm buffer of the weights' size (cache), at the fewest threads"}
    for t, rate in floor["sgemm_gflops"].items():
        say(f"  SGEMM {rate:.1f} GFLOP/s at {t} thread(s); floor at batch 1: "
            f"{floor['flops_per_call'].get('1', 0) / rate / 1e6:.3f} ms", flush=True)
    for where, gbs in floor["read_gbs"].items():
        say(f"  reading the weights ({weight_bytes / 1e6:.1f} MB) from {where} at {gbs:.1f} GB/s: "
            f"{weight_bytes / gbs / 1e6:.3f} ms", flush=True)
    return floor


def add_floor_ratios(rows: list[dict], floor: dict) -> None:
    """Each backend row gets ``floor_ms`` and ``over_floor`` = median_ms / floor_ms (None where not timed)."""
    for r in rows:
        flops, rate = floor["flops_per_call"].get(str(r["batch"])), floor["sgemm_gflops"].get(str(r["threads"]))
        r["floor_ms"] = flops / rate / 1e6 if flops and rate else None
        r["over_floor"] = r["median_ms"] / r["floor_ms"] if r["floor_ms"] and r.get("median_ms") else None


def profile_default(device: str = "cpu", threads: int = 1, seed: int = 0, calls: int = 50, top: int = 12,
                    backend: str = "eager") -> dict:
    """torch.profiler over ``calls`` predict_action calls of the default drift policy at batch 1 through
    ``backend`` (``eager``: the default path; ``reference``: the layers as written)."""
    policy = accelerated_policy(_default_drift_policy(device, seed), backend, threads)
    obs = random_obs(policy, 1, seed)
    return {"threads": threads, "backend": backend,
            **profile_ops(lambda: policy.predict_action(obs), calls=calls, device=device, top=top)}


# -- command line ----------------------------------------------------------------------------------------------
OPTIONS = {"presets": comma_list(str), "xlarge": flag, "batches": comma_list(int), "methods": comma_list(str),
           "threads": int, "repeats": int, "budget_s": float, "warmup": int, "device": str, "backend": str,
           "backends": comma_list(str), "backend_batches": comma_list(int), "backend_threads": comma_list(int),
           "profile": int, "out": str, "seed": int, "task_policies": comma_list(str)}


def main(args: list[str]) -> dict:
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(bench_latency).parameters.items() if k in OPTIONS}
    defaults.update(device="cuda if available, else cpu", profile=50, backends="all of the device's backends",
                    task_policies=",".join(TASK_POLICIES), xlarge=0, out="eval/results/latency/latency_<device>.json")
    try:
        opts = parse_kv(args, OPTIONS, usage="usage: drift-policy bench latency [key=value ...]", defaults=defaults)
    except ConfigError as e:                          # an unknown option or a value its parser rejects
        raise SystemExit(f"drift-policy bench latency: {e}") from None
    device = opts.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    presets = opts.pop("presets", list(DEFAULT_PRESETS))
    if opts.pop("xlarge", False) and "xlarge" not in presets:
        presets.append("xlarge")
    default_backends = list(CUDA_BACKENDS if device.startswith("cuda") else BENCH_CPU_BACKENDS)
    out = opts.pop("out", str(REPO_ROOT / "eval" / "results" / "latency" / f"latency_{device.split(':')[0]}.json"))
    try:
        res = bench_latency(presets=presets, device=device, backends=opts.pop("backends", default_backends),
                            profile=opts.pop("profile", 50),
                            task_policies=opts.pop("task_policies", list(TASK_POLICIES)), **opts)
    except BenchOptionError as e:
        raise SystemExit(f"drift-policy bench latency: {e}") from None
    paths = write_results(res, out)
    print()
    print(format_report(res), end="")
    print(f"\nwritten: {paths[0]}, {paths[1]}")
    return res
