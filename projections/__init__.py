"""Read models built only from events. Pure folds: no I/O, no clock."""

from projections.sandboxes import SandboxesProjection, SandboxView, evolve

__all__ = ["SandboxView", "SandboxesProjection", "evolve"]
