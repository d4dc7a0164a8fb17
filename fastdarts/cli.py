"""What the command-line tools share: one-line errors, never a usage dump or a traceback;
flags built from a settings dataclass; the settings a resumed run was started with."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.runs import default_out

# The help of the flags that the search and the training share.
RUN_HELP = {
    "dataset": "ptb for rnn, cifar10 for cnn (default: the space's)",
    "max_steps": "stop after this many steps in all (resume with a larger value to go on)",
    "epoch_steps": "cap each epoch at this many steps (quick trials)",
    "seed": "random seed",
    "device": "cpu, cuda, cuda:1, ... (default: cuda if available)",
    "data": "data folder (never downloads); default: $FASTDARTS_DATA, the cache, a download",
    "resume": "continue the run in --out from its checkpoint.pt",
    "threads": "CPU threads (a resumed run keeps its run's count unless given)",
    "checkpoint_every": "checkpoint every N steps (and at each epoch end)",
    "log_every": "write a metrics line every N steps",
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
    "init_channels": "cnn: initial channels C",
    "layers": "cnn: cells",
    "momentum": "cnn: SGD momentum",
    "grad_clip": "cnn: gradient norm clip",
}


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report(prog: str, error: FastDartsError) -> int:
    """Print ``error`` as one line on stderr; return its exit code."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return error.exit_code


def dataclass_parser(
    settings: type,
    prog: str,
    description: str,
    helps: dict[str, str],
    choices: dict[str, tuple] | None = None,
) -> OneLineParser:
    """A parser with one ``--flag-name`` per field of the dataclass ``settings``: booleans
    are switches, the rest take the field's type (int, float, else str); ``helps`` holds
    every field's help. Only the flags given end up in the namespace."""
    parser = OneLineParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(settings):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            parser.add_argument(flag, action="store_true", help=helps[f.name])
            continue
        kind = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        # A help that names its default itself (one that depends on the space) keeps it.
        named = f.default is None or "default" in helps[f.name]
        shown = "" if named else f" (default: {f.default})"
        parser.add_argument(
            flag, type=kind, choices=(choices or {}).get(f.name), help=helps[f.name] + shown
        )
    return parser


def saved_settings(settings: type, out: str) -> dict:
    """The settings in ``out``/config.json that are fields of ``settings`` ({} if none)."""
    saved = Path(out) / "config.json"
    if not saved.is_file():
        return {}
    try:
        base = json.loads(saved.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{saved}: not valid JSON ({e})") from None
    known = {f.name for f in dataclasses.fields(settings)}
    return {k: v for k, v in base.items() if k in known}


def run_folder(given: dict, kind: str) -> str:
    """The run folder: ``--out``, else runs/KIND-SPACE (the space given, else rnn's)."""
    return given.get("out") or default_out(kind, given.get("space", "rnn"))


def run_reporting(prog: str, out: str, work: Callable[[], object]) -> int:
    """Run ``work()`` and print its result as JSON (none for None: a distributed run's other
    ranks) (exit 0); a FastDartsError, or running out of memory, is one line on stderr (its
    exit code; 2), an interrupt says how to resume (130)."""

    def one_line(message, category, filename, lineno, line=None) -> str:
        kind = "warning" if category is UserWarning else category.__name__
        return f"{prog}: {kind}: {message}\n"

    # A warning shown is one line too, not Python's file:line and source line (formatting
    # only: a recorder, such as pytest.warns, still records it).
    formatwarning, warnings.formatwarning = warnings.formatwarning, one_line
    try:
        result = work()
    except FastDartsError as e:
        return report(prog, e)
    except RuntimeError as e:  # torch's OutOfMemoryError (CUDA) or the CPU allocator's
        tried = re.search(r"[Tt]ried to allocate ([\d.]+ ?\w+)", str(e))
        if tried is None or not re.search(r"out of memory|can't allocate memory", str(e)):
            raise
        return report(
            prog,
            ConfigError(
                f"out of memory (tried to allocate {tried.group(1)}): a smaller --batch-size, "
                "or model (--bptt, --nhid; --init-channels, --layers), fits"
            ),
        )
    except KeyboardInterrupt:
        if (Path(out) / "checkpoint.pt").is_file():
            print(f"{prog}: interrupted; continue with --resume --out {out}", file=sys.stderr)
        else:
            print(f"{prog}: interrupted before a checkpoint (nothing to resume)", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
    if result is not None:
        print(json.dumps(result))
    return 0
