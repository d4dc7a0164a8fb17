"""Benchmarks: search steps and kernels, reference and fast paths side by side.

``harness`` holds what both scripts share; ``search_step`` and ``kernels`` are thin CLIs.
"""
