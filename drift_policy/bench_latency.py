"""``drift-policy bench latency``: time one ``predict_action`` call (observation in, action chunk out).

For each backbone size preset and batch size it times the drift policy (1 NFE), Diffusion Policy with DDIM-10
and with DDPM-100 on the same backbone, and reports the speed ratios DDPM-100 / drift and DDIM-10 / drift.
A second, smaller table times the default drift policy (``policy=drift_unet``) under several inference
backends (eager PyTorch, TorchScript, the convolutions as time-major matrix products, torch.compile, ONNX
Runtime; CUDA graphs on a GPU) and thread counts.

    drift-policy bench latency [presets=small,medium,large] [xlarge=0] [batches=1,50]
        [methods=drift,ddim10,ddpm100] [threads=1] [device=cpu] [repeats=200] [budget_s=5] [warmup=10]
        [backend=eager] [backends=eager,eager_no_grad,jit_trace,jit_ofi,gemm,jit_gemm,compile,compile_freezing,
        onnxruntime] (default: all for the device)
        [backend_batches=1] [backend_threads=1,2] [profile=50] [out=eval/results/latency_cpu.json]
        [task_policies=pusht_keypoints/drift_unet,pusht_image/drift_unet,...] (default: all of TASK_POLICIES)

Measurement: weights are random (latency does not depend on their values); observations are random numbers
in data units. Each cell is warmed up first (``warmup`` calls, at most ~``budget_s / 2`` seconds, at least
one call), then timed ``n`` times with ``time.perf_counter`` under ``torch.inference_mode`` with the garbage
collector off; on CUDA the device is synchronised before and after every call. ``n`` adapts to the cell:
as many calls as fit in ``budget_s`` seconds, at most ``repeats`` and at least ``MIN_REPEATS`` (3; fewer
only if ``repeats`` itself is smaller, e.g. in tests). Reported:
median and p90 (and min/mean) in milliseconds, and ``n``.

Backends never change the model's math: ``accelerated_policy`` swaps only the backbone call inside the
unchanged ``predict_action`` (same noise draw from the same generator, same normaliser, same scheduler), and
the table reports the largest absolute difference of its actions from eager PyTorch.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import io
import json
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .paths import REPO_ROOT

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
MIN_REPEATS = 3
CPU_BACKENDS = ("eager", "eager_no_grad", "jit_trace", "jit_ofi", "gemm", "jit_gemm", "compile", "compile_freezing",
                "onnxruntime")
CUDA_BACKENDS = ("eager", "eager_no_grad", "cuda_graph", "compile", "compile_reduce_overhead")
ALL_BACKENDS = tuple(dict.fromkeys(CPU_BACKENDS + CUDA_BACKENDS))
BACKEND_NOTES = {
    "eager": "PyTorch eager, predict_action under torch.inference_mode",
    "eager_no_grad": "PyTorch eager, predict_action's own torch.no_grad only",
    "jit_trace": "torch.jit.trace + torch.jit.freeze of the backbone",
    "jit_ofi": "torch.jit.trace + torch.jit.optimize_for_inference (freeze, oneDNN conv, fusions)",
    "gemm": "eager, each Conv1d computed as one time-major matrix product (unfold, addmm with W^T pre-transposed)",
    "jit_gemm": "the gemm form, then torch.jit.trace + torch.jit.freeze",
    "compile": "torch.compile(backbone, dynamic=False), inductor (setup s: with inductor's on-disk cache warm; "
               "a cold compile takes minutes on 2 cores)",
    "compile_freezing": "torch.compile(backbone, dynamic=False, options={'freezing': True}), inductor",
    "compile_reduce_overhead": "torch.compile(backbone, mode='reduce-overhead') (CUDA graphs via inductor)",
    "onnxruntime": "backbone exported to ONNX (opset 17, static shapes), ONNX Runtime CPUExecutionProvider",
    "cuda_graph": "backbone captured in a torch.cuda.CUDAGraph per batch size, inputs copied into static buffers",
}
# Targets from the latency issue; reported against, never assumed.
TARGET_DDPM_RATIO_B1 = 90.0
TARGET_DEFAULT_DRIFT_MS_B1 = 3.0
RESULT_KEYS = ("preset", "method", "label", "nfe", "batch", "params_m", "median_ms", "p90_ms", "min_ms", "mean_ms",
               "n_repeats", "backend")
ROW_KEYS = ("preset", "params_m", "params_m_diffusion", "batch", "drift_ms", "ddim10_ms", "ddpm100_ms",
            "ddpm100_over_drift", "ddim10_over_drift", "drift_p90_ms", "ddim10_p90_ms", "ddpm100_p90_ms")


class BenchOptionError(ValueError):
    """An option of the latency benchmark is wrong; the message names it and the allowed values."""


# -- machine description ---------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(device: str) -> dict:
    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "torch_num_threads": torch.get_num_threads(), "torch_num_interop_threads": torch.get_num_interop_threads(),
            "hostname": platform.node(), "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    try:
        info["load_avg_1min_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


# -- timing ----------------------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def time_call(fn: Callable[[], object], *, device: str = "cpu", repeats: int = 200, budget_s: float = 5.0,
              warmup: int = 10, min_repeats: int = MIN_REPEATS, inference_mode: bool = True) -> dict:
    """Warm up, then time ``fn()`` n times: as many as fit in ``budget_s``, at most ``repeats``, at least
    ``min(min_repeats, repeats)``.

    Returns {"median_ms", "p90_ms", "min_ms", "mean_ms", "n_repeats", "n_warmup", "times_ms"}.
    """
    ctx = torch.inference_mode if inference_mode else contextlib.nullcontext
    with ctx():
        # Warm-up: at least one call; stop early when half the budget is spent (slow cells).
        n_warm, t_warm0, first_s = 0, time.perf_counter(), None
        while n_warm < max(1, warmup):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            first_s = time.perf_counter() - t0     # the last warm-up call: the estimate for the timed ones
            n_warm += 1
            if time.perf_counter() - t_warm0 > budget_s / 2:
                break
        floor = min(min_repeats, repeats)                  # repeats below MIN_REPEATS: exactly that many
        n = int(min(repeats, max(floor, budget_s / max(first_s, 1e-9))))
        times = []
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
        finally:
            if gc_was_enabled:
                gc.enable()
    return {**summarize_times(times), "n_warmup": n_warm, "times_ms": times}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not values:
        raise ValueError("percentile of no values")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_times(times_ms: list[float]) -> dict:
    return {"median_ms": statistics.median(times_ms), "p90_ms": percentile(times_ms, 90), "min_ms": min(times_ms),
            "mean_ms": statistics.fmean(times_ms), "n_repeats": len(times_ms)}


def speed_ratio(baseline_ms: float | None, drift_ms: float | None) -> float | None:
    """How many times faster drift is than the baseline: baseline_ms / drift_ms (None if either is missing)."""
    if baseline_ms is None or drift_ms is None:
        return None
    if not (drift_ms > 0 and baseline_ms > 0):
        raise ValueError(f"latencies must be positive, got baseline {baseline_ms} ms and drift {drift_ms} ms")
    return baseline_ms / drift_ms


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


# -- inference backends for the backbone ---------------------------------------------------------------------
class _PerShapeBackbone(nn.Module):
    """Runs the backbone through a compiled artefact built lazily per (batch size, has timestep) and cached.

    Holds the original net as ``inner`` so that ``policy.device`` / ``parameters()`` still work.
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self._cache: dict = {}

    @property
    def timestep_dim(self) -> int:
        return self.inner.timestep_dim

    def _build(self, args: tuple[Tensor, ...]):
        raise NotImplementedError

    def forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        if (timestep is None) != (self.inner.timestep_dim == 0):
            raise ValueError("timestep must be given exactly when the net was built with timestep_dim > 0")
        args = (sample, global_cond) if timestep is None else (sample, global_cond, timestep)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self._cache:
            self._cache[key] = self._build(args)
        return self._cache[key](*args)


class _GemmConv1d(nn.Module):
    """A Conv1d (groups=1, dilation 1, zero padding) computed as one matrix product, time-major.

    cols [B*T_out, C_in*k] @ W^T [C_in*k, C_out] + bias: the same sums as the convolution (float rounding
    may differ). At batch 1 this orientation runs the BLAS kernel several times faster than PyTorch's default
    CPU path for these small 1-D convolutions (im2col with W [C_out, C_in*k] @ cols [C_in*k, T]).
    """

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"_GemmConv1d handles plain convolutions only, got {conv}")
        self.k, self.stride, self.pad = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        self.c_out = conv.out_channels
        w = conv.weight.detach()
        self.register_buffer("w_t", w.reshape(self.c_out, -1).t().contiguous())          # [C_in*k, C_out]
        self.register_buffer("bias", conv.bias.detach().clone() if conv.bias is not None
                             else torch.zeros(self.c_out, dtype=w.dtype, device=w.device))

    def forward(self, x: Tensor) -> Tensor:
        B, C, T = x.shape
        if self.k == 1 and self.stride == 1 and self.pad == 0:
            t_out, cols = T, x.transpose(1, 2).reshape(B * T, C)
        else:
            xp = torch.nn.functional.pad(x, (self.pad, self.pad)) if self.pad else x
            u = xp.unfold(2, self.k, self.stride)                                    # [B, C, T_out, k]
            t_out = u.shape[2]
            cols = u.permute(0, 2, 1, 3).reshape(B * t_out, C * self.k)
        y = torch.addmm(self.bias, cols, self.w_t)                                   # [B*T_out, C_out]
        return y.view(B, t_out, self.c_out).transpose(1, 2).contiguous()


def gemm_conv_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every plain nn.Conv1d replaced by a _GemmConv1d (same weights)."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Conv1d:
                setattr(mod, name, _GemmConv1d(child))
    return model.eval()


class _JitBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, optimize_for_inference: bool = False, gemm_conv: bool = False):
        super().__init__(inner)
        self.ofi = optimize_for_inference
        # not registered as a submodule: the policy's parameters stay the original ones
        self.__dict__["source"] = gemm_conv_copy(inner) if gemm_conv else inner

    def _build(self, args):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(self.source, args, check_trace=False).eval()
            return torch.jit.optimize_for_inference(traced) if self.ofi else torch.jit.freeze(traced)


class _EagerGemmBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module):
        super().__init__(inner)
        self.__dict__["source"] = gemm_conv_copy(inner)

    def _build(self, args):
        return self.source


class _OrtBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, threads: int):
        super().__init__(inner)
        self.threads = threads

    def _build(self, args):
        import onnxruntime as ort

        names = ["sample", "global_cond", "timestep"][: len(args)]
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The TorchScript-based exporter: no onnxscript needed; static shapes (one session per batch size).
            torch.onnx.export(self.inner, tuple(a.cpu() for a in args), buf, input_names=names,
                              output_names=["action"], opset_version=17, dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        out_dtype = args[0].dtype

        def run(*xs: Tensor) -> Tensor:
            feeds = {n: x.detach().cpu().contiguous().numpy() for n, x in zip(names, xs)}
            y = sess.run(None, feeds)[0]
            return torch.from_numpy(y).to(device=xs[0].device, dtype=out_dtype)

        return run


class _CompiledBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, **compile_kw):
        super().__init__(inner)
        self.compiled = torch.compile(inner, dynamic=False, fullgraph=True, **compile_kw)
        self.cudagraphs = compile_kw.get("mode") == "reduce-overhead"

    def _build(self, args):
        if not self.cudagraphs:
            return self.compiled     # torch.compile specialises (and caches) per shape itself

        def run(*xs: Tensor) -> Tensor:
            # CUDA-graph outputs are overwritten by the next replay: mark the step, hand out a copy.
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(*xs).clone()

        return run


class _CudaGraphBackbone(_PerShapeBackbone):
    """One CUDA graph per input shape. Inputs are copied into static buffers; the output is cloned out."""

    def _build(self, args):
        static_in = [a.clone() for a in args]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):                            # warm-up allocations / cuDNN autotuning off-graph
                self.inner(*static_in)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static_out = self.inner(*static_in)

        def run(*xs: Tensor) -> Tensor:
            for s, x in zip(static_in, xs):
                s.copy_(x)
            graph.replay()
            return static_out.clone()

        return run


def make_backbone(model: nn.Module, backend: str, threads: int | None = None) -> nn.Module:
    """The backbone ``model`` run through ``backend`` (same inputs, same outputs up to float rounding)."""
    cuda = next(model.parameters()).is_cuda
    if backend in ("eager", "eager_no_grad"):
        return model
    if backend in ("jit_trace", "jit_ofi"):
        return _JitBackbone(model, optimize_for_inference=backend == "jit_ofi")
    if backend == "gemm":
        return _EagerGemmBackbone(model)
    if backend == "jit_gemm":
        return _JitBackbone(model, gemm_conv=True)
    if backend == "onnxruntime":
        if cuda:
            raise BenchOptionError("backend onnxruntime is wired for the CPU only (CPUExecutionProvider)")
        return _OrtBackbone(model, threads or torch.get_num_threads())
    if backend == "compile":
        return _CompiledBackbone(model)
    if backend == "compile_freezing":
        return _CompiledBackbone(model, options={"freezing": True})
    if backend == "compile_reduce_overhead":
        if not cuda:
            raise BenchOptionError("backend compile_reduce_overhead needs CUDA (it uses CUDA graphs)")
        return _CompiledBackbone(model, mode="reduce-overhead")
    if backend == "cuda_graph":
        if not (cuda and torch.cuda.is_available()):
            raise BenchOptionError("backend cuda_graph needs a CUDA device")
        return _CudaGraphBackbone(model)
    raise BenchOptionError(f"backend must be one of {list(ALL_BACKENDS)}, got {backend!r}")


def accelerated_policy(policy, backend: str = "eager", threads: int | None = None):
    """Opt-in fast inference: a shallow copy of ``policy`` whose backbone runs through ``backend``.

    ``predict_action`` / ``select_action`` / ``sample`` are the policy's own, unchanged code: the noise comes
    from the same generator, the normaliser and the diffusion scheduler are the same objects; only
    ``policy.model(...)`` is executed by another engine (float rounding may differ, ~1e-6). The original policy
    is not modified and shares its weights with the copy. For inference only (no gradients flow through
    onnxruntime; a traced or compiled copy does not follow later changes to the weights). Example::

        fast = accelerated_policy(policy, "onnxruntime", threads=1)
        action = fast.predict_action(obs)["action"]
    """
    if backend not in ALL_BACKENDS:
        raise BenchOptionError(f"backend must be one of {list(ALL_BACKENDS)}, got {backend!r}")
    if backend in ("eager", "eager_no_grad"):
        return policy
    fast = copy.copy(policy)
    fast._modules = dict(policy._modules)                 # own module table: the original keeps its backbone
    fast._modules["model"] = make_backbone(policy.model, backend, threads)
    if hasattr(policy, "_action_queue"):
        fast.reset()
    return fast


def max_abs_diff(ref_policy, fast_policy, obs: Tensor, seed: int = 0) -> float:
    """Largest |action_pred(fast) - action_pred(eager)| with the same noise (same generator seed)."""
    dev = ref_policy.device
    with torch.inference_mode():
        a = ref_policy.predict_action(obs, torch.Generator(dev).manual_seed(seed))["action_pred"]
        b = fast_policy.predict_action(obs, torch.Generator(dev).manual_seed(seed))["action_pred"]
    return float((a - b).abs().max())


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
    allowed = CUDA_BACKENDS if device.startswith("cuda") else CPU_BACKENDS
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
        t = time_call(lambda: policy.predict_action(obs), **timing_kw)
        row = {"name": name, "batch": batch, "params_m": n_params(policy) / 1e6, "predict_ms": t["median_ms"],
               "predict_p90_ms": t["p90_ms"], "n_repeats": t["n_repeats"], "encoder_ms": None,
               "encoder_params_m": None, "nfe": cfg.policy.nfe}
        if policy.obs_encoder is not None:
            c = cfg.policy
            frames = {k: v[:, -c.n_obs_steps:].flatten(0, 1) for k, v in obs.items() if k in c.image_keys}
            e = time_call(lambda: policy.obs_encoder(frames), **timing_kw)
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
    ``profile`` (top ops of the default drift policy at batch 1, eager, over ``profile`` calls; None if 0) and
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
    meta.update({"threads_option": threads, "repeats_max": repeats, "min_repeats": min(MIN_REPEATS, repeats),
                 "budget_s": budget_s,
                 "warmup": warmup, "backend": backend, "presets": presets, "batches": batches, "methods": methods,
                 "timing": "median/p90 of n timed predict_action calls after warm-up, torch.inference_mode, gc off, "
                           "device synchronised around each call; n = calls fitting in budget_s, "
                           f"in [min(3, repeats), repeats]"})
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
                t = time_call(lambda: policy.predict_action(obs), inference_mode=backend != "eager_no_grad",
                              **timing_kw)
                label = METHODS[method][0]
                cell = {"preset": preset, "method": method, "label": label, "nfe": policy.config.nfe, "batch": batch,
                        "params_m": params[(preset, method)] / 1e6, "backend": backend,
                        **{k: t[k] for k in ("median_ms", "p90_ms", "min_ms", "mean_ms", "n_repeats")}}
                results.append(cell)
                say(f"  {preset:>6} {label:>11} batch {batch:>3}: median {t['median_ms']:9.3f} ms  "
                    f"p90 {t['p90_ms']:9.3f} ms  (n={t['n_repeats']})", flush=True)
            del policy
            gc.collect()

    out = {"meta": meta, "results": results, "rows": make_rows(results), "backends": [], "profile": None,
           "task_policies": bench_task_policies(task_policies, 1, seed=seed, say=say, **timing_kw)
           if task_policies else []}
    out["targets"] = check_targets(out["rows"])
    if profile:
        out["profile"] = profile_default(device, threads, seed, calls=int(profile))
    if backends:
        out["backends"] = bench_backends(backends, backend_batches, backend_threads, device=device, seed=seed,
                                         say=say, **{k: v for k, v in timing_kw.items() if k != "device"})
        set_threads(threads)
        out["targets"].update(check_backend_targets(out["backends"]))
    meta["torch_num_threads"] = torch.get_num_threads()
    return out


def make_rows(results: list[dict]) -> list[dict]:
    """One row per (preset, batch): the three methods' medians side by side and the drift speed ratios."""
    cells = {(r["preset"], r["batch"], r["method"]): r for r in results}
    rows = []
    for preset, batch in dict.fromkeys((r["preset"], r["batch"]) for r in results):
        get = lambda m, k="median_ms": cells[(preset, batch, m)][k] if (preset, batch, m) in cells else None  # noqa
        params = [cells[(preset, batch, m)]["params_m"] for m in METHODS if (preset, batch, m) in cells]
        drift_p = get("drift", "params_m")
        diff_p = get("ddpm100", "params_m") or get("ddim10", "params_m")
        rows.append({
            "preset": preset, "batch": batch,
            "params_m": drift_p if drift_p is not None else params[0],
            "params_m_diffusion": diff_p,
            "drift_ms": get("drift"), "ddim10_ms": get("ddim10"), "ddpm100_ms": get("ddpm100"),
            "ddpm100_over_drift": speed_ratio(get("ddpm100"), get("drift")),
            "ddim10_over_drift": speed_ratio(get("ddim10"), get("drift")),
            "drift_p90_ms": get("drift", "p90_ms"), "ddim10_p90_ms": get("ddim10", "p90_ms"),
            "ddpm100_p90_ms": get("ddpm100", "p90_ms"),
        })
    return rows


def check_targets(rows: list[dict]) -> dict:
    t = {"ddpm100_over_drift_b1_min": TARGET_DDPM_RATIO_B1, "default_drift_b1_ms_max": TARGET_DEFAULT_DRIFT_MS_B1,
         "ratio_b1": {}}
    default = _default_backbone()
    for r in rows:
        if r["batch"] == 1 and r["ddpm100_over_drift"] is not None:
            t["ratio_b1"][r["preset"]] = {"ratio": r["ddpm100_over_drift"],
                                          "met": r["ddpm100_over_drift"] >= TARGET_DDPM_RATIO_B1}
        if r["batch"] == 1 and r["preset"] == default and r["drift_ms"] is not None:
            t["default_drift_b1_ms_eager"] = r["drift_ms"]
            t["default_drift_b1_met_eager"] = r["drift_ms"] <= TARGET_DEFAULT_DRIFT_MS_B1
    return t


def check_backend_targets(backend_rows: list[dict]) -> dict:
    """The fastest backend at batch 1, overall and per thread count, against the 3 ms target."""
    ok = [r for r in backend_rows if r.get("median_ms") is not None and r["batch"] == 1]
    if not ok:
        return {}
    pick = lambda r: {**{k: r[k] for k in ("backend", "threads", "median_ms", "p90_ms")},  # noqa: E731
                      "met": r["median_ms"] <= TARGET_DEFAULT_DRIFT_MS_B1}
    best = min(ok, key=lambda r: r["median_ms"])
    per_threads = {}
    for r in sorted(ok, key=lambda r: r["median_ms"]):
        per_threads.setdefault(str(r["threads"]), pick(r))
    return {"default_drift_b1_best": pick(best),
            "default_drift_b1_met_best": best["median_ms"] <= TARGET_DEFAULT_DRIFT_MS_B1,
            "default_drift_b1_best_by_threads": per_threads}


def _default_backbone() -> str:
    from .config import compose

    return compose([]).policy.backbone


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
                    diff = max_abs_diff(policy, fast, obs, seed)    # also builds/compiles for this shape
                    setup_s = time.perf_counter() - t1 + (t1 - t0)
                    t = time_call(lambda: fast.predict_action(obs), device=device,
                                  inference_mode=backend != "eager_no_grad", **timing_kw)
                    r = {**row, "batch": batch, "setup_s": setup_s, "max_abs_diff": diff, "error": None,
                         **{k: t[k] for k in ("median_ms", "p90_ms", "min_ms", "mean_ms", "n_repeats")}}
                    rows.append(r)
                    done.append(batch)
                    say(f"  backend {backend:>17} threads {threads} batch {batch:>3}: median {r['median_ms']:8.3f} ms"
                        f"  p90 {r['p90_ms']:8.3f} ms  max|diff| {diff:.1e}  setup {setup_s:.1f} s", flush=True)
                    t0 = time.perf_counter()
            except Exception as e:                             # a backend that does not work here is a result too
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                for batch in [b for b in batches if b not in done]:
                    rows.append({**row, "batch": batch, "setup_s": None, "max_abs_diff": None, "error": msg,
                                 "median_ms": None, "p90_ms": None, "min_ms": None, "mean_ms": None,
                                 "n_repeats": 0})
                say(f"  backend {backend:>17} threads {threads}: unavailable ({msg})", flush=True)
            if backend.startswith("compile"):
                torch._dynamo.reset()                          # drop compiled graphs between rows
    return rows


def profile_default(device: str = "cpu", threads: int = 1, seed: int = 0, calls: int = 50, top: int = 12) -> dict:
    """torch.profiler over ``calls`` eager predict_action calls of the default drift policy at batch 1."""
    from torch.profiler import ProfilerActivity, profile

    policy = _default_drift_policy(device, seed)
    obs = random_obs(policy, 1, seed)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.inference_mode():
        for _ in range(10):
            policy.predict_action(obs)
        _sync(device)
        with profile(activities=acts) as prof:
            for _ in range(calls):
                policy.predict_action(obs)
            _sync(device)
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    ops = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"calls": calls, "threads": threads, "self_cpu_ms_per_call": total / 1e3 / calls,
            "ops_per_call": sum(e.count for e in ev if e.key.startswith("aten::")) / calls,
            "top_ops": [{"op": e.key, "self_cpu_pct": 100 * e.self_cpu_time_total / total,
                         "self_cpu_ms_per_call": e.self_cpu_time_total / 1e3 / calls,
                         "calls_per_predict": e.count / calls} for e in ops]}


# -- reporting -------------------------------------------------------------------------------------------------
def _f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def _ms(x):
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.1f}" if x < 1000 else f"{x:,.0f}"


def format_report(res: dict) -> str:
    m = res["meta"]
    dev = m["device"] + (f" ({m['gpu']})" if "gpu" in m else "")
    lines = [f"predict_action latency — CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs), device {dev}, "
             f"threads {m['threads_option']} (torch.get_num_threads() = {m['torch_num_threads']}), "
             f"torch {m['torch']}, backend {m['backend']}, {m['time_utc']} UTC", "",
             f"Median ms per call (observation in, action chunk out; p90 in the JSON); n = {m['min_repeats']}.."
             f"{m['repeats_max']} timed calls per cell (as many as fit in {m['budget_s']:g} s). Random weights.", "",
             "| preset | params (M) drift / DP | batch | drift 1-NFE ms | DDIM-10 ms | DDPM-100 ms | DDPM-100/drift "
             "| DDIM-10/drift |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['preset']} | {_f(r['params_m'])} / {_f(r['params_m_diffusion'])} | {r['batch']} | "
                     f"{_ms(r['drift_ms'])} | {_ms(r['ddim10_ms'])} | {_ms(r['ddpm100_ms'])} | "
                     f"{_f(r['ddpm100_over_drift'], '{:.1f}x')} | {_f(r['ddim10_over_drift'], '{:.1f}x')} |")
    t = res.get("targets", {})
    lines.append("")
    if t.get("ratio_b1"):
        parts = [f"{p} {v['ratio']:.1f}x ({'met' if v['met'] else 'NOT met'})" for p, v in t["ratio_b1"].items()]
        lines.append(f"Target DDPM-100/drift >= {TARGET_DDPM_RATIO_B1:g}x at batch 1: " + ", ".join(parts) + ".")
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    if "default_drift_b1_ms_eager" in t:
        line = (f"Target default drift policy <= {TARGET_DEFAULT_DRIFT_MS_B1:g} ms at batch 1: eager "
                f"{t['default_drift_b1_ms_eager']:.2f} ms ({met(t['default_drift_b1_met_eager'])})")
        for n, b in sorted(t.get("default_drift_b1_best_by_threads", {}).items(), key=lambda kv: int(kv[0])):
            line += (f"; fastest backend with {n} thread(s): {b['backend']} {b['median_ms']:.2f} ms "
                     f"({met(b['met'])})")
        lines.append(line + ".")
    if res.get("backends"):
        b0 = res["backends"][0]
        eager = {(r["threads"], r["batch"]): r["median_ms"] for r in res["backends"]
                 if r["backend"] == "eager" and r["median_ms"] is not None}
        lines += ["", f"Default drift policy ({b0['backbone']}, {b0['params_m']:.2f}M params) by inference backend:",
                  "", "| backend | threads | batch | median ms | p90 ms | vs eager | max abs diff | setup s | n |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["backends"]:
            if r["error"]:
                lines.append(f"| {r['backend']} | {r['threads']} | {r['batch']} | unavailable: {r['error']} "
                             f"| | | | | |")
                continue
            e = eager.get((r["threads"], r["batch"]))
            lines.append(f"| {r['backend']} | {r['threads']} | {r['batch']} | {_ms(r['median_ms'])} | "
                         f"{_ms(r['p90_ms'])} | {_f(e / r['median_ms'] if e else None, '{:.2f}x')} | "
                         f"{r['max_abs_diff']:.1e} | {r['setup_s']:.1f} | {r['n_repeats']} |")
        lines += [""] + [f"- {b}: {BACKEND_NOTES[b]}" for b in dict.fromkeys(r["backend"] for r in res["backends"])]
    if res.get("task_policies"):
        lines += ["", "Whole policies per task, batch 1 (eager; image encoder = all cameras x To frames, timed alone):",
                  "", "| task / policy | NFE | params (M) | predict_action ms | of which image encoder ms | encoder params (M) |",
                  "|---|---|---|---|---|---|"]
        for r in res["task_policies"]:
            lines.append(f"| {r['name']} | {r['nfe']} | {r['params_m']:.2f} | {_ms(r['predict_ms'])} | "
                         f"{_ms(r['encoder_ms'])} | {_f(r['encoder_params_m'])} |")
    if res.get("profile"):
        p = res["profile"]
        lines += ["", f"Where eager time goes (torch.profiler, default drift policy, batch 1, "
                      f"{p['threads']} thread(s), {p['calls']} calls; {p['ops_per_call']:.0f} aten op calls "
                      f"(nested included) per predict, "
                      f"{p['self_cpu_ms_per_call']:.2f} ms profiled self CPU per call):", "",
                  "| op | self CPU % | ms per call | calls per predict |", "|---|---|---|---|"]
        for o in p["top_ops"]:
            lines.append(f"| {o['op']} | {o['self_cpu_pct']:.1f} | {o['self_cpu_ms_per_call']:.3f} | "
                         f"{o['calls_per_predict']:.0f} |")
    return "\n".join(lines) + "\n"


def write_results(res: dict, out: str | Path) -> tuple[Path, Path]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(res, indent=2))
    os.replace(tmp, out)
    md = out.with_suffix(".md")
    md.write_text(format_report(res))
    return out, md


# -- command line ----------------------------------------------------------------------------------------------
def _list(kind: Callable, name: str):
    def parse(v: str):
        items = [s.strip() for s in v.split(",") if s.strip()]
        try:
            return [kind(s) for s in items]
        except ValueError:
            raise SystemExit(f"{name}: expected a comma-separated list of {kind.__name__}, got {v!r}") from None
    parse.__name__ = f"list[{kind.__name__}]"     # shown by --help
    return parse


def _flag(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off", ""):
        return False
    raise SystemExit(f"expected a flag 0/1, got {v!r}")


OPTIONS = {"presets": _list(str, "presets"), "xlarge": _flag, "batches": _list(int, "batches"),
           "methods": _list(str, "methods"), "threads": int, "repeats": int, "budget_s": float, "warmup": int,
           "device": str, "backend": str, "backends": _list(str, "backends"),
           "backend_batches": _list(int, "backend_batches"), "backend_threads": _list(int, "backend_threads"),
           "profile": int, "out": str, "seed": int, "task_policies": _list(str, "task_policies")}


def main(args: list[str]) -> dict:
    import inspect

    from .runs import parse_kv

    defaults = {k: p.default for k, p in inspect.signature(bench_latency).parameters.items() if k in OPTIONS}
    defaults.update(device="cuda if available, else cpu", profile=50, backends="all of the device's backends",
                    task_policies=",".join(TASK_POLICIES), xlarge=0, out="eval/results/latency_<device>.json")
    try:
        opts = parse_kv(args, OPTIONS, usage="usage: drift-policy bench latency [key=value ...]", defaults=defaults)
    except ValueError as e:  # int("x") and the like
        raise SystemExit(f"bad option value: {e}") from None
    device = opts.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    presets = opts.pop("presets", list(DEFAULT_PRESETS))
    if opts.pop("xlarge", False) and "xlarge" not in presets:
        presets.append("xlarge")
    default_backends = list(CUDA_BACKENDS if device.startswith("cuda") else CPU_BACKENDS)
    out = opts.pop("out", str(REPO_ROOT / "eval" / "results" / f"latency_{device.split(':')[0]}.json"))
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
