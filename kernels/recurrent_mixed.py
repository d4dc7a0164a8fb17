"""Triton kernels for the fused recurrent MixedOp (see fastdarts.ops.recurrent_mixed).

Each program takes BLOCK elements of the flattened (B, D) output and loops over the n
predecessors: the forward reads S, C, H once and writes out; the backward reads g, S, C, H
once and writes dS, dC, dH and its block's partial dP sums, which the launcher adds up in a
fixed order (no atomics, so results are deterministic). Imported only on first use on CUDA
(or under TRITON_INTERPRET=1 in the tests).
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
def _forward_kernel(S, CH, P, OUT, n, B, D, BLOCK: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = j < B * D
    b = j // D
    d = j - b * D
    acc = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    for i in range(n):
        p1 = tl.load(P + i * 5 + 1)
        p2 = tl.load(P + i * 5 + 2)
        p3 = tl.load(P + i * 5 + 3)
        p4 = tl.load(P + i * 5 + 4)
        s = tl.load(S + i * B * D + j, mask=mask, other=0)
        c = tl.load(CH + (i * B + b) * 2 * D + d, mask=mask, other=0)
        h = tl.load(CH + (i * B + b) * 2 * D + D + d, mask=mask, other=0)
        sg = _sigmoid(c)
        f = p1 * _tanh(h) + p2 * tl.maximum(h, 0) + p3 * _sigmoid(h) + p4 * h
        acc += (1 - sg) * (p1 + p2 + p3 + p4) * s + sg * f
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
def _backward_kernel(
    G, S, CH, P, DS, DCH, DP_PART, n, B, D, DP_STRIDE: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    mask = j < B * D
    b = j // D
    d = j - b * D
    g = tl.load(G + j, mask=mask, other=0)  # zero past the end: adds nothing to dP
    # Column 0 ('none') of the block's dP is zero, so the launcher's one sum over blocks is
    # the whole dP. (Stored in the loop below, triton 3.6 spilled the float64 kernel on sm_90.)
    for i in range(n):
        tl.store(_part(DP_PART, pid, i, n, DP_STRIDE), 0.0)
    if ACCUMULATE:
        # dS added to the whole cell's state gradients in place, in a loop of its own: in the
        # main loop the extra load gave the float32 kernel a stack frame on sm_90 (triton 3.6).
        for i in range(n):
            t = tl.load(P + i * 5 + 1) + tl.load(P + i * 5 + 2) + tl.load(P + i * 5 + 3)
            t += tl.load(P + i * 5 + 4)
            so = i * B * D + j
            c = tl.load(CH + (i * B + b) * 2 * D + d, mask=mask, other=0)
            ds = tl.load(DS + so, mask=mask, other=0) + g * t * (1 - _sigmoid(c))
            tl.store(DS + so, ds, mask=mask)
    for i in range(n):
        p1 = tl.load(P + i * 5 + 1)
        p2 = tl.load(P + i * 5 + 2)
        p3 = tl.load(P + i * 5 + 3)
        p4 = tl.load(P + i * 5 + 4)
        t = p1 + p2 + p3 + p4
        so = i * B * D + j
        co = (i * B + b) * 2 * D + d
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
        part = _part(DP_PART, pid, i, n, DP_STRIDE)
        tl.store(part + 1, tl.sum(gs + gsg * (th - s), axis=0))
        tl.store(part + 2, tl.sum(gs + gsg * (rl - s), axis=0))
        tl.store(part + 3, tl.sum(gs + gsg * (sh - s), axis=0))
        tl.store(part + 4, tl.sum(gs + gsg * (h - s), axis=0))


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


def blocks(b: int, d: int) -> int:
    """Programs per launch for a (B, D) output: the partial dP sums' first dim."""
    return cdiv(b * d, BLOCK)


def backward(
    grad: torch.Tensor,
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dstates (n, B, D), dch (n, B, 2D), dprobs (n, 5)) for grad (B, D); ``out`` if given
    (contiguous dstates, dch) receives the first two, every element written."""
    n, b, d = states.shape
    d_states, d_ch = (torch.empty_like(states), torch.empty_like(ch)) if out is None else out
    parts = states.new_empty(blocks(b, d), n, K)
    backward_into(grad, states, ch, probs, d_states, d_ch, parts)
    return d_states, d_ch, parts.sum(0)


def backward_into(
    grad: torch.Tensor,
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    d_states: torch.Tensor,
    d_ch: torch.Tensor,
    parts: torch.Tensor,
    accumulate: bool = False,
) -> None:
    """:func:`backward` into given tensors: d_states (n, B, D) (added to with
    ``accumulate``), d_ch (n, B, 2D), both contiguous, and dP's partial sums per program
    ``parts`` (blocks(B, D), n, 5), a view whose rows may be apart (a slice of a larger
    buffer: the whole cell sums every node's and step's at once)."""
    grad, states, ch = grad.contiguous(), states.contiguous(), ch.contiguous()
    probs = probs.contiguous()
    n, b, d = states.shape
    check_extent(ch.numel())
    if not (d_states.is_contiguous() and d_ch.is_contiguous()):
        raise ValueError("recurrent_mixed.backward: d_states and d_ch must be contiguous")
    if d_states.shape != states.shape or d_ch.shape != ch.shape:
        raise ValueError("recurrent_mixed.backward: d_states and d_ch must match states and ch")
    # Each program's n rows of K, apart from the next program's (no overlap, no expansion).
    apart = parts.shape[0] == 1 or parts.stride(0) >= n * K
    if parts.shape != (blocks(b, d), n, K) or parts.stride()[1:] != (K, 1) or not apart:
        raise ValueError(
            f"recurrent_mixed.backward: parts must be ({blocks(b, d)}, {n}, {K}) with rows "
            f"{K} apart and programs at least {n * K} apart, got {tuple(parts.shape)} strided "
            f"{parts.stride()}"
        )
    with on_device(states):
        _backward_kernel[(blocks(b, d),)](
            grad, states, ch, probs, d_states, d_ch, parts, n, b, d,
            DP_STRIDE=0 if parts.stride(0) == n * K else parts.stride(0),
            ACCUMULATE=accumulate, BLOCK=BLOCK,
        )  # fmt: skip
