"""Policies: a config dataclass that validates itself, and a module with compute_loss / predict_action.

Each policy module registers its (config, policy) pair with ``register_policy``; importing this package
registers the built-in drift policy and the diffusion baseline.
"""
from .base import (
                   POLICIES,
                   Policy,
                   PolicyConfig,
                   config_from_dict,
                   make_policy,
                   policy_class,
                   register_policy,
                   removed_options,
                   with_inference,
                   with_legacy_keys,
)
from .diffusion import DiffusionConfig, DiffusionPolicy
from .drift import DriftConfig, DriftPolicy

__all__ = ["Policy", "PolicyConfig", "DriftConfig", "DriftPolicy", "DiffusionConfig", "DiffusionPolicy",
           "make_policy", "policy_class", "config_from_dict", "register_policy", "with_inference", "with_legacy_keys",
           "removed_options", "POLICIES"]
