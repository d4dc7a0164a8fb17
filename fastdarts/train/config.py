"""Training settings: the paper's evaluation setups per space."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fastdarts.runs import SPACES, RunSettings, default_out


@dataclass
class TrainConfig(RunSettings):
    """Every setting of a training run. ``None`` means the space's paper default."""

    space: str = "rnn"
    genotype: str | None = None
    dataset: str | None = None
    epochs: int | None = None
    max_steps: int | None = None
    epoch_steps: int | None = None  # cap on steps per epoch (quick trials and tests)
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    data: str | None = None
    out: str | None = None  # runs/train-SPACE
    resume: bool = False
    backend: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 200
    log_every: int = 50
    eval_batches: int | None = None  # cap on validation and test batches (quick trials)
    lr: float | None = None
    weight_decay: float | None = None
    # recurrent network (PTB)
    emsize: int = 850
    nhid: int = 850
    bptt: int = 35
    max_seq_len_delta: int = 20
    clip: float = 0.25
    dropout: float = 0.75
    dropouth: float = 0.25
    dropoutx: float = 0.75
    dropouti: float = 0.2
    dropoute: float = 0.1
    tar: float = 1e-3
    nonmono: int = 5
    eval_batch_size: int = 10
    test_batch_size: int = 1
    # convolutional network (CIFAR-10)
    init_channels: int = 36
    layers: int = 20
    momentum: float = 0.9
    grad_clip: float = 5.0
    cutout: int = 16
    drop_path: float = 0.2
    auxiliary_weight: float = 0.4

    def resolved(self) -> TrainConfig:
        """A copy with the space's paper defaults filled in."""
        rnn = self.space == "rnn"
        paper = {
            "dataset": SPACES.get(self.space),
            "epochs": 8000 if rnn else 600,
            "batch_size": 64 if rnn else 96,
            "lr": 20.0 if rnn else 0.025,
            "weight_decay": 8e-7 if rnn else 3e-4,
            "out": default_out("train", self.space),
        }
        filled = self.unset(paper)
        return dataclasses.replace(self, **filled)
