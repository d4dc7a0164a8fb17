"""The convolutional evaluation network (NetworkCIFAR) built from a derived genotype.

A stem (3×3 conv to 3C channels, BN), ``layers`` cells with reductions at 1/3 and 2/3 of the
depth (channels double there), global average pooling and a linear classifier; an auxiliary
classifier reads the output of the cell at 2/3 of the depth during training. Each cell
preprocesses its two inputs to C channels, and node i sums the two ops the genotype names
(on the inputs it names); the cell outputs the concatenation of the ``concat`` nodes. Ops
are the search's with affine BatchNorm, pools without the BatchNorm the search adds.
Drop-path zeroes each non-identity op's output per example with probability p (scaling the
kept ones by 1/(1 − p)). Module and parameter names follow the original code (``stem``,
``cells.i.preprocess0``, ``cells.i._ops.k``, ``auxiliary_head``, ``classifier``).

No fused kernel applies here: the search's fused MixedOp fuses the candidate ops of one
edge, and a derived edge has a single op (plain cuDNN / MKL-DNN convolutions), so this
network runs on the reference ops whatever the backend.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdarts.genotypes import ConvGenotype
from fastdarts.spaces.cnn import DilConv, FactorizedReduce, Identity, SepConv, cell_inputs


def make_op(name: str, C: int, stride: int) -> nn.Module:
    """A discrete op of the evaluation network: C channels in and out."""
    if name == "max_pool_3x3":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)
    if name == "skip_connect":
        return Identity() if stride == 1 else FactorizedReduce(C, C, affine=True)
    if name in ("sep_conv_3x3", "sep_conv_5x5"):
        k = int(name[-1])
        return SepConv(C, C, k, stride, k // 2, affine=True)
    if name in ("dil_conv_3x3", "dil_conv_5x5"):
        k = int(name[-1])
        return DilConv(C, C, k, stride, k - 1, 2, affine=True)
    raise ValueError(f"no evaluation op '{name}'")


def drop_path(x: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """x (B, ...) with each example zeroed with probability p, the rest scaled by 1/(1 − p)."""
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x * mask.bernoulli_(keep, generator=generator).div_(keep)


class Cell(nn.Module):
    def __init__(
        self,
        genotype: ConvGenotype,
        c_prev_prev: int,
        c_prev: int,
        C: int,
        reduction: bool,
        reduction_prev: bool,
    ):
        super().__init__()
        self.reduction = reduction
        pre = cell_inputs(c_prev_prev, c_prev, C, reduction_prev, affine=True)
        self.preprocess0, self.preprocess1 = pre
        edges = genotype.reduce if reduction else genotype.normal
        self._concat = list(genotype.reduce_concat if reduction else genotype.normal_concat)
        self.multiplier = len(self._concat)
        self._indices = [j for _, j in edges]
        self._ops = nn.ModuleList(
            make_op(name, C, 2 if reduction and j < 2 else 1) for name, j in edges
        )

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """s0, s1 the two previous cells' outputs → (B, multiplier·C, H', W')."""
        states = [self.preprocess0(s0), self.preprocess1(s1)]
        for i in range(0, len(self._ops), 2):
            total = 0
            for op, j in zip(self._ops[i : i + 2], self._indices[i : i + 2]):
                h = op(states[j])
                if self.training and drop_prob > 0 and not isinstance(op, Identity):
                    h = drop_path(h, drop_prob, generator)
                total = total + h
            states.append(total)
        return torch.cat([states[i] for i in self._concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Module):
    """Auxiliary classifier on an 8×8 feature map: (B, C, 8, 8) → (B, num_classes)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.ReLU(inplace=False),
            nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=False),
            nn.Conv2d(128, 768, 2, bias=False),
            nn.BatchNorm2d(768),
            nn.ReLU(inplace=False),
        )
        self.classifier = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


class NetworkCIFAR(nn.Module):
    """The DARTS CIFAR-10 evaluation network. Defaults: C = 36, 20 cells, auxiliary head."""

    def __init__(
        self,
        genotype: ConvGenotype,
        C: int = 36,
        num_classes: int = 10,
        layers: int = 20,
        auxiliary: bool = True,
        stem_multiplier: int = 3,
    ):
        super().__init__()
        if layers < 3:
            raise ValueError(f"the evaluation network needs at least 3 layers, got {layers}")
        self._layers, self._auxiliary = layers, auxiliary
        self.aux_index = 2 * layers // 3
        c_curr = stem_multiplier * C
        self.stem = nn.Sequential(
            nn.Conv2d(3, c_curr, 3, padding=1, bias=False), nn.BatchNorm2d(c_curr)
        )
        c_prev_prev, c_prev, c_curr = c_curr, c_curr, C
        self.cells = nn.ModuleList()
        reduction_prev = False
        c_aux = c_prev
        for i in range(layers):
            reduction = i in (layers // 3, 2 * layers // 3)
            if reduction:
                c_curr *= 2
            cell = Cell(genotype, c_prev_prev, c_prev, c_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            c_prev_prev, c_prev = c_prev, cell.multiplier * c_curr
            if i == self.aux_index:
                c_aux = c_prev
        if auxiliary:
            self.auxiliary_head = AuxiliaryHeadCIFAR(c_aux, num_classes)
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_prev, num_classes)

    def forward(
        self,
        images: torch.Tensor,
        drop_prob: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, 32, 32) → logits (B, classes), auxiliary logits (training) or None.

        ``drop_prob`` is the drop-path probability (training only); its masks come from
        ``generator`` (on the images' device).
        """
        logits_aux = None
        s0 = s1 = self.stem(images)
        for i, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, drop_prob, generator)
            if i == self.aux_index and self._auxiliary and self.training:
                logits_aux = self.auxiliary_head(s1)
        return self.classifier(self.global_pooling(s1).flatten(1)), logits_aux
