"""Loss components as pure functions on tensors.

Each returns `(loss_sum, metrics)`: the component summed over its units (valid tokens, sequences, ...)
and a dict with at least `"count"` (the number of units). Callers divide by the count reduced over every
micro-batch of an accumulation window and every rank, so the result is token-weighted, never a mean of
per-batch means.
"""

from dsdistill.losses.closed_form import kd_loss
from dsdistill.losses.lm import lm_loss, shifted_mask

__all__ = ["kd_loss", "lm_loss", "shifted_mask"]
