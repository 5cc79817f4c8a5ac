"""drift-policy: one-step (1-NFE) robot policies trained with the drifting-field loss."""

__version__ = "0.1.0"
