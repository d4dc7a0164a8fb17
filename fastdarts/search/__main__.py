"""python -m fastdarts.search: DARTS architecture search with the paper's defaults.

python -m fastdarts.search --space rnn --dataset ptb        # recurrent cell on PTB
python -m fastdarts.search --space cnn --dataset cifar10    # convolutional cell on CIFAR-10
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from fastdarts.cli import OneLineParser, report
from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.genotypes import to_dict
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import run_search

PROG = "python -m fastdarts.search"

HELP = {
    "space": "search space: rnn (recurrent cell, PTB) or cnn (convolutional cell, CIFAR-10)",
    "dataset": "ptb for rnn, cifar10 for cnn (default: the space's)",
    "order": "1: first-order α-gradient; 2: second order through the unrolled step",
    "epochs": "epochs (paper: 50)",
    "max_steps": "stop after this many steps in all (resume with a larger value to go on)",
    "epoch_steps": "cap each epoch at this many steps (quick trials)",
    "batch_size": "batch size (paper: 256 rnn, 64 cnn)",
    "seed": "random seed",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "dtype": "float32 or float64",
    "data": "data folder (never downloads); default: $FASTDARTS_DATA, the cache, a download",
    "out": "run folder (default: runs/search-SPACE)",
    "resume": "continue the run in --out from its checkpoint.pt",
    "backend": "MixedOp implementation: reference, fused, auto (fastest that runs here)",
    "compat": "'darts': reproduce the published code where it departs from the maths",
    "hvp": "Hessian-vector product: fd (finite difference, the paper's) or exact",
    "batched_fd": "run the w+ and w- passes of the finite difference as one batched pass",
    "fast": "the fastest settings with the same results: --backend auto --batched-fd",
    "amp": "bf16: matmuls and convolutions in bfloat16 (softmax, losses, reductions and the "
    "finite-difference passes in float32)",
    "threads": "CPU threads (a resumed run keeps its run's count unless given)",
    "checkpoint_every": "checkpoint every N steps (and at each epoch end)",
    "log_every": "write a metrics line every N steps",
    "eval_batches": "cap the evaluation at N batches per epoch",
    "lr": "weight learning rate (paper: 20 rnn, 0.025 cnn)",
    "weight_decay": "weight decay (paper: 5e-7 rnn, 3e-4 cnn)",
    "arch_lr": "α learning rate (paper: 3e-3 rnn, 3e-4 cnn)",
    "arch_weight_decay": "α weight decay",
    "emsize": "rnn: embedding size",
    "nhid": "rnn: hidden size (= emsize)",
    "bptt": "rnn: sequence length",
    "clip": "rnn: gradient norm clip",
    "dropout": "rnn: output dropout",
    "dropouth": "rnn: hidden-state dropout",
    "dropoutx": "rnn: cell-input dropout",
    "dropouti": "rnn: embedding dropout",
    "dropoute": "rnn: word (embedding row) dropout",
    "tar": "rnn: temporal activation regularisation β",
    "eval_batch_size": "rnn: evaluation batch size",
    "init_channels": "cnn: initial channels C",
    "layers": "cnn: cells",
    "lr_min": "cnn: final cosine learning rate",
    "momentum": "cnn: SGD momentum",
    "grad_clip": "cnn: gradient norm clip",
    "train_portion": "cnn: share of CIFAR-10's training set used for weights (rest: α)",
}
CHOICES = {
    "space": ("rnn", "cnn"),
    "dataset": ("ptb", "cifar10"),
    "order": (1, 2),
    "dtype": ("float32", "float64"),
    "compat": ("darts",),
    "hvp": ("fd", "exact"),
    "amp": ("off", "bf16"),
}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror SearchConfig's fields; only the flags given end up in the namespace."""
    parser = OneLineParser(
        prog=PROG,
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(SearchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=HELP[f.name])
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        shown = "" if f.default is None else f" (default: {f.default})"
        parser.add_argument(flag, type=kind, choices=CHOICES.get(f.name), help=HELP[f.name] + shown)
    return parser


def make_config(given: dict) -> SearchConfig:
    """The run's settings: the flags given, over (with --resume) the run's saved settings,
    over the defaults — so ``--resume --out DIR`` alone continues a run as it was started."""
    out = given.get("out") or f"runs/search-{given.get('space', 'rnn')}"
    base = {}
    saved = Path(out) / "config.json"
    if given.get("resume") and saved.is_file():
        try:
            base = json.loads(saved.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{saved}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(SearchConfig)}
        base = {k: v for k, v in base.items() if k in known}
        if given.get("space", base.get("space")) != base.get("space"):
            base = {}  # another space: let the checkpoint check say so
    return SearchConfig(**{**base, **given, "out": out})


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    try:
        genotype = run_search(make_config(given))
    except FastDartsError as e:
        return report(PROG, e)
    except KeyboardInterrupt:
        out = given.get("out", "runs/search-SPACE")
        print(f"{PROG}: interrupted; continue with --resume --out {out}", file=sys.stderr)
        return 130
    print(json.dumps(to_dict(genotype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
