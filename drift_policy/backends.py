"""Inference backends: the same policy, its backbone run by another engine, under one set of names.

``accelerated_policy(policy, backend)`` is opt-in fast inference for every caller (``bench latency``, the
real-time runner): a shallow copy of the policy whose backbone (``policy.model``) runs through ``backend``
while ``predict_action`` stays the policy's own code (same noise from the same generator, same normaliser, same
scheduler). ``export.py`` writes whole-policy files with the same builders (``jit_trace``, ``onnx_export``,
``ort_session``).

Backends: ``eager`` (PyTorch as shipped: on the CPU at small batch the U-Net's default fast inference path,
models/unet1d.py, at batch 1 a compiled kernel: models/cpu_kernel.py or models/aot.py), ``fast_trace`` (that path
without compiled kernels: its TorchScript fallback), ``fast_aoti`` (the AOTInductor kernel at batch 1),
``eager_no_grad`` (the same; the benchmark times it without inference_mode), ``reference``
(the U-Net's layers as written, i.e. the eager path before the fast default, for comparison), ``jit_trace`` /
``jit_ofi`` (TorchScript trace + freeze / optimize_for_inference), ``compile`` / ``compile_freezing``
(torch.compile, inductor), ``onnxruntime`` (ONNX Runtime CPU, backbone only), and on CUDA ``cuda_graph`` and
``compile_reduce_overhead``. Tracing, exporting and compiling see the reference layers (the fast path steps aside
under ``torch.jit.is_tracing`` / ``torch.compiler.is_compiling``).
"""
from __future__ import annotations

import copy
import io
import os
import warnings

import torch
from torch import Tensor, nn

from .errors import ConfigError

__all__ = ["CPU_BACKENDS", "CUDA_BACKENDS", "ALL_BACKENDS", "BACKEND_NOTES", "BackendError", "accelerated_policy",
           "make_backbone", "max_abs_diff", "jit_trace", "onnx_export", "ort_session"]

CPU_BACKENDS = ("eager", "eager_no_grad", "fast_trace", "fast_aoti", "reference", "jit_trace", "jit_ofi",
                "compile", "compile_freezing", "onnxruntime")
CUDA_BACKENDS = ("eager", "eager_no_grad", "reference", "cuda_graph", "compile", "compile_reduce_overhead")
ALL_BACKENDS = tuple(dict.fromkeys(CPU_BACKENDS + CUDA_BACKENDS))
BACKEND_NOTES = {
    "eager": "the default: predict_action as shipped, under torch.inference_mode (on the CPU below batch 16 the "
             "U-Net runs its fast path: convolutions as time-major GEMMs, TorchScript-traced, not frozen; at batch 1 "
             "the drift net in one call into a C library built with the system compiler (models/cpu_kernel.py), "
             "weights read live)",
    "fast_trace": "the default's fast path without compiled kernels: the TorchScript trace of the time-major "
                  "GEMMs at every batch below 16 (the default before them; their fallback)",
    "fast_aoti": "the default's fast path with the AOTInductor kernel at batch 1 (models/aot.py: the time-major "
                 "GEMM formulation compiled to C++, BLAS products, weights as inputs; what nets with a timestep "
                 "input get by default)",
    "eager_no_grad": "the default, with predict_action's own torch.no_grad only",
    "reference": "the U-Net's layers as written (nn.Conv1d, ...): the eager path before the fast default",
    "jit_trace": "torch.jit.trace + torch.jit.freeze of the backbone (reference layers)",
    "jit_ofi": "torch.jit.trace + torch.jit.optimize_for_inference (freeze, oneDNN conv, fusions)",
    "compile": "torch.compile(backbone, dynamic=False), inductor (setup s: with inductor's on-disk cache warm; "
               "a cold compile takes minutes on 2 cores)",
    "compile_freezing": "torch.compile(backbone, dynamic=False, options={'freezing': True}), inductor",
    "compile_reduce_overhead": "torch.compile(backbone, mode='reduce-overhead') (CUDA graphs via inductor)",
    "onnxruntime": "backbone exported to ONNX (opset 17, static shapes), ONNX Runtime CPUExecutionProvider",
    "cuda_graph": "backbone captured in a torch.cuda.CUDAGraph per batch size, inputs copied into static buffers",
}


class BackendError(ConfigError):
    """A backend name that does not exist, or one this device cannot run; the message names the choices."""


# -- builders shared with export.py --------------------------------------------------------------------------
def jit_trace(module: nn.Module, args: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """torch.jit.trace without gradients; shape checks in the traced code are Python-side only (warnings off)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module, args, check_trace=False).eval()


def onnx_export(module: nn.Module, args: tuple[Tensor, ...], f, input_names: list[str], output_names: list[str],
                opset: int, dynamic_axes: dict | None = None) -> None:
    """The TorchScript-based ONNX exporter (no onnxscript dependency; these graphs need nothing newer)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, f, dynamo=False, input_names=input_names, output_names=output_names,
                          opset_version=opset, **({"dynamic_axes": dynamic_axes} if dynamic_axes else {}))


def ort_session(model: bytes | str | os.PathLike, threads: int = 1):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and sequential execution."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("ONNX Runtime needs the optional extra: pip install 'drift-policy[export]'") from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so,
                                providers=["CPUExecutionProvider"])


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


class _ReferenceBackbone(nn.Module):
    """The net's reference layers whatever the grad mode (``reference_forward``; a net without one: forward)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def timestep_dim(self) -> int:
        return self.inner.timestep_dim

    def forward(self, *args: Tensor) -> Tensor:
        return getattr(self.inner, "reference_forward", self.inner.forward)(*args)


class _ForcedModeBackbone(nn.Module):
    """The net's default path with ``DRIFT_POLICY_COMPILE`` forced to ``mode`` (models/aot.py ``forced``)."""

    def __init__(self, inner: nn.Module, mode: str):
        super().__init__()
        self.inner, self.mode = inner, mode

    @property
    def timestep_dim(self) -> int:
        return self.inner.timestep_dim

    def forward(self, *args: Tensor) -> Tensor:
        from .models import aot

        with aot.forced(self.mode):
            return self.inner(*args)


class _JitBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, optimize_for_inference: bool = False):
        super().__init__(inner)
        self.ofi = optimize_for_inference

    def _build(self, args):
        traced = jit_trace(self.inner, args)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.optimize_for_inference(traced) if self.ofi else torch.jit.freeze(traced)


class _OrtBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, threads: int):
        super().__init__(inner)
        self.threads = threads

    def _build(self, args):
        names = ["sample", "global_cond", "timestep"][: len(args)]
        buf = io.BytesIO()
        # Static shapes: one session per batch size.
        onnx_export(self.inner, tuple(a.cpu() for a in args), buf, names, ["action"], opset=17)
        sess = ort_session(buf.getvalue(), self.threads)
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
    if backend == "reference":
        return _ReferenceBackbone(model)
    if backend in ("fast_trace", "fast_aoti"):
        return _ForcedModeBackbone(model, "0" if backend == "fast_trace" else "aoti")
    if backend in ("jit_trace", "jit_ofi"):
        return _JitBackbone(model, optimize_for_inference=backend == "jit_ofi")
    if backend == "onnxruntime":
        if cuda:
            raise BackendError("backend onnxruntime is wired for the CPU only (CPUExecutionProvider)")
        return _OrtBackbone(model, threads or torch.get_num_threads())
    if backend == "compile":
        return _CompiledBackbone(model)
    if backend == "compile_freezing":
        return _CompiledBackbone(model, options={"freezing": True})
    if backend == "compile_reduce_overhead":
        if not cuda:
            raise BackendError("backend compile_reduce_overhead needs CUDA (it uses CUDA graphs)")
        return _CompiledBackbone(model, mode="reduce-overhead")
    if backend == "cuda_graph":
        if not (cuda and torch.cuda.is_available()):
            raise BackendError("backend cuda_graph needs a CUDA device")
        return _CudaGraphBackbone(model)
    raise BackendError(f"backend must be one of {list(ALL_BACKENDS)}, got {backend!r}")


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
        raise BackendError(f"backend must be one of {list(ALL_BACKENDS)}, got {backend!r}")
    if backend in ("eager", "eager_no_grad"):
        return policy
    fast = copy.copy(policy)
    fast._modules = dict(policy._modules)                 # own module table: the original keeps its backbone
    fast._modules["model"] = make_backbone(policy.model, backend, threads)
    fast.reset()                                          # its own action queue and observation history
    return fast


def max_abs_diff(ref_policy, fast_policy, obs: Tensor, seed: int = 0) -> float:
    """Largest |action_pred(fast) - action_pred(eager)| with the same noise (same generator seed)."""
    dev = ref_policy.device
    with torch.inference_mode():
        a = ref_policy.predict_action(obs, torch.Generator(dev).manual_seed(seed))["action_pred"]
        b = fast_policy.predict_action(obs, torch.Generator(dev).manual_seed(seed))["action_pred"]
    return float((a - b).abs().max())
