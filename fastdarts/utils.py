"""Small helpers shared by the search loop, the training loop and the tools."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a torn one. The
    file keeps the mode of the one it replaces, else gets the mode a plain open() would
    (0666 less the umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        mode = path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_umask() -> int:
    """The process's umask, read once at import (reading it means setting it and setting it
    back, which would race with another thread creating a file)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that replaces ``path`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def perplexity(loss: float | torch.Tensor) -> float | torch.Tensor:
    """exp(loss), capped at exp(700); a tensor loss gives a float64 tensor on its device
    (float32 would overflow at exp(89)), so a step can report it without a host read."""
    if isinstance(loss, torch.Tensor):
        return loss.detach().double().clamp(max=700.0).exp()
    return math.exp(min(loss, 700.0))
