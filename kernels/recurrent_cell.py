"""Triton kernels for the whole-cell op's first state (see fastdarts.ops.recurrent_cell).

Per time step, s0 = BN(u) with u = h + σ(c0)·(tanh(h0) − h) from [c0, h0] (rows, 2D) and
the previous hidden state h (rows, D), rows = B·N (the weight samples interleaved). Torch
takes 3 launches for u and 10 for its backward (the activations again, the two gradients
of [c0, h0], the carried gradient of h, and h ⊙ mh for the projection's weight gradient);
each is one launch here. Imported only on first use on CUDA (or under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device
from .recurrent_mixed import _sigmoid, _tanh
from .tiles import cdiv

BLOCK = 512


@triton.jit
def _s0_forward_kernel(C0H0, H, U, total, D, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < total
    row = j // D
    co = row * 2 * D + j - row * D
    c = tl.load(C0H0 + co, mask=mask, other=0)
    h0 = tl.load(C0H0 + co + D, mask=mask, other=0)
    h = tl.load(H + j, mask=mask, other=0)
    tl.store(U + j, h + _sigmoid(c) * (_tanh(h0) - h), mask=mask)


@triton.jit
def _s0_backward_kernel(
    GU, C0H0, H, MASK, CARRY, GXP, HM, total, N, D, HAS_MASK: tl.constexpr, BLOCK: tl.constexpr
):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < total
    row = j // D
    d = j - row * D
    co = row * 2 * D + d
    gu = tl.load(GU + j, mask=mask, other=0)
    c = tl.load(C0H0 + co, mask=mask, other=0)
    h0 = tl.load(C0H0 + co + D, mask=mask, other=0)
    h = tl.load(H + j, mask=mask, other=0)
    sg = _sigmoid(c)
    th = _tanh(h0)
    tl.store(CARRY + j, gu * (1 - sg), mask=mask)
    tl.store(GXP + co, gu * (th - h) * sg * (1 - sg), mask=mask)
    tl.store(GXP + co + D, gu * sg * (1 - th * th), mask=mask)
    if HAS_MASK:  # h ⊙ mh, the mask (B, D) shared by the N samples of a row's batch index
        m = tl.load(MASK + (row // N) * D + d, mask=mask, other=0)
        tl.store(HM + j, h * m, mask=mask)


def _check(name: str, *tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError(f"recurrent_cell.{name}: every tensor must be contiguous")
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"recurrent_cell.{name}: tensors of one dtype, got mixed dtypes")


def s0_forward(c0h0: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (…, D) = h + σ(c0)·(tanh(h0) − h) for c0h0 (…, 2D) = [c0, h0], h (…, D)."""
    _check("s0_forward", c0h0, h, out)
    total, d = h.numel(), h.shape[-1]
    check_extent(c0h0.numel())
    with on_device(h):
        _s0_forward_kernel[(cdiv(total, BLOCK),)](c0h0, h, out, total, d, BLOCK=BLOCK)
    return out


def s0_backward(
    grad_u: torch.Tensor,
    c0h0: torch.Tensor,
    h: torch.Tensor,
    h_mask: torch.Tensor | None,
    carry: torch.Tensor,
    grad_c0h0: torch.Tensor,
    h_masked: torch.Tensor | None,
) -> None:
    """From ∂L/∂u (B, N, D): writes carry = ∂L/∂h through u (B, N, D), grad_c0h0 (B, N, 2D)
    and, with h_mask (B, D), h_masked = h ⊙ mh (B, N, D); c0h0 and h as in s0_forward."""
    masked = (h_mask, h_masked) if h_mask is not None else ()
    _check("s0_backward", grad_u, c0h0, h, carry, grad_c0h0, *masked)
    total, n, d = h.numel(), h.shape[-2], h.shape[-1]
    check_extent(c0h0.numel())
    # Without the mask its two pointers are never read: carry stands in (a tensor, not None).
    mask_ptr, masked_ptr = (h_mask, h_masked) if h_mask is not None else (carry, carry)
    with on_device(h):
        _s0_backward_kernel[(cdiv(total, BLOCK),)](
            grad_u, c0h0, h, mask_ptr, carry, grad_c0h0, masked_ptr, total, n, d,
            HAS_MASK=h_mask is not None, BLOCK=BLOCK,
        )  # fmt: skip
