"""The Triton kernels compiled ahead of time for the GPUs the project targets, without one.

The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute but not that they
compile: the interpreter runs the Python body with numpy and accepts code the compiler
rejects (a type mismatch between loop-carried values, an unsupported op on float64). Here
each kernel goes through Triton's whole pipeline (TTIR → TTGIR → LLVM IR → PTX → cubin, with
the ptxas Triton ships) for Hopper (sm_90: H100, H200) and Ampere (sm_80), in every dtype
its launcher sends, so a kernel that would fail to build on the GPU machine fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastdarts.ops.extension import triton_kernels  # noqa: E402

conv_mixed, recurrent_mixed = triton_kernels("conv_mixed"), triton_kernels("recurrent_mixed")
TARGETS = [GPUTarget("cuda", 90, 32), GPUTarget("cuda", 80, 32)]
DTYPES = ["fp32", "fp64"]  # the fused ops' dtypes (see _DTYPES in fastdarts.ops)


def _signature(names: str, dtype: str) -> dict[str, str]:
    """Triton signature from 'NAME:kind' pairs: f = *dtype, l = *i64 (index tensors built
    as torch.long), i = a Python int (i32), c = constexpr."""
    kinds = {"f": f"*{dtype}", "l": "*i64", "i": "i32", "c": "constexpr"}
    return {name: kinds[kind] for name, kind in (pair.split(":") for pair in names.split())}


# (kernel, its arguments as _signature pairs, constexpr values) for each launch the
# launchers make; conv_mixed's forward with and without an accumulator.
CONV_FORWARD = "SRC:f ALPHA:f SHIFT:f ACC:f ACC_B:i RSRC:l OPTR:l OUT:f S:i N:i P:i"
CONV_FORWARD += " HAS_ACC:c BLOCK:c"
KERNELS = {
    "conv_forward_acc": (
        conv_mixed._forward_kernel,
        CONV_FORWARD,
        {"HAS_ACC": True, "BLOCK": conv_mixed.BLOCK},
    ),
    "conv_forward": (
        conv_mixed._forward_kernel,
        CONV_FORWARD,
        {"HAS_ACC": False, "BLOCK": conv_mixed.BLOCK},
    ),
    "conv_grad_src": (
        conv_mixed._grad_src_kernel,
        "G:f ALPHA:f ROUT:l PERM:l SPTR:l DSRC:f S:i N:i P:i BLOCK:c",
        {"BLOCK": conv_mixed.BLOCK},
    ),
    "conv_grad_coef": (
        conv_mixed._grad_coef_kernel,
        "G:f SRC:f ALPHA:f SHIFT:f RSRC:l ROUT:l DALPHA:f DSHIFT:f B:i S:i N:i P:i BLOCK:c",
        {"BLOCK": conv_mixed.BLOCK},
    ),
    "rnn_forward": (
        recurrent_mixed._forward_kernel,
        "S:f CH:f P:f OUT:f n:i B:i D:i BLOCK:c",
        {"BLOCK": recurrent_mixed.BLOCK},
    ),
    "rnn_backward": (
        recurrent_mixed._backward_kernel,
        "G:f S:f CH:f P:f DS:f DCH:f DP_PART:f n:i B:i D:i BLOCK:c",
        {"BLOCK": recurrent_mixed.BLOCK},
    ),
}


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm_{t.arch}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_compiles_to_cubin(name, dtype, target):
    kernel, names, constexprs = KERNELS[name]
    signature = _signature(names, dtype)
    assert list(signature) == kernel.arg_names, "the table above is out of date"
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target
        )
    except RuntimeError as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():
            pytest.skip(f"this Triton install has no ptxas: {e}")
        raise
    ptx = compiled.asm["ptx"]
    assert f".target sm_{target.arch}" in ptx
    assert f".entry {kernel.fn.__name__}" in ptx
    # float64 kernels must do their arithmetic in float64, not silently in float32.
    if dtype == "fp64":
        assert ".f64" in ptx
    assert len(compiled.asm["cubin"]) > 1000


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
