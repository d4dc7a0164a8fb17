"""The optional compiled extension ``fastdarts._C`` (csrc/, built by setup.py), whether
Triton is installed, and the Triton kernels' modules.

Loaded on first use, never at ``import fastdarts``; when it is missing the fast ops fall back
(Triton on CUDA, the reference elsewhere) and one warning says what is missing and why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module("fastdarts._C"), None
    except ImportError as e:
        reason = (
            f"the C++ extension fastdarts._C is not available ({e}); build it with "
            "'pip install -e . --no-build-isolation' (needs a C++ compiler)"
        )
        warnings.warn(
            f"fastdarts: {reason}; without it the fused ops run the reference's on the CPU",
            stacklevel=3,
        )
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


def triton_ready(device: torch.device) -> bool:
    """Whether the Triton kernels run for tensors on ``device`` (CUDA, with Triton)."""
    return device.type == "cuda" and has_triton()


@functools.cache
def triton_kernels(name: str) -> ModuleType:
    """The Triton kernels' module ``fastdarts.kernels.<name>`` (imports triton).

    setup.py installs the top-level ``kernels/`` as ``fastdarts.kernels``; when fastdarts runs
    from a checkout on sys.path instead (not installed: the GPU suite's fallback when the
    install fails), that package is loaded from the checkout's ``kernels/``.
    """
    if importlib.util.find_spec("fastdarts.kernels") is None:
        folder = Path(__file__).resolve().parents[2] / "kernels"
        spec = importlib.util.spec_from_file_location(
            "fastdarts.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        if spec is None or not folder.is_dir():
            raise ImportError(f"fastdarts.kernels is not installed and {folder} does not exist")
        package = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"fastdarts.kernels.{name}")
