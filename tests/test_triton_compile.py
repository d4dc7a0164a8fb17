"""The Triton kernels compiled ahead of time for the GPUs the project targets, without one.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute but not that they
compile: the interpreter runs the Python body with numpy and accepts code the compiler
rejects (a type mismatch between loop-carried values, an unsupported op on float64). Here
each kernel goes through Triton's whole pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin, with
the ptxas Triton ships) for Hopper (sm_90: H100, H200) and Ampere (sm_80), in every dtype
its launcher sends, so a kernel that would fail to build on the GPU machine fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

triton = pytest.importorskip("triton")

from benchmarks import triton_resources  # noqa: E402
from benchmarks.triton_resources import LAUNCHES, compile_launch  # noqa: E402
from fastdarts.ops.extension import triton_kernels  # noqa: E402

conv_mixed, recurrent_mixed = triton_kernels("conv_mixed"), triton_kernels("recurrent_mixed")


@pytest.fixture(scope="module")
def cuobjdump() -> str:
    """The cuobjdump path; the test skips without one."""
    tool = triton_resources.cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (Triton's NVIDIA backend ships one)")
    return tool


def _compile(name: str, dtype: str, arch: int):
    try:
        return compile_launch(name, dtype, arch)
    except RuntimeError as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            pytest.skip(f"this Triton install has no ptxas: {e}")
        raise


@pytest.mark.parametrize("arch", triton_resources.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("dtype", triton_resources.DTYPES)
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_kernel_compiles_to_cubin(name, dtype, arch):
    launch = LAUNCHES[name]
    kernel = launch.function()
    signature = triton_resources.signature(launch.args, dtype)
    assert list(signature) == kernel.arg_names, "LAUNCHES is out of date"
    compiled = _compile(name, dtype, arch)
    ptx = compiled.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert f".entry {kernel.fn.__name__}" in ptx
    # float64 kernels must do their arithmetic in float64, not silently in float32.
    if dtype == "fp64":
        assert ".f64" in ptx
    assert len(compiled.asm["cubin"]) > 1000


@pytest.mark.parametrize("dtype", triton_resources.DTYPES)
@pytest.mark.parametrize("name", list(LAUNCHES))
def test_kernel_does_not_spill_on_hopper(name, dtype, cuobjdump):
    # A spill is a round trip to device memory per spilled value, in every thread: a kernel
    # change that makes one spill is a performance bug this catches without a GPU.
    usage = triton_resources.resource_usage(_compile(name, dtype, 90).asm["cubin"], cuobjdump)
    assert usage["local_bytes"] == 0 and usage["stack_bytes"] == 0, usage
    # float32, the search's dtype: at most 64 registers a thread, so at least half of the
    # SM's 64 warps stay resident (float64, for the tests, only must not spill).
    if dtype == "fp32":
        assert 0 < usage["registers"] <= 64, usage


def test_resource_usage_reads_spills_and_warps_per_sm(cuobjdump):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def outer(X, OUT, N: tl.constexpr):
        # An N × N outer product live in one warp: N = 128 needs far more than the 255
        # registers a thread may have, so ptxas spills; N = 32 fits.
        offs = tl.arange(0, N)
        m = tl.load(X + offs)[:, None] * tl.load(X + N + offs)[None, :]
        tl.store(OUT + offs, tl.sum(tl.exp(m), 1) * tl.max(m, 1))

    def usage(n: int) -> dict[str, int]:
        signature = {"X": "*fp32", "OUT": "*fp32", "N": "constexpr"}
        source = ASTSource(fn=outer, signature=signature, constexprs={"N": n})
        target = GPUTarget("cuda", 90, 32)
        compiled = triton.compile(source, target=target, options={"num_warps": 1})
        return triton_resources.resource_usage(compiled.asm["cubin"], cuobjdump)

    fits, spills = usage(32), usage(128)
    assert fits["stack_bytes"] == fits["local_bytes"] == 0 and fits["registers"] < 255
    assert spills["registers"] == 255 and spills["stack_bytes"] + spills["local_bytes"] > 0
    # 32 registers a thread fill the SM with 64 warps; 128 leave 16 (4-warp blocks).
    assert triton_resources.resident_warps(32, 4) == 64
    assert triton_resources.resident_warps(55, 4) == 36  # 56 allocated: 9 blocks of 4 warps
    assert triton_resources.resident_warps(128, 4) == 16


def test_kernels_load_from_a_plain_checkout():
    # The GPU suite falls back to the checkout on PYTHONPATH when the install fails; there
    # kernels/ is not yet fastdarts.kernels. Without the install's finder, it must still load.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        sys.meta_path = [m for m in sys.meta_path if "__editable__" not in m.__module__]
        sys.path.insert(0, {str(REPO)!r})
        import fastdarts
        assert fastdarts.__file__.startswith({str(REPO)!r}), fastdarts.__file__
        assert importlib.util.find_spec("fastdarts.kernels") is None
        from fastdarts.ops.extension import triton_kernels
        module = triton_kernels("recurrent_mixed")
        assert module.__file__ == {str(REPO / "kernels" / "recurrent_mixed.py")!r}, module.__file__
        assert module is sys.modules["fastdarts.kernels.recurrent_mixed"]
        print("loaded")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "loaded"


def test_launchers_refuse_tensors_past_32_bit_offsets():
    # Checked before any launch, so meta tensors (no memory) stand in for huge ones.
    def big(*shape):
        return torch.empty(*shape, device="meta")

    half = 2**16, 2**15 + 1  # one plane of just over 2**31 elements
    src, none = big(1, 1, *half), torch.empty(0, dtype=torch.long)
    args = (big(1), big(1), None, none, none, big(1, 1, *half))
    with pytest.raises(ValueError, match="index in 32 bits"):
        conv_mixed.forward(src, *args)
    with pytest.raises(ValueError, match="index in 32 bits"):
        conv_mixed.backward(big(1, 1, *half), src, big(1), big(1), none, none, none, none)
    with pytest.raises(ValueError, match="index in 32 bits"):
        recurrent_mixed.forward(big(1, 1, 2**30), big(1, 1, 2**31), big(1, 5))
    # An accumulator read in place (a channel block of a larger tensor): its span counts.
    src = big(2, 1, 32, 32)
    acc = big(2, 2**21, 32, 32)[:, :1]  # batch stride 2**31
    with pytest.raises(ValueError, match="index in 32 bits"):
        conv_mixed.forward(src, big(1), big(1), acc, none, none, big(2, 1, 32, 32))


def test_resources_script_writes_every_launch(tmp_path, cuobjdump):
    out = tmp_path / "res.json"
    doc = triton_resources.main(["--archs", "90", "--json", str(out)])
    assert json.loads(out.read_text()) == doc
    got = {(r["triton_kernel"], r["dtype"]) for r in doc["rows"]}
    assert got == {(n, d) for n in LAUNCHES for d in triton_resources.DTYPES}
    assert {r["arch"] for r in doc["rows"]} == {"sm_90"}
    # Each launch compiled with the warps its launcher asks for (4, Triton's default, or the
    # option given), one block at least resident.
    for r in doc["rows"]:
        assert r["num_warps"] == LAUNCHES[r["triton_kernel"]].options.get("num_warps", 4)
        assert r["warps_per_sm"] >= r["num_warps"]
    assert doc["env"]["command"].endswith(f"--archs 90 --json {out}")
