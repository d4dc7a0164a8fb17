"""The dropout mask sampler: the one source of randomness inside a search step.

Every backend asks it for the masks of each pass, so a reference run and a fast run with the
same seed see identical masks and can be compared exactly. Its state is checkpointed. In a
distributed run every rank draws the global batch's masks and keeps its slice, so the masks
are those of one process, whatever the number of processes.
"""

from __future__ import annotations

import torch

from fastdarts import distributed
from fastdarts.spaces.base import MaskSpec


class MaskSampler:
    """Draws inverted-dropout masks (entries 0 or 1/(1 − rate)) from its own generator."""

    def __init__(self, seed: int, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(seed)

    def draw(self, specs: dict[str, MaskSpec], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """One pass's masks, in the order of ``specs`` (rate 0 entries are left out); the
        shapes are this rank's (its shard of the batch along each spec's ``batch_dim``)."""
        masks = {}
        world = distributed.world_size()
        for name, spec in specs.items():
            if spec.rate <= 0:
                continue
            keep = 1.0 - spec.rate
            shape = list(spec.shape)
            if spec.batch_dim is not None:
                shape[spec.batch_dim] *= world  # the global batch (shards are equal)
            mask = torch.empty(shape, device=self.device, dtype=dtype)
            mask = mask.bernoulli_(keep, generator=self.generator).div_(keep)
            if spec.batch_dim is not None:
                mask = distributed.shard(mask, spec.batch_dim)
            masks[name] = mask
        return masks

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])
