"""Each search kernel against its reference: time, speedup, bytes moved, achieved bandwidth.

    python benchmarks/kernels.py --device cuda --json out.json

Kernels are entries of ``KERNELS``: input builders per shape and implementations side by
side (``impls``: "reference", torch's ops, first; then "fused", fastdarts' version, where
there is one). Each row names what its implementation ran here (``implementation``: the C++
extension, its CUDA kernel, Triton or torch's ops: the fused ops choose by device and by
what is installed). Each is timed forward (with autograd recording, as in a search step)
and forward + backward, the implementations interleaved A B A B … on the same inputs.
"Bytes" is the traffic a kernel cannot avoid — its inputs read and its outputs written once
(formula per kernel in the JSON) — so GB/s is the bandwidth that lower bound achieves. The
device's own bandwidth is measured in the same run by a large copy (bytes read + written),
and each row gives the fraction of it reached. The JSON is rewritten after every row, so a
run stopped by a time limit keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    # Run as a script: make ``benchmarks`` and an uninstalled ``fastdarts`` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from fastdarts.genotypes import CNN_PRIMITIVES, CNN_STEPS, RNN_PRIMITIVES
from fastdarts.ops import conv_mixed
from fastdarts.ops import cross_entropy as cross_entropy_ops
from fastdarts.ops import recurrent_mixed as recurrent_mixed_ops
from fastdarts.ops.conv_mixed import MixedOp as FusedMixedOp
from fastdarts.ops.conv_mixed import (
    batch_norm,
    depthwise,
    depthwise_reference,
    fused_cell_ops,
    pointwise,
    pools,
    pools_reference,
)
from fastdarts.ops.cross_entropy import cross_entropy
from fastdarts.ops.recurrent_mixed import recurrent_mixed
from fastdarts.spaces.cnn import MixedOp, SearchCell
from fastdarts.spaces.rnn import recurrent_mixed_reference

SCRIPT = "benchmarks/kernels.py"
PASSES = ("fwd", "fwd+bwd")


@dataclass
class Inputs:
    """One shape's inputs: ``args`` go to every implementation, ``leaves`` get gradients."""

    args: dict[str, Any]
    leaves: list[torch.Tensor]


@dataclass
class Kernel:
    """A kernel's benchmark entry.

    ``shapes`` maps a configuration (paper, large, tiny) to shape parameters; ``make``
    builds the inputs of one shape; ``impls`` are the implementations (each takes
    ``Inputs.args`` and returns one tensor); ``bytes_moved(shape, pass, element_size)`` is
    the unavoidable traffic, as ``formula`` says; ``fused_parts(device)`` says what the
    "fused" implementation runs on ``device``: per (part, direction) its kind (see
    :func:`implementation`).
    """

    name: str
    shapes: dict[str, list[dict[str, int]]]
    make: Callable[[dict[str, int], torch.device, torch.dtype], Inputs]
    impls: dict[str, Callable[[dict[str, Any]], torch.Tensor]]
    bytes_moved: Callable[[dict[str, int], str, int], int]
    formula: str
    fused_parts: Callable[[torch.device], dict[tuple[str, str], str]] = field(
        default=lambda device: {}
    )
    describe: Callable[[dict[str, int]], str] = field(
        default=lambda s: " ".join(f"{k}={v}" for k, v in s.items())
    )


# -- which implementation runs --------------------------------------------------------------

# The fused ops' own words for what runs: conv_mixed calls torch's ops "reference".
_KINDS = {"reference": "torch", "cpp": "cpp", "cuda": "cuda", "triton": "triton"}


def _both(kind_of: Callable[[str], str], part: str) -> dict[tuple[str, str], str]:
    """{(part, fwd): kind, (part, bwd): kind}, ``kind_of`` given "forward" or "backward"."""
    return {(part, d): _KINDS[kind_of(w)] for d, w in (("fwd", "forward"), ("bwd", "backward"))}


def _conv_parts(*parts: str) -> Callable[[torch.device], dict[tuple[str, str], str]]:
    """What fastdarts.ops.conv_mixed runs for ``parts`` (mix, depthwise, pointwise, pools,
    batch_norm), as it decides: Triton on CUDA for the mixture, depthwise and pools; the C++
    kernel on the CPU where the extension has it; torch's ops otherwise."""

    def parts_on(device: torch.device) -> dict[tuple[str, str], str]:
        x = torch.empty(0, device=device)
        cpp = {True: "cpp", False: "reference"}
        deciders = {
            "mix": lambda way: conv_mixed.kernel_name(device),
            "depthwise": lambda way: conv_mixed._impl(x, f"depthwise_{way}"),
            "pointwise": lambda way: cpp[conv_mixed._cpp(x, f"pointwise_{way}")],
            "pools": lambda way: conv_mixed._impl(x, f"pools_{way}"),
            # Without the C++ forward, torch's op runs and autograd takes its backward.
            "batch_norm": lambda way: cpp[
                conv_mixed._cpp(x, "batch_norm_forward") and conv_mixed._cpp(x, f"batch_norm_{way}")
            ],
        }
        return {key: kind for part in parts for key, kind in _both(deciders[part], part).items()}

    return parts_on


def implementation(kernel: Kernel, impl: str, pass_: str, device: torch.device) -> str:
    """What ``impl`` of ``kernel`` runs in ``pass_`` on ``device``: "cpp" (the C++
    extension), "cuda" (its CUDA kernel), "triton" or "torch" (torch's ops; always the
    reference's). A fused version whose parts differ lists them by kind, e.g.
    "triton: mix, depthwise, pools; torch: pointwise, batch_norm"; a part whose forward and
    backward differ is named with its direction."""
    if impl == "reference":
        return "torch"
    parts = {k: v for k, v in kernel.fused_parts(device).items() if pass_ != "fwd" or k[1] == "fwd"}
    split = {p for (p, d), kind in parts.items() if kind != parts.get((p, "fwd"))}
    by_kind: dict[str, list[str]] = {}
    for (part, direction), kind in parts.items():
        label = f"{part} {direction}" if part in split else part
        if label not in by_kind.setdefault(kind, []):
            by_kind[kind].append(label)
    if len(by_kind) == 1:
        return next(iter(by_kind))
    return "; ".join(f"{kind}: {', '.join(labels)}" for kind, labels in by_kind.items())


# -- the recurrent node mixture -----------------------------------------------------------

K_RNN = len(RNN_PRIMITIVES)


def _make_recurrent(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    n, b, d = shape["n"], shape["B"], shape["D"]
    g = torch.Generator().manual_seed(0)
    states = torch.randn(n, b, d, generator=g, dtype=dtype)
    ch = torch.randn(n, b, 2 * d, generator=g, dtype=dtype)
    probs = torch.softmax(torch.randn(n, K_RNN, generator=g, dtype=dtype), -1)
    leaves = [t.to(device).requires_grad_() for t in (states, ch, probs)]
    return Inputs(dict(zip(("states", "ch", "probs"), leaves)), leaves)


def _recurrent_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    n, b, d = shape["n"], shape["B"], shape["D"]
    inputs = 3 * n * b * d + n * K_RNN  # states, ch = [C, H], probs
    fwd = inputs + b * d  # + the node's output
    bwd = b * d + 2 * inputs  # grad_out and the inputs read, one gradient per input written
    return size * (fwd if pass_ == "fwd" else fwd + bwd)


RECURRENT = Kernel(
    name="rnn_node_mixture",
    shapes={
        # The last node of the cell has n = 8 predecessors; n = 4 is the middle of the cell.
        "paper": [{"n": 8, "B": 256, "D": 300}, {"n": 4, "B": 256, "D": 300}],
        "large": [{"n": 8, "B": 1024, "D": 1024}],
        "tiny": [{"n": 2, "B": 4, "D": 8}],
    },
    make=_make_recurrent,
    impls={
        "reference": lambda a: recurrent_mixed_reference(a["states"], a["ch"], a["probs"]),
        # One kernel per pass: C++ on the CPU, Triton on CUDA (fastdarts.ops.recurrent_mixed).
        "fused": lambda a: recurrent_mixed(a["states"], a["ch"], a["probs"]),
    },
    fused_parts=lambda device: _both(
        lambda way: recurrent_mixed_ops.kernel_name(device), "recurrent_mixed"
    ),
    bytes_moved=_recurrent_bytes,
    formula="fwd: (3nBD + nK + BD)·size (states, ch, probs read; output written); "
    "fwd+bwd: fwd + (BD + 2·(3nBD + nK))·size (grad_out and inputs read, their grads written)",
)


# -- the convolutional MixedOp ------------------------------------------------------------


def _make_mixed(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    torch.manual_seed(0)
    module = MixedOp(shape["C"], shape["stride"]).to(device, dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["C"], shape["H"], shape["H"], generator=g, dtype=dtype)
    w = torch.softmax(torch.randn(len(CNN_PRIMITIVES), generator=g, dtype=dtype), -1)
    x, w = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    return Inputs({"module": module, "x": x, "weights": w}, [x, w, *module.parameters()])


def _mixed_params(c: int, stride: int) -> int:
    return sum(p.numel() for p in MixedOp(c, stride).parameters())


def _mixed_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    b, c, h, s = shape["B"], shape["C"], shape["H"], shape["stride"]
    x, out = b * c * h * h, b * c * (h // s) ** 2
    p = _mixed_params(c, s) + len(CNN_PRIMITIVES)  # conv weights + the 8 op weights
    fwd = x + p + out
    bwd = out + 2 * x + 2 * p  # grad_out, x and params read; grad_x and their grads written
    return size * (fwd if pass_ == "fwd" else fwd + bwd)


MIXED_OP = Kernel(
    name="cnn_mixed_op",
    shapes={
        # Search network at batch 64: first normal cells (C 16, 32×32), the first reduction
        # edges (C 32 at 32×32, stride 2), the last normal cells (C 64, 8×8).
        "paper": [
            {"B": 64, "C": 16, "H": 32, "stride": 1},
            {"B": 64, "C": 32, "H": 32, "stride": 2},
            {"B": 64, "C": 64, "H": 8, "stride": 1},
        ],
        "large": [{"B": 256, "C": 64, "H": 16, "stride": 1}],
        "tiny": [{"B": 2, "C": 4, "H": 8, "stride": 1}],
    },
    make=_make_mixed,
    impls={"reference": lambda a: a["module"](a["x"], a["weights"])},
    bytes_moved=_mixed_bytes,
    formula="x = B·C·H·W, out = B·C·H'·W', P = conv weights + 8; fwd: (x + P + out)·size; "
    "fwd+bwd: fwd + (out + 2x + 2P)·size (grad_out, x, P read; grad_x, grad_P written)",
)

# -- the fused convolutional MixedOp and cell (fastdarts.ops.conv_mixed) ----------------


def _make_mixed_fused(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    inputs = _make_mixed(shape, device, dtype)
    fused = FusedMixedOp(shape["C"], shape["stride"]).to(device, dtype)
    fused.load_state_dict(inputs.args["module"].state_dict())
    # Gradients of x and the op weights only: the two modules hold their weights apart.
    x, w = inputs.leaves[:2]
    return Inputs({**inputs.args, "fused": fused}, [x, w])


MIXED_OP_FUSED = Kernel(
    name="cnn_mixed_op_fused",
    shapes=MIXED_OP.shapes,
    make=_make_mixed_fused,
    impls={
        "reference": lambda a: a["module"](a["x"], a["weights"]),
        # One edge: batched convolutions, one BN, the mixture kernel (C++ / Triton).
        "fused": lambda a: a["fused"](a["x"], a["weights"]),
    },
    fused_parts=_conv_parts("mix", "depthwise", "pointwise", "pools", "batch_norm"),
    bytes_moved=_mixed_bytes,
    formula=MIXED_OP.formula + "; fwd+bwd differentiates x and the op weights only",
)


def _make_cell(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    b, c, h, red = shape["B"], shape["C"], shape["H"], bool(shape["reduction"])
    torch.manual_seed(0)
    cell = SearchCell(CNN_STEPS, 4, c, c, c, red, False).to(device, dtype)
    fused = copy.deepcopy(cell)
    fused._ops = fused_cell_ops(fused)
    g = torch.Generator().manual_seed(0)
    s0, s1 = (torch.randn(b, c, h, h, generator=g, dtype=dtype) for _ in range(2))
    w = torch.softmax(torch.randn(14, len(CNN_PRIMITIVES), generator=g, dtype=dtype), -1)
    s0, s1, w = (t.to(device).requires_grad_() for t in (s0, s1, w))
    return Inputs({"cell": cell, "fused": fused, "s0": s0, "s1": s1, "w": w}, [s0, s1, w])


def _cell_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    b, c, h, red = shape["B"], shape["C"], shape["H"], shape["reduction"]
    x, out = 2 * b * c * h * h, 4 * b * c * (h // (2 if red else 1)) ** 2
    cell = SearchCell(CNN_STEPS, 4, c, c, c, bool(red), False)
    p = sum(t.numel() for t in cell.parameters()) + 14 * len(CNN_PRIMITIVES)
    fwd = x + p + out
    return size * (fwd if pass_ == "fwd" else fwd + out + 2 * x + p)


CELL_FUSED = Kernel(
    name="cnn_cell_fused",
    shapes={
        "paper": [
            {"B": 64, "C": 16, "H": 32, "reduction": 0},
            {"B": 64, "C": 32, "H": 32, "reduction": 1},
        ],
        "large": [{"B": 256, "C": 64, "H": 16, "reduction": 0}],
        "tiny": [{"B": 2, "C": 4, "H": 8, "reduction": 1}],
    },
    make=_make_cell,
    impls={
        "reference": lambda a: a["cell"](a["s0"], a["s1"], a["w"]),
        # The 14 edges as 4 batched groups, one mixture kernel each.
        "fused": lambda a: a["fused"](a["s0"], a["s1"], a["w"]),
    },
    fused_parts=_conv_parts("mix", "depthwise", "pointwise", "pools", "batch_norm"),
    bytes_moved=_cell_bytes,
    formula="s = 2·B·C·H·W (the two inputs), out = 4·B·C·H'·W', P = weights + 14·8; fwd: "
    "(s + P + out)·size; fwd+bwd: fwd + (out + 2s + P)·size (grads of inputs and α only)",
)

# -- the first-stage depthwise convolutions of a group (fastdarts.ops.conv_mixed.depthwise) --

# (kernel, padding, dilation) of sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5.
DW_SHAPES = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2)]


def _make_depthwise(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(0)
    b, c, h = shape["B"], shape["C"], shape["H"]
    x = torch.randn(b, c, h, h, generator=g, dtype=dtype)
    ws = [torch.randn(c, 1, k, k, generator=g, dtype=dtype) for k, _, _ in DW_SHAPES]
    leaves = [t.to(device).requires_grad_() for t in (x, *ws)]
    return Inputs({"x": leaves[0], "ws": leaves[1:], "stride": shape["stride"]}, leaves)


def _depthwise_args(a: dict[str, Any]) -> tuple:
    pads, dils = [p for _, p, _ in DW_SHAPES], [d for _, _, d in DW_SHAPES]
    return a["x"], a["ws"], a["stride"], pads, dils, [0] * len(DW_SHAPES)


def _depthwise_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    b, c, h, s = shape["B"], shape["C"], shape["H"], shape["stride"]
    x, out = b * c * h * h, len(DW_SHAPES) * b * c * ((h - 1) // s + 1) ** 2
    w = c * sum(k * k for k, _, _ in DW_SHAPES)
    fwd = x + w + out
    return size * (fwd if pass_ == "fwd" else fwd + out + 2 * x + 2 * w)


DEPTHWISE = Kernel(
    name="cnn_depthwise",
    shapes={
        # A normal cell's first group reads 2 edges' inputs (C 16 each at 32x32); the first
        # reduction cell's, 2 edges of C 32 at stride 2; batch 64.
        "paper": [
            {"B": 64, "C": 32, "H": 32, "stride": 1},
            {"B": 64, "C": 64, "H": 32, "stride": 2},
        ],
        "large": [{"B": 256, "C": 128, "H": 16, "stride": 2}],
        "tiny": [{"B": 2, "C": 3, "H": 9, "stride": 2}],
    },
    make=_make_depthwise,
    impls={
        # One grouped convolution per kernel shape, concatenated (oneDNN on the CPU).
        "reference": lambda a: depthwise_reference(*_depthwise_args(a)),
        # The four shapes in one kernel each way: C++ on the CPU, Triton on CUDA.
        "fused": lambda a: depthwise(*_depthwise_args(a)),
    },
    fused_parts=_conv_parts("depthwise"),
    bytes_moved=_depthwise_bytes,
    formula="x = B·C·H·W, out = 4·B·C·H'·W', w = C·Σk²; fwd: (x + w + out)·size; fwd+bwd: "
    "fwd + (out + 2x + 2w)·size (grad_out, x, w read; their grads written)",
)


# -- the grouped 1×1 convolutions of a group (fastdarts.ops.conv_mixed.pointwise) --------


def _make_pointwise(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    g = torch.Generator().manual_seed(0)
    b, groups, c, h = shape["B"], shape["G"], shape["C"], shape["H"]
    x = torch.randn(b, groups * c, h, h, generator=g, dtype=dtype)
    w = torch.randn(groups * c, c, 1, 1, generator=g, dtype=dtype) / c**0.5
    leaves = [t.to(device).requires_grad_() for t in (x, w)]
    return Inputs({"x": leaves[0], "w": leaves[1], "groups": groups}, leaves)


def _pointwise_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    x = shape["B"] * shape["G"] * shape["C"] * shape["H"] ** 2
    w = shape["G"] * shape["C"] ** 2
    fwd = 2 * x + w  # x read, out (as large as x) written
    return size * (fwd if pass_ == "fwd" else fwd + 3 * x + 2 * w)


POINTWISE = Kernel(
    name="cnn_pointwise",
    shapes={
        # The first stage's 1x1 convolutions of a normal cell's first group (E = 8 edges, 4
        # conv ops: 32 groups of C channels) at each of the search network's three
        # resolutions (C 16 at 32x32, 32 at 16x16, 64 at 8x8), batch 64.
        "paper": [
            {"B": 64, "G": 32, "C": 16, "H": 32},
            {"B": 64, "G": 32, "C": 32, "H": 16},
            {"B": 64, "G": 32, "C": 64, "H": 8},
        ],
        "large": [{"B": 256, "G": 32, "C": 32, "H": 16}],
        "tiny": [{"B": 2, "G": 3, "C": 5, "H": 7}],
    },
    make=_make_pointwise,
    impls={
        # One grouped convolution (oneDNN or THNN on the CPU).
        "reference": lambda a: torch.nn.functional.conv2d(a["x"], a["w"], groups=a["groups"]),
        # The C++ kernel each way (cuDNN's convolution on CUDA).
        "fused": lambda a: pointwise(a["x"], a["w"], a["groups"]),
    },
    fused_parts=_conv_parts("pointwise"),
    bytes_moved=_pointwise_bytes,
    formula="x = B·G·C·H·W (out the same), w = G·C²; fwd: (2x + w)·size; fwd+bwd: fwd + "
    "(3x + 2w)·size (grad_out and x read, grad_x written; w read, grad_w written)",
)


# -- both 3x3 pools of a group's input (fastdarts.ops.conv_mixed.pools) --------------------


def _make_planes(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    """x (B, C, H, H), the only input (pools and BatchNorm), with the shape's stride if any."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape["B"], shape["C"], shape["H"], shape["H"], generator=g, dtype=dtype)
    x = x.to(device).requires_grad_()
    return Inputs({"x": x, **({"stride": shape["stride"]} if "stride" in shape else {})}, [x])


def _pools_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    b, c, h, s = shape["B"], shape["C"], shape["H"], shape["stride"]
    x, out = b * c * h * h, 2 * b * c * ((h - 1) // s + 1) ** 2
    return size * (x + out if pass_ == "fwd" else 2 * (x + out))


POOLS = Kernel(
    name="cnn_pools",
    shapes={
        # A normal cell's group input (E = 2 edges of C 16 at 32x32) and a reduction
        # group's (E = 2 edges of C 32 at 32x32, stride 2), batch 64.
        "paper": [
            {"B": 64, "C": 32, "H": 32, "stride": 1},
            {"B": 64, "C": 64, "H": 32, "stride": 2},
        ],
        "large": [{"B": 256, "C": 128, "H": 16, "stride": 1}],
        "tiny": [{"B": 2, "C": 3, "H": 7, "stride": 2}],
    },
    make=_make_planes,
    impls={
        # torch's max_pool2d and avg_pool2d (count_include_pad=False), concatenated.
        "reference": lambda a: pools_reference(a["x"], a["stride"]),
        # One kernel each way for both pools: C++ on the CPU, Triton on CUDA (torch's two
        # ops where neither runs).
        "fused": lambda a: pools(a["x"], a["stride"]),
    },
    fused_parts=_conv_parts("pools"),
    bytes_moved=_pools_bytes,
    formula="x = B·C·H·W, out = 2·B·C·H'·W'; fwd: (x + out)·size; fwd+bwd: 2·(x + out)·size "
    "(x and grad_out read, out and grad_x written)",
)


# -- BatchNorm's training forward, no affine (fastdarts.ops.conv_mixed.batch_norm) --------


def _batch_norm_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    n = shape["B"] * shape["C"] * shape["H"] ** 2
    return size * (2 * n if pass_ == "fwd" else 5 * n)


BATCH_NORM = Kernel(
    name="cnn_batch_norm",
    shapes={
        # A group's BatchNorms: the normal cell's first group (E = 2, C = 16: 4EC = 128
        # channels at 32x32) and the first reduction cell's (E = 2, C = 32, at 16x16), batch 64.
        "paper": [{"B": 64, "C": 128, "H": 32}, {"B": 64, "C": 256, "H": 16}],
        "large": [{"B": 256, "C": 256, "H": 16}],
        "tiny": [{"B": 2, "C": 3, "H": 5}],
    },
    make=_make_planes,
    impls={
        # torch's native_batch_norm (batch statistics, no affine) and its backward.
        "reference": lambda a: torch.nn.functional.batch_norm(a["x"], None, None, training=True),
        # The C++ kernel each way on the CPU; torch's own op elsewhere.
        "fused": lambda a: batch_norm(a["x"])[0],
    },
    fused_parts=_conv_parts("batch_norm"),
    bytes_moved=_batch_norm_bytes,
    formula="n = B·C·H·W; fwd: 2n·size (x read, y written); fwd+bwd: fwd + 3n·size (grad_out "
    "and x read, grad_x written)",
)

# -- the RNN language model's loss (fastdarts.ops.cross_entropy) ---------------------------


def _make_logits(shape: dict[str, int], device: torch.device, dtype: torch.dtype) -> Inputs:
    n, v = shape["N"], shape["V"]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g, dtype=dtype).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    return Inputs({"logits": logits, "targets": targets}, [logits])


def _cross_entropy_bytes(shape: dict[str, int], pass_: str, size: int) -> int:
    logits = shape["N"] * shape["V"]
    return size * (logits if pass_ == "fwd" else 3 * logits)


CROSS_ENTROPY = Kernel(
    name="rnn_cross_entropy",
    shapes={
        # The search's logits: bptt 35 × batch 256 rows of PTB's 10,000 words (and a short
        # sequence's 17).
        "paper": [{"N": 35 * 256, "V": 10000}, {"N": 17 * 256, "V": 10000}],
        "large": [{"N": 70 * 512, "V": 10000}],
        "tiny": [{"N": 6, "V": 37}],
    },
    make=_make_logits,
    impls={
        # torch's log-softmax and NLL loss, and their backwards.
        "reference": lambda a: F.cross_entropy(a["logits"], a["targets"]),
        # One Triton kernel each way on CUDA (the mean a torch op); torch's op elsewhere.
        "fused": lambda a: cross_entropy(a["logits"], a["targets"]),
    },
    fused_parts=lambda device: _both(
        lambda way: "triton" if cross_entropy_ops.triton_ready(device) else "reference",
        "cross_entropy",
    ),
    bytes_moved=_cross_entropy_bytes,
    formula="fwd: N·V·size (the logits read once); fwd+bwd: 3·N·V·size (read again, their "
    "gradient written)",
)

KERNELS: list[Kernel] = [
    RECURRENT,
    MIXED_OP,
    MIXED_OP_FUSED,
    CELL_FUSED,
    DEPTHWISE,
    POINTWISE,
    POOLS,
    BATCH_NORM,
    CROSS_ENTROPY,
]


# -- measurement --------------------------------------------------------------------------


def copy_bandwidth_gb_s(device: torch.device, mib: int, repeats: int = 5) -> float:
    """Achieved GB/s of a large device-to-device (or RAM-to-RAM) copy, bytes read + written."""
    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = harness.interleaved(
        {"copy": lambda: dst.copy_(src)}, repeats, warmup=2, sync=harness.synchronizer(device)
    )["copy"]
    return 2 * src.numel() * 4 / harness.Summary.of(times).median / 1e9


def _pass_fn(impl, inputs: Inputs, pass_: str, grad_out: torch.Tensor | None):
    if pass_ == "fwd":
        return lambda: impl(inputs.args)
    return lambda: torch.autograd.grad(impl(inputs.args), inputs.leaves, grad_out)


def _peak_mb(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak allocated during one call (CUDA); None on CPU, where RSS can't be reset."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


def bench_kernel(
    kernel: Kernel,
    config: str,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    copy_gb_s: float | None,
    number: int = 1,
) -> Iterator[dict]:
    """Rows for every shape of ``config``, both passes, every implementation, each yielded
    as soon as it is measured."""
    size = torch.empty((), dtype=dtype).element_size()
    for shape in kernel.shapes[config]:
        inputs = kernel.make(shape, device, dtype)
        grad_out = torch.randn_like(kernel.impls["reference"](inputs.args).detach())
        for pass_ in PASSES:
            fns = {
                name: _pass_fn(impl, inputs, pass_, grad_out) for name, impl in kernel.impls.items()
            }
            sync = harness.synchronizer(device)
            times = harness.interleaved(fns, repeats, warmup, sync=sync, number=number)
            ref = harness.Summary.of(times["reference"]).median
            moved = kernel.bytes_moved(shape, pass_, size)
            for name, fn in fns.items():
                s = harness.Summary.of(times[name])
                gb_s = moved / s.median / 1e9
                yield {
                    "kernel": kernel.name,
                    "shape": kernel.describe(shape),
                    "pass": pass_,
                    "config": config,
                    "backend": name,
                    "flags": [],
                    "device": str(device),
                    "median_s": s.median,
                    "min_s": s.min,
                    "max_s": s.max,
                    "ratio_vs_reference": s.median / ref,
                    "ops_per_step": harness.count_ops(fn).total(),
                    "kernel_launches_per_step": harness.count_kernel_launches(fn, device),
                    "peak_mem_mb": _peak_mb(fn, device),
                    "projected_gpu_hours": None,
                    "speedup": ref / s.median,
                    "bytes": moved,
                    "gb_per_s": gb_s,
                    "bandwidth_fraction": gb_s / copy_gb_s if copy_gb_s else None,
                    "implementation": implementation(kernel, name, pass_, device),
                }


COLUMNS = [
    ("kernel", "kernel"),
    ("shape", "shape"),
    ("pass", "pass"),
    ("impl", "backend"),
    ("runs", "implementation"),
    ("median s", "median_s"),
    ("speedup", "speedup"),
    ("ops", "ops_per_step"),
    ("launches", "kernel_launches_per_step"),
    ("MB moved", "mb"),
    ("GB/s", "gb_per_s"),
    ("of copy BW", "bandwidth_fraction"),
]

# The shape sets, in the order the kernels' entries give them.
CONFIGS = tuple(dict.fromkeys(config for k in KERNELS for config in k.shapes))


def _names(known: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: comma-separated names, each one of ``known``."""

    def parse(text: str) -> list[str]:
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            what = f"unknown {', '.join(unknown)}" if unknown else "no name given"
            raise argparse.ArgumentTypeError(f"{what}; have {', '.join(known)}")
        return names

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument(
        "--configs",
        type=_names(CONFIGS),
        default="paper,large",
        help=f"shape sets, comma-separated: {', '.join(CONFIGS)} (default: paper,large)",
    )
    p.add_argument(
        "--kernels",
        type=_names([k.name for k in KERNELS]),
        default=[k.name for k in KERNELS],
        help=f"kernel names, comma-separated: {', '.join(k.name for k in KERNELS)} (default: all)",
    )
    # The defaults depend on --device: None stands for the device's.
    p.add_argument(
        "--repeats", type=harness.positive_int, help="timed samples (default: cuda 20, cpu 5)"
    )
    p.add_argument(
        "--warmup", type=harness.non_negative_int, help="untimed calls (default: cuda 3, cpu 1)"
    )
    p.add_argument(
        "--number",
        type=harness.positive_int,
        help="back-to-back calls per timed sample, averaged (default: cuda 10, cpu 1)",
    )
    p.add_argument(
        "--copy-mib",
        type=harness.positive_int,
        help="size of the bandwidth-measuring copy (default: cuda 1024, cpu 256)",
    )
    harness.add_threads_argument(p)
    p.add_argument("--json", default=None, help="write the results here (after every row)")
    args = p.parse_args(argv)
    harness.check_device(p, args.device)
    harness.check_json_path(p, args.json)
    return args


def _device_default(value: int | None, cuda: bool, on_cuda: int, on_cpu: int) -> int:
    return value if value is not None else (on_cuda if cuda else on_cpu)


def main(argv: list[str] | None = None) -> dict:
    """Runs the kernel benchmarks; returns (and optionally writes) the result document."""
    args = parse_args(argv)
    device = harness.setup(args.device, args.threads)
    cuda = device.type == "cuda"
    repeats = _device_default(args.repeats, cuda, 20, 5)
    warmup = _device_default(args.warmup, cuda, 3, 1)
    number = _device_default(args.number, cuda, 10, 1)
    copy_mib = _device_default(args.copy_mib, cuda, 1024, 256)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]

    copy_gb_s = copy_bandwidth_gb_s(device, copy_mib)
    print(f"copy bandwidth: {copy_gb_s:.1f} GB/s ({copy_mib} MiB, read + write)")
    rows: list[dict] = []
    doc = {
        "env": harness.env_info(device, [SCRIPT, *(sys.argv[1:] if argv is None else argv)]),
        "rows": rows,
        "run": {
            "repeats": repeats,
            "warmup": warmup,
            "number": number,
            "median_s": "median over the repeats of one sample's seconds per call, a sample "
            "being `number` back-to-back calls between two device syncs",
            "dtype": args.dtype,
            "copy_mib": copy_mib,
            "copy_gb_s": copy_gb_s,
            "bytes": {k.name: k.formula for k in KERNELS if k.name in args.kernels},
            "fwd": "forward with autograd recording (as in a search step)",
            "ops_per_step": "ATen ops dispatched by one call (custom ops count once plus the "
            "ATen ops inside them)",
            "bandwidth_fraction": "gb_per_s / copy_gb_s, the copy measured in this run",
            "implementation": "what the row's implementation ran here: cpp (the C++ "
            "extension), cuda (its CUDA kernel), triton, torch (torch's ops); parts listed "
            "by kind where they differ",
        },
    }
    for kernel in KERNELS:
        if kernel.name in args.kernels:
            for config in args.configs:
                for row in bench_kernel(
                    kernel, config, device, dtype, repeats, warmup, copy_gb_s, number
                ):
                    rows.append(row)
                    # Each row saved as it ends: a run stopped by a time limit keeps it.
                    if args.json:
                        harness.write_json(args.json, doc)
    table = [{**r, "mb": r["bytes"] / 1e6} for r in rows]
    return harness.report(doc, COLUMNS, args.json, table)


if __name__ == "__main__":
    main()
