"""Triton kernels for the whole-cell op's states (see fastdarts.ops.recurrent_cell).

Each state of a time step is a BatchNorm of an input computed from the step's tensors: s0's
u = h + σ(c0)·(tanh(h0) − h) from [c0, h0] and the previous hidden state h, a node's the
mixture of its predecessors (``kernels/recurrent_mixed.py``). Both arrive as a (B, N·D)
matrix (rows b·N + k: the N weight samples interleaved; BatchNorm's statistics per column).
One launch per state and pass computes the input, its statistics, the normalised output,
the running statistics' update and the masked copy the next projections read; its backward
one launch too, BatchNorm's gradient with the input's (for a node, dS added in place and
dP's partial sums per tile), reading the state's gradient as two parts: the direct one and,
with the hidden mask, the projections' (of the masked state) times the mask. Before, a
state took three launches forward besides its projection (the mixture's or u's kernel,
torch's BatchNorm, the mask's mul) and two backward (torch's BatchNorm backward, then the
mixture's or u's), and a node's projection gradient with the mask an addcmul more.

A program owns a block of columns and all B rows, so the statistics need no second launch:
the rows in chunks of up to 256 (the search's batch is one chunk), the columns TILE / rows
wide. At the paper's size that is 75 programs of 16 warps (150 with the w± passes batched),
against the node op's 150 of 4 and an H100's 132 SMs.

Around the states, each time step's remaining elementwise work is one launch each way:
the hidden state (the mean of the states after s0) with its masked copy for the next
step's projection, and a backward step's start (the states' gradients from ∂L/∂h_t and
what the next step carried). Imported only on first use on CUDA (or under
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device
from .recurrent_mixed import K, _mixture, _node_backward, _sigmoid, _tanh
from .tiles import cdiv

# A program's tile: up to MAX_ROWS rows of a BatchNorm input by TILE // rows columns.
TILE, MAX_ROWS = 1024, 256


@triton.jit
def _tile(q, B, ND, D, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """Row chunk q of the program's columns of a (B, N·D) BatchNorm input: offsets into
    it, into a (B·N, 2D) projection ([c, h] per row b·N + k) and into a (B, D) mask shared
    by the N samples, and which elements are in range."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    rows = q * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    k = cols // D
    ok = (rows < B) & (cols < ND)[None, :]
    return (rows * ND + cols[None, :], rows * 2 * ND + (cols + k * D)[None, :],
            rows * D + (cols - k * D)[None, :], ok)  # fmt: skip


@triton.jit
def _normalized_store(x, mean, invstd, Y, HMASK, MASKED, off, ok, HAS_MASK: tl.constexpr):
    y = (x - mean[None, :]) * invstd[None, :]
    tl.store(Y + off, y, mask=ok)
    if HAS_MASK:
        tl.store(MASKED + off, y * tl.load(HMASK + off, mask=ok, other=0), mask=ok)


@triton.jit
def _bn_forward_kernel(
    S, CH, P, Y, INVSTD, MEAN, RM, RV, HMASK, MASKED, n, B, ND, D, factor: tl.float64,
    eps: tl.float64, S0: tl.constexpr, TRAINING: tl.constexpr, UPDATE: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < ND
    dtype = Y.dtype.element_ty
    if TRAINING:
        # Pass 1: x into Y, and per column its mean and sum of squared deviations, each row
        # chunk's two-pass values merged into the running ones (Chan et al.'s update).
        mean = tl.zeros([BLOCK_C], dtype=dtype)
        m2 = tl.zeros([BLOCK_C], dtype=dtype)
        for q in range(tl.cdiv(B, BLOCK_B)):
            off, c_off, _, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
            x = _input(S, CH, P, n, off, c_off, ok, ND, B, D, S0, BLOCK_B, BLOCK_C, dtype)
            tl.store(Y + off, x, mask=ok)
            rows = tl.minimum(B - q * BLOCK_B, BLOCK_B).to(dtype)
            chunk_mean = tl.sum(x, axis=0) / rows
            dev = tl.where(ok, x - chunk_mean[None, :], 0)
            chunk_m2 = tl.sum(dev * dev, axis=0)
            total = q * BLOCK_B + rows
            delta = chunk_mean - mean
            mean += delta * rows / total
            m2 += chunk_m2 + delta * delta * (q * BLOCK_B) * rows / total
        invstd = (1 / tl.sqrt(m2 / B + eps)).to(dtype)
        tl.store(INVSTD + cols, invstd, mask=col_ok)
        if UPDATE:  # torch's formulas: the unbiased variance into the running one
            rm = tl.load(RM + cols, mask=col_ok, other=0)
            rv = tl.load(RV + cols, mask=col_ok, other=0)
            tl.store(RM + cols, factor * mean + (1 - factor) * rm, mask=col_ok)
            tl.store(RV + cols, factor * (m2 / (B - 1)) + (1 - factor) * rv, mask=col_ok)
        # Pass 2 reads what other threads of the program wrote in pass 1.
        tl.debug_barrier()
        for q in range(tl.cdiv(B, BLOCK_B)):
            off, c_off, _, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
            x = tl.load(Y + off, mask=ok, other=0)
            _normalized_store(x, mean, invstd, Y, HMASK, MASKED, off, ok, HAS_MASK)
    else:  # the running statistics: MEAN and INVSTD given, one pass
        mean = tl.load(MEAN + cols, mask=col_ok, other=0)
        invstd = tl.load(INVSTD + cols, mask=col_ok, other=0)
        for q in range(tl.cdiv(B, BLOCK_B)):
            off, c_off, _, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
            x = _input(S, CH, P, n, off, c_off, ok, ND, B, D, S0, BLOCK_B, BLOCK_C, dtype)
            _normalized_store(x, mean, invstd, Y, HMASK, MASKED, off, ok, HAS_MASK)


@triton.jit
def _input(S, CH, P, n, off, c_off, ok, ND, B, D, S0: tl.constexpr, BLOCK_B: tl.constexpr,
           BLOCK_C: tl.constexpr, dtype):  # fmt: skip
    """The BatchNorm's input at a tile: s0's u from [c0, h0] (CH) and h (S), or the node's
    mixture of its n states (S) and projections (CH); zero where masked."""
    if S0:
        c = tl.load(CH + c_off, mask=ok, other=0)
        h0 = tl.load(CH + c_off + D, mask=ok, other=0)
        h = tl.load(S + off, mask=ok, other=0)
        x = h + _sigmoid(c) * (_tanh(h0) - h)
    else:
        x = _mixture(S, CH, P, n, off, c_off, B * ND, B * 2 * ND, D, ok,
                     tl.zeros([BLOCK_B, BLOCK_C], dtype=dtype))  # fmt: skip
    return tl.where(ok, x, 0)  # the mixture is not zero where its inputs were masked


@triton.jit
def _grad(G, GM, MASK, off, m_off, ok, HAS_MASK: tl.constexpr):
    """A state's gradient at a tile: G's, plus with the hidden mask GM's ⊙ mask (GM: the
    gradient of the masked state, which the next projections read)."""
    g = tl.load(G + off, mask=ok, other=0)
    if HAS_MASK:
        g += tl.load(GM + off, mask=ok, other=0) * tl.load(MASK + m_off, mask=ok, other=0)
    return g


@triton.jit
def _bn_grad_means(G, GM, MASK, Y, B, ND, D, TRAINING: tl.constexpr, HAS_MASK: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    """Per column of the program's, the means over the batch of g and g·y (g as
    :func:`_grad` reads it, y the BatchNorm's output), which its backward subtracts; zeros
    in evaluation."""
    mg = tl.zeros([BLOCK_C], dtype=Y.dtype.element_ty)
    mgy = tl.zeros([BLOCK_C], dtype=Y.dtype.element_ty)
    if TRAINING:
        for q in range(tl.cdiv(B, BLOCK_B)):
            off, _, m_off, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
            g = _grad(G, GM, MASK, off, m_off, ok, HAS_MASK)
            mg += tl.sum(g, axis=0)
            mgy += tl.sum(g * tl.load(Y + off, mask=ok, other=0), axis=0)
        mg /= B
        mgy /= B
    return mg, mgy


@triton.jit
def _bn_grad(G, GM, MASK, Y, off, m_off, ok, mg, mgy, invstd, TRAINING: tl.constexpr,
             HAS_MASK: tl.constexpr):  # fmt: skip
    """The BatchNorm input's gradient at a tile from its output's, g (:func:`_grad`):
    invstd·(g − mean(g) − y·mean(g·y)) in training, invstd·g in evaluation; zero where out
    of range."""
    g = _grad(G, GM, MASK, off, m_off, ok, HAS_MASK)
    if TRAINING:
        g = g - mg[None, :] - tl.load(Y + off, mask=ok, other=0) * mgy[None, :]
    return tl.where(ok, g * invstd[None, :], 0)


@triton.jit
def _node_bn_backward_kernel(
    G, GM, MASK, Y, INVSTD, S, CH, P, DS, DCH, DP_PART, n, B, ND, D, DP_STRIDE: tl.constexpr,
    TRAINING: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    invstd = tl.load(INVSTD + cols, mask=cols < ND, other=0)
    mg, mgy = _bn_grad_means(G, GM, MASK, Y, B, ND, D, TRAINING, HAS_MASK, BLOCK_B, BLOCK_C)
    chunks = tl.cdiv(B, BLOCK_B)
    for q in range(chunks):
        off, c_off, m_off, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
        gx = _bn_grad(G, GM, MASK, Y, off, m_off, ok, mg, mgy, invstd, TRAINING, HAS_MASK)
        _node_backward(
            gx, S, CH, P, DS, DCH, DP_PART, tl.program_id(0) * chunks + q, n, off, c_off,
            B * ND, B * 2 * ND, D, ok, DP_STRIDE, True,
        )  # fmt: skip


@triton.jit
def _s0_bn_backward_kernel(
    G, GM, MASK, Y, INVSTD, C0H0, H, CARRY, GXP, B, ND, D, TRAINING: tl.constexpr,
    HAS_MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    invstd = tl.load(INVSTD + cols, mask=cols < ND, other=0)
    mg, mgy = _bn_grad_means(G, GM, MASK, Y, B, ND, D, TRAINING, HAS_MASK, BLOCK_B, BLOCK_C)
    for q in range(tl.cdiv(B, BLOCK_B)):
        off, c_off, m_off, ok = _tile(q, B, ND, D, BLOCK_B, BLOCK_C)
        gu = _bn_grad(G, GM, MASK, Y, off, m_off, ok, mg, mgy, invstd, TRAINING, HAS_MASK)
        c = tl.load(C0H0 + c_off, mask=ok, other=0)
        h0 = tl.load(C0H0 + c_off + D, mask=ok, other=0)
        h = tl.load(H + off, mask=ok, other=0)
        sg = _sigmoid(c)
        th = _tanh(h0)
        tl.store(CARRY + off, gu * (1 - sg), mask=ok)
        tl.store(GXP + c_off, gu * (th - h) * sg * (1 - sg), mask=ok)
        tl.store(GXP + c_off + D, gu * sg * (1 - th * th), mask=ok)


# Per time step, around the states: one launch each, where torch ops took two to four.
STEP_BLOCK = 512


@triton.jit
def _hidden_kernel(STATES, H, HM, MASK, S, total, ND, D, HAS_MASK: tl.constexpr,
                   BLOCK: tl.constexpr):  # fmt: skip
    """h = the mean of the S states after s0 ((S, B, N, D) at STATES), and with the mask
    h ⊙ mh for the next step's projection."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < total
    acc = tl.zeros([BLOCK], dtype=H.dtype.element_ty)
    for k in range(S):
        acc += tl.load(STATES + k * total + j, mask=ok, other=0)
    h = acc / S
    tl.store(H + j, h, mask=ok)
    if HAS_MASK:
        b = j // ND
        m = tl.load(MASK + b * D + j - (j // D) * D, mask=ok, other=0)
        tl.store(HM + j, h * m, mask=ok)


@triton.jit
def _step_grads_kernel(GRAD, CARRY, GC, MASK, GS, GM, S, total, ND, D, HAS_MASK: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """The states' gradients at the start of a backward step: g = ∂L/∂h_t (GRAD, from the
    output, plus CARRY and, with the mask, GC ⊙ mh from the next step), each of the S states
    after s0 g / S and s0 0 (GS (S+1, B, N, D)); with the mask GM (same shape) zeroed."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = j < total
    g = tl.load(GRAD + j, mask=ok, other=0) + tl.load(CARRY + j, mask=ok, other=0)
    if HAS_MASK:
        b = j // ND
        m = tl.load(MASK + b * D + j - (j // D) * D, mask=ok, other=0)
        g += tl.load(GC + j, mask=ok, other=0) * m
    g = g / S
    tl.store(GS + j, tl.zeros_like(g), mask=ok)
    for k in range(1, S + 1):
        tl.store(GS + k * total + j, g, mask=ok)
    if HAS_MASK:
        for k in range(S + 1):
            tl.store(GM + k * total + j, tl.zeros_like(g), mask=ok)


def _check(name: str, *tensors: torch.Tensor) -> None:
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError(f"recurrent_cell.{name}: every tensor must be contiguous")
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"recurrent_cell.{name}: tensors of one dtype, got mixed dtypes")


def tiles(b: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_C): a program's tile, rows by columns, of a (B, N·D) BatchNorm input.
    Each program owns BLOCK_C columns, so their statistics need no second launch: all B
    rows of them in one chunk up to 256 (the search's batch), more in chunks of 256."""
    block_b = min(1 << (b - 1).bit_length(), MAX_ROWS)
    return block_b, TILE // block_b


def tile_options(b: int) -> dict[str, int]:
    """The launch options for a batch of b: the tile's constexprs and the warps that run it.
    16 warps: two elements a thread. With 4, ptxas spilled the node forward (float32,
    sm_90, triton 3.8); with 8, the node backward took 80 and 128 registers (triton 3.8,
    3.6) and s0's float64 backward spilled (3.6); with 16 each takes at most 64 in float32
    and none spills (benchmarks/triton_resources.py). The grid is about one program per SM,
    so register occupancy does not limit it."""
    block_b, block_c = tiles(b)
    return {"BLOCK_B": block_b, "BLOCK_C": block_c, "num_warps": 16}


def bn_blocks(b: int, nd: int) -> int:
    """Tiles per launch for a (B, N·D) BatchNorm input: the node backward's partial dP
    sums' first dim."""
    block_b, block_c = tiles(b)
    return cdiv(nd, block_c) * cdiv(b, block_b)


def _bn_forward(s, ch, probs, n, out, invstd, mean, running, factor, eps, training, h_mask,
                masked, s0) -> None:  # fmt: skip
    mask = (h_mask, masked) if h_mask is not None else ()
    given = (mean,) if not training else running if running is not None else ()
    _check("bn_forward", s, ch, probs, out, invstd, *given, *mask)
    b, nd = out.shape
    d = s.shape[-1]
    if invstd.shape != (nd,) or any(t.shape != (nd,) for t in given):
        raise ValueError(f"recurrent_cell.bn_forward: statistics must be ({nd},)")
    check_extent(ch.numel())
    options = tile_options(b)
    # Pointers never read stand in for what is not given (a tensor, not None).
    mean = invstd if training else mean
    rm, rv = running if training and running is not None else (invstd, invstd)
    h_mask, masked = (h_mask, masked) if h_mask is not None else (out, out)
    with on_device(out):
        _bn_forward_kernel[(cdiv(nd, options["BLOCK_C"]),)](
            s, ch, probs, out, invstd, mean, rm, rv, h_mask, masked, n, b, nd, d, factor, eps,
            S0=s0, TRAINING=training, UPDATE=training and running is not None,
            HAS_MASK=mask != (), **options,
        )  # fmt: skip


def node_bn_forward(
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    out: torch.Tensor,
    invstd: torch.Tensor,
    *,
    training: bool,
    mean: torch.Tensor | None = None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    factor: float = 0.0,
    eps: float = 1e-5,
    h_mask: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
) -> None:
    """A node of the cell, fused: the mixture of states (n, B·N, D) and their projections
    ch (n, B·N, 2D) (rows b·N + k: N weight samples interleaved) with probs (n, 5), its
    BatchNorm over the batch per sample's feature, out = the normalised (B, N·D). Training:
    the batch statistics, invstd (N·D) written and, with ``running`` (mean, var), those
    updated with ``factor`` as torch's BatchNorm does; evaluation: ``mean`` and ``invstd``
    given. With h_mask (B, N·D), masked = out ⊙ h_mask too."""
    _bn_forward(states, ch, probs, states.shape[0], out, invstd, mean, running, factor, eps,
                training, h_mask, masked, s0=False)  # fmt: skip


def s0_bn_forward(
    c0h0: torch.Tensor,
    h: torch.Tensor,
    out: torch.Tensor,
    invstd: torch.Tensor,
    *,
    training: bool,
    mean: torch.Tensor | None = None,
    running: tuple[torch.Tensor, torch.Tensor] | None = None,
    factor: float = 0.0,
    eps: float = 1e-5,
    h_mask: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
) -> None:
    """The first state, fused: u = h + σ(c0)·(tanh(h0) − h) from c0h0 (B, N, 2D) = [c0, h0]
    and h (B, N, D), then its BatchNorm and mask as in :func:`node_bn_forward`."""
    _bn_forward(h, c0h0, c0h0, 1, out, invstd, mean, running, factor, eps, training, h_mask,
                masked, s0=True)  # fmt: skip


def node_bn_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    invstd: torch.Tensor,
    states: torch.Tensor,
    ch: torch.Tensor,
    probs: torch.Tensor,
    d_states: torch.Tensor,
    d_ch: torch.Tensor,
    parts: torch.Tensor,
    *,
    training: bool,
    grad_masked: torch.Tensor | None = None,
    h_mask: torch.Tensor | None = None,
) -> None:
    """:func:`node_bn_forward`'s backward from ∂L/∂out ``grad`` (B, N·D) (plus, with h_mask
    (B, D), grad_masked ⊙ h_mask: the gradient of out ⊙ h_mask, (B, N·D)), its output y and
    invstd: dS added to d_states (n, B·N, D), dCH written to d_ch (n, B·N, 2D), dP's partial
    sums to ``parts`` (bn_blocks(B, N·D), n, 5), rows 5 apart and tiles at least n·5 apart
    (a slice of the whole cell's buffer)."""
    masked = (grad_masked, h_mask) if h_mask is not None else ()
    _check("node_bn_backward", grad, y, invstd, states, ch, probs, d_states, d_ch, *masked)
    n, b, nd = states.shape[0], *grad.shape
    if d_states.shape != states.shape or d_ch.shape != ch.shape:
        raise ValueError(
            "recurrent_cell.node_bn_backward: d_states and d_ch must match states and ch"
        )
    blocks = bn_blocks(b, nd)
    apart = parts.shape[0] == 1 or parts.stride(0) >= n * K
    if parts.shape != (blocks, n, K) or parts.stride()[1:] != (K, 1) or not apart:
        raise ValueError(
            f"recurrent_cell.node_bn_backward: parts must be ({blocks}, {n}, {K}) with rows "
            f"{K} apart and tiles at least {n * K} apart, got {tuple(parts.shape)} strided "
            f"{parts.stride()}"
        )
    check_extent(ch.numel())
    options = tile_options(b)
    # Without the mask its two pointers are never read: grad stands in (a tensor, not None).
    gm, mask = masked or (grad, grad)
    with on_device(grad):
        _node_bn_backward_kernel[(cdiv(nd, options["BLOCK_C"]),)](
            grad, gm, mask, y, invstd, states, ch, probs, d_states, d_ch, parts, n, b, nd,
            states.shape[-1], DP_STRIDE=0 if parts.stride(0) == n * K else parts.stride(0),
            TRAINING=training, HAS_MASK=h_mask is not None, **options,
        )  # fmt: skip


def s0_bn_backward(
    grad: torch.Tensor,
    y: torch.Tensor,
    invstd: torch.Tensor,
    c0h0: torch.Tensor,
    h: torch.Tensor,
    carry: torch.Tensor,
    grad_c0h0: torch.Tensor,
    *,
    training: bool,
    grad_masked: torch.Tensor | None = None,
    h_mask: torch.Tensor | None = None,
) -> None:
    """:func:`s0_bn_forward`'s backward from ∂L/∂out ``grad`` (B, N·D) (plus, with h_mask
    (B, D), grad_masked ⊙ h_mask as in :func:`node_bn_backward`), its output y and invstd:
    writes carry = ∂L/∂h through u (B, N, D) and grad_c0h0 (B, N, 2D); c0h0 and h as in
    s0_bn_forward."""
    masked = (grad_masked, h_mask) if h_mask is not None else ()
    _check("s0_bn_backward", grad, y, invstd, c0h0, h, carry, grad_c0h0, *masked)
    b, nd = grad.shape
    check_extent(c0h0.numel())
    options = tile_options(b)
    # Without the mask its pointers are never read: carry stands in (a tensor, not None).
    gm, mask = masked or (carry, carry)
    with on_device(grad):
        _s0_bn_backward_kernel[(cdiv(nd, options["BLOCK_C"]),)](
            grad, gm, mask, y, invstd, c0h0, h, carry, grad_c0h0, b, nd, h.shape[-1],
            TRAINING=training, HAS_MASK=h_mask is not None, **options,
        )  # fmt: skip


def hidden_out(
    states: torch.Tensor,
    out: torch.Tensor,
    h_mask: torch.Tensor | None = None,
    masked: torch.Tensor | None = None,
) -> None:
    """out (B, N, D) = the mean of states (S, B, N, D); with h_mask (B, D), masked (B, N, D)
    = out ⊙ h_mask too."""
    mask = (h_mask, masked) if h_mask is not None else ()
    _check("hidden_out", states, out, *mask)
    total, nd, d = out.numel(), out.shape[-2] * out.shape[-1], out.shape[-1]
    check_extent(states.numel())
    mask_ptr, masked_ptr = mask or (out, out)  # never read without the mask
    with on_device(out):
        _hidden_kernel[(cdiv(total, STEP_BLOCK),)](
            states, out, masked_ptr, mask_ptr, states.shape[0], total, nd, d,
            HAS_MASK=h_mask is not None, BLOCK=STEP_BLOCK,
        )  # fmt: skip


def step_grads(
    grad: torch.Tensor,
    carry: torch.Tensor,
    gs: torch.Tensor,
    *,
    carry_masked: torch.Tensor | None = None,
    h_mask: torch.Tensor | None = None,
    gm: torch.Tensor | None = None,
) -> None:
    """A backward step's start: gs (S+1, B, N, D) = [0, g/S, …, g/S] for g = grad + carry
    (+ carry_masked ⊙ h_mask, with h_mask (B, D)), all (B, N, D); with the mask gm (S+1, B,
    N, D) zeroed too (the gradients of the masked states, which the step accumulates)."""
    mask = (carry_masked, h_mask, gm) if h_mask is not None else ()
    _check("step_grads", grad, carry, gs, *mask)
    total, nd, d = grad.numel(), grad.shape[-2] * grad.shape[-1], grad.shape[-1]
    check_extent(gs.numel())
    gc, mask_ptr, gm_ptr = mask or (grad, grad, grad)  # never read without the mask
    with on_device(grad):
        _step_grads_kernel[(cdiv(total, STEP_BLOCK),)](
            grad, carry, gc, mask_ptr, gs, gm_ptr, gs.shape[0] - 1, total, nd, d,
            HAS_MASK=h_mask is not None, BLOCK=STEP_BLOCK,
        )  # fmt: skip
