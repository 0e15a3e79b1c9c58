"""Boosters: changes that combine with any adapter (SIBO's initial residual)."""
from peftlab.boosters.sibo import attach_sibo, boosted_layers

__all__ = ["attach_sibo", "boosted_layers"]
