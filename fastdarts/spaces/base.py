"""What every search model offers the architect and the search loop."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fastdarts.genotypes import Genotype


@dataclass
class Batch:
    """One pass's data. ``state`` is the carried recurrent state (RNN) or None (CNN).

    ``share`` is this rank's share of the global batch in a distributed run (its samples over
    the global batch's; 1 in one process): its loss's weight in the global batch's gradient.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    state: torch.Tensor | None = None
    share: float = 1.0


class SearchOutput(NamedTuple):
    """What one forward pass of a search model returns.

    ``loss`` is the plain task loss (NLL or cross-entropy), the one the architect
    differentiates; ``penalty`` is the regulariser the weight step adds (the RNN's temporal
    activation regularisation, zero for the CNN); ``state`` is the state to carry into the
    next batch (RNN) or None; ``logits`` are class scores where accuracy is reported (CNN).
    """

    loss: torch.Tensor
    penalty: torch.Tensor
    state: torch.Tensor | None
    logits: torch.Tensor | None


@dataclass(frozen=True)
class MaskSpec:
    """A dropout mask a pass needs: its shape and the drop rate (kept entries are 1/(1-rate)).

    ``batch_dim`` is the dimension that runs over the batch's samples, if any: a distributed
    run draws the mask for the global batch along it and keeps its rank's slice.
    """

    shape: tuple[int, ...]
    rate: float
    batch_dim: int | None = None


class SearchModel(nn.Module):
    """Base of the reference search models.

    α are registered parameters whose names start with ``alphas_``, so they are in
    ``state_dict`` and apart from the weights: ``arch_parameters()`` for the α optimiser,
    ``weights()`` for the weight optimiser. ``forward(batch, masks)`` returns a
    :class:`SearchOutput`; the model draws no random numbers itself — its dropout masks come
    in from the search's mask sampler, shaped as ``mask_specs`` says.
    """

    space: str = ""
    # Parameters shared by two modules (the RNN's tied embedding/decoder), by their first name.
    tied_weight_names: tuple[str, ...] = ()

    def named_arch_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if n.startswith("alphas_")]

    def arch_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_arch_parameters()]

    def named_weights(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("alphas_")]

    def weights(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_weights()]

    def mask_specs(self, batch: Batch) -> dict[str, MaskSpec]:
        """The dropout masks one training pass over ``batch`` needs (none by default)."""
        return {}

    def genotype(self) -> Genotype:
        raise NotImplementedError

    def alpha_probs(self) -> dict[str, list[list[float]]]:
        """softmax(α) per α parameter, as nested lists (for alpha.json)."""
        return {
            n.removeprefix("alphas_"): torch.softmax(p.detach().double(), -1).tolist()
            for n, p in self.named_arch_parameters()
        }

    @contextmanager
    def frozen_bn_stats(self) -> Iterator[None]:
        """Within the block, BatchNorm normalises by batch statistics but updates no
        running statistics (for passes at virtual or perturbed weights)."""
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.track_running_stats for m in bns]
        try:
            for m in bns:
                m.track_running_stats = False
            yield
        finally:
            for m, s in zip(bns, saved):
                m.track_running_stats = s
