"""Triton kernels for max_pool_3x3 and avg_pool_3x3 of the same input in one launch each
way (see fastdarts.ops.conv_mixed.pools), where torch runs two pooling kernels each way and
keeps the max pool's int64 indices for its backward.

x (B, C, H, W) → out (B, 2C, Ho, Wo) = [max pool | avg pool], 3×3 windows with padding 1 at
stride 1 or 2, the average over the window's pixels inside the image (DARTS'
count_include_pad=False), the maximum as torch takes it (the first in row-major order; a NaN
wins, the last one if several); x (and the backward's gradient) may be a channel block of a
larger tensor, read in place.

- forward: one program per (b, c, block of output pixels), both pools from one read;
- backward: one program per (b, c, block of input pixels), gathering from every window that
  holds the pixel its share of the average's gradient and, where the pixel is the window's
  maximum (found again: nothing saved), the max's gradient, in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import check_extent, on_device, planes_dense
from .tiles import cdiv, plane_block

BLOCK = 128


@triton.jit
def _window(X, xbase, oy, ox, mask, H, W, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """Per output pixel: the window's maximum, its argmax (row-major offset 0–8 in the
    window), sum and count of in-image pixels."""
    m = tl.zeros([BLOCK], dtype=X.dtype.element_ty)
    arg = tl.full([BLOCK], -1, tl.int32)
    total = tl.zeros([BLOCK], dtype=X.dtype.element_ty)
    count = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(3):
        iy = oy * STRIDE - 1 + i
        row = mask & (iy >= 0) & (iy < H)
        for j in tl.static_range(3):
            ix = ox * STRIDE - 1 + j
            valid = row & (ix >= 0) & (ix < W)
            v = tl.load(X + xbase + iy * W + ix, mask=valid, other=0)
            takes = valid & ((arg < 0) | (v > m) | (v != v))
            m = tl.where(takes, v, m)
            arg = tl.where(takes, i * 3 + j, arg)
            total += tl.where(valid, v, 0)
            count += valid.to(tl.int32)
    return m, arg, total, count


@triton.jit
def _forward_kernel(X, X_B, OUT, C, H, W, HO, WO, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    b, c, p, mask, oy, ox = plane_block(C, WO, HO * WO, BLOCK)
    m, _, total, count = _window(X, b * X_B + c * (H * W), oy, ox, mask, H, W, STRIDE, BLOCK)
    out = OUT + (b * 2 * C + c) * (HO * WO) + p
    tl.store(out, m, mask=mask)
    tl.store(out + C * (HO * WO), total / tl.maximum(count, 1).to(total.dtype), mask=mask)


@triton.jit
def _backward_kernel(
    G, G_B, X, X_B, DX, C, H, W, HO, WO, STRIDE: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    b, c, p, mask, y, x = plane_block(C, W, H * W, BLOCK)
    xbase = b * X_B + c * (H * W)
    g_max = G + b * G_B + c * (HO * WO)
    g_avg = g_max + C * (HO * WO)
    acc = tl.zeros([BLOCK], dtype=DX.dtype.element_ty)
    # The windows holding (y, x): output pixel (oy, ox) with oy·S − 1 + i = y and
    # ox·S − 1 + j = x for a window offset (i, j). One loop, not unrolled: unrolled, the nine
    # windows' loads took 71 registers a thread (and nested loops a stack frame at stride 2).
    for k in range(9):
        i = k // 3
        j = k - i * 3
        ty = y + 1 - i
        tx = x + 1 - j
        tyc = tl.where(ty >= 0, ty, 0)
        txc = tl.where(tx >= 0, tx, 0)
        oy = tyc // STRIDE
        ox = txc // STRIDE
        held = mask & (ty >= 0) & (tyc - oy * STRIDE == 0) & (oy < HO)
        held = held & (tx >= 0) & (txc - ox * STRIDE == 0) & (ox < WO)
        _, arg, _, count = _window(X, xbase, oy, ox, held, H, W, STRIDE, BLOCK)
        o = oy * WO + ox
        avg = tl.load(g_avg + o, mask=held, other=0) / tl.maximum(count, 1).to(acc.dtype)
        acc += avg + tl.load(g_max + o, mask=held & (arg == k), other=0)
    tl.store(DX + (b * C + c) * (H * W) + p, acc, mask=mask)


def _planes(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: each (b, c) plane dense, the channels one plane apart."""
    return x if planes_dense(x) else x.contiguous()


def forward(x: torch.Tensor, stride: int) -> torch.Tensor:
    """[max pool | avg pool] (B, 2C, Ho, Wo) of x (B, C, H, W), every element written."""
    x = _planes(x)
    b, c, h, w = x.shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = x.new_empty(b, 2 * c, ho, wo)
    check_extent((b - 1) * x.stride(0) + c * h * w, out.numel())
    with on_device(x):
        _forward_kernel[(b * c, cdiv(ho * wo, BLOCK))](
            x, x.stride(0), out, c, h, w, ho, wo, STRIDE=stride, BLOCK=BLOCK
        )
    return out


def backward(grad: torch.Tensor, x: torch.Tensor, stride: int) -> torch.Tensor:
    """d_x (B, C, H, W) (contiguous, every element written) for grad (B, 2C, Ho, Wo), which
    may be a channel block of a larger tensor (the gradient of a concatenation)."""
    x, grad = _planes(x), _planes(grad)
    b, c, h, w = x.shape
    ho, wo = grad.shape[2:]
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    check_extent((b - 1) * x.stride(0) + c * h * w, (b - 1) * grad.stride(0) + 2 * c * ho * wo)
    with on_device(x):
        _backward_kernel[(b * c, cdiv(h * w, BLOCK))](
            grad, grad.stride(0), x, x.stride(0), d_x, c, h, w, ho, wo, STRIDE=stride, BLOCK=BLOCK
        )
    return d_x
