"""Export a drift policy's one-step generator, normaliser included, to ONNX, TorchScript or AOTInductor.

The exported graph maps data units to data units, so a deployment needs nothing from this package:

    inputs   obs    float32 [B, To, obs_dim]   the last To observations, oldest first, in data units
             noise  float32 [B, Tp, Da]        standard normal noise (an input, so results are reproducible
                                               and parity with PyTorch is exact up to float rounding)
             <camera> uint8 [B, To, 3, H, W]   image policies only, one input per camera after noise (in the
                                               config's image_keys order): the last To frames, 0..255; the
                                               encoder (centre crop, as in evaluation) is inside
    outputs  action       float32 [B, Ta, Da]  the executable chunk (steps To-1 .. To-2+Ta of action_pred)
             action_pred  float32 [B, Tp, Da]  the whole predicted chunk

The batch dimension is dynamic. A JSON file beside the export (``<out>.json``) records the shapes, the input and
output names and the policy config. Command line:

    drift-policy export checkpoint=runs/<run>/pretrained format=onnx out=policy.onnx
    drift-policy export checkpoint=runs/<run> format=torchscript out=policy.pt
    drift-policy export checkpoint=runs/<run> format=aoti out=policy.pt2

``aoti``: ``torch.export`` + AOTInductor, the whole computation compiled to C++ (weights inside) in one ``.pt2``
package; compiling takes about a minute on a 2-core CPU and needs a C++ compiler. It loads without this
package, from Python::

    import torch
    model = torch._inductor.aoti_load_package("policy.pt2")
    action, action_pred = model(obs, noise)          # float32 tensors as above

and from C++ (libtorch of the same version; ``examples/aoti_policy.cpp``)::

    torch::inductor::AOTIModelPackageLoader loader("policy.pt2");
    std::vector<at::Tensor> out = loader.run({obs, noise});   // {action, action_pred}

The package is compiled for the CPU it was exported on (its instruction set) and the thread count at export.

``checkpoint`` is a save_pretrained folder, a run folder (newest good checkpoint, EMA weights) or a checkpoint
file. ONNX needs the optional extra: ``pip install 'drift-policy[export]'`` (onnx, onnxruntime).

Only the drift policy (1 NFE) is exported: a diffusion policy's sampler is a loop over a scheduler. Image
policies export to ONNX and TorchScript; ``aoti`` takes low-dim policies only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .backends import jit_trace, onnx_export, ort_session
from .errors import ConfigError
from .fileio import atomic_write_text, unique_temp_path, write_error
from .policies import Policy

INPUT_NAMES = ["obs", "noise"]
OUTPUT_NAMES = ["action", "action_pred"]
ONNX_OPSET = 18
FORMATS = ("onnx", "torchscript", "aoti")
AOTI_MAX_BATCH = 4096          # the dynamic batch axis of an aoti export: 1 .. this


class ExportablePolicy(nn.Module):
    """obs (data units) + noise -> (action, action_pred) in data units, the same computation as
    ``Policy.predict_action`` with the noise passed in instead of drawn."""

    def __init__(self, policy: Policy, gemm: bool = False):
        super().__init__()
        # gemm: the U-Net as its time-major matrix products (gemm_forward, the fast CPU path's formulation)
        # instead of its convolution layers; same function, and faster at small batch once compiled.
        self.gemm = gemm
        if policy.config.nfe != 1:
            raise ValueError(f"only one-step drift policies can be exported (1 NFE), got a {policy.config.type!r} "
                             f"policy with {policy.config.nfe} network evaluations per chunk")
        for key in ("obs", "action"):
            policy.normalizer.params(key)  # KeyError now, not at deployment, if a field was never fitted
        self.policy = policy.eval()
        c = policy.config
        self.n_obs_steps, self.n_action_steps = c.n_obs_steps, c.n_action_steps
        self.image_keys = tuple(c.image_keys)
        # The wrapper in eval mode too: the ONNX exporter restores the wrapper's mode on the whole tree afterwards,
        # and a wrapper left in train mode put the policy back in training (random crops) after an export.
        self.eval()

    def forward(self, obs: Tensor, noise: Tensor, *images: Tensor) -> tuple[Tensor, Tensor]:
        """``images``: one [B, To, 3, H, W] uint8 tensor per camera, in ``image_keys`` order (none: low-dim)."""
        p = self.policy
        obs = obs[:, -self.n_obs_steps:]
        cond = p.condition({"obs": obs, **dict(zip(self.image_keys, images))})
        if self.gemm:
            with _gemm_backbone(p.model):
                sample = p.sample(cond, noise=noise)
        else:
            sample = p.sample(cond, noise=noise)
        action_pred = p.unnormalize_action(sample, obs)
        start = self.n_obs_steps - 1
        return action_pred[:, start: start + self.n_action_steps], action_pred


class _gemm_backbone:
    """Within the block, calls of the U-Net run its gemm_forward (it has one; other backbones are unchanged)."""

    def __init__(self, net: nn.Module):
        self.net = net

    def __enter__(self):
        if hasattr(self.net, "gemm_forward"):
            self.net.__dict__["forward"] = self.net.gemm_forward     # an instance attribute shadows the method

    def __exit__(self, *exc):
        self.net.__dict__.pop("forward", None)


def example_inputs(policy: Policy, batch: int = 1, generator: torch.Generator | None = None) -> tuple[Tensor, ...]:
    """Plausible (obs, noise, *camera frames): obs drawn inside the range the normaliser was fitted on, frames
    uniform uint8 [batch, To, 3, H, W] per camera (image policies only)."""
    c = policy.config
    g = generator or torch.Generator().manual_seed(0)
    scale, offset = policy.normalizer.params("obs")
    u = torch.rand(batch, c.n_obs_steps, c.obs_dim, generator=g) * 2 - 1        # normalised units
    obs = (u - offset.cpu()) / scale.cpu()
    noise = torch.randn(batch, c.horizon, c.action_dim, generator=g)
    images = [torch.randint(0, 256, (batch, c.n_obs_steps, *c.image_shape), generator=g, dtype=torch.uint8)
              for _ in c.image_keys]
    return (obs, noise, *images)


def input_names(policy: Policy) -> list[str]:
    """The export's inputs in order: obs, noise, then one per camera (its image key)."""
    return [*INPUT_NAMES, *policy.config.image_keys]


def metadata(policy: Policy, fmt: str) -> dict:
    c = policy.config
    cams = {k: ["batch", c.n_obs_steps, *c.image_shape] for k in c.image_keys}
    return {
        "format": fmt,
        "inputs": {"obs": ["batch", c.n_obs_steps, c.obs_dim], "noise": ["batch", c.horizon, c.action_dim], **cams},
        **({"image_dtype": "uint8 (0..255, channels first)"} if cams else {}),
        "outputs": {"action": ["batch", c.n_action_steps, c.action_dim], "action_pred": ["batch", c.horizon, c.action_dim]},
        "units": "obs and actions in data units (normaliser inside); noise ~ N(0, 1)",
        "policy_config": c.to_dict(),
    }


def export_policy(policy: Policy, out: str | os.PathLike, fmt: str) -> Path:
    """Write the policy as ``fmt`` (one of FORMATS) to ``out`` (plus ``<out>.json``); returns ``out``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "aoti" and policy.config.image_keys:
        raise ConfigError("format=aoti exports low-dim policies only; export an image policy as onnx or torchscript")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportablePolicy(policy.to("cpu").eval())
    args = example_inputs(policy, batch=2)
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError as e:
            raise ImportError("ONNX export needs the optional extra: pip install 'drift-policy[export]'") from e
    tmp = unique_temp_path(out)
    try:
        if fmt == "torchscript":
            jit_trace(module, args).save(str(tmp))
        elif fmt == "aoti":
            pkg = tmp.with_suffix(".pt2")            # AOTInductor wants the .pt2 suffix
            try:
                aoti_export(policy, str(pkg))
                os.replace(pkg, tmp)
            finally:
                pkg.unlink(missing_ok=True)
        else:
            names = input_names(policy)
            onnx_export(module, args, str(tmp), names, OUTPUT_NAMES, ONNX_OPSET,
                        dynamic_axes={n: {0: "batch"} for n in names + OUTPUT_NAMES})
        os.replace(tmp, out)
    except OSError as e:
        raise write_error(e, out) from e
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write_text(str(out) + ".json", json.dumps(metadata(policy, fmt), indent=2))
    return out


def aoti_export(policy: Policy, out: str, gemm: bool = True) -> str:
    """torch.export + AOTInductor of ``ExportablePolicy(policy)`` with a dynamic batch axis, the weights stored in
    the package as constants; ``out`` must end in .pt2. Returns ``out``. (Not inductor's ``freezing``: with it
    the weight-prepacking pass of torch 2.13 fixed the batch of the products to the example's.)"""
    import warnings

    import torch._inductor

    if policy.config.image_keys:
        raise ConfigError("format=aoti exports low-dim policies only; export an image policy as onnx or torchscript")
    module = ExportablePolicy(policy.to("cpu").eval(), gemm=gemm)
    obs, noise = example_inputs(policy, batch=2)
    batch = torch.export.Dim("batch", min=1, max=AOTI_MAX_BATCH)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(module, (obs, noise), dynamic_shapes=({0: batch}, {0: batch}), strict=False)
        return torch._inductor.aoti_compile_and_package(ep, package_path=out)


# ---- loading the exports -------------------------------------------------------------------------------------
class OnnxPolicy:
    """An exported ONNX file run with onnxruntime: ``(obs, noise) -> (action, action_pred)`` as numpy."""

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        self.session = ort_session(path, threads)

    def __call__(self, obs: np.ndarray, noise: np.ndarray, *images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``images``: an image policy's frames, uint8 [B, To, 3, H, W] per camera, in its image_keys order."""
        feed = {"obs": np.ascontiguousarray(obs, dtype=np.float32), "noise": np.ascontiguousarray(noise, dtype=np.float32)}
        cams = [i.name for i in self.session.get_inputs()][len(INPUT_NAMES):]
        if len(images) != len(cams):
            raise ValueError(f"this export takes {len(cams)} camera input(s) {cams}, got {len(images)}")
        feed.update({k: np.ascontiguousarray(v, dtype=np.uint8) for k, v in zip(cams, images)})
        action, action_pred = self.session.run(OUTPUT_NAMES, feed)
        return action, action_pred


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    return torch.jit.load(str(path), map_location="cpu").eval()


class AotiPolicy:
    """An ``aoti`` export: ``(obs, noise) -> (action, action_pred)`` as float32 tensors, run by AOTInductor's
    loader (what ``torch._inductor.aoti_load_package`` returns, called without its per-call pytree handling)."""

    def __init__(self, path: str | os.PathLike):
        import torch._inductor

        self.model = torch._inductor.aoti_load_package(str(path))
        self._run = self.model.loader.run

    def __call__(self, obs: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        action, action_pred = self._run([obs.float().contiguous(), noise.float().contiguous()])
        return action, action_pred


# ---- command line ---------------------------------------------------------------------------------------------
def cmd_export(args: list[str]) -> None:
    from .fileio import check_writable
    from .runs import load_policy_for_eval, parse_kv

    usage = "usage: drift-policy export checkpoint=PATH format=onnx|torchscript|aoti out=FILE"
    opts = parse_kv(args, {"checkpoint": str, "format": str, "out": str}, usage=usage,
                    defaults={"format": "onnx", "out": "required"})
    if "checkpoint" not in opts or "out" not in opts:
        raise SystemExit(usage)
    fmt = opts.get("format", "onnx")
    if fmt not in FORMATS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "aoti" and not opts["out"].endswith(".pt2"):
        raise ConfigError(f"format=aoti writes a .pt2 package: out= must end in .pt2, got {opts['out']!r}")
    check_writable(opts["out"], "export out=")
    policy, _ = load_policy_for_eval(opts["checkpoint"])
    out = export_policy(policy, opts["out"], fmt)
    print(f"exported {policy.config.type} policy ({fmt}) to {out}; interface in {out}.json")
