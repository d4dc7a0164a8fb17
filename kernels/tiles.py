"""What several Triton kernels share: a program's plane and block of pixels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plane_block(N, W, P, BLOCK: tl.constexpr):
    """The program's plane (b, n) of a (B, N, ·, W) grid (program id 0 = b·N + n) and its
    block of the plane's P pixels (program id 1): (b, n, pixel, in range, row, column)."""
    bn = tl.program_id(0)
    b = bn // N
    n = bn - b * N
    p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = p // W
    return b, n, p, p < P, row, p - row * W
