"""FLOP formulas of fastdarts' custom ops, for ``torch.utils.flop_counter.FlopCounterMode``.

That module imports triton (to count Triton kernels), and ``import fastdarts`` loads no
Triton; so :func:`flop_formula` registers a formula when torch.utils.flop_counter is
imported: at once if it already is, else from an import hook that waits for it (and then
removes itself). The formulas live beside their ops.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

import torch

FLOP_COUNTER = "torch.utils.flop_counter"
_pending: list[tuple[str, Callable]] = []


def flop_formula(op: str) -> Callable[[Callable], Callable]:
    """Decorator: the formula counts ``torch.ops.fastdarts.<op>`` (torch's signature: the
    arguments with tensors as shapes, and ``out_shape``)."""

    def register(formula: Callable) -> Callable:
        module = sys.modules.get(FLOP_COUNTER)
        if module is not None:
            _register(module, op, formula)
        else:
            _pending.append((op, formula))
            if _HOOK not in sys.meta_path:
                sys.meta_path.insert(0, _HOOK)
        return formula

    return register


def _register(module: ModuleType, op: str, formula: Callable) -> None:
    packet = getattr(torch.ops.fastdarts, op)
    if packet not in module.flop_registry:  # a reload of fastdarts' modules registers again
        module.register_flop_formula(packet)(formula)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds torch.utils.flop_counter as Python would, with a loader that registers the
    pending formulas once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != FLOP_COUNTER:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        if _HOOK in sys.meta_path:
            sys.meta_path.remove(_HOOK)
        while _pending:
            _register(module, *_pending.pop(0))

    def __getattr__(self, name: str):  # get_source, get_filename, … as the real loader's
        return getattr(self._loader, name)


_HOOK = _AfterImport()
