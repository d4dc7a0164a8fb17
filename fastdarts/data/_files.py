"""Shared file plumbing for the datasets: where data lives, checksums, downloads, extraction.

Everything that writes goes through a temporary name beside the target and ``os.replace``, so
an interrupted download or extraction never leaves something that looks complete; writers to
one cache entry take its lock (:func:`cache_lock`), so processes started together (torchrun's
ranks on a fresh machine) fetch and unpack it once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import shutil
import ssl
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from ..errors import DataError
from ..utils import atomic_write

TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_STAMP = ".fastdarts-source"


class DownloadError(Exception):
    """A download failed; the message is the reason, for the dataset to wrap in a DataError."""


def cache_dir() -> Path:
    """The user cache folder: $FASTDARTS_CACHE, else $XDG_CACHE_HOME/fastdarts, else ~/.cache."""
    explicit = os.environ.get("FASTDARTS_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says to ignore relative paths.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "fastdarts"
    return Path.home() / ".cache" / "fastdarts"


@contextlib.contextmanager
def cache_lock(entry: Path) -> Iterator[None]:
    """Hold the exclusive lock of the cache entry ``entry`` (a file beside it) for the block;
    DataError in one line when the cache folder cannot be written."""
    lock = entry.parent / f".{entry.name}.lock"
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(
            f"cannot write the cache folder {entry.parent} ({e.strerror or e}); set "
            "FASTDARTS_CACHE to a writable folder, or pass --data DIR"
        ) from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the descriptor closes, or the process ends
        yield
    finally:
        os.close(fd)


def env_data_dir(name: str) -> Path | None:
    """``$FASTDARTS_DATA/<name>`` when the variable is set, else None."""
    root = os.environ.get("FASTDARTS_DATA")
    return Path(root).expanduser() / name if root else None


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks."""
    # Not hashlib.file_digest: that needs Python 3.11 and the package supports 3.10.
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_digest(path: Path, algorithm: str, expected: str, what: str) -> None:
    """Raise DataError unless the file at ``path`` has the expected digest."""
    if file_digest(path, algorithm) != expected:
        raise DataError(f"{path}: {algorithm} mismatch (corrupt or not {what}); replace it")


def download(url: str, dest: Path, algorithm: str, expected: str) -> None:
    """Fetch ``url`` into ``dest`` atomically and verify its digest; raise DownloadError."""
    request = urllib.request.Request(url, headers={"User-Agent": "fastdarts"})

    def fetch(out: BinaryIO) -> None:
        with (
            urllib.request.urlopen(request, timeout=TIMEOUT_S) as response,
            tqdm(
                total=getattr(response, "length", None),
                desc=f"downloading {dest.name}",
                unit="B",
                unit_scale=True,
                disable=None,  # no bar when stderr is not a terminal
            ) as bar,
        ):
            digest, size, received = hashlib.new(algorithm), getattr(response, "length", None), 0
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                bar.update(len(chunk))
                received += len(chunk)
        if size is not None and received < size:
            raise DownloadError(f"{url}: connection dropped after {received} of {size} bytes")
        if digest.hexdigest() != expected:
            # Raised inside the write: atomic_write discards the temporary file.
            raise DownloadError(f"{url}: {algorithm} mismatch")

    try:
        atomic_write(dest, fetch)
    except urllib.error.HTTPError as e:  # the server answered, with an error
        raise DownloadError(f"{url}: {e}") from e
    except urllib.error.URLError as e:
        # No reply at all (no route, no name resolution, a timeout): most likely no network
        # here. A TLS failure or a bad URL is said as it is.
        offline = isinstance(e.reason, OSError) and not isinstance(e.reason, ssl.SSLError)
        said = f"no connection, offline? ({e.reason})" if offline else str(e)
        raise DownloadError(f"{url}: {said}") from e
    except (OSError, http.client.HTTPException) as e:
        raise DownloadError(f"{url}: {e}") from e


def extract_tar_once(archive: Path, dest: Path, stamp: str) -> Path:
    """Extract ``archive`` into ``dest`` unless ``dest`` already holds it (same ``stamp``).

    Extraction goes to a temporary folder beside ``dest`` that is renamed into place, so a
    killed run leaves no half tree (the next extraction removes what it left); ``stamp``
    identifies the archive so a different one is extracted afresh instead of reusing a stale
    tree. Under ``dest``'s cache lock: a second process waits, then finds the tree.
    """
    if _read_stamp(dest) == stamp:
        return dest
    with cache_lock(dest):
        if _read_stamp(dest) == stamp:
            return dest
        with staging_dir(dest) as tmp:
            extract_all(archive, tmp)
            (tmp / _STAMP).write_text(stamp)
            swap_into_place(tmp, dest)
        return dest


def extract_all(archive: Path, folder: Path) -> None:
    """Extract the tar ``archive`` into ``folder`` (members that would land outside it are
    refused); DataError if it cannot."""
    if not hasattr(tarfile, "data_filter"):  # Python 3.10.12 and 3.11.4 added the filters
        raise DataError(
            f"{archive}: this Python ({sys.version.split()[0]}) cannot extract an archive "
            "safely; use Python 3.10.12, 3.11.4 or later, or extract it yourself and pass "
            "--data the folder"
        )
    try:
        with tarfile.open(archive) as tar:
            members = tqdm(tar, desc=f"extracting {archive.name}", unit=" files", disable=None)
            tar.extractall(folder, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{archive}: cannot extract ({e}); replace the archive") from e


@contextlib.contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A temporary folder beside ``dest`` to build its new content in, removed afterwards
    (once moved into place by :func:`swap_into_place`, nothing is left to remove). The caller
    holds ``dest``'s cache lock, so what a killed build left beside it is removed first."""
    for pattern in (f".{dest.name}.*.part", f".{dest.name}.*.old"):
        for left in dest.parent.glob(pattern):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    # mkdtemp makes the folder private (0700); the tree should read like any other cache entry.
    tmp.chmod(0o755)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_stamp(tree: Path) -> str | None:
    try:
        return (tree / _STAMP).read_text()
    except OSError:
        return None


def swap_into_place(tmp: Path, dest: Path) -> None:
    """Replace ``dest`` (a folder, or nothing) by the folder ``tmp`` beside it."""
    if dest.exists():
        # os.replace cannot overwrite a non-empty folder: move the stale tree aside first.
        stale = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
        os.replace(dest, stale / dest.name)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, dest)


def skipped_note(skipped: list[str]) -> str:
    """The copies a default search skipped, for the error that follows (they are what to
    fix, when the download was the fallback): '' if none."""
    return f"; skipped the copy in {'; '.join(skipped)}" if skipped else ""
