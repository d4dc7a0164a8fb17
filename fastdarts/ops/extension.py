"""The optional compiled extension ``fastdarts._C`` (csrc/, built by setup.py), and whether
Triton is installed.

Loaded on first use, never at ``import fastdarts``; when it is missing the fast ops fall back
(Triton on CUDA, the reference elsewhere) and one warning says what is missing and why.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastdarts._C"), None
    except ImportError as e:
        reason = (
            f"the C++ extension fastdarts._C is not available ({e}); build it with "
            "'pip install -e . --no-build-isolation' (needs a C++ compiler)"
        )
        warnings.warn(f"fastdarts: {reason}; using the reference ops on the CPU", stacklevel=3)
        return None, reason


def extension() -> ModuleType | None:
    """The compiled module, or None (warning once) when it cannot be loaded."""
    return _load()[0]


def unavailable_reason() -> str | None:
    """None when the extension loads, else why it does not."""
    return _load()[1]


@functools.cache
def has_triton() -> bool:
    """Whether Triton imports (the fused ops' GPU kernels need it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
