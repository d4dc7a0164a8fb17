"""setup.py's fallbacks, on a checkout whose csrc/ is a stub module (seconds to compile): a
failed CUDA build retries without CUDA, a failed C++ build installs pure Python (removing an
earlier in-place build), and FORCE_CUDA=1 / FASTDARTS_REQUIRE_EXT=1 make either an error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

STUB = textwrap.dedent(
    """
    #include <Python.h>
    static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
    """
)


def build(
    tmp_path: Path, cuda_here: bool = False, **env: str
) -> tuple[subprocess.CompletedProcess, Path]:
    """``setup.py build_ext --inplace`` in a stub checkout; (the process, fastdarts/)."""
    checkout = tmp_path / "checkout"
    if not checkout.exists():
        for folder in ("csrc", "fastdarts", "kernels"):
            (checkout / folder).mkdir(parents=True)
        (checkout / "setup.py").write_bytes((REPO / "setup.py").read_bytes())
        (checkout / "csrc" / "stub.cpp").write_text(STUB)
        (checkout / "csrc" / "stub.cu").write_text("__global__ void kernel() {}\n")
        for package in ("fastdarts", "kernels"):
            (checkout / package / "__init__.py").write_text("")
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    # A machine with a GPU, as far as setup.py can tell.
    hook = "import torch\ntorch.cuda.is_available = lambda: True\n" if cuda_here else ""
    (site / "sitecustomize.py").write_text(hook)
    clean = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "CXX", "CC")}
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
        cwd=checkout, capture_output=True, text=True, timeout=600,
        env={**clean, "PYTHONPATH": str(site), "FASTDARTS_NO_AVX2": "1", **env},
    )  # fmt: skip
    return proc, checkout / "fastdarts"


def built(package: Path) -> list[str]:
    return [p.name for p in package.glob("_C*.so")]


def test_a_failed_cuda_build_retries_without_cuda(tmp_path):
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit: setup.py would not try CUDA")
    proc, package = build(tmp_path, cuda_here=True, TORCH_CUDA_ARCH_LIST="bogus")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not build the CUDA extension (Unknown CUDA arch" in proc.stderr
    assert "building it without CUDA" in proc.stderr and "pure Python" not in proc.stderr
    assert len(built(package)) == 1
    forced, _ = build(tmp_path, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="bogus")
    assert forced.returncode != 0 and "Unknown CUDA arch (bogus)" in forced.stderr


def test_a_failed_build_installs_pure_python_unless_required(tmp_path):
    proc, package = build(tmp_path)
    assert proc.returncode == 0 and len(built(package)) == 1, proc.stderr[-2000:]
    proc, _ = build(tmp_path, CXX="/bin/false", CC="/bin/false")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "could not build the C++ extension" in proc.stderr
    assert "installing pure Python, removed the earlier build's _C" in proc.stderr
    assert built(package) == []
    proc, _ = build(tmp_path, CXX="/bin/false", CC="/bin/false", FASTDARTS_REQUIRE_EXT="1")
    assert proc.returncode != 0 and "could not build" not in proc.stderr
