"""python -m fastdarts.search: DARTS architecture search with the paper's defaults.

python -m fastdarts.search --space rnn --dataset ptb        # recurrent cell on PTB
python -m fastdarts.search --space cnn --dataset cifar10    # convolutional cell on CIFAR-10
torchrun --nproc_per_node 4 -m fastdarts.search --space cnn # one search on 4 GPUs
"""

from __future__ import annotations

import argparse
import sys

from fastdarts import distributed
from fastdarts.cli import RUN_HELP, dataclass_parser, run_folder, run_reporting, saved_settings
from fastdarts.errors import ConfigError
from fastdarts.genotypes import to_dict
from fastdarts.search.architect import AMP_MODES, COMPAT_MODES, HVP_MODES
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import run_search
from fastdarts.search.seeds import run_seeds

PROG = "python -m fastdarts.search"

HELP = {
    **RUN_HELP,
    "space": "search space: rnn (recurrent cell, PTB) or cnn (convolutional cell, CIFAR-10)",
    "order": "1: first-order α-gradient; 2: second order through the unrolled step",
    "epochs": "epochs (paper: 50)",
    "batch_size": "batch size (paper: 256 rnn, 64 cnn)",
    "dtype": "float32 or float64",
    "out": "run folder (default: runs/search-SPACE)",
    "backend": "MixedOp implementation: reference, fused, auto (fastest that runs here)",
    "compat": "'darts': reproduce the published code where it departs from the maths",
    "hvp": "Hessian-vector product: fd (finite difference, the paper's) or exact",
    "batched_fd": "run the w+ and w- passes of the finite difference as one batched pass",
    "foreach": "the weight arithmetic of the step (virtual step, norms, w±, SGD, clipping) as "
    "multi-tensor ops: a few launches instead of several per weight tensor",
    "fast": "the fastest settings with the same results: --backend auto, --foreach (and "
    "--batched-fd for the RNN on GPUs)",
    "cuda_graphs": "capture the whole step in CUDA graphs, one per batch shape, and replay it "
    "(CUDA only; not yet validated on a GPU)",
    "amp": "bf16: matmuls and convolutions in bfloat16 (softmax, losses, reductions and the "
    "finite-difference passes in float32)",
    "sync_bn": "distributed (torchrun): normalise BatchNorm by the global batch's statistics "
    "instead of each process's shard (--backend reference, not with --batched-fd)",
    "seeds": "comma-separated seeds (e.g. 0,1,2,3): one search per seed in OUT/seed-S, then "
    "each cell trained from scratch briefly and ranked in OUT/summary.json",
    "rank_train": "flags of the short training that ranks the --seeds cells, e.g. "
    "'--epochs 20 --layers 8' (default: the paper's, --epochs 100 cnn, 300 rnn)",
    "eval_batches": "cap the evaluation at N batches per epoch",
    "lr": "weight learning rate (paper: 20 rnn, 0.025 cnn)",
    "weight_decay": "weight decay (paper: 5e-7 rnn, 3e-4 cnn)",
    "arch_lr": "α learning rate (paper: 3e-3 rnn, 3e-4 cnn)",
    "arch_weight_decay": "α weight decay",
    "eval_batch_size": "rnn: evaluation batch size",
    "lr_min": "cnn: final cosine learning rate",
    "train_portion": "cnn: share of CIFAR-10's training set used for weights (rest: α)",
}
CHOICES = {
    "space": ("rnn", "cnn"),
    "dataset": ("ptb", "cifar10"),
    "order": (1, 2),
    "dtype": ("float32", "float64"),
    "compat": COMPAT_MODES,
    "hvp": HVP_MODES,
    "amp": AMP_MODES,
}


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror SearchConfig's fields; only the flags given end up in the namespace."""
    description = __doc__.splitlines()[0].split(": ", 1)[1]
    return dataclass_parser(SearchConfig, PROG, description, HELP, CHOICES)


def make_config(given: dict) -> SearchConfig:
    """The run's settings: the flags given, over (with --resume) the run's saved settings,
    over the defaults — so ``--resume --out DIR`` alone continues a run as it was started."""
    out = run_folder(given, "search")
    if given.get("fast") and "backend" in given:
        raise ConfigError("--fast picks the fastest backend itself: give --backend or --fast")
    base = saved_settings(SearchConfig, out) if given.get("resume") else {}
    if base and given.get("space", base.get("space")) != base.get("space"):
        base = {}  # another space: let the checkpoint check say so
    if base.get("fast") and "backend" in given:
        raise ConfigError(
            f"{out} was started with --fast, which picks the backend itself: resume it "
            "without --backend"
        )
    return SearchConfig(**{**base, **given, "out": out})


def search(cfg: SearchConfig) -> dict | None:
    """The search (or, with --seeds, the searches and their ranking); what rank 0 prints."""
    result = run_seeds(cfg) if cfg.seeds else to_dict(run_search(cfg))
    return result if distributed.is_main() else None


def main(argv: list[str] | None = None) -> int:
    given = vars(build_parser().parse_args(argv))
    out = run_folder(given, "search")
    try:
        return run_reporting(distributed.label(PROG), out, lambda: search(make_config(given)))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
