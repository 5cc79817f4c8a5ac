"""Policies: a config dataclass that validates itself, and a module with compute_loss / predict_action."""
from .base import ConfigError, Policy, PolicyConfig
from .diffusion import DiffusionConfig, DiffusionPolicy
from .drift import DriftConfig, DriftPolicy

POLICIES = {"drift": (DriftConfig, DriftPolicy), "diffusion": (DiffusionConfig, DiffusionPolicy)}


def make_policy(config: PolicyConfig, normalizer=None) -> Policy:
    return POLICIES[config.type][1](config, normalizer)


def config_from_dict(d: dict) -> PolicyConfig:
    d = dict(d)
    kind = d.get("type")
    if kind not in POLICIES:
        raise ConfigError(f"policy.type must be one of {sorted(POLICIES)}, got {kind!r}")
    return POLICIES[kind][0].from_dict(d)


__all__ = ["Policy", "PolicyConfig", "DriftConfig", "DriftPolicy", "DiffusionConfig", "DiffusionPolicy",
           "make_policy", "config_from_dict", "POLICIES"]
