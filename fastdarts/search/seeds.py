"""``--seeds``: independent searches, one per seed, ranked by a short training from scratch.

The paper's protocol: search four times with different seeds and keep the cell that does
best when trained from scratch for a short while (100 epochs on CIFAR-10, 300 on PTB). The
searches run one after another in ``OUT/seed-S`` (each across all processes under torchrun);
then rank 0 alone trains each derived cell (``python -m fastdarts.train`` with
``--rank-train``'s flags) in ``OUT/seed-S/train`` and writes ``OUT/summary.json``, the
cells ranked best first, and ``OUT/genotype.json``, the best cell. The RNN ranks by the
best validation perplexity of its training; the CNN by the accuracy its training reports
(fastdarts.train evaluates the CNN on CIFAR-10's test split, as the paper's code does).
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

from fastdarts import distributed
from fastdarts.errors import ConfigError
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import Searcher, run_search
from fastdarts.utils import atomic_write_text

PAPER_RANK_EPOCHS = {"cnn": 100, "rnn": 300}


def _say(line: str) -> None:
    """A progress line on stderr (rank 0): whose the epoch lines that follow are."""
    if distributed.is_main():
        print(line, file=sys.stderr)


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2,3"`` → [0, 1, 2, 3]; ConfigError unless distinct integers."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds must be comma-separated integers, got '{text}'") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must list distinct integers, got '{text}'")
    return seeds


def run_seeds(cfg: SearchConfig) -> dict | None:
    """One search per seed of ``cfg.seeds``, then the ranking; returns the summary (rank 0)
    or None (the other ranks, which stop once the searches are done)."""
    seeds = parse_seeds(cfg.seeds or "")
    root = Path(cfg.resolved().out)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--out {root}: a file, not a folder; choose another --out")
    searches = []
    for seed in seeds:
        out = root / f"seed-{seed}"
        resume = cfg.resume and (out / "checkpoint.pt").is_file()
        one = dataclasses.replace(
            cfg, seed=seed, seeds=None, rank_train=None, out=str(out), resume=resume
        )
        Searcher.validate(one.resolved())  # every search's settings before the first runs
        searches.append(one)
    _train_config(cfg, root / f"seed-{seeds[0]}")  # and --rank-train's
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / "config.json", json.dumps(cfg.to_dict(), indent=1))
    for one in searches:
        _say(f"seed {one.seed}: search in {one.out}")
        run_search(one)
    if not distributed.is_main():
        return None
    results = [_train_cell(cfg, seed, root / f"seed-{seed}") for seed in seeds]
    lower_better = cfg.space == "rnn"
    results.sort(key=lambda r: r["score"] if lower_better else -r["score"])
    summary = {
        "space": cfg.space,
        "criterion": "valid_ppl (lower is better)" if lower_better else "test_acc (higher)",
        "best_seed": results[0]["seed"],
        "ranking": results,
    }
    atomic_write_text(root / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(root / "genotype.json", Path(results[0]["genotype"]).read_text())
    return summary


def _train_config(cfg: SearchConfig, run: Path):
    """The settings of the short training of ``run``'s cell: the paper's, then --rank-train's
    flags; ConfigError if those are bad (checked before the searches, not hours later)."""
    from fastdarts.train.__main__ import build_parser, make_config
    from fastdarts.train.loop import Trainer

    out = run / "train"
    argv = ["--space", cfg.space, "--genotype", str(run / "genotype.json"), "--out", str(out)]
    argv += ["--epochs", str(PAPER_RANK_EPOCHS[cfg.space])]
    for flag, value in (("--data", cfg.data), ("--device", cfg.device), ("--threads", cfg.threads)):
        if value is not None:
            argv += [flag, str(value)]
    if cfg.resume and (out / "checkpoint.pt").is_file():
        argv.append("--resume")
    # The user's flags last, so they override the defaults above.
    flags = shlex.split(cfg.rank_train or "")
    if {"-h", "--help"} & set(flags):
        raise ConfigError("--rank-train: the training's flags are in fastdarts.train's --help")
    argv += flags
    parser = build_parser()

    def error(message: str) -> None:
        raise ConfigError(f"--rank-train: {message}")

    parser.error = error  # a ConfigError (one line, exit 2), not the training's own exit
    train_cfg = make_config(vars(parser.parse_args(argv)))
    try:
        Trainer.validate(train_cfg.resolved())
    except ConfigError as e:
        raise ConfigError(f"--rank-train: {e}") from None
    return train_cfg


def _train_cell(cfg: SearchConfig, seed: int, run: Path) -> dict:
    """Train the cell of the search in ``run`` briefly; its seed, files and score."""
    from fastdarts.train.loop import run_training

    out = run / "train"
    _say(f"seed {seed}: training its cell in {out}")
    result = run_training(_train_config(cfg, run))
    if cfg.space == "rnn":
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        score = min(r["valid_ppl"] for r in records if "valid_ppl" in r)
    else:
        score = result["test_acc"]
    genotype = str(run / "genotype.json")
    return {
        "seed": seed,
        "score": score,
        "search": str(run),
        "train": str(out),
        "genotype": genotype,
    }
