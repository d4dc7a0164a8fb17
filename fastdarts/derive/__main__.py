"""python -m fastdarts.derive SOURCE: print a genotype as JSON.

SOURCE is a search's run folder or checkpoint.pt (the genotype is derived from its α), a
genotype JSON file (validated), or a published genotype's name with --space.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from fastdarts.cli import OneLineParser, report
from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.genotypes import derive_conv, derive_recurrent, load_genotype, to_dict

PROG = "python -m fastdarts.derive"


def genotype_from_checkpoint(path: Path):
    """Derive the genotype from the α stored in a search checkpoint."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = saved["task"]["model"]
        space = saved["config"]["space"]
    except Exception as e:  # any unreadable or foreign file: say so in one line
        raise ConfigError(f"{path}: not a readable fastdarts checkpoint ({e})") from e
    if space == "rnn":
        return derive_recurrent(model["alphas_recurrent"])
    return derive_conv(model["alphas_normal"], model["alphas_reduce"])


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("source", help="run folder, checkpoint.pt, genotype JSON, or a name")
    parser.add_argument("--space", choices=("rnn", "cnn"), help="space of a named genotype")
    args = parser.parse_args(argv)
    source = Path(args.source)
    try:
        if source.is_dir():
            source = source / "checkpoint.pt"
            if not source.is_file():
                raise ConfigError(f"{args.source}: no checkpoint.pt in this folder")
        if source.suffix == ".pt":
            genotype = genotype_from_checkpoint(source)
        else:
            genotype = load_genotype(args.source, args.space)
    except FastDartsError as e:
        return report(PROG, e)
    print(json.dumps(to_dict(genotype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
