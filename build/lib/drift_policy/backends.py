"""Inference backends: the same policy, its backbone run by another engine, under one set of names.

``accelerated_policy(policy, backend)`` is opt-in fast inference for every caller (``bench latency``, the
real-time runner): a shallow copy of the policy whose backbone (``policy.model``) runs through ``backend``
while ``predict_action`` stays the policy's own code (same noise from the same generator, same normaliser, same
scheduler). ``export.py`` writes whole-policy files with the same builders (``jit_trace``, ``onnx_export``,
``ort_session``).

Backends: ``eager`` (PyTorch), ``eager_no_grad`` (the same; the benchmark times it without inference_mode),
``jit_trace`` / ``jit_ofi`` (TorchScript trace + freeze / optimize_for_inference), ``gemm`` / ``jit_gemm`` (each
Conv1d as one time-major matrix product, eager / traced), ``compile`` / ``compile_freezing`` (torch.compile,
inductor), ``onnxruntime`` (ONNX Runtime CPU), and on CUDA ``cuda_graph`` and ``compile_reduce_overhead``.
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
           "make_backbone", "max_abs_diff", "gemm_conv_copy", "GemmConv1d", "jit_trace", "onnx_export",
           "ort_session"]

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


class GemmConv1d(nn.Module):
    """A Conv1d (groups=1, dilation 1, zero padding) computed as one matrix product, time-major.

    cols [B*T_out, C_in*k] @ W^T [C_in*k, C_out] + bias: the same sums as the convolution (float rounding
    may differ). At batch 1 this orientation runs the BLAS kernel several times faster than PyTorch's default
    CPU path for these small 1-D convolutions (im2col with W [C_out, C_in*k] @ cols [C_in*k, T]).
    """

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"GemmConv1d handles plain convolutions only, got {conv}")
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
    """A deep copy of ``model`` with every plain nn.Conv1d replaced by a GemmConv1d (same weights)."""
    model = copy.deepcopy(model)
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if type(child) is nn.Conv1d:
                setattr(mod, name, GemmConv1d(child))
    return model.eval()


class _JitBackbone(_PerShapeBackbone):
    def __init__(self, inner: nn.Module, optimize_for_inference: bool = False, gemm_conv: bool = False):
        super().__init__(inner)
        self.ofi = optimize_for_inference
        # not registered as a submodule: the policy's parameters stay the original ones
        self.__dict__["source"] = gemm_conv_copy(inner) if gemm_conv else inner

    def _build(self, args):
        traced = jit_trace(self.source, args)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
    if backend in ("jit_trace", "jit_ofi"):
        return _JitBackbone(model, optimize_for_inference=backend == "jit_ofi")
    if backend == "gemm":
        return _EagerGemmBackbone(model)
    if backend == "jit_gemm":
        return _JitBackbone(model, gemm_conv=True)
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
