"""Triton kernels for the fused convolutional MixedOp's mixture (see fastdarts.ops.conv_mixed).

out[b, o] = acc[b, o] + Σ_{routes r into o} alpha_r · (src[b, s_r] − shift_r), over P = H·W
pixels. The forward runs one program per (b, o, block of pixels), looping over o's routes
(CSR ``out_ptr``); the backward's d_src one per (b, s, block), looping over the routes that
read s (``src_perm``/``src_ptr``), and d_alpha, d_shift one program per route, reducing over
B and P in a fixed order (no atomics, so results are deterministic). src is the channels of
up to four source tensors, read in place (a group's stage-1 block, its normalised block
and its inputs: no concatenated copy); d_src is written as one tensor of all of them.
Imported only on first use on CUDA (or under TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device, planes_dense
from .tiles import cdiv

BLOCK = 256


MAX_SOURCES = 4


@triton.jit
def _source(X0, X1, X2, X3, XB0, XB1, XB2, XB3, C1, C2, C3, b, s, P):
    """Plane (b, s) of the sources' channels: source t holds channels C_t … C_{t+1} − 1
    (C_0 = 0), its rows XB_t elements apart."""
    if s < C1:
        plane = X0 + b * XB0 + s * P
    elif s < C2:
        plane = X1 + b * XB1 + (s - C1) * P
    elif s < C3:
        plane = X2 + b * XB2 + (s - C2) * P
    else:
        plane = X3 + b * XB3 + (s - C3) * P
    return plane


@triton.jit
def _forward_kernel(
    X0, X1, X2, X3, XB0, XB1, XB2, XB3, C1, C2, C3,
    ALPHA, SHIFT, ACC, ACC_B, RSRC, OPTR, OUT, N, P,
    HAS_ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    bo = tl.program_id(0)
    b = bo // N
    o = bo - b * N
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    if HAS_ACC:
        y = tl.load(ACC + b * ACC_B + o * P + p, mask=mask, other=0)
    else:
        y = tl.zeros([BLOCK], dtype=OUT.dtype.element_ty)
    r0 = tl.load(OPTR + o)
    r1 = tl.load(OPTR + o + 1)
    for r in range(r0, r1):
        s = tl.load(RSRC + r)
        a = tl.load(ALPHA + r)
        h = tl.load(SHIFT + r)
        plane = _source(X0, X1, X2, X3, XB0, XB1, XB2, XB3, C1, C2, C3, b, s, P)
        x = tl.load(plane + p, mask=mask, other=0)
        y += a * (x - h)
    tl.store(OUT + bo * P + p, y, mask=mask)


@triton.jit
def _grad_src_kernel(G, ALPHA, ROUT, PERM, SPTR, DSRC, S, N, P, BLOCK: tl.constexpr):
    bs = tl.program_id(0)
    b = bs // S
    s = bs - b * S
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    y = tl.zeros([BLOCK], dtype=DSRC.dtype.element_ty)
    j0 = tl.load(SPTR + s)
    j1 = tl.load(SPTR + s + 1)
    for j in range(j0, j1):
        r = tl.load(PERM + j)
        a = tl.load(ALPHA + r)
        o = tl.load(ROUT + r)
        y += a * tl.load(G + (b * N + o) * P + p, mask=mask, other=0)
    tl.store(DSRC + bs * P + p, y, mask=mask)


@triton.jit
def _grad_coef_kernel(
    G, X0, X1, X2, X3, XB0, XB1, XB2, XB3, C1, C2, C3,
    ALPHA, SHIFT, RSRC, ROUT, DALPHA, DSHIFT, B, N, P, BLOCK: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    s = tl.load(RSRC + r)
    o = tl.load(ROUT + r)
    h = tl.load(SHIFT + r)
    sgx = tl.zeros([BLOCK], dtype=DALPHA.dtype.element_ty)
    sg = tl.zeros([BLOCK], dtype=DALPHA.dtype.element_ty)
    for b in range(B):
        plane = _source(X0, X1, X2, X3, XB0, XB1, XB2, XB3, C1, C2, C3, b, s, P)
        for p0 in range(0, P, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            mask = p < P
            g = tl.load(G + (b * N + o) * P + p, mask=mask, other=0)  # zero past the end
            x = tl.load(plane + p, mask=mask, other=0)
            sgx += g * (x - h)
            sg += g
    tl.store(DALPHA + r, tl.sum(sgx, axis=0))
    tl.store(DSHIFT + r, -tl.load(ALPHA + r) * tl.sum(sg, axis=0))


def _sources(srcs: list[torch.Tensor], p: int) -> tuple[list, list[int]]:
    """The kernels' source arguments (X0…X3, XB0…XB3, C1…C3) for ``srcs``, each read in place
    where its planes are dense (a channel block of a larger tensor qualifies), with the
    extents their offsets reach; past four sources the last ones are joined."""
    if len(srcs) > MAX_SOURCES:
        srcs = [*srcs[: MAX_SOURCES - 1], torch.cat(srcs[MAX_SOURCES - 1 :], 1)]
    srcs = [x if planes_dense(x) else x.contiguous() for x in srcs]
    starts, total = [], 0
    for x in srcs[:-1]:
        total += x.shape[1]
        starts.append(total)
    total += srcs[-1].shape[1]
    starts += [total] * (MAX_SOURCES - 1 - len(starts))  # channels no source has
    pad = MAX_SOURCES - len(srcs)
    extents = [(x.shape[0] - 1) * x.stride(0) + x.shape[1] * p for x in srcs]
    args = [*srcs, *[srcs[0]] * pad, *(x.stride(0) for x in srcs), *[0] * pad, *starts]
    return args, extents


def forward(
    srcs: list[torch.Tensor],
    alpha: torch.Tensor,
    shift: torch.Tensor,
    acc: torch.Tensor | None,
    route_src: torch.Tensor,
    out_ptr: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes every element of ``out`` (B, N, H, W) (contiguous) and returns it; src the
    channels of ``srcs`` (each (B, S_t, H, W), in order), alpha and shift (R,), routes sorted
    by output channel; acc may be a channel block of a larger tensor (read in place)."""
    alpha, shift = alpha.contiguous(), shift.contiguous()
    b, n, p = out.shape[0], out.shape[1], out.shape[2] * out.shape[3]
    sources, extents = _sources(srcs, p)
    has_acc = acc is not None
    if has_acc and not planes_dense(acc):
        acc = acc.contiguous()
    acc_b = acc.stride(0) if has_acc else 0
    check_extent(*extents, out.numel(), (b - 1) * acc_b + n * p)
    grid = (b * n, cdiv(p, BLOCK))
    with on_device(out):
        _forward_kernel[grid](
            *sources, alpha, shift, acc if has_acc else out, acc_b, route_src, out_ptr, out, n, p,
            HAS_ACC=has_acc, BLOCK=BLOCK,
        )  # fmt: skip
    return out


def backward(
    grad: torch.Tensor,
    srcs: list[torch.Tensor],
    alpha: torch.Tensor,
    shift: torch.Tensor,
    route_src: torch.Tensor,
    route_out: torch.Tensor,
    src_perm: torch.Tensor,
    src_ptr: torch.Tensor,
    out: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_src (B, S, H, W): all the sources' channels, d_alpha (R,), d_shift (R,)) for grad
    (B, N, H, W); ``out`` if given (contiguous) receives them, every element written."""
    grad = grad.contiguous()
    alpha, shift = alpha.contiguous(), shift.contiguous()
    b, n, p = grad.shape[0], grad.shape[1], grad.shape[2] * grad.shape[3]
    s = sum(x.shape[1] for x in srcs)
    sources, extents = _sources(srcs, p)
    check_extent(*extents, grad.numel(), b * s * p)
    if out is None:
        d_src = grad.new_empty(b, s, *grad.shape[2:])
        out = [d_src, torch.empty_like(alpha), torch.empty_like(shift)]
    d_src, d_alpha, d_shift = out
    with on_device(grad):
        _grad_src_kernel[(b * s, cdiv(p, BLOCK))](
            grad, alpha, route_out, src_perm, src_ptr, d_src, s, n, p, BLOCK=BLOCK
        )
        if alpha.numel():
            _grad_coef_kernel[(alpha.numel(),)](
                grad, *sources, alpha, shift, route_src, route_out, d_alpha, d_shift, b, n, p,
                BLOCK=BLOCK,
            )  # fmt: skip
    return d_src, d_alpha, d_shift
