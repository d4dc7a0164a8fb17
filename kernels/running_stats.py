"""Triton kernel for the fused CNN edges' running BatchNorm statistics (see
fastdarts.ops.conv_mixed.FusedEdges._update_running): one launch where torch takes ten ops
(two gathers, each moving average's scale and add, the variance from invstd in three, the
count's increment).

For each running channel r of a group, c = stat[r] the channel of the normalised block it
follows, m the momentum and n the values per channel:

    running_mean[r] = (1 − m)·running_mean[r] + m·mean[c]
    running_var[r]  = (1 − m)·running_var[r] + m·(invstd[c]⁻² − eps)·n / max(n − 1, 1)

and every num_batches_tracked entry grows by one. m and eps come from a tensor in the
statistics' dtype: Triton passes Python floats as float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import on_device
from .tiles import cdiv

BLOCK = 256


@triton.jit
def _update_kernel(MEAN, INVSTD, STAT, RM, RV, NBT, CONSTS, R, K, n, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = r < R
    m = tl.load(CONSTS)
    eps = tl.load(CONSTS + 1)
    c = tl.load(STAT + r, mask=mask, other=0)
    mean = tl.load(MEAN + c, mask=mask, other=0)
    invstd = tl.load(INVSTD + c, mask=mask, other=1)
    # tl.cast, not n.to: Triton makes an integer argument equal to 1 a constant (a plain int).
    nf = tl.cast(n, m.dtype)
    unbias = nf / tl.maximum(nf - 1, 1)
    var = (1 / (invstd * invstd) - eps) * unbias
    rm = tl.load(RM + r, mask=mask, other=0)
    rv = tl.load(RV + r, mask=mask, other=0)
    tl.store(RM + r, rm * (1 - m) + mean * m, mask=mask)
    tl.store(RV + r, rv * (1 - m) + var * m, mask=mask)
    counted = r < K
    tl.store(NBT + r, tl.load(NBT + r, mask=counted, other=0) + 1, mask=counted)


def update(
    mean: torch.Tensor,
    invstd: torch.Tensor,
    stat: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor,
    consts: torch.Tensor,
    n: int,
) -> None:
    """Updates running_mean and running_var (R,) from the batch's mean and invstd (channels,)
    at channels ``stat`` (R,), and num_batches_tracked (any shape, contiguous), in place;
    consts = (momentum, eps) in the statistics' dtype."""
    floats = (mean, invstd, running_mean, running_var, consts)
    if any(t.dtype != mean.dtype for t in floats) or mean.dtype not in (
        torch.float32,
        torch.float64,
    ):
        raise TypeError(
            "running_stats.update: mean, invstd, the running statistics and consts must share "
            f"one dtype, float32 or float64; got {[str(t.dtype) for t in floats]}"
        )
    written = (running_mean, running_var, num_batches_tracked)
    if not all(t.is_contiguous() for t in written) or running_var.shape != running_mean.shape:
        raise ValueError(
            "running_stats.update: running_mean, running_var (of one shape) and "
            "num_batches_tracked must be contiguous (they are updated in place)"
        )
    r, k = running_mean.numel(), num_batches_tracked.numel()
    with on_device(mean):
        _update_kernel[(cdiv(max(r, k), BLOCK),)](
            mean.contiguous(), invstd.contiguous(), stat, running_mean, running_var,
            num_batches_tracked, consts, r, k, n, BLOCK=BLOCK,
        )  # fmt: skip
