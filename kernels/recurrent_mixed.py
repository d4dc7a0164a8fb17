"""Triton kernels for the fused recurrent MixedOp (see fastdarts.ops.recurrent_mixed).

Each program takes BLOCK elements of the flattened (B, D) output and loops over the n
predecessors: the forward reads S, C, H once and writes out; the backward reads g, S, C, H
once and writes dS, dC, dH and its block's partial dP sums, which the launcher adds up in a
fixed order (no atomics, so results are deterministic). The two loops are jit functions
(:func:`_mixture`, :func:`_node_backward`) that the whole cell's fused kernels call on
their tiles (``kernels/recurrent_cell.py``). Imported only on first use on CUDA (or under
TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device
from .tiles import cdiv

K = 5
BLOCK = 512


@triton.jit
def _sigmoid(x):
    # exp of a non-positive argument only: no overflow in either tail.
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1 / (1 + e), e / (1 + e))


@triton.jit
def _tanh(x):
    e = tl.exp(-2 * tl.abs(x))
    t = (1 - e) / (1 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _mixture(S, CH, P, n, s_off, c_off, s_stride, c_stride, D, mask, acc):
    """acc + the node's output at s_off: Σ_i over its n predecessors of the mixture of state
    S[i] (at s_off + i·s_stride) with its projection [c, h] (CH at c_off + i·c_stride, h D
    after c). Offsets and mask of any shape: a block of the flat output, or a tile."""
    for i in range(n):
        p1 = tl.load(P + i * 5 + 1)
        p2 = tl.load(P + i * 5 + 2)
        p3 = tl.load(P + i * 5 + 3)
        p4 = tl.load(P + i * 5 + 4)
        s = tl.load(S + i * s_stride + s_off, mask=mask, other=0)
        c = tl.load(CH + i * c_stride + c_off, mask=mask, other=0)
        h = tl.load(CH + i * c_stride + c_off + D, mask=mask, other=0)
        sg = _sigmoid(c)
        f = p1 * _tanh(h) + p2 * tl.maximum(h, 0) + p3 * _sigmoid(h) + p4 * h
        acc += (1 - sg) * (p1 + p2 + p3 + p4) * s + sg * f
    return acc


@triton.jit
def _forward_kernel(S, CH, P, OUT, n, B, D, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < B * D
    b = j // D
    c_off = b * 2 * D + j - b * D
    acc = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    acc = _mixture(S, CH, P, n, j, c_off, B * D, B * 2 * D, D, mask, acc)
    tl.store(OUT + j, acc, mask=mask)


@triton.jit
def _part(DP_PART, pid, i, n, DP_STRIDE: tl.constexpr):
    """Where program pid's partial dP sums for predecessor i start: DP_STRIDE apart in the
    whole cell's buffer (E·5 for every node), or contiguous (DP_STRIDE 0). Computed where
    used: a pointer kept live over the loops gave the float64 kernel an 8-byte stack frame
    on sm_90 (triton 3.6)."""
    if DP_STRIDE > 0:
        return DP_PART + pid * DP_STRIDE + i * 5
    return DP_PART + (pid * n + i) * 5


@triton.jit
def _node_backward(
    g, S, CH, P, DS, DCH, DP_PART, block, n, s_off, c_off, s_stride, c_stride, D, mask,
    DP_STRIDE: tl.constexpr, ACCUMULATE: tl.constexpr,
):  # fmt: skip
    """The mixture's backward from its output gradient g (zero where masked), offsets as in
    :func:`_mixture`: writes dS (added to with ACCUMULATE) and dCH where S and CH are read,
    and dP's partial sums over g's elements as the block-th (see :func:`_part`)."""
    # Column 0 ('none') of the block's dP is zero, so the launcher's one sum over blocks is
    # the whole dP. (Stored in the loop below, triton 3.6 spilled the float64 kernel on sm_90.)
    for i in range(n):
        tl.store(_part(DP_PART, block, i, n, DP_STRIDE), 0.0)
    if ACCUMULATE:
        # dS added to the whole cell's state gradients in place, in a loop of its own: in the
        # main loop the extra load gave the float32 kernel a stack frame on sm_90 (triton 3.6).
        for i in range(n):
            t = tl.load(P + i * 5 + 1) + tl.load(P + i * 5 + 2) + tl.load(P + i * 5 + 3)
            t += tl.load(P + i * 5 + 4)
            so = i * s_stride + s_off
            c = tl.load(CH + i * c_stride + c_off, mask=mask, other=0)
            ds = tl.load(DS + so, mask=mask, other=0) + g * t * (1 - _sigmoid(c))
            tl.store(DS + so, ds, mask=mask)
    for i in range(n):
        p1 = tl.load(P + i * 5 + 1)
        p2 = tl.load(P + i * 5 + 2)
        p3 = tl.load(P + i * 5 + 3)
        p4 = tl.load(P + i * 5 + 4)
        t = p1 + p2 + p3 + p4
        so = i * s_stride + s_off
        co = i * c_stride + c_off
        s = tl.load(S + so, mask=mask, other=0)
        c = tl.load(CH + co, mask=mask, other=0)
        h = tl.load(CH + co + D, mask=mask, other=0)
        sg = _sigmoid(c)
        sh = _sigmoid(h)
        th = _tanh(h)
        rl = tl.maximum(h, 0)
        f = p1 * th + p2 * rl + p3 * sh + p4 * h
        if not ACCUMULATE:
            tl.store(DS + so, g * t * (1 - sg), mask=mask)
        tl.store(DCH + co, g * sg * (1 - sg) * (f - t * s), mask=mask)
        df = p1 * (1 - th * th) + p2 * (h > 0).to(h.dtype) + p3 * sh * (1 - sh) + p4
        tl.store(DCH + co + D, g * sg * df, mask=mask)
        gs = g * s
        gsg = g * sg
        part = _part(DP_PART, block, i, n, DP_STRIDE)
        tl.store(part + 1, tl.sum(gs + gsg * (th - s)))
        tl.store(part + 2, tl.sum(gs + gsg * (rl - s)))
        tl.store(part + 3, tl.sum(gs + gsg * (sh - s)))
        tl.store(part + 4, tl.sum(gs + gsg * (h - s)))


@triton.jit
def _backward_kernel(G, S, CH, P, DS, DCH, DP_PART, n, B, D, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    mask = j < B * D
    b = j // D
    c_off = b * 2 * D + j - b * D
    g = tl.load(G + j, mask=mask, other=0)  # zero past the end: adds nothing to dP
    _node_backward(
        g, S, CH, P, DS, DCH, DP_PART, pid, n, j, c_off, B * D, B * 2 * D, D, mask, 0, False
    )


def forward(
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out (B, D) from states (n, B, D), ch (n, B, 2D), probs (n, 5); ``out`` if given
    (contiguous) receives the result, every element written."""
    states, ch, probs = states.contiguous(), ch.contiguous(), probs.contiguous()
    n, b, d = states.shape
    check_extent(ch.numel())  # the largest: n·B·2D
    out = states.new_empty(b, d) if out is None else out
    with on_device(states):
        _forward_kernel[(cdiv(b * d, BLOCK),)](states, ch, probs, out, n, b, d, BLOCK=BLOCK)
    return out


def backward(
    grad: torch.Tensor,
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dstates (n, B, D), dch (n, B, 2D), dprobs (n, 5)) for grad (B, D); ``out`` if given
    (contiguous dstates, dch) receives the first two, every element written."""
    grad, states, ch = grad.contiguous(), states.contiguous(), ch.contiguous()
    probs = probs.contiguous()
    n, b, d = states.shape
    check_extent(ch.numel())
    d_states, d_ch = (torch.empty_like(states), torch.empty_like(ch)) if out is None else out
    if not (d_states.is_contiguous() and d_ch.is_contiguous()):
        raise ValueError("recurrent_mixed.backward: d_states and d_ch must be contiguous")
    if d_states.shape != states.shape or d_ch.shape != ch.shape:
        raise ValueError("recurrent_mixed.backward: d_states and d_ch must match states and ch")
    blocks = cdiv(b * d, BLOCK)
    parts = states.new_empty(blocks, n, K)  # each program's partial dP sums
    with on_device(states):
        _backward_kernel[(blocks,)](
            grad, states, ch, probs, d_states, d_ch, parts, n, b, d, BLOCK=BLOCK
        )
    return d_states, d_ch, parts.sum(0)
