"""The U-Net's fast CPU path compiled ahead of time to C++ (AOTInductor), weights read live at every call.

Why: at batch 1 the TorchScript trace of ``gemm_forward`` spent most of its time outside the matrix products
(~1,800 small ops per call, each dispatched by the interpreter; eval/results/latency_fast_default_cpu.md).
Inductor fuses the im2col copies, GroupNorm, FiLM, Mish and the residual adds into a few C++ loops around the
matrix products, and the AOT wrapper calls them from C++: no Python and no interpreter per op.

The compiled kernel takes the net's parameters as inputs (none is baked in), so, like the trace, it reads the
live weights at every call: optimizer steps, EMA, ``load_state_dict`` and ``.data`` writes are always seen. It
depends only on the net's structure, the input shapes, torch, the thread count and the CPU, so it is compiled
once per machine (about a minute on a 2-core CPU) and cached on disk as one ``.pt2`` per key in
``$DRIFT_POLICY_CACHE_DIR`` (default ``~/.cache/drift_policy/kernels``); later processes load it in milliseconds,
and every net of the same structure shares one loaded kernel.

``DRIFT_POLICY_COMPILE`` chooses the compiled kernels at the batch sizes of ``COMPILED_BATCHES`` (float32):
``auto`` (default): the C kernel of cpu_kernel.py where it applies (the drift generator: no timestep input), this
module's AOTInductor kernel otherwise; ``c``: the C kernel only; ``aoti``: the AOTInductor kernel only; ``0``:
neither (the TorchScript trace, e.g. in the test suite, where each new shape would cost a compile). When
compiling is impossible or fails, the fast path falls back to the next one and finally to the TorchScript trace
(one warning per process and key) and does not try again in that process.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .cpu_kernel import cache_dir

__all__ = ["COMPILED_BATCHES", "MODES", "compile_mode", "cache_dir", "compiled_kernel", "fast_kernel", "forced",
           "disabled", "kernel_key", "clear_loaded"]

# Batch sizes that get a compiled kernel: batch 1 is the real-time case; other batches keep the trace, so that
# evaluation with a few environments never waits for a compile per batch size.
COMPILED_BATCHES = (1,)
MODES = ("auto", "c", "aoti", "0")
# How the matrix products are compiled: "mm", inductor calls the BLAS (MKL) as eager does; "reduction", they are
# written as multiply + sum (ConditionalUnet1D.products_as_reductions) and inductor generates the loops. An experiment switch:
# ``DRIFT_POLICY_AOT_GEMM``; part of the kernel key.
GEMM_FORMS = ("mm", "reduction")


def gemm_form() -> str:
    form = os.environ.get("DRIFT_POLICY_AOT_GEMM", "mm")
    if form not in GEMM_FORMS:
        from ..errors import ConfigError

        raise ConfigError(f"DRIFT_POLICY_AOT_GEMM must be one of {', '.join(GEMM_FORMS)}, got {form!r}")
    return form

_LOADED: dict[str, object] = {}        # key -> loaded AOTI runner (weights are inputs: shared by equal nets)
_FAILED: dict[str, str] = {}           # key -> why compiling failed in this process (not retried)
_LOCK = threading.Lock()
_local = threading.local()


def compile_mode() -> str:
    mode = getattr(_local, "mode", None)
    if mode is not None:
        return mode
    mode = os.environ.get("DRIFT_POLICY_COMPILE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        from ..errors import ConfigError

        raise ConfigError(f"DRIFT_POLICY_COMPILE must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@contextlib.contextmanager
def forced(mode: str):
    """Within this block (this thread), ``DRIFT_POLICY_COMPILE`` is ``mode`` (one of MODES)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    before = getattr(_local, "mode", None)
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = before


def disabled():
    """Within this block (this thread), the fast path uses the TorchScript trace, never a compiled kernel."""
    return forced("0")


def wanted(args: tuple[Tensor, ...]) -> bool:
    """Whether a call with these inputs should run a compiled kernel (before any key is computed)."""
    return (args[0].shape[0] in COMPILED_BATCHES and args[0].dtype == torch.float32
            and compile_mode() != "0")


def fast_kernel(net: nn.Module, args: tuple[Tensor, ...]):
    """The compiled kernel for this call under ``compile_mode()``: the C kernel, then AOTInductor's; None: trace."""
    mode = compile_mode()
    if mode in ("auto", "c"):
        from .cpu_kernel import kernel

        k = kernel(net, args)
        if k is not None:
            return k
    if mode in ("auto", "aoti"):
        return compiled_kernel(net, args)
    return None


def _source_digest(net: nn.Module) -> str:
    """What the kernel is compiled from: the source of the net's module (its gemm formulation) and of the export
    here; any change to them compiles anew. Read through the net, so that this module imports no model module."""
    import inspect

    if type(net).__module__ not in _DIGESTS:
        parts = [inspect.getsource(sys.modules[type(net).__module__]), inspect.getsource(_Flat), inspect.getsource(_compile)]
        _DIGESTS[type(net).__module__] = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _DIGESTS[type(net).__module__]


_DIGESTS: dict[str, str] = {}


def kernel_key(net: nn.Module, args: tuple[Tensor, ...]) -> str:
    """Everything the compiled code depends on: the net's structure (its repr and parameter shapes), the input
    shapes and dtypes, the source, torch, the thread count (inductor writes it into the OpenMP loops) and the CPU."""
    from ..timing import cpu_model

    parts = [_source_digest(net), gemm_form(), torch.__version__, platform.machine(), cpu_model(), torch.backends.cpu.get_cpu_capability(),
             str(torch.get_num_threads()), repr(net),
             repr([(n, tuple(p.shape), str(p.dtype)) for n, p in net.named_parameters()]),
             repr([(tuple(a.shape), str(a.dtype)) for a in args])]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


class _Flat(nn.Module):
    """gemm_forward as a function of (inputs..., weights...): what is exported. The net is held outside the
    module tree, so that no parameter of it can be captured as a constant."""

    def __init__(self, net: nn.Module, names: list[str], n_inputs: int):
        super().__init__()
        self.__dict__["_net"] = net
        self.names, self.n_inputs = names, n_inputs

    def forward(self, *flat: Tensor) -> Tensor:
        from torch.nn.utils.stateless import _reparametrize_module

        inputs, weights = flat[: self.n_inputs], flat[self.n_inputs:]
        with _reparametrize_module(self._net, dict(zip(self.names, weights))):
            return self._net.gemm_forward(*inputs)


def _compile(net: nn.Module, args: tuple[Tensor, ...], path: Path) -> None:
    import torch._inductor  # noqa: F401  (aoti_compile_and_package)
    from torch._inductor import config as inductor_config
    from torch._inductor.cpp_builder import get_cpp_compiler

    get_cpp_compiler()                       # InvalidCxxCompiler now, before a minute of tracing
    names = [n for n, _ in net.named_parameters()]
    weights = [p.detach() for _, p in net.named_parameters()]
    flat = _Flat(net, names, len(args))
    with torch.no_grad(), warnings.catch_warnings(), net.products_as_reductions(gemm_form() == "reduction"):
        warnings.simplefilter("ignore")
        ep = torch.export.export(flat, (*[a.detach().clone() for a in args], *weights), strict=False)
    if ep.state_dict or ep.constants:        # a baked-in weight would not follow later weight changes
        raise RuntimeError(f"the export captured tensors as constants: {sorted({**ep.state_dict, **ep.constants})}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    try:
        with inductor_config.patch({"aot_inductor.package_constants_in_so": False}):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_or_compile(net: nn.Module, args: tuple[Tensor, ...], key: str):
    runner = _LOADED.get(key)
    if runner is not None:
        return runner
    path = cache_dir() / f"unet_{key}.pt2"
    if not path.exists():
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)         # one compile per key, however many processes ask
            if not path.exists():
                print(f"drift-policy: compiling the U-Net's CPU kernel for inputs "
                      f"{[tuple(a.shape) for a in args]} once (about a minute); cached in {path}",
                      file=sys.stderr, flush=True)
                _compile(net, args, path)
    import torch._inductor

    runner = _LOADED[key] = torch._inductor.aoti_load_package(str(path))
    return runner


def compiled_kernel(net: nn.Module, args: tuple[Tensor, ...]):
    """A callable ``(*args) -> Tensor`` running ``net.gemm_forward`` through the compiled kernel with the net's
    current parameters, or None (compiling is off, impossible or failed: the caller traces instead)."""
    if not wanted(args) or compile_mode() not in ("auto", "aoti"):
        return None
    key = kernel_key(net, args)
    if key in _FAILED:
        return None
    try:
        with _LOCK:
            runner = _load_or_compile(net, args, key)
    except Exception as e:                            # no compiler, an op inductor cannot lower, a full disk, ...
        _FAILED[key] = f"{type(e).__name__}: {e}"
        warnings.warn(f"fast inference: no compiled kernel ({_FAILED[key].splitlines()[0][:300]}); "
                      f"using the TorchScript trace", stacklevel=3)
        return None
    params = list(net.parameters())                   # the Parameter objects: their current data at every call
    if not all(p.is_contiguous() for p in params):    # the kernel assumes the strides it was compiled for
        return None
    run = runner.loader.run

    def call(*inputs: Tensor) -> Tensor:
        return run([*(x.contiguous() for x in inputs), *params])[0]

    call.key = key
    return call


def clear_loaded() -> None:
    """Forget the loaded kernels and the failures of this process (tests)."""
    _LOADED.clear()
    _FAILED.clear()
