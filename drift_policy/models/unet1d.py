"""1-D temporal convolutional U-Net with FiLM conditioning (the CNN generator of Diffusion Policy, Chi et al. 2023).

Input: a sequence shaped like the action chunk [B, T, Da] (Gaussian noise for the drift generator, a noisy
action for diffusion). Conditioning: a global vector (flattened observation features), plus a diffusion
timestep embedding when ``timestep_dim > 0``. Each residual block modulates its features with a per-channel
scale and bias predicted from the conditioning (FiLM).

Fast CPU inference (the default, see ``ConditionalUnet1D.forward``): at small batch on the CPU, PyTorch runs
these short 1-D convolutions through its slow im2col path (``_slow_conv2d_forward``: W [C_out, C_in*k] @ cols
[C_in*k, T] with T = 4..16, a shape the BLAS handles badly), which took ~70 % of an eager call at batch 1
(profile in eval/results/latency/latency_fast_default_cpu.md). Without
gradients, the net is instead computed as time-major matrix products (cols [B*T, C_in*k] @ W^T, one ``addmm``
per convolution, the transposed convolutions as one ``mm`` plus two shifted adds), with the FiLM Mish shared by
all blocks, and run through a TorchScript trace of that formulation (no Python overhead per op). The trace reads
the live parameters (it is not frozen), so weight updates, in place or through ``.data``, are always seen; it is
cached per input shape and dropped on ``.to()`` / dtype moves and whenever a Parameter or module is replaced
(``load_state_dict(assign=True)``, setattr). Same sums as the convolutions, so the outputs agree to float
rounding (~1e-6; tests/test_fast_inference.py).

At batch 1 (the real-time case) a compiled kernel runs instead, reading the live weights at every call: for the
drift generator the whole net in one call into a small C library (models/cpu_kernel.py, built in a second with
the system's C compiler), for nets with a timestep input the gemm formulation compiled by AOTInductor
(models/aot.py). Both are cached on disk per machine; the trace is the fallback when no compiler is found, and
``DRIFT_POLICY_COMPILE=0`` switches them off (tests/test_cpu_kernel.py, tests/test_aot.py).
"""
from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import aot

# Channel widths per resolution level. "large" is Diffusion Policy's low-dim Push-T net (down_dims 256/512/1024,
# 65.8M parameters with its timestep embedding); "xlarge" its image net (512/1024/2048).
UNET_PRESETS = {
    "tiny": dict(down_dims=(32, 64, 128)),
    "small": dict(down_dims=(64, 128, 256)),
    "medium": dict(down_dims=(128, 256, 512)),
    "large": dict(down_dims=(256, 512, 1024)),
    "xlarge": dict(down_dims=(512, 1024, 2048)),
}


class Conv1dBlock(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, kernel_size: int, n_groups: int):
        super().__init__(nn.Conv1d(c_in, c_out, kernel_size, padding=kernel_size // 2),
                         nn.GroupNorm(n_groups, c_out), nn.Mish())


class FiLMResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block1 = Conv1dBlock(c_in, c_out, kernel_size, n_groups)
        self.block2 = Conv1dBlock(c_out, c_out, kernel_size, n_groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * c_out))
        self.skip = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.block1(x)                                   # [B, C, T]
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)  # [B, C, 1] each
        h = self.block2(scale * h + bias)
        return h + self.skip(x)


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float().unsqueeze(-1) * freqs                   # [B, half]
    return torch.cat([args.sin(), args.cos()], dim=-1)       # [B, dim]


# The gemm formulation is used below this batch size only: from batch 16 on, PyTorch's CPU convolution takes
# oneDNN (its own heuristic), which beat im2col + addmm in our measurements at batch 16-50.
FAST_MAX_BATCH = 16


class ConditionalUnet1D(nn.Module):
    # Plain attribute (not saved): False forces the reference path, e.g. to time it against the fast one.
    fast_inference = True

    def __init__(self, action_dim: int, global_cond_dim: int, down_dims=(64, 128, 256), kernel_size: int = 5,
                 n_groups: int = 8, timestep_dim: int = 0):
        super().__init__()
        self.timestep_dim = timestep_dim
        cond_dim = global_cond_dim
        if timestep_dim > 0:
            self.time_mlp = nn.Sequential(nn.Linear(timestep_dim, 4 * timestep_dim), nn.Mish(),
                                          nn.Linear(4 * timestep_dim, timestep_dim))
            cond_dim += timestep_dim
        dims = [action_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))
        block = lambda i, o: FiLMResBlock(i, o, cond_dim, kernel_size, n_groups)  # noqa: E731

        self.down = nn.ModuleList()
        for k, (c_in, c_out) in enumerate(pairs):
            last = k == len(pairs) - 1
            self.down.append(nn.ModuleList([block(c_in, c_out), block(c_out, c_out),
                                            nn.Conv1d(c_out, c_out, 3, 2, 1) if not last else nn.Identity()]))
        self.mid = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        self.up = nn.ModuleList()
        for c_in, c_out in reversed(pairs[1:]):  # every up level doubles T back; the top skip is not reused
            self.up.append(nn.ModuleList([block(2 * c_out, c_in), block(c_in, c_in),
                                          nn.ConvTranspose1d(c_in, c_in, 4, 2, 1)]))
        self.final = nn.Sequential(Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups),
                                   nn.Conv1d(down_dims[0], action_dim, 1))

    def forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        """sample [B, T, Da], global_cond [B, C], timestep [B] (diffusion only) -> [B, T, Da].

        Without gradients (``torch.no_grad`` / ``inference_mode``), in eval mode, on the CPU and below
        FAST_MAX_BATCH, this runs the fast inference path (module docstring); otherwise the reference layers.
        """
        if (timestep is None) != (self.timestep_dim == 0):
            raise ValueError("timestep must be given exactly when the net was built with timestep_dim > 0")
        if self.uses_fast_path(sample):
            return self._fast_call(sample, global_cond, timestep)
        return self.reference_forward(sample, global_cond, timestep)

    def uses_fast_path(self, sample: Tensor) -> bool:
        """Whether ``forward(sample, ...)`` takes the fast inference path now."""
        # Under someone else's trace or compile (ONNX export, jit backends, torch.compile) the reference layers
        # are what gets exported: ONNX Runtime / inductor have their own convolution kernels.
        return (self.fast_inference and not self.training and not torch.is_grad_enabled()
                and sample.device.type == "cpu" and sample.shape[0] < FAST_MAX_BATCH
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling())

    def reference_forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        """The layers as written (training, gradients, GPU, large batch)."""
        cond = global_cond
        if timestep is not None:
            cond = torch.cat([self.time_mlp(sinusoidal_embedding(timestep, self.timestep_dim)), cond], dim=-1)
        x = sample.transpose(1, 2)                           # [B, Da, T]
        skips = []
        for res1, res2, down in self.down:
            x = res2(res1(x, cond), cond)
            skips.append(x)
            x = down(x)                                      # T -> T/2 except at the last level
        for res in self.mid:
            x = res(x, cond)
        for res1, res2, up in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = res2(res1(x, cond), cond)
            x = up(x)
        return self.final(x).transpose(1, 2)                 # [B, T, Da]

    # ---- fast inference path ------------------------------------------------------------------------------
    @staticmethod
    @contextlib.contextmanager
    def products_as_reductions(on: bool = True):
        """While exporting for AOTInductor (aot.py): the gemm form's products as multiply + sum (see below)."""
        global _gemm_as_reduction
        _gemm_as_reduction = on
        try:
            yield
        finally:
            _gemm_as_reduction = False

    def gemm_forward(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None = None) -> Tensor:
        """The same function as ``reference_forward``, written as time-major matrix products (eager)."""
        cond = global_cond
        if timestep is not None:
            cond = torch.cat([self.time_mlp(sinusoidal_embedding(timestep, self.timestep_dim)), cond], dim=-1)
        mcond = F.mish(cond)               # every block's FiLM starts with Mish(cond): computed once
        x = sample.transpose(1, 2)                           # [B, Da, T] (a view; the first conv copies)
        skips = []
        for res1, res2, down in self.down:
            x = _res_gemm(_res_gemm(x, res1, mcond), res2, mcond)
            skips.append(x)
            if not isinstance(down, nn.Identity):
                x = conv1d_gemm(x, down)
        for res in self.mid:
            x = _res_gemm(x, res, mcond)
        for res1, res2, up in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = _res_gemm(_res_gemm(x, res1, mcond), res2, mcond)
            x = conv_transpose1d_gemm(x, up)
        return conv1d_gemm(_block_gemm(x, self.final[0]), self.final[1]).transpose(1, 2)

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_trace_cache", None)              # device / dtype moves may swap parameter tensors
        return super()._apply(fn, *args, **kwargs)

    def _fast_call(self, sample: Tensor, global_cond: Tensor, timestep: Tensor | None) -> Tensor:
        args = (sample, global_cond) if timestep is None else (sample, global_cond, timestep)
        cache = self.__dict__.get("_trace_cache")
        if cache is None:
            cache = self.__dict__["_trace_cache"] = _TraceCache()
        return cache.get(self, args)(*args)


class _GemmForward(nn.Module):
    """What is traced: the net's gemm_forward (holds the net, so the trace reads its live parameters)."""

    def __init__(self, net: ConditionalUnet1D):
        super().__init__()
        self.net = net

    def forward(self, *args: Tensor) -> Tensor:
        return self.net.gemm_forward(*args)


# Counts parameter and submodule registrations in the whole process (setattr of a Parameter or a Module,
# ``load_state_dict(assign=True)``): a trace made before one may hold a tensor that its module no longer has.
# One integer compare per call, against ~0.1 ms for walking the net's 300 parameter and module slots.
# Registrations made while tracing (TorchScript's own module objects) are not counted.
_registrations = 0
_tracing = False


def _count_registration(*_):
    global _registrations
    if not _tracing:
        _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


class _TraceCache:
    """TorchScript traces of ``gemm_forward`` per input signature, for one net (at batch 1 in float32: the
    compiled kernel of cpu_kernel.py or aot.py instead, when there is one; it reads the parameters at every
    call too).

    Not frozen: a trace reads the net's parameter tensors at every call, so in-place weight changes (optimizer
    steps, EMA, ``load_state_dict``, ``.data.copy_``) are seen. A trace holds the parameter tensors it was made
    with, so it is dropped when one may have been replaced: on any Parameter or Module registration anywhere
    (``_registrations``) and on every ``_apply`` of the net (``.to()``, ``.float()``, ...). Copies and pickles
    of the net start with an empty cache.
    """

    MAX_ENTRIES = 2 * FAST_MAX_BATCH

    def __init__(self):
        self.traces: dict = {}
        self.epoch = -1

    def get(self, net: nn.Module, args: tuple[Tensor, ...]):
        if self.epoch != _registrations:
            self.traces, self.epoch = {}, _registrations
        want = aot.wanted(args)
        key = (tuple((tuple(a.shape), a.dtype) for a in args), want and (aot.compile_mode(), torch.get_num_threads()))
        fn = self.traces.get(key)
        if fn is None:
            if len(self.traces) >= self.MAX_ENTRIES:
                self.traces.clear()
            fn = self.traces[key] = (want and aot.fast_kernel(net, args)) or _trace(net, args)
        return fn

    def __deepcopy__(self, memo):
        return _TraceCache()

    def __reduce__(self):
        return (_TraceCache, ())


def _trace(net: nn.Module, args: tuple[Tensor, ...]):
    global _tracing
    _tracing = True
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")                  # TracerWarnings: shapes are fixed per entry by design
            return torch.jit.trace(_GemmForward(net), tuple(a.clone() for a in args), check_trace=False)
    except Exception as e:                                   # a module TorchScript cannot trace: eager is exact too
        warnings.warn(f"fast inference: tracing failed ({type(e).__name__}: {e}); running the gemm form eagerly")
        return net.gemm_forward
    finally:
        _tracing = False


# Set through ConditionalUnet1D.products_as_reductions while aot.py exports the net for compilation, never in eager
# or the trace: the products as a broadcast multiply and a sum, which inductor compiles into one loop that reads
# each weight row once for all the 4-16 rows of cols at batch 1 (in eager this would materialise [N, M, K]).
_gemm_as_reduction = False


def _linear(cols: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """cols [M, K] @ w[N, K]^T (+ bias) -> [M, N]."""
    if _gemm_as_reduction:
        y = (w.unsqueeze(1) * cols.unsqueeze(0)).sum(-1).t()
        return y if bias is None else y + bias
    return torch.addmm(bias, cols, w.t()) if bias is not None else cols @ w.t()


def _matmul(x: Tensor, w: Tensor) -> Tensor:
    """x [M, K] @ w [K, N] -> [M, N]."""
    if _gemm_as_reduction:
        return (x.unsqueeze(-1) * w.unsqueeze(0)).sum(1)
    return torch.mm(x, w)


def conv1d_gemm(x: Tensor, conv: nn.Conv1d) -> Tensor:
    """conv(x) for x [B, C_in, T] (any strides) as cols [B*T_out, C_in*k] @ W^T: one addmm.

    Returns a [B, C_out, T_out] view of the time-major result. For T_out = 4..16 the BLAS is several times
    faster in this orientation than in PyTorch's own W [C_out, C_in*k] @ cols [C_in*k, T_out]. (pad + unfold
    + one copy builds cols faster than F.unfold's im2col for these sizes.)"""
    w = conv.weight
    c_out, _, k = w.shape
    B, C, T = x.shape
    if k == 1 and conv.stride[0] == 1 and conv.padding[0] == 0:
        t_out, cols = T, x.transpose(1, 2).reshape(B * T, C)
    else:
        p = conv.padding[0]
        u = (F.pad(x, (p, p)) if p else x).unfold(2, k, conv.stride[0])       # [B, C, T_out, k]
        t_out = u.shape[2]
        cols = u.transpose(1, 2).reshape(B * t_out, C * k)                     # (c, j) order = W's flattening
    y = _linear(cols, w.view(c_out, -1), conv.bias)
    return y.view(B, t_out, c_out).transpose(1, 2)


def conv_transpose1d_gemm(x: Tensor, conv: nn.ConvTranspose1d) -> Tensor:
    """ConvTranspose1d(C, C', 4, stride 2, padding 1) of x [B, C, T] -> [B, C', 2T].

    z[t, :, j] = x[t] @ W[:, :, j] for all taps in one mm; input t reaches output 2t - 1 + j, so
    out[2m] = z[m, 1] + z[m-1, 3] and out[2m+1] = z[m, 2] + z[m+1, 0] (zero outside 0..T-1)."""
    if conv.kernel_size != (4,) or conv.stride != (2,) or conv.padding != (1,) or conv.output_padding != (0,):
        raise ValueError(f"conv_transpose1d_gemm handles the U-Net's (k=4, stride 2, padding 1) only, got {conv}")
    w = conv.weight                                                            # [C_in, C_out, 4]
    c_in, c_out, k = w.shape
    B, _, T = x.shape
    z = _matmul(x.transpose(1, 2).reshape(B * T, c_in), w.view(c_in, c_out * k)).view(B, T, c_out, k)
    zp = F.pad(z, (0, 0, 0, 0, 1, 1))                                          # [B, T+2, C_out, 4]
    even = zp[:, 1:-1, :, 1] + zp[:, :-2, :, 3]
    odd = zp[:, 1:-1, :, 2] + zp[:, 2:, :, 0]
    y = torch.stack([even, odd], dim=2).view(B, 2 * T, c_out)
    if conv.bias is not None:
        y = y + conv.bias
    return y.transpose(1, 2)


def _block_gemm(x: Tensor, block: Conv1dBlock) -> Tensor:
    conv, norm, _ = block
    return F.mish(F.group_norm(conv1d_gemm(x, conv), norm.num_groups, norm.weight, norm.bias, norm.eps))


def _res_gemm(x: Tensor, res: FiLMResBlock, mish_cond: Tensor) -> Tensor:
    lin = res.film[1]
    scale, bias = _linear(mish_cond, lin.weight, lin.bias).unsqueeze(-1).chunk(2, dim=1)
    h = _block_gemm(torch.addcmul(bias, scale, _block_gemm(x, res.block1)), res.block2)
    return h + (x if isinstance(res.skip, nn.Identity) else conv1d_gemm(x, res.skip))
