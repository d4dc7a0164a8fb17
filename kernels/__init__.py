"""Triton kernels, installed as ``fastdarts.kernels``; imported only by the fast ops."""

import contextlib

import torch

# The kernels compute offsets in int32 (program ids and integer arguments are 32-bit).
MAX_EXTENT = 2**31 - 1


def check_extent(*extents: int) -> None:
    """ValueError if an offset the kernels compute could pass int32 (elements from a base
    pointer: a tensor's numel, or a strided block's span)."""
    if max(extents) > MAX_EXTENT:
        raise ValueError(
            f"fastdarts' Triton kernels index in 32 bits: {max(extents)} elements from one "
            f"pointer is over {MAX_EXTENT}; use a smaller batch"
        )


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its current stream, not the arguments'
    device: within this block they are ``t``'s (a no-op for CPU tensors, interpreted)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def planes_dense(t: torch.Tensor) -> bool:
    """Whether each (b, c) plane of the 4-D ``t`` is laid out contiguously, the channels one
    plane apart (any batch stride: a channel block of a larger tensor qualifies)."""
    dense = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != dense:
            return False
        dense *= size
    return True
