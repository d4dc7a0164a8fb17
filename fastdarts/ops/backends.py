"""Backends: what each MixedOp implementation supports, and the one place that picks one.

Each backend declares the spaces and device types it supports and whether it can run here
(and why not); ``resolve`` is the only dispatch point, so a run can always say why a
backend was skipped. ``auto`` resolves to the fastest backend that can run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from fastdarts.errors import ConfigError
from fastdarts.ops.conv_mixed import fused_cell_ops, reference_cell_ops
from fastdarts.ops.cross_entropy import cross_entropy
from fastdarts.ops.extension import extension, has_triton, unavailable_reason
from fastdarts.ops.recurrent_cell import recurrent_cell
from fastdarts.ops.recurrent_mixed import recurrent_mixed
from fastdarts.spaces.cnn import SearchCell
from fastdarts.spaces.rnn import RecurrentSearchCell, RNNSearchModel, recurrent_mixed_reference


@dataclass(frozen=True)
class Backend:
    name: str
    spaces: frozenset[str]
    device_types: frozenset[str]
    # (space, device type) → None when usable there, else the reason it is not.
    unavailable: Callable[[str, str], str | None] = lambda space, device_type: None
    # The RNN cell's node op and whole-cell op (see RecurrentSearchCell.node_op and
    # cell_op); None keeps the reference.
    rnn_node_op: Callable | None = None
    rnn_cell_op: Callable | None = None
    # Builds a CNN search cell's edge module from the cell (see SearchCell.forward and
    # fastdarts.ops.conv_mixed); None keeps (or restores) the reference MixedOps.
    cnn_cell_ops: Callable | None = None
    # The RNN language model's loss (see RNNSearchModel.cross_entropy); None keeps torch's.
    rnn_cross_entropy: Callable | None = None

    def why_not(self, space: str, device_type: str) -> str | None:
        """None if this backend can run ``space`` on ``device_type``, else the reason."""
        if space not in self.spaces:
            return f"does not implement the {space} space"
        if device_type not in self.device_types:
            return f"does not run on {device_type}"
        return self.unavailable(space, device_type)

    def apply(self, model: nn.Module) -> nn.Module:
        """Make ``model``'s search cells use this backend's ops (in place); returns it."""
        for module in model.modules():
            if isinstance(module, RecurrentSearchCell):
                module.node_op = self.rnn_node_op or recurrent_mixed_reference
                module.cell_op = self.rnn_cell_op
            if isinstance(module, RNNSearchModel):
                module.cross_entropy = self.rnn_cross_entropy or F.cross_entropy
        for cell in [m for m in model.modules() if isinstance(m, SearchCell)]:
            cell._ops = (self.cnn_cell_ops or reference_cell_ops)(cell)
        return model


def _fused_unavailable(space: str, device_type: str) -> str | None:
    """On the CPU the C++ kernels; on CUDA the Triton kernels, or for the RNN the extension's
    CUDA mixture (without Triton the CNN's fused ops would run torch-op formulas: slower
    than the reference)."""
    if device_type == "cpu":
        reason = unavailable_reason()
        return None if reason is None else f"needs the C++ kernels on the CPU: {reason}"
    if has_triton():
        return None
    if space == "rnn" and hasattr(extension(), "recurrent_mixed_forward_cuda"):
        return None
    needs = "Triton or the extension built with CUDA" if space == "rnn" else "Triton"
    return f"needs {needs} on {device_type} (triton does not import)"


BACKENDS: dict[str, Backend] = {
    "reference": Backend("reference", frozenset({"rnn", "cnn"}), frozenset({"cpu", "cuda"})),
    "fused": Backend(
        "fused",
        frozenset({"rnn", "cnn"}),
        frozenset({"cpu", "cuda"}),
        _fused_unavailable,
        rnn_node_op=recurrent_mixed,
        rnn_cell_op=recurrent_cell,
        cnn_cell_ops=fused_cell_ops,
        rnn_cross_entropy=cross_entropy,
    ),
}
# Fastest first; ``auto`` takes the first that can run.
AUTO_ORDER = ("fused", "reference")


def resolve(name: str, space: str, device_type: str, network: str = "search") -> Backend:
    """The backend to use for ``network`` (the ``search`` supernet or the derived network a
    ``train`` run trains); ConfigError says why a named one cannot be.

    The derived recurrent network runs each node through the backend's node op: ``fused`` is
    one kernel per node. ``auto`` takes it on GPUs only (one launch per node instead of a
    dozen elementwise ones): on the CPU the C++ kernel, which evaluates all four activations
    (and in the backward the op weights' gradient) for a node that needs one, measured 2-4
    times slower than the node's few torch ops. The derived convolutional network has one op
    per edge, where nothing fused applies: it takes the reference, and ``fused`` is an error.
    """
    if network == "train" and space == "cnn" and name == "fused":
        raise ConfigError(
            "backend 'fused' has no kernel for the cnn evaluation network (one op per edge, "
            "nothing to fuse); use reference or auto"
        )
    if network == "train" and name == "auto" and (space == "cnn" or device_type == "cpu"):
        name = "reference"
    if name == "auto":
        reasons = {c: BACKENDS[c].why_not(space, device_type) for c in AUTO_ORDER}
        usable = [c for c, reason in reasons.items() if reason is None]
        if not usable:
            why = "; ".join(f"'{c}' {reason}" for c, reason in reasons.items())
            raise ConfigError(f"backend 'auto': no backend can run here ({why})")
        return BACKENDS[usable[0]]
    if name not in BACKENDS:
        raise ConfigError(f"unknown backend '{name}' (available: auto, {', '.join(BACKENDS)})")
    reason = BACKENDS[name].why_not(space, device_type)
    if reason:
        raise ConfigError(f"backend '{name}' {reason}")
    return BACKENDS[name]
