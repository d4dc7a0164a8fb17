"""python -m fastdarts.derive: derive a genotype and print it as JSON.

python -m fastdarts.derive SOURCE: SOURCE is a search's run folder or checkpoint.pt (the
genotype is read off its α), a genotype JSON file (validated), or a published genotype's
name with --space.

python -m fastdarts.derive --run RUN_DIR --method {argmax,pt}: derive from the search in
RUN_DIR and also write the genotype as JSON (default RUN_DIR/genotype-METHOD.json): argmax
is the paper's rule on α; pt is DARTS-PT's perturbation-based selection (see
fastdarts/derive/pt.py), which fine-tunes the supernet between decisions and can resume.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdarts.cli import OneLineParser, report
from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.genotypes import (
    Genotype,
    derive_conv,
    derive_recurrent,
    load_genotype,
    save_genotype,
    to_dict,
)
from fastdarts.runs import read_checkpoint

PROG = "python -m fastdarts.derive"


def genotype_from_checkpoint(path: Path, space: str | None = None) -> Genotype:
    """Derive the genotype from the α stored in a search checkpoint (of ``space``, if
    given)."""
    saved = read_checkpoint(path, "search")
    model, saved_space = saved["task"].get("model", {}), saved["config"].get("space")
    if space is not None and space != saved_space:
        raise ConfigError(f"{path}: a search of the {saved_space} space, but --space is {space}")
    names = ["alphas_recurrent"] if saved_space == "rnn" else ["alphas_normal", "alphas_reduce"]
    if any(name not in model for name in names):
        raise ConfigError(f"{path}: no α in this search checkpoint (damaged?)")
    if saved_space == "rnn":
        return derive_recurrent(model["alphas_recurrent"])
    return derive_conv(model["alphas_normal"], model["alphas_reduce"])


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="derive a genotype and print it as JSON")
    parser.add_argument(
        "source", nargs="?", help="run folder, checkpoint.pt, genotype JSON, or a name"
    )
    parser.add_argument("--space", choices=("rnn", "cnn"), help="space of a named genotype")
    parser.add_argument("--run", help="a search's run folder: derive from it and write JSON")
    parser.add_argument("--method", choices=("argmax", "pt"), help="with --run (default argmax)")
    parser.add_argument(
        "-o", "--out", help="with --run: genotype JSON to write (RUN/genotype-METHOD.json)"
    )
    pt = parser.add_argument_group("pt (DARTS-PT) settings")
    pt.add_argument(
        "--tune-steps",
        type=int,
        help="search steps after each round (default: 5 epochs for cnn, 1 for rnn)",
    )
    pt.add_argument(
        "--eval-batches", type=int, help="validation batches per measurement (default: all)"
    )
    pt.add_argument(
        "--crit",
        choices=("loss", "acc"),
        help="what a removal hurts: validation loss (rnn default) or accuracy (cnn default)",
    )
    pt.add_argument(
        "--order",
        choices=("random", "sequential"),
        default="random",
        help="order of the edges' op decisions (default: random, seeded)",
    )
    pt.add_argument("--seed", type=int, default=0, help="seed of the edge order (default 0)")
    pt.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    pt.add_argument("--data", help="data folder (default: as the search found it)")
    pt.add_argument("--threads", type=int, help="CPU threads")
    pt.add_argument("--resume", action="store_true", help="continue a selection in RUN")
    pt.add_argument(
        "--max-decisions", type=int, help="stop after this many decisions in all (resume later)"
    )
    return parser


def _derive_run(args: argparse.Namespace) -> Genotype | None:
    for flag in ("tune_steps", "eval_batches", "max_decisions", "threads"):
        value = getattr(args, flag)
        least = 0 if flag == "tune_steps" else 1
        if value is not None and value < least:
            kind = "non-negative" if least == 0 else "positive"
            raise ConfigError(f"--{flag.replace('_', '-')} must be {kind}, got {value}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must lie in [0, 2^32), got {args.seed}")
    run = Path(args.run)
    if not (run / "checkpoint.pt").is_file():
        raise ConfigError(f"{args.run}: no checkpoint.pt in this folder (not a search run?)")
    out = Path(args.out) if args.out else run / f"genotype-{args.method}.json"
    if args.method == "argmax":
        genotype = genotype_from_checkpoint(run / "checkpoint.pt", args.space)
        save_genotype(genotype, out)
        return genotype
    from fastdarts.derive.pt import PTConfig, run_pt

    cfg = PTConfig(
        run=str(run),
        space=args.space,
        out=str(out),
        tune_steps=args.tune_steps,
        eval_batches=args.eval_batches,
        crit=args.crit,
        order=args.order,
        seed=args.seed,
        device=args.device,
        data=args.data,
        threads=args.threads,
        resume=args.resume,
        max_decisions=args.max_decisions,
    )
    genotype, records = run_pt(cfg)
    if genotype is None:
        print(
            f"{PROG}: stopped after {len(records)} decisions; continue with --run {args.run} "
            "--method pt --resume",
            file=sys.stderr,
        )
    return genotype


# The flags only DARTS-PT reads: given without --method pt they are refused, not ignored.
PT_FLAGS = ("tune_steps", "eval_batches", "crit", "order", "seed", "device", "data", "threads")
PT_FLAGS += ("resume", "max_decisions")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if (args.source is None) == (args.run is None):
            raise ConfigError("give either SOURCE or --run RUN_DIR (see --help)")
        if args.run is None and args.method is not None:
            raise ConfigError("--method goes with --run RUN_DIR (see --help)")
        if args.method != "pt":
            given = [f for f in PT_FLAGS if getattr(args, f) != parser.get_default(f)]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} goes with --method pt")
        if args.run is not None:
            args.method = args.method or "argmax"
            try:
                genotype = _derive_run(args)
            except KeyboardInterrupt:
                from fastdarts.derive.pt import STATE_FILE

                hint = f"continue with --run {args.run} --method pt --resume"
                if args.method != "pt" or not (Path(args.run) / STATE_FILE).is_file():
                    hint = "nothing to resume"
                print(f"{PROG}: interrupted; {hint}", file=sys.stderr)
                return 130
        else:
            source = Path(args.source)
            if source.is_dir():
                source = source / "checkpoint.pt"
                if not source.is_file():
                    raise ConfigError(f"{args.source}: no checkpoint.pt in this folder")
            if source.suffix == ".pt":
                genotype = genotype_from_checkpoint(source, args.space)
            else:
                genotype = load_genotype(args.source, args.space)
    except FastDartsError as e:
        return report(PROG, e)
    if genotype is not None:
        print(json.dumps(to_dict(genotype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
