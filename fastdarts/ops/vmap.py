"""What the fused ops' vmap rules share."""

from __future__ import annotations

from torch import Tensor


def batch_first(x: Tensor, bdim: int | None, size: int) -> Tensor:
    """x with its vmap batch dim first, of ``size`` (expanded, not copied, when x is not
    batched)."""
    if bdim is None:
        return x.expand(size, *x.shape)
    return x.movedim(bdim, 0)
