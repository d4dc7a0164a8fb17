"""Triton kernels for the fused convolutional MixedOp's mixture (see fastdarts.ops.conv_mixed).

out[b, o] = acc[b, o] + Σ_{routes r into o} alpha_r · (src[b, s_r] − shift_r), over P = H·W
pixels. The forward runs one program per (b, o, block of pixels), looping over o's routes
(CSR ``out_ptr``); the backward's d_src one per (b, s, block), looping over the routes that
read s (``src_perm``/``src_ptr``), and d_alpha, d_shift one program per route, reducing over
B and P in a fixed order (no atomics, so results are deterministic). Imported only on first
use on CUDA (or under TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device, planes_dense
from .tiles import cdiv

BLOCK = 256


@triton.jit
def _forward_kernel(
    SRC,
    ALPHA,
    SHIFT,
    ACC,
    ACC_B,
    RSRC,
    OPTR,
    OUT,
    S,
    N,
    P,
    HAS_ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
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
        x = tl.load(SRC + (b * S + s) * P + p, mask=mask, other=0)
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
    G, SRC, ALPHA, SHIFT, RSRC, ROUT, DALPHA, DSHIFT, B, S, N, P, BLOCK: tl.constexpr
):
    r = tl.program_id(0)
    s = tl.load(RSRC + r)
    o = tl.load(ROUT + r)
    h = tl.load(SHIFT + r)
    sgx = tl.zeros([BLOCK], dtype=DALPHA.dtype.element_ty)
    sg = tl.zeros([BLOCK], dtype=DALPHA.dtype.element_ty)
    for b in range(B):
        for p0 in range(0, P, BLOCK):
            p = p0 + tl.arange(0, BLOCK)
            mask = p < P
            g = tl.load(G + (b * N + o) * P + p, mask=mask, other=0)  # zero past the end
            x = tl.load(SRC + (b * S + s) * P + p, mask=mask, other=0)
            sgx += g * (x - h)
            sg += g
    tl.store(DALPHA + r, tl.sum(sgx, axis=0))
    tl.store(DSHIFT + r, -tl.load(ALPHA + r) * tl.sum(sg, axis=0))


def forward(
    src: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor,
    acc: torch.Tensor | None,
    route_src: torch.Tensor,
    out_ptr: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Writes every element of ``out`` (B, N, H, W) (contiguous) and returns it; src
    (B, S, H, W), alpha and shift (R,), routes sorted by output channel; acc may be a channel
    block of a larger tensor (read in place)."""
    src, alpha, shift = src.contiguous(), alpha.contiguous(), shift.contiguous()
    b, s, n, p = src.shape[0], src.shape[1], out.shape[1], src.shape[2] * src.shape[3]
    has_acc = acc is not None
    if has_acc and not planes_dense(acc):
        acc = acc.contiguous()
    acc_b = acc.stride(0) if has_acc else 0
    check_extent(src.numel(), out.numel(), (b - 1) * acc_b + n * p)
    grid = (b * n, cdiv(p, BLOCK))
    with on_device(src):
        _forward_kernel[grid](
            src,
            alpha,
            shift,
            acc if has_acc else out,
            acc_b,
            route_src,
            out_ptr,
            out,
            s,
            n,
            p,
            HAS_ACC=has_acc,
            BLOCK=BLOCK,
        )
    return out


def backward(
    grad: torch.Tensor,
    src: torch.Tensor,
    alpha: torch.Tensor,
    shift: torch.Tensor,
    route_src: torch.Tensor,
    route_out: torch.Tensor,
    src_perm: torch.Tensor,
    src_ptr: torch.Tensor,
    out: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_src (B, S, H, W), d_alpha (R,), d_shift (R,)) for grad (B, N, H, W); ``out`` if
    given (contiguous) receives them, every element written."""
    grad, src = grad.contiguous(), src.contiguous()
    alpha, shift = alpha.contiguous(), shift.contiguous()
    b, s, n, p = src.shape[0], src.shape[1], grad.shape[1], src.shape[2] * src.shape[3]
    check_extent(grad.numel(), src.numel())
    if out is None:
        out = [torch.empty_like(src), torch.empty_like(alpha), torch.empty_like(shift)]
    d_src, d_alpha, d_shift = out
    with on_device(src):
        _grad_src_kernel[(b * s, cdiv(p, BLOCK))](
            grad, alpha, route_out, src_perm, src_ptr, d_src, s, n, p, BLOCK=BLOCK
        )
        if alpha.numel():
            _grad_coef_kernel[(alpha.numel(),)](
                grad,
                src,
                alpha,
                shift,
                route_src,
                route_out,
                d_alpha,
                d_shift,
                b,
                s,
                n,
                p,
                BLOCK=BLOCK,
            )
    return d_src, d_alpha, d_shift
