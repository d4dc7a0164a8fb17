"""Reference convolutional search space (DARTS on CIFAR-10), in plain PyTorch.

A cell takes the outputs of the two previous cells, preprocesses them to C channels, and
builds 4 intermediate nodes; node i sums a MixedOp over each of its 2 + i inputs (14 edges
in all), and the cell outputs the concatenation of the 4 nodes (4C channels). A MixedOp is
Σ_k softmax(α_e)_k · op_k(x) over the 8 primitives; in reduction cells the edges from the
two cell inputs have stride 2. The network is a stem (3×3 conv, 3C channels, affine BN),
8 cells with reductions at 1/3 and 2/3 of the depth (channels double there), global
average pooling and a linear classifier. BatchNorm inside cells is affine=False and every
pooling op is followed by one. α: ``alphas_normal`` and ``alphas_reduce`` (14, 8).

Module and parameter names follow the original code (``stem``, ``cells.i.preprocess0``,
``cells.i._ops.e._ops.k``, ``classifier``) so its state_dicts load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from fastdarts.genotypes import CNN_PRIMITIVES, CNN_STEPS, ConvGenotype, derive_conv
from fastdarts.spaces.base import Batch, SearchModel, SearchOutput


class _Op(nn.Module):
    """Layers held in ``self.op`` (the original's module layout, so state_dict keys match)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.op = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ReLUConvBN(_Op):
    """ReLU, conv, BN."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, padding: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class DilConv(_Op):
    """ReLU, depthwise dilated conv, pointwise conv, BN."""

    def __init__(self, c_in, c_out, kernel, stride, padding, dilation, affine):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(
                c_in, c_in, kernel, stride, padding, dilation=dilation, groups=c_in, bias=False
            ),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class SepConv(_Op):
    """Two stacked (ReLU, depthwise conv, pointwise conv, BN); only the first has the stride."""

    def __init__(self, c_in, c_out, kernel, stride, padding, affine):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, stride, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in, affine=affine),
            nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, kernel, 1, padding, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out, affine=affine),
        )


class Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    """The ``none`` op: zeros of the output's shape (kept so its gradient path exists)."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """Halves the resolution: two stride-2 1×1 convs on offset grids, concatenated, BN."""

    def __init__(self, c_in: int, c_out: int, affine: bool):
        super().__init__()
        if c_out % 2:
            raise ValueError(f"FactorizedReduce needs an even channel count, got {c_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(c_in, c_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(x)
        return self.bn(torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:])], dim=1))


def _pool(pool: nn.Module, c: int) -> nn.Module:
    return nn.Sequential(pool, nn.BatchNorm2d(c, affine=False))


OPS: dict[str, Callable[[int, int], nn.Module]] = {
    "none": lambda c, stride: Zero(stride),
    "max_pool_3x3": lambda c, stride: _pool(nn.MaxPool2d(3, stride=stride, padding=1), c),
    "avg_pool_3x3": lambda c, stride: _pool(
        nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False), c
    ),
    "skip_connect": lambda c, stride: (
        Identity() if stride == 1 else FactorizedReduce(c, c, affine=False)
    ),
    "sep_conv_3x3": lambda c, stride: SepConv(c, c, 3, stride, 1, affine=False),
    "sep_conv_5x5": lambda c, stride: SepConv(c, c, 5, stride, 2, affine=False),
    "dil_conv_3x3": lambda c, stride: DilConv(c, c, 3, stride, 2, 2, affine=False),
    "dil_conv_5x5": lambda c, stride: DilConv(c, c, 5, stride, 4, 2, affine=False),
}


class MixedOp(nn.Module):
    """Σ_k weights[k] · op_k(x) over the 8 primitives. x (B, C, H, W), weights (8,)."""

    def __init__(self, C: int, stride: int):
        super().__init__()
        self._ops = nn.ModuleList(OPS[name](C, stride) for name in CNN_PRIMITIVES)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return sum(w * op(x) for w, op in zip(weights, self._ops))


def cell_inputs(
    c_prev_prev: int, c_prev: int, C: int, reduction_prev: bool, affine: bool
) -> tuple[nn.Module, nn.Module]:
    """The two preprocessing ops that bring the previous two cells' outputs to C channels at
    this cell's input size (FactorizedReduce for s0 after a reduction cell)."""
    if reduction_prev:
        pre0: nn.Module = FactorizedReduce(c_prev_prev, C, affine=affine)
    else:
        pre0 = ReLUConvBN(c_prev_prev, C, 1, 1, 0, affine=affine)
    return pre0, ReLUConvBN(c_prev, C, 1, 1, 0, affine=affine)


class SearchCell(nn.Module):
    def __init__(
        self,
        steps: int,
        multiplier: int,
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ):
        super().__init__()
        self.reduction, self._steps, self._multiplier = reduction, steps, multiplier
        pre = cell_inputs(c_prev_prev, c_prev, C, reduction_prev, affine=False)
        self.preprocess0, self.preprocess1 = pre
        self._ops = nn.ModuleList(
            MixedOp(C, 2 if reduction and j < 2 else 1) for i in range(steps) for j in range(2 + i)
        )

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """s0, s1 the two previous cells' outputs; weights (14, 8) → (B, 4C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        if not isinstance(self._ops, nn.ModuleList):
            # A backend's module for all edges at once (fastdarts.ops.conv_mixed.FusedCellOps),
            # installed by Backend.apply; same state_dict keys as the ModuleList.
            return self._ops(states, weights)
        offset = 0
        for _ in range(self._steps):
            s = sum(self._ops[offset + j](h, weights[offset + j]) for j, h in enumerate(states))
            offset += len(states)
            states.append(s)
        return torch.cat(states[-self._multiplier :], dim=1)


class ConvSearchModel(SearchModel):
    """The DARTS convolutional search network (reference implementation).

    Defaults are the paper's: C = 16, 8 layers, 10 classes, 4 nodes, stem multiplier 3.
    """

    space = "cnn"

    def __init__(
        self,
        C: int = 16,
        num_classes: int = 10,
        layers: int = 8,
        steps: int = CNN_STEPS,
        multiplier: int = 4,
        stem_multiplier: int = 3,
    ):
        super().__init__()
        if layers < 3:
            raise ValueError(f"the search network needs at least 3 layers, got {layers}")
        self._steps, self._multiplier = steps, multiplier
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            self.cells.append(
                SearchCell(
                    steps, multiplier, c_prev_prev, c_prev, c_curr, reduction, reduction_prev
                )
            )
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, multiplier * c_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)
        n_edges = sum(2 + i for i in range(steps))
        self.alphas_normal = nn.Parameter(1e-3 * torch.randn(n_edges, len(CNN_PRIMITIVES)))
        self.alphas_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, len(CNN_PRIMITIVES)))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) → class scores (B, num_classes)."""
        w_normal = torch.softmax(self.alphas_normal, dim=-1)
        w_reduce = torch.softmax(self.alphas_reduce, dim=-1)
        s0 = s1 = self.stem(images)
        for cell in self.cells:
            s0, s1 = s1, cell(s0, s1, w_reduce if cell.reduction else w_normal)
        return self.classifier(self.global_pooling(s1).flatten(1))

    def forward(self, batch: Batch, masks: dict[str, torch.Tensor] | None = None) -> SearchOutput:
        """batch.inputs (B, 3, H, W), batch.targets (B,) class ids; no dropout in search."""
        logits = self.logits(batch.inputs)
        loss = F.cross_entropy(logits, batch.targets)
        return SearchOutput(loss, loss.new_zeros(()), None, logits)

    def genotype(self) -> ConvGenotype:
        return derive_conv(self.alphas_normal, self.alphas_reduce, self._steps)

    @contextmanager
    def frozen_bn_stats(self) -> Iterator[None]:
        """As :meth:`SearchModel.frozen_bn_stats`, also for fused edge modules, which keep
        BatchNorm statistics without BatchNorm modules (a ``track_running_stats`` flag)."""
        fused = [
            m
            for m in self.modules()
            if isinstance(getattr(m, "track_running_stats", None), bool)
            and not isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        saved = [m.track_running_stats for m in fused]
        try:
            for m in fused:
                m.track_running_stats = False
            with super().frozen_bn_stats():
                yield
        finally:
            for m, s in zip(fused, saved):
                m.track_running_stats = s
