"""Triton kernels for depthwise convolutions of several shapes at once (see
fastdarts.ops.conv_mixed.depthwise): the first stage of a group's four conv ops (3×3 and
5×5, dilation 1 and 2) in one launch each way, where torch runs one convolution per shape,
a concatenation, and in the backward one input-gradient convolution, padding and sum per
shape.

x (N, Cin, H, W); shape t (at most 4) has weights (S, Ch_t, 1, K_t, K_t), padding, dilation
and the first input channel it reads; output channel o of shape t (c = o − its first output
channel) reads input channel OFF_t + c; one stride; ``relu``: the shapes read relu(x). The
S weight samples (the batched w± passes' w⁺ and w⁻; S = 1 otherwise) split the N rows: row
n takes sample (n // VDIV) mod S, and sample v's rows are v·VDIV + b·BSTEP for b < N / S
(sample-major: VDIV = N / S, BSTEP = 1; interleaved, as torch's batched convolutions leave
them: VDIV = 1, BSTEP = S).

- forward: one program per (b, o, block of output pixels), the taps of o's shape unrolled
  (K and dilation are constexprs per shape);
- d_x: one program per (b, input channel, block of input pixels), gathering from the output
  gradient of every shape that reads the channel (written once: no padding, no sum of
  per-shape tensors), then relu's mask;
- d_w: one program per (output channel, kernel row, sample), the row's taps as one 2-D tile
  over (tap, pixel), reduced over the sample's rows and the pixels in a fixed order (no
  atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device
from .tiles import cdiv, plane_block

BLOCK = 128
MAX_SHAPES = 4


@triton.jit
def _forward_taps(X, Wt, xbase, wr, oy, ox, mask, H, W, pad, acc, K: tl.constexpr,
                  DIL: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr):  # fmt: skip
    # wr: the weight row (sample v's channel c: v·Ch + c).
    for i in tl.static_range(K):
        iy = oy * STRIDE - pad + i * DIL
        row = mask & (iy >= 0) & (iy < H)
        for j in tl.static_range(K):
            ix = ox * STRIDE - pad + j * DIL
            v = tl.load(X + xbase + iy * W + ix, mask=row & (ix >= 0) & (ix < W), other=0)
            if RELU:
                v = tl.where(v < 0, 0, v)  # NaN stays NaN, as torch's relu
            acc += tl.load(Wt + wr * (K * K) + i * K + j) * v
    return acc


@triton.jit
def _forward_kernel(
    X, W0, W1, W2, W3, OUT, CIN, H, W, COUT, HO, WO, S, VDIV,
    E1, E2, E3, OFF0, OFF1, OFF2, OFF3, P0, P1, P2, P3,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    STRIDE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, o, p, mask, oy, ox = plane_block(COUT, WO, HO * WO, BLOCK)
    sv = (b // VDIV) % S  # the row's weight sample
    acc = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    plane = H * W
    if o < E1:
        xb = (b * CIN + OFF0 + o) * plane
        wr = sv * E1 + o
        acc = _forward_taps(X, W0, xb, wr, oy, ox, mask, H, W, P0, acc, K0, D0, STRIDE, RELU)
    elif o < E2:
        c = o - E1
        xb = (b * CIN + OFF1 + c) * plane
        wr = sv * (E2 - E1) + c
        acc = _forward_taps(X, W1, xb, wr, oy, ox, mask, H, W, P1, acc, K1, D1, STRIDE, RELU)
    elif o < E3:
        c = o - E2
        xb = (b * CIN + OFF2 + c) * plane
        wr = sv * (E3 - E2) + c
        acc = _forward_taps(X, W2, xb, wr, oy, ox, mask, H, W, P2, acc, K2, D2, STRIDE, RELU)
    else:
        c = o - E3
        xb = (b * CIN + OFF3 + c) * plane
        wr = sv * (COUT - E3) + c
        acc = _forward_taps(X, W3, xb, wr, oy, ox, mask, H, W, P3, acc, K3, D3, STRIDE, RELU)
    tl.store(OUT + (b * COUT + o) * (HO * WO) + p, acc, mask=mask)


@triton.jit
def _gather_taps(G, Wt, gbase, wr, y, x, mask, HO, WO, pad, acc, K: tl.constexpr,
                 DIL: tl.constexpr, STRIDE: tl.constexpr):  # fmt: skip
    # d_x[y, x] += Σ_{i,j} w[c, i, j] · g[oy, ox] over the taps with oy·S − pad + i·D = y.
    for i in tl.static_range(K):
        ty = y + pad - i * DIL
        tyc = tl.where(ty >= 0, ty, 0)
        oy = tyc // STRIDE
        row = mask & (ty >= 0) & (tyc - oy * STRIDE == 0) & (oy < HO)
        for j in tl.static_range(K):
            tx = x + pad - j * DIL
            txc = tl.where(tx >= 0, tx, 0)
            ox = txc // STRIDE
            m = row & (tx >= 0) & (txc - ox * STRIDE == 0) & (ox < WO)
            g = tl.load(G + gbase + oy * WO + ox, mask=m, other=0)
            acc += tl.load(Wt + wr * (K * K) + i * K + j) * g
    return acc


@triton.jit
def _grad_x_kernel(
    G, X, W0, W1, W2, W3, DX, CIN, H, W, COUT, HO, WO, S, VDIV,
    E1, E2, E3, OFF0, OFF1, OFF2, OFF3, P0, P1, P2, P3,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    STRIDE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, ci, p, mask, y, x = plane_block(CIN, W, H * W, BLOCK)
    sv = (b // VDIV) % S
    acc = tl.zeros([BLOCK], dtype=DX.dtype.element_ty)
    out_plane = HO * WO
    c = ci - OFF0
    if (c >= 0) & (c < E1):
        gb = (b * COUT + c) * out_plane
        acc = _gather_taps(G, W0, gb, sv * E1 + c, y, x, mask, HO, WO, P0, acc, K0, D0, STRIDE)
    c = ci - OFF1
    if (c >= 0) & (c < E2 - E1):
        gb = (b * COUT + E1 + c) * out_plane
        wr = sv * (E2 - E1) + c
        acc = _gather_taps(G, W1, gb, wr, y, x, mask, HO, WO, P1, acc, K1, D1, STRIDE)
    c = ci - OFF2
    if (c >= 0) & (c < E3 - E2):
        gb = (b * COUT + E2 + c) * out_plane
        wr = sv * (E3 - E2) + c
        acc = _gather_taps(G, W2, gb, wr, y, x, mask, HO, WO, P2, acc, K2, D2, STRIDE)
    c = ci - OFF3
    if (c >= 0) & (c < COUT - E3):
        gb = (b * COUT + E3 + c) * out_plane
        wr = sv * (COUT - E3) + c
        acc = _gather_taps(G, W3, gb, wr, y, x, mask, HO, WO, P3, acc, K3, D3, STRIDE)
    if RELU:
        v = tl.load(X + (b * CIN + ci) * (H * W) + p, mask=mask, other=0)
        acc = tl.where(v > 0, acc, 0)
    tl.store(DX + (b * CIN + ci) * (H * W) + p, acc, mask=mask)


@triton.jit
def _row_taps(G, X, DWt, o, wr, ci, i, n0, BSTEP, B, CIN, H, W, COUT, HO, WO, pad,
              K: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr, RELU: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    # Kernel row i of one channel (weight row wr): dw[wr, i, j] = Σ_{b, oy, ox} g[n, o, oy,
    # ox] · x[n, ci, oy·S − pad + i·D, ox·S − pad + j·D] over the sample's B rows n = n0 +
    # b·BSTEP, the K taps j as the rows of one tile.
    KP: tl.constexpr = triton.next_power_of_2(K)
    j = tl.arange(0, KP)
    acc = tl.zeros([KP, BLOCK], dtype=DWt.dtype.element_ty)
    for b in range(B):
        n = n0 + b * BSTEP
        for p0 in range(0, HO * WO, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            mask = p < HO * WO
            oy = p // WO
            ox = p - oy * WO
            g = tl.load(G + (n * COUT + o) * (HO * WO) + p, mask=mask, other=0)
            iy = oy * STRIDE - pad + i * DIL
            ix = ox[None, :] * STRIDE - pad + j[:, None] * DIL
            m = (mask & (iy >= 0) & (iy < H))[None, :] & (ix >= 0) & (ix < W) & (j[:, None] < K)
            v = tl.load(X + (n * CIN + ci) * (H * W) + (iy * W)[None, :] + ix, mask=m, other=0)
            if RELU:
                v = tl.where(v < 0, 0, v)
            acc += g[None, :] * v
    tl.store(DWt + wr * (K * K) + i * K + j, tl.sum(acc, axis=1), mask=j < K)


@triton.jit
def _grad_w_kernel(
    G, X, DW0, DW1, DW2, DW3, B, CIN, H, W, COUT, HO, WO, VDIV, BSTEP,
    E1, E2, E3, OFF0, OFF1, OFF2, OFF3, P0, P1, P2, P3,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, D3: tl.constexpr,
    STRIDE: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    o = tl.program_id(0)
    i = tl.program_id(1)  # the kernel row; rows past a shape's K have nothing to do
    sv = tl.program_id(2)  # the weight sample, whose B rows start at n0
    n0 = sv * VDIV
    if o < E1:
        if i < K0:
            _row_taps(G, X, DW0, o, sv * E1 + o, OFF0 + o, i, n0, BSTEP, B, CIN, H, W, COUT,
                      HO, WO, P0, K0, D0, STRIDE, RELU, BLOCK)  # fmt: skip
    elif o < E2:
        if i < K1:
            c = o - E1
            _row_taps(G, X, DW1, o, sv * (E2 - E1) + c, OFF1 + c, i, n0, BSTEP, B, CIN, H, W,
                      COUT, HO, WO, P1, K1, D1, STRIDE, RELU, BLOCK)  # fmt: skip
    elif o < E3:
        if i < K2:
            c = o - E2
            _row_taps(G, X, DW2, o, sv * (E3 - E2) + c, OFF2 + c, i, n0, BSTEP, B, CIN, H, W,
                      COUT, HO, WO, P2, K2, D2, STRIDE, RELU, BLOCK)  # fmt: skip
    else:
        if i < K3:
            c = o - E3
            _row_taps(G, X, DW3, o, sv * (COUT - E3) + c, OFF3 + c, i, n0, BSTEP, B, CIN, H,
                      W, COUT, HO, WO, P3, K3, D3, STRIDE, RELU, BLOCK)  # fmt: skip


def _geometry(
    weights: list[torch.Tensor], pads: list[int], dils: list[int], in_offsets: list[int]
) -> tuple[list, dict]:
    """The shapes' runtime arguments (E1..E3, OFF0..3, P0..3) and constexprs (K0..3, D0..3);
    unused slots are 1×1 shapes of no channels (their bounds at Cout: no program enters them)."""
    n = len(weights)
    if not 1 <= n <= MAX_SHAPES:
        raise ValueError(f"depthwise: 1 to {MAX_SHAPES} shapes, got {n}")
    ends, total = [], 0
    for w in weights:
        total += w.shape[-4]
        ends.append(total)
    pad_to = MAX_SHAPES - n
    bounds = (ends[:-1] + [total] * (pad_to + 1))[: MAX_SHAPES - 1]
    offs = list(in_offsets) + [0] * pad_to
    padding = list(pads) + [0] * pad_to
    ks = [w.shape[-1] for w in weights] + [1] * pad_to
    ds = list(dils) + [1] * pad_to
    consts = {**{f"K{t}": ks[t] for t in range(4)}, **{f"D{t}": ds[t] for t in range(4)}}
    return [*bounds, *offs, *padding], consts


def _slots(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(tensors) + [tensors[0]] * (MAX_SHAPES - len(tensors))


def _samples(n: int, weights: list[torch.Tensor], interleaved: bool) -> tuple[int, int, int]:
    """(S, VDIV, BSTEP) for N = n rows: S weight samples (weights (S, Ch, 1, K, K); one for
    4-D weights), the rows of a sample sample-major or ``interleaved``."""
    s = weights[0].shape[0] if weights[0].dim() == 5 else 1
    if any((w.shape[0] if w.dim() == 5 else 1) != s for w in weights) or n % s:
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"depthwise: {n} rows for weight samples {shapes}")
    return (s, 1, s) if interleaved else (s, n // s, 1)


def forward(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    relu: bool,
    out: torch.Tensor,
    interleaved: bool = False,
) -> torch.Tensor:
    """Writes every element of ``out`` (N, Σ Ch_t, Ho, Wo) (contiguous) and returns it; x
    (N, Cin, H, W) contiguous, weights (Ch_t, 1, K_t, K_t) or S samples (S, Ch_t, 1, K_t,
    K_t), contiguous (see the module docstring for the rows of each sample)."""
    b, cin, h, w = x.shape
    cout, ho, wo = out.shape[1:]
    check_extent(x.numel(), out.numel())
    args, consts = _geometry(weights, pads, dils, in_offsets)
    s, vdiv, _ = _samples(b, weights, interleaved)
    grid = (b * cout, cdiv(ho * wo, BLOCK))
    with on_device(x):
        _forward_kernel[grid](
            x, *_slots(weights), out, cin, h, w, cout, ho, wo, s, vdiv, *args,
            STRIDE=stride, RELU=relu, BLOCK=BLOCK, **consts,
        )  # fmt: skip
    return out


def backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    grad_weights: bool,
    relu: bool,
    interleaved: bool = False,
) -> list[torch.Tensor]:
    """[d_x, *d_weights] ([d_x] without ``grad_weights``) for grad (N, Σ Ch_t, Ho, Wo), every
    element written; grad, x and the weights contiguous (weight samples as in
    :func:`forward`)."""
    b, cin, h, w = x.shape
    cout, ho, wo = grad.shape[1:]
    check_extent(x.numel(), grad.numel())
    args, consts = _geometry(weights, pads, dils, in_offsets)
    s, vdiv, bstep = _samples(b, weights, interleaved)
    d_x = torch.empty_like(x)
    d_ws = [torch.empty_like(t) for t in weights] if grad_weights else []
    common = dict(STRIDE=stride, RELU=relu, BLOCK=BLOCK, **consts)
    with on_device(x):
        _grad_x_kernel[(b * cin, cdiv(h * w, BLOCK))](
            grad, x, *_slots(weights), d_x, cin, h, w, cout, ho, wo, s, vdiv, *args, **common
        )
        if grad_weights:
            k_max = max(t.shape[-1] for t in weights)
            _grad_w_kernel[(cout, k_max, s)](
                grad, x, *_slots(d_ws), b // s, cin, h, w, cout, ho, wo, vdiv, bstep, *args,
                **common,
            )  # fmt: skip
    return [d_x, *d_ws]
