"""Search settings: the paper's defaults per space."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fastdarts.runs import SPACES, RunSettings, default_out


@dataclass
class SearchConfig(RunSettings):
    """Every setting of a search run. ``None`` means the space's paper default."""

    space: str = "rnn"
    dataset: str | None = None
    order: int = 2
    epochs: int = 50
    max_steps: int | None = None
    epoch_steps: int | None = None  # cap on steps per epoch (quick trials and tests)
    batch_size: int | None = None
    seed: int = 2
    device: str | None = None
    dtype: str = "float32"
    data: str | None = None
    out: str | None = None  # runs/search-SPACE
    resume: bool = False
    backend: str = "reference"
    compat: str | None = None
    hvp: str = "fd"
    batched_fd: bool = False
    amp: str = "off"
    foreach: bool = False
    sync_bn: bool = False  # distributed: BatchNorm over the global batch, not each shard
    seeds: str | None = None  # "0,1,2,3": one search per seed, ranked by a short training
    rank_train: str | None = None  # flags of that training (None: the paper's short run)
    fast: bool = False
    cuda_graphs: bool = False
    threads: int | None = None
    checkpoint_every: int = 200
    log_every: int = 50
    eval_batches: int | None = None  # cap on evaluation batches per epoch
    lr: float | None = None
    weight_decay: float | None = None
    arch_lr: float | None = None
    arch_weight_decay: float = 1e-3
    # recurrent space (PTB)
    emsize: int = 300
    nhid: int = 300
    bptt: int = 35
    clip: float = 0.25
    dropout: float = 0.75
    dropouth: float = 0.25
    dropoutx: float = 0.75
    dropouti: float = 0.2
    dropoute: float = 0.0
    tar: float = 1e-3
    eval_batch_size: int = 10
    # convolutional space (CIFAR-10)
    init_channels: int = 16
    layers: int = 8
    lr_min: float = 0.001
    momentum: float = 0.9
    grad_clip: float = 5.0
    train_portion: float = 0.5

    def resolved(self) -> SearchConfig:
        """A copy with the space's paper defaults filled in."""
        rnn = self.space == "rnn"
        paper = {
            "dataset": SPACES.get(self.space),
            "batch_size": 256 if rnn else 64,
            "lr": 20.0 if rnn else 0.025,
            "weight_decay": 5e-7 if rnn else 3e-4,
            "arch_lr": 3e-3 if rnn else 3e-4,
            "out": default_out("search", self.space),
        }
        filled = self.unset(paper)
        if self.fast:
            # The fastest settings that compute the same function: the fastest backend that
            # runs here, multi-tensor weight arithmetic (equal up to rounding), and for the
            # RNN on GPUs (second order, finite differences) w± in one batched pass, where
            # the whole-cell op runs both samples in one call: 4,150 → 3,356 launches a small
            # step, counted on the CUDA code path (cuda-path-ops-rnn-small.json). Not on the
            # CPU, where the C++ cell runs once per sample, nor yet for the CNN: batched, its
            # kernels run both samples too (5,586 → 4,906 launches a small step), but the
            # host's time on that path rises (tiny: 0.226 → 0.249 s, vmap's dispatch;
            # cuda-path-host-cnn-tiny.json) and activations are copied where vmap's layouts
            # meet (25,624 MiB a small step against 23,448): the GPU suite times both. It
            # stays available as --batched-fd.
            filled["backend"] = "auto"
            filled["foreach"] = self.compat is None
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            batchable = self.order == 2 and self.hvp == "fd" and self.compat is None
            batches = batchable and self.space == "rnn" and device != "cpu"
            filled["batched_fd"] = self.batched_fd or batches
        return dataclasses.replace(self, **filled)
