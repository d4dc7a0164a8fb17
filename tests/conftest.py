"""Shared test helpers. Tests read the shared data through FASTDARTS_DATA (default:
../shared/data beside the repository) and never touch the user's cache."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FASTDARTS_DATA", str(REPO.parent / "shared" / "data"))

# Tiny search configurations: a few steps take seconds on 2 cores.
RNN_TINY = ["--space", "rnn", "--emsize", "8", "--nhid", "8", "--batch-size", "4", "--bptt", "5"]
RNN_TINY += ["--eval-batches", "2", "--log-every", "1"]
CNN_TINY = ["--space", "cnn", "--init-channels", "4", "--layers", "3", "--batch-size", "2"]
CNN_TINY += ["--eval-batches", "1", "--log-every", "1"]


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 300):
    """``python -m module args``; returns the CompletedProcess (text mode)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=REPO,
    )


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def run_triton_interpreted(script: str, timeout: float = 300) -> None:
    """Runs ``script`` (Python source, the repository importable, ``math``, ``sys`` and
    ``torch`` imported) in a fresh interpreter with TRITON_INTERPRET=1 — Triton reads it at
    import, so not in this process — and checks that it ran to its end. Skips without triton.
    """
    triton = pytest.importorskip("triton")
    if _minor(triton.__version__) < (3, 8) and _minor(np.__version__) >= (2, 4):
        # Seen with triton 3.6 (torch 2.11's): its interpreter calls int() on a 1-element
        # array for `range(n)`, which numpy 2.4 refuses; triton 3.8 works.
        pytest.skip(f"triton {triton.__version__}'s interpreter fails with numpy {np.__version__}")
    prelude = f"import math, sys, torch\nsys.path.insert(0, {str(REPO)!r})\n"
    result = subprocess.run(
        [sys.executable, "-c", prelude + script + '\nprint("triton-interpreter-ok")\n'],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        timeout=timeout,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton-interpreter-ok" in result.stdout


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: two threads on the shared 2-core machine spend most
    of a tiny step waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cli(capsys):
    """Call a command's ``main(argv)`` in this process (no interpreter start-up per call)."""
    from fastdarts.derive.__main__ import main as derive_main
    from fastdarts.search.__main__ import main as search_main

    mains = {"fastdarts.search": search_main, "fastdarts.derive": derive_main}

    def call(module: str, *args: str) -> Result:
        capsys.readouterr()
        try:
            code = mains[module](list(args))
        except SystemExit as e:  # argparse's exits
            code = e.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return call


@pytest.fixture(scope="module")
def datasets_read_once():
    """Each dataset is read once per module that asks (PTB's tokenising alone takes seconds)."""
    from fastdarts.data import cifar, ptb

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ptb, "load_ptb", functools.cache(ptb.load_ptb))
        mp.setattr(cifar, "load_cifar10", functools.cache(cifar.load_cifar10))
        yield


@pytest.fixture(scope="session", autouse=True)
def cache_env(tmp_path_factory):
    """A private data cache for the session (CIFAR-10's JPEG tree is extracted there once);
    tests never touch the user's cache."""
    path = str(tmp_path_factory.mktemp("cache"))
    old = os.environ.get("FASTDARTS_CACHE")
    os.environ["FASTDARTS_CACHE"] = path
    yield {"FASTDARTS_CACHE": path}
    if old is None:
        del os.environ["FASTDARTS_CACHE"]
    else:
        os.environ["FASTDARTS_CACHE"] = old


def assert_equal_state(a, b, where: str) -> None:
    """Nested state (dicts, lists, tensors, numbers) equal exactly; ``where`` names it."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, to check that a failed command left earlier outputs intact."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def pytest_collection_modifyitems(config, items):
    """CUDA-marked tests (deselected by default; the GPU suite runs them with -m cuda) skip,
    saying why, on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
