"""python -m fastdarts.train: train a derived cell from scratch, with the paper's settings.

python -m fastdarts.train --space rnn --genotype DARTS_V2 --dataset ptb
python -m fastdarts.train --space cnn --genotype runs/search-cnn/genotype.json --dataset cifar10
"""

from __future__ import annotations

import argparse
import sys

from fastdarts.cli import RUN_HELP, dataclass_parser, run_folder, run_reporting, saved_settings
from fastdarts.errors import ConfigError
from fastdarts.train.config import TrainConfig
from fastdarts.train.loop import run_training

PROG = "python -m fastdarts.train"

HELP = {
    **RUN_HELP,
    "space": "rnn (recurrent cell, PTB language model) or cnn (convolutional cell, CIFAR-10)",
    "genotype": "a published genotype's name (DARTS_V1, DARTS_V2), a genotype JSON file, or "
    "a search's run folder (required, except with --resume)",
    "epochs": "epochs (paper: 8000 rnn, an upper limit; 600 cnn)",
    "batch_size": "batch size (paper: 64 rnn, 96 cnn)",
    "out": "run folder (default: runs/train-SPACE)",
    "backend": "rnn cell nodes and loss: reference, fused (one kernel per node; on GPUs the "
    "fused cross-entropy), auto (fused on GPUs where it runs, else reference); cnn: "
    "reference or auto",
    "eval_batches": "cap validation and test at N batches (quick trials; the test is partial)",
    "lr": "learning rate (paper: 20 rnn, 0.025 cnn)",
    "weight_decay": "weight decay (paper: 8e-7 rnn, 3e-4 cnn)",
    "max_seq_len_delta": "rnn: longest sequence is bptt + this",
    "nonmono": "rnn: switch to averaged SGD when validation is worse than N epochs before",
    "eval_batch_size": "rnn: validation batch size",
    "test_batch_size": "rnn: test batch size",
    "cutout": "cnn: cutout square side in pixels (0: off)",
    "drop_path": "cnn: final drop-path probability (rises linearly from 0)",
    "auxiliary_weight": "cnn: auxiliary head loss weight (0: no auxiliary head)",
}
CHOICES = {
    "space": ("rnn", "cnn"),
    "dataset": ("ptb", "cifar10"),
    "backend": ("reference", "fused", "auto"),
}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror TrainConfig's fields; only the flags given end up in the namespace."""
    description = __doc__.splitlines()[0].split(": ", 1)[1]
    return dataclass_parser(TrainConfig, PROG, description, HELP, CHOICES)


def make_config(given: dict) -> TrainConfig:
    """The flags given, over (with --resume) the run's saved settings, over the defaults."""
    out = run_folder(given, "train")
    base = saved_settings(TrainConfig, out) if given.get("resume") else {}
    if base and given.get("space", base.get("space")) != base.get("space"):
        raise ConfigError(
            f"{out}: a run of the {base.get('space')} space, but --space is {given['space']}"
        )
    return TrainConfig(**{**base, **given, "out": out})


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    out = run_folder(given, "train")
    return run_reporting(PROG, out, lambda: run_training(make_config(given)))


if __name__ == "__main__":
    sys.exit(main())
