"""Triton kernels for the fused cross-entropy (see fastdarts.ops.cross_entropy).

loss[n] = logsumexp(x[n, :]) − x[n, t[n]] over V classes, for rows n of logits x (N, V).
The forward runs one program per row, one pass over it (a running maximum and rescaled sum
of exponentials, block by block; while a row's logits so far are all −inf it shifts by 0),
and keeps each row's log-sum-exp for the backward; the backward one program per (row,
block of classes): d_x = (exp(x − lse) − [class = t]) · g,
g the upstream gradient of the row's sample scaled by 1/rows per sample. So the logits are
read twice and their gradient written once, where log-softmax, NLL and their backwards
read or write a logits-sized tensor eight times. Targets are read at row mod T, so S
samples' rows (sample-major) can share T = N / S targets. Imported only on first use on
CUDA (or under TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device
from .tiles import cdiv

BLOCK = 1024


@triton.jit
def _forward_kernel(X, T, LOSS, LSE, V, NT, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    row = X + n * V
    cols = tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=X.dtype.element_ty)
    m = tl.max(zero - float("inf"), axis=0)  # −inf and 0 in the logits' dtype
    s = tl.sum(zero, axis=0)
    for start in range(0, V, BLOCK):
        x = tl.load(row + start + cols, mask=start + cols < V, other=-float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # Shifted by 0 while every logit so far is −inf: exp(−inf − −inf) would be NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
        m = m_new
    lse = m + tl.log(s)
    t = tl.load(T + n % NT)
    tl.store(LSE + n, lse)
    # A target out of range reads nothing and gives NaN (no host check inside a step).
    x_t = tl.load(row + t, mask=(t >= 0) & (t < V), other=float("nan"))
    tl.store(LOSS + n, lse - x_t)


@triton.jit
def _backward_kernel(X, T, LSE, G, DX, V, NT, ROWS, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < V
    x = tl.load(X + n * V + cols, mask=mask, other=0)
    g = tl.load(G + n // ROWS) / ROWS
    t = tl.load(T + n % NT)
    p = tl.exp(x - tl.load(LSE + n))
    tl.store(DX + n * V + cols, (p - tl.where(cols == t, 1, 0).to(p.dtype)) * g, mask=mask)


def forward(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (N,), lse (N,)) for logits (N, V) and targets (T,) (row n's at n mod T), both
    contiguous; every element written."""
    n, v = logits.shape
    check_extent(logits.numel())
    loss = torch.empty(n, dtype=logits.dtype, device=logits.device)
    lse = torch.empty_like(loss)
    with on_device(logits):
        _forward_kernel[(n,)](logits, targets, loss, lse, v, targets.numel(), BLOCK=BLOCK)
    return loss, lse


def backward(
    logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """d_logits (N, V) for the per-sample mean losses' gradient ``grad`` (S,), each sample
    N / S consecutive rows; every element written."""
    n, v = logits.shape
    d_x = torch.empty_like(logits)
    with on_device(logits):
        _backward_kernel[(n, cdiv(v, BLOCK))](
            logits, targets, lse, grad, d_x, v, targets.numel(), n // grad.numel(), BLOCK=BLOCK
        )
    return d_x
