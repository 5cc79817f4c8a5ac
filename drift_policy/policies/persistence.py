"""A policy's pretrained folder: ``save_pretrained`` / ``from_pretrained`` (LeRobot's names), verified on load."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..normalizer import Normalizer


class Pretrained:
    """Mixed into ``Policy``: uses its ``config`` and ``state_dict``, and the registry's rules for reading a saved
    config (``_legacy``, ``_removed``, ``_config_of``, ``_class_of``), which ``Policy`` supplies, so this module
    imports nothing of ``base``."""

    # ---- LeRobot-style persistence ---------------------------------------------------------------------
    # A pretrained folder: config.json (the policy config), model.safetensors (the weights, with the same config
    # in their metadata) and manifest.json (SHA-256 and size of both files). from_pretrained verifies all three, so
    # flipped bytes, a config with missing keys, or a config.json that contradicts the weights (another horizon,
    # n_action_steps, size or policy type) are refused instead of loading something else than was trained.
    MANIFEST = "manifest.json"

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save

        from ..checkpoint import non_finite_tensors
        from ..fileio import atomic_write_bytes

        path = Path(path)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        bad = non_finite_tensors(state)
        if bad:
            raise CheckpointError(f"refusing to save {path}: the weights hold NaN or inf (first: {bad[0]})")
        config = json.dumps(self.config.to_dict(), indent=2)
        files = {"config.json": config.encode(),
                 "model.safetensors": save(state, metadata={"config": json.dumps(self.config.to_dict())})}
        for name, data in files.items():
            atomic_write_bytes(path / name, data)
        manifest = {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in files.items()}
        atomic_write_bytes(path / self.MANIFEST, json.dumps(manifest, indent=2).encode())  # last: marks it complete
        return path

    @classmethod
    def _read_pretrained(cls, path: Path) -> tuple[dict, bytes]:
        """config.json as a dict and the weights' bytes, after checking them against manifest.json."""
        for f in ("config.json", "model.safetensors"):
            if not (path / f).exists():
                raise FileNotFoundError(f"{path}: missing {f} (expected a folder written by save_pretrained)")
        if not (path / cls.MANIFEST).exists():
            raise CheckpointError(f"{path}: missing {cls.MANIFEST} (the checksums of a folder written by "
                                  f"save_pretrained): its files cannot be verified")
        try:
            manifest = json.loads((path / cls.MANIFEST).read_text())
            expected = {f: (int(manifest[f]["bytes"]), str(manifest[f]["sha256"]))
                        for f in ("config.json", "model.safetensors")}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {cls.MANIFEST} is corrupted ({type(e).__name__}: {e})") from e
        data = {}
        for f, (size, digest) in expected.items():
            data[f] = (path / f).read_bytes()
            if len(data[f]) != size:
                raise CheckpointError(f"{path / f}: truncated or changed ({len(data[f])} bytes, {cls.MANIFEST} "
                                      f"says {size})")
            if hashlib.sha256(data[f]).hexdigest() != digest:
                raise CheckpointError(f"{path / f}: corrupted or changed (SHA-256 does not match {cls.MANIFEST})")
        try:
            config = json.loads(data["config.json"])
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path / 'config.json'}: not valid JSON ({e})") from e
        return config, data["model.safetensors"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu"):
        from safetensors import SafetensorError
        from safetensors.torch import load

        from ..checkpoint import non_finite_tensors
        path = Path(path)
        raw, weights = cls._read_pretrained(path)
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
        saved, raw = raw, cls._legacy(raw, where=str(path))
        config = cls._config_of(raw)
        missing = sorted({f.name for f in dataclasses.fields(config)} - set(raw))
        if missing:   # defaults would silently describe another policy than the one trained
            raise CheckpointError(f"{path / 'config.json'}: missing key(s) {', '.join('policy.' + k for k in missing)}")
        try:
            state = load(weights)
            n = int.from_bytes(weights[:8], "little")              # safetensors: u64 header size, JSON header
            meta = json.loads(weights[8: 8 + n]).get("__metadata__") or {}
        except (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise CheckpointError(f"{path / 'model.safetensors'}: not a readable safetensors file ({e})") from e
        if "config" in meta:
            trained = json.loads(meta["config"])
            # removed options compared as saved: config.json must tell what the weights were trained with
            trained = {**cls._legacy(trained, removed="quiet"), **cls._removed(trained)}
            raw = {**raw, **cls._removed(saved)}
            differ = sorted(k for k in set(trained) | set(raw) if plain(trained.get(k)) != plain(raw.get(k)))
            if differ:
                raise CheckpointError(f"{path / 'config.json'} contradicts the weights, which were trained with "
                                      + ", ".join(f"policy.{k}={trained.get(k)!r} (config.json: {raw.get(k)!r})"
                                                  for k in differ))
        bad = non_finite_tensors(state)
        if bad:
            raise CheckpointError(f"{path / 'model.safetensors'}: weights hold NaN or inf (first: {bad[0]})")
        norm = Normalizer.from_state_dict({k[len("normalizer."):]: v for k, v in state.items()
                                           if k.startswith("normalizer.")})
        policy_cls = cls._class_of(config)
        if not cls.__dict__.get("_ANY_TYPE") and not issubclass(policy_cls, cls):
            raise TypeError(f"{path} holds a {config.type} policy, not a {cls.__name__}")
        policy = policy_cls(config, norm)
        load_state(policy, state, str(path / "model.safetensors"))
        return policy.to(device).eval()


def load_state(module: nn.Module, state: dict, where: str) -> None:
    """``load_state_dict`` whose key or shape mismatch is a CheckpointError naming the file (weights of another
    policy type, size or task), not a RuntimeError deep in torch."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{where}: the weights do not fit this {type(module).__name__} "
                              f"({'; '.join(x.strip() for x in first[:3])})") from e


def plain(v):
    """A config value as JSON and YAML give it back (tuples as lists, nested too), so that a value read from a file
    compares equal to the same value in a dataclass."""
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
