"""Triton kernels, installed as ``fastdarts.kernels``; imported only by the fast ops."""
