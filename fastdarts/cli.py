"""What the command-line tools share: one-line errors, never a usage dump or a traceback."""

from __future__ import annotations

import argparse
import sys

from fastdarts.errors import FastDartsError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2)."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def report(prog: str, error: FastDartsError) -> int:
    """Print ``error`` as one line on stderr; return its exit code."""
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return error.exit_code
