"""fastdarts.utils: keeping freed memory for reuse on the CPU."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
from conftest import RNN_TINY

from fastdarts import runs
from fastdarts.search.__main__ import main

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Page faults per allocation of a fresh 256 MiB tensor, written once, after twelve were
# allocated and freed: with glibc's defaults every one is a new mapping (65,536 pages); kept,
# the heap grows until a freed block fits the next request (torch aligns large blocks to
# 2 MiB: seven allocations here), and no page faults after.
FAULTS = """
import resource, sys, torch
from fastdarts.utils import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(12):
    torch.empty(2**26).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    torch.empty(2**26).fill_(1.0)
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults(mode: str) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    applied, kept = _faults("keep")
    _, system = _faults("system")
    assert applied == "True"
    assert system > 30_000  # a fresh mapping each time: the test can tell the two apart
    assert kept < 1_000


def test_cpu_search_keeps_freed_memory(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runs, "keep_freed_memory", lambda: calls.append(1) or True)
    assert main([*RNN_TINY, "--max-steps", "1", "--out", str(tmp_path / "run")]) == 0
    assert calls == [1]
