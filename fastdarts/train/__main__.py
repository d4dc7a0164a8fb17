"""python -m fastdarts.train: train a derived cell from scratch, with the paper's settings.

python -m fastdarts.train --space rnn --genotype DARTS_V2 --dataset ptb
python -m fastdarts.train --space cnn --genotype runs/search-cnn/genotype.json --dataset cifar10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fastdarts.cli import OneLineParser, report
from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.train.config import TrainConfig
from fastdarts.train.loop import run_training

PROG = "python -m fastdarts.train"

HELP = {
    "space": "rnn (recurrent cell, PTB language model) or cnn (convolutional cell, CIFAR-10)",
    "genotype": "a published genotype's name (DARTS_V1, DARTS_V2) or a genotype JSON file",
    "dataset": "ptb for rnn, cifar10 for cnn (default: the space's)",
    "epochs": "epochs (paper: 8000 rnn, an upper limit; 600 cnn)",
    "max_steps": "stop after this many steps in all (resume with a larger value to go on)",
    "epoch_steps": "cap each epoch at this many steps (quick trials)",
    "batch_size": "batch size (paper: 64 rnn, 96 cnn)",
    "seed": "random seed",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "data": "data folder (never downloads); default: $FASTDARTS_DATA, the cache, a download",
    "out": "run folder (default: runs/train-SPACE)",
    "resume": "continue the run in --out from its checkpoint.pt",
    "threads": "CPU threads (a resumed run keeps its run's count unless given)",
    "checkpoint_every": "checkpoint every N steps (and at each epoch end)",
    "log_every": "write a metrics line every N steps",
    "eval_batches": "cap validation and test at N batches (quick trials; the test is partial)",
    "lr": "learning rate (paper: 20 rnn, 0.025 cnn)",
    "weight_decay": "weight decay (paper: 8e-7 rnn, 3e-4 cnn)",
    "emsize": "rnn: embedding size",
    "nhid": "rnn: hidden size (= emsize)",
    "bptt": "rnn: sequence length",
    "max_seq_len_delta": "rnn: longest sequence is bptt + this",
    "clip": "rnn: gradient norm clip",
    "dropout": "rnn: output dropout",
    "dropouth": "rnn: hidden-state dropout",
    "dropoutx": "rnn: cell-input dropout",
    "dropouti": "rnn: embedding dropout",
    "dropoute": "rnn: word (embedding row) dropout",
    "tar": "rnn: temporal activation regularisation β",
    "nonmono": "rnn: switch to averaged SGD when validation is worse than N epochs before",
    "eval_batch_size": "rnn: validation batch size",
    "test_batch_size": "rnn: test batch size",
    "init_channels": "cnn: initial channels C",
    "layers": "cnn: cells",
    "momentum": "cnn: SGD momentum",
    "grad_clip": "cnn: gradient norm clip",
    "cutout": "cnn: cutout square side in pixels (0: off)",
    "drop_path": "cnn: final drop-path probability (rises linearly from 0)",
    "auxiliary_weight": "cnn: auxiliary head loss weight (0: no auxiliary head)",
}
CHOICES = {"space": ("rnn", "cnn"), "dataset": ("ptb", "cifar10")}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror TrainConfig's fields; only the flags given end up in the namespace."""
    parser = OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=HELP[f.name] + shown)
    return parser


def make_config(given: dict) -> TrainConfig:
    """The flags given, over (with --resume) the run's saved settings, over the defaults."""
    out = given.get("out") or f"runs/train-{given.get('space', 'rnn')}"
    base = {}
    saved = Path(out) / "config.json"
    if given.get("resume") and saved.is_file():
        try:
            base = json.loads(saved.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{saved}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        base = {k: v for k, v in base.items() if k in known}
        if given.get("space", base.get("space")) != base.get("space"):
            raise ConfigError(
                f"{out}: a run of the {base.get('space')} space, but --space is {given['space']}"
            )
    return TrainConfig(**{**base, **given, "out": out})


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    try:
        result = run_training(make_config(given))
    except FastDartsError as e:
        return report(PROG, e)
    except KeyboardInterrupt:
        out = given.get("out", "runs/train-SPACE")
        print(f"{PROG}: interrupted; continue with --resume --out {out}", file=sys.stderr)
        return 130
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
