"""drift-policy: one-step (1-NFE) robot policies trained with the drifting-field loss.

    from drift_policy import DriftPolicy, DriftConfig, DiffusionPolicy, DiffusionConfig

    policy = DriftPolicy.from_pretrained("runs/<run>/pretrained")
    action = policy.select_action(obs)

The policy classes are imported on first use, so ``import drift_policy`` (the command line, ``__version__``)
does not load torch.
"""

__version__ = "0.1.0"

# name -> the module that defines it (drift_policy.policies registers both built-in policies on import)
_PUBLIC = {"DriftPolicy": "policies", "DriftConfig": "policies", "DiffusionPolicy": "policies",
           "DiffusionConfig": "policies", "Policy": "policies", "PolicyConfig": "policies"}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value            # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
