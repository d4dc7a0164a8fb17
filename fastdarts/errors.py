"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class FastDartsError(Exception):
    """An error caused by the user's input or environment, not by a bug.

    The message must be one line that says what is wrong and what to do.
    ``exit_code`` is what the command-line tools return for it.
    """

    exit_code = 2


class DataError(FastDartsError):
    """Missing, corrupt or unreachable data."""


class ConfigError(FastDartsError):
    """A bad flag, genotype file, or a checkpoint that does not fit the run."""


class DivergedError(FastDartsError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

    exit_code = 3
