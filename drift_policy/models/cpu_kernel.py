"""The drift U-Net's batch-1 CPU forward as one call into a small C library (cpu_kernel.c), weights read live.

Why: at batch 1 the call is bound by streaming the weights once (every product has only 4-16 rows); the BLAS
packs each weight matrix per product and the TorchScript / inductor paths add per-op dispatch around it. The C
kernel reads every weight row once with no packing and runs the whole net (im2col, GroupNorm + Mish + FiLM
fused, FiLM linears from Mish(cond) computed once, residual adds) in one call on a cache-resident arena.

The library is plain C (no torch headers): compiled once per machine in about a second with the system's C
compiler (``$CC``, else ``cc``; ``-O3 -march=native``) into the kernels' cache folder (``cache_dir``), keyed by
its source, the compiler and the CPU. The net is turned into a program (a flat int64 array of ops) once per
net; at every call the parameter tensors' current data pointers are passed, so weight changes in place or
through ``.data`` are always seen (a parameter whose storage was replaced is re-checked for dtype and layout;
one that is no longer contiguous float32 sends the call to the reference layers). Used for nets without a
timestep input (the drift generator) at batch 1 in float32; anything else, or a missing compiler, goes on to the
other fast paths (aot.py, the trace).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["kernel", "library", "clear_loaded"]

SOURCE = Path(__file__).with_name("cpu_kernel.c")


def cache_dir() -> Path:
    """Where compiled kernels are kept (this C library and aot.py's packages): ``DRIFT_POLICY_CACHE_DIR``, else
    ``~/.cache/drift_policy/kernels``."""
    env = os.environ.get("DRIFT_POLICY_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "drift_policy" / "kernels"
OP_CONV, OP_GNMISH, OP_ADD, OP_CONVT, OP_CAT, OP_LINEAR, OP_MISH = 1, 2, 3, 4, 5, 6, 7
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared"]

_LIB: list = []                   # [loaded ctypes function] once built (or [None] after a failure)
_LOCK = threading.Lock()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def library():
    """The loaded ``drift_unet_run`` (ctypes), building the library on first use; None without a compiler."""
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        try:
            _LIB.append(_build())
        except Exception as e:                        # no compiler, a compiler error, a read-only cache
            warnings.warn(f"fast inference: the C kernel is unavailable ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''})", stacklevel=4)
            _LIB.append(None)
    return _LIB[0]


def _build():
    from ..timing import cpu_model

    cc = _compiler()
    if cc is None:
        raise FileNotFoundError(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\n".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), cpu_model()]).encode())
    path = cache_dir() / f"cpu_kernel_{key.hexdigest()[:20]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            res = subprocess.run([cc, *FLAGS, "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()}")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    fn = ctypes.CDLL(str(path)).drift_unet_run
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double]
    fn.restype = ctypes.c_int64
    return fn


def clear_loaded() -> None:
    """Forget the loaded library (tests)."""
    _LIB.clear()


class Unsupported(Exception):
    """The net has a layer or setting the C kernel does not implement."""


class _Program:
    """The net's batch-1 forward for inputs sample [1, T, Da], cond [1, C] as a flat op list.

    Slots (pointer operands): ("param", Parameter), ("io", 0 sample | 1 cond | 2 out) or ("buf", n floats)."""

    def __init__(self, net: nn.Module, T: int, Da: int, cond_dim: int):
        self.ops: list = []
        self.params: list[nn.Parameter] = []
        self._param_slot: dict[int, tuple] = {}
        self.bufs: list[int] = []
        self.cols = 0                                  # floats of the shared im2col / convT scratch
        self.eps = None
        self._build(net, T, Da, cond_dim)

    # -- slots
    def p(self, t: Tensor | None):
        if t is None:
            return None
        if not isinstance(t, nn.Parameter) or t.dtype != torch.float32 or not t.is_contiguous():
            raise Unsupported("every weight must be a contiguous float32 Parameter")
        key = id(t)
        if key not in self._param_slot:
            self._param_slot[key] = ("param", len(self.params))
            self.params.append(t)
        return self._param_slot[key]

    def buf(self, n: int):
        self.bufs.append(n)
        return ("buf", len(self.bufs) - 1)

    def emit(self, *args):
        self.ops.append(args)

    # -- layers
    def conv(self, x, T: int, conv: nn.Module, out=None):
        if type(conv) is not nn.Conv1d or conv.groups != 1 or conv.dilation != (1,) or conv.padding_mode != "zeros":
            raise Unsupported(f"unsupported convolution {conv}")
        c_out, c_in, k = conv.weight.shape
        s, pad = conv.stride[0], conv.padding[0]
        if not isinstance(pad, int):
            raise Unsupported(f"padding {conv.padding}")
        t_out = (T + 2 * pad - k) // s + 1
        y = out or self.buf(t_out * c_out)
        self.cols = max(self.cols, t_out * c_in * k)
        self.emit(OP_CONV, x, y, self.p(conv.weight), self.p(conv.bias), c_in, c_out, k, s, pad, T, t_out, "cols")
        return y, t_out, c_out

    def gn_mish(self, x, T: int, C: int, norm: nn.Module, act: nn.Module, film=None):
        if type(norm) is not nn.GroupNorm or not norm.affine or type(act) is not nn.Mish:
            raise Unsupported(f"expected GroupNorm (affine) + Mish, got {norm}, {act}")
        if self.eps is not None and norm.eps != self.eps:
            raise Unsupported("GroupNorm eps differs between layers")
        self.eps = norm.eps
        self.emit(OP_GNMISH, x, C, T, norm.num_groups, self.p(norm.weight), self.p(norm.bias), film)

    def res(self, x, T: int, C: int, block: nn.Module, mcond, cond_dim: int):
        # The U-Net's FiLM residual block, recognised by its parts (this module imports no model module).
        if not all(hasattr(block, a) for a in ("film", "block1", "block2", "skip")) or type(block.film[0]) is not nn.Mish:
            raise Unsupported(f"unexpected block {type(block).__name__}")
        lin = block.film[1]
        film = self.buf(lin.out_features)
        self.emit(OP_LINEAR, mcond, film, self.p(lin.weight), self.p(lin.bias), 1, cond_dim, lin.out_features)
        h, _, c_out = self.conv(x, T, block.block1[0])
        self.gn_mish(h, T, c_out, block.block1[1], block.block1[2], film)
        h2, _, _ = self.conv(h, T, block.block2[0])
        self.gn_mish(h2, T, c_out, block.block2[1], block.block2[2])
        skip = x if isinstance(block.skip, nn.Identity) else self.conv(x, T, block.skip)[0]
        out = self.buf(T * c_out)
        self.emit(OP_ADD, out, h2, skip, T * c_out)
        return out, c_out

    def _build(self, net, T: int, Da: int, cond_dim: int):
        if net.timestep_dim:
            raise Unsupported("nets with a timestep input (diffusion) are not implemented")
        mcond = self.buf(cond_dim)
        self.emit(OP_MISH, ("io", 1), mcond, cond_dim)      # every block's FiLM starts with Mish(cond): once
        x, C = ("io", 0), Da
        skips = []
        for res1, res2, down in net.down:
            x, C = self.res(x, T, C, res1, mcond, cond_dim)
            x, C = self.res(x, T, C, res2, mcond, cond_dim)
            skips.append((x, C))
            if not isinstance(down, nn.Identity):
                x, T, C = self.conv(x, T, down)
        for res in net.mid:
            x, C = self.res(x, T, C, res, mcond, cond_dim)
        for res1, res2, up in net.up:
            s, cs = skips.pop()
            cat = self.buf(T * (C + cs))
            self.emit(OP_CAT, cat, x, C, s, cs, T)
            x, C = self.res(cat, T, C + cs, res1, mcond, cond_dim)
            x, C = self.res(x, T, C, res2, mcond, cond_dim)
            if (type(up) is not nn.ConvTranspose1d or up.kernel_size != (4,) or up.stride != (2,)
                    or up.padding != (1,) or up.output_padding != (0,) or up.groups != 1 or up.dilation != (1,)):
                raise Unsupported(f"unsupported transposed convolution {up}")
            c_out = up.weight.shape[1]
            y = self.buf(2 * T * c_out)
            self.cols = max(self.cols, T * 4 * c_out)
            self.emit(OP_CONVT, x, y, self.p(up.weight), self.p(up.bias), C, c_out, T, "cols")
            x, T, C = y, 2 * T, c_out
        block, last = net.final
        h, _, C = self.conv(x, T, block[0])
        self.gn_mish(h, T, C, block[1], block[2])
        if last.weight.shape[0] != Da:
            raise Unsupported("the final convolution does not map back to the action dims")
        self.conv(h, T, last, out=("io", 2))


class CpuKernel:
    """``(sample [1, T, Da], cond [1, C]) -> [1, T, Da]``: the net's forward in the C library."""

    def __init__(self, fn, prog: _Program, T: int, Da: int, fallback=None):
        self.fn, self.T, self.Da, self.fallback = fn, T, Da, fallback
        self.params = prog.params
        n_par = len(prog.params)
        # The arena: every activation buffer and the shared scratch, each 64-byte aligned.
        sizes = [-(-n // 16) * 16 for n in [*prog.bufs, prog.cols]]
        self.arena = torch.zeros(sum(sizes) + 16)
        base = self.arena.data_ptr()
        base_off = (-base % 64) // 4
        offs, at = [], base_off
        for n in sizes:
            offs.append(at)
            at += n
        def index(s):
            if s is None:
                return -1
            if s == "cols":
                return n_par + 3 + len(prog.bufs)
            kind, i = s
            return i if kind == "param" else n_par + i if kind == "io" else n_par + 3 + i

        code = []
        for op in prog.ops:
            code.append(op[0])
            code += [index(a) if (a is None or isinstance(a, (tuple, str))) else int(a) for a in op[1:]]
        self.code = np.asarray(code, dtype=np.int64)
        self.ptrs = np.zeros(n_par + 3 + len(sizes), dtype=np.int64)
        self.ptrs[n_par + 3:] = [base + 4 * o for o in offs]
        self.n_par = n_par
        self.eps = float(prog.eps if prog.eps is not None else 1e-5)
        self._last = None
        self._lock = threading.Lock()                 # one arena: calls from two threads take turns

    def _params_ok(self, ptrs: list[int]) -> bool:
        """After a parameter's storage was replaced (``p.data = ...``): still contiguous float32 on the CPU?"""
        ok = all(p.dtype == torch.float32 and p.is_contiguous() and p.device.type == "cpu" for p in self.params)
        self._last = ptrs if ok else None
        return ok

    def __call__(self, sample: Tensor, cond: Tensor) -> Tensor:
        sample, cond = sample.contiguous(), cond.contiguous()
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs != self._last and not self._params_ok(ptrs):
            if self.fallback is None:
                raise RuntimeError("C kernel: a parameter is no longer a contiguous float32 CPU tensor")
            return self.fallback(sample, cond)                 # the reference layers: any layout
        out = torch.empty(1, self.T, self.Da)
        n = self.n_par
        with self._lock:
            self.ptrs[:n] = ptrs
            self.ptrs[n: n + 3] = (sample.data_ptr(), cond.data_ptr(), out.data_ptr())
            rc = self.fn(self.code.ctypes.data, len(self.code), self.ptrs.ctypes.data, self.eps)
        if rc:
            raise RuntimeError(f"C kernel: unknown op at {rc - 1}")
        return out


def kernel(net: nn.Module, args: tuple[Tensor, ...]) -> CpuKernel | None:
    """The C kernel for ``net`` at these inputs (sample [1, T, Da], cond [1, C], float32, no timestep), or None
    when it does not apply or the library cannot be built."""
    if len(args) != 2 or args[0].shape[0] != 1 or args[0].dtype != torch.float32 or args[1].dtype != torch.float32:
        return None
    _, T, Da = args[0].shape
    try:
        prog = _Program(net, T, Da, args[1].shape[1])
    except Unsupported:
        return None
    fn = library()
    if fn is None:
        return None
    return CpuKernel(fn, prog, T, Da, fallback=net.reference_forward)
