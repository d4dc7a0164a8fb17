"""What each Triton kernel costs a GPU's multiprocessor, from its machine code: registers,
spills, shared memory. Runs without a GPU (Triton's own ptxas and cuobjdump).

    python benchmarks/triton_resources.py --json benchmarks/results/triton-resources.json

Each kernel is compiled ahead of time (``triton.compile``: TTIR → … → cubin) for each target
and each dtype its launcher sends, with the constexprs the launcher passes, and the cubin's
resource usage is read back with ``cuobjdump --dump-resource-usage``. A kernel that spills
registers (to its stack frame, ``STACK``, or to ``LOCAL`` memory: bytes per thread) pays
device-memory round trips per spilled value; the register count bounds how many warps a
multiprocessor keeps resident (an H100/H200 SM has 65,536 registers for at most 64 warps:
32 registers per thread or fewer allow all 64).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from fastdarts.ops.extension import triton_kernels

SCRIPT = "benchmarks/triton_resources.py"
DTYPES = ("fp32", "fp64")  # the fused ops' dtypes (see _DTYPES in fastdarts.ops)
ARCHS = (90, 80)  # Hopper (H100, H200), Ampere (A100)
REGISTERS_PER_SM, MAX_WARPS_PER_SM = 65536, 64  # sm_80 and sm_90 alike


def signature(names: str, dtype: str) -> dict[str, str]:
    """Triton signature from 'NAME:kind' pairs: f = *dtype, l = *i64 (index tensors built
    as torch.long), i = a Python int (i32), d = a Python float annotated tl.float64,
    c = constexpr."""
    kinds = {"f": f"*{dtype}", "l": "*i64", "i": "i32", "d": "fp64", "c": "constexpr"}
    return {name: kinds[kind] for name, kind in (pair.split(":") for pair in names.split())}


@dataclass(frozen=True)
class Launch:
    """One way a launcher calls a kernel: its module, kernel, argument kinds and the
    constexprs besides BLOCK (a launcher passes its module's BLOCK where the kernel takes
    one, unless given here)."""

    module: str
    kernel: str
    args: str
    constexprs: dict[str, Any] = field(default_factory=dict)
    # What the launcher passes with them: more constexprs, and num_warps.
    options: dict[str, Any] = field(default_factory=dict)

    def function(self):
        return getattr(triton_kernels(self.module), self.kernel)

    def constexpr_values(self) -> dict[str, Any]:
        given = {**self.constexprs, **{k: v for k, v in self.options.items() if k != "num_warps"}}
        if "BLOCK:c" in self.args.split() and "BLOCK" not in given:
            given["BLOCK"] = triton_kernels(self.module).BLOCK
        return given


_CONV_SOURCES = "X0:f X1:f X2:f X3:f XB0:i XB1:i XB2:i XB3:i C1:i C2:i C3:i"
_CONV_FORWARD = (
    f"{_CONV_SOURCES} ALPHA:f SHIFT:f ACC:f ACC_B:i RSRC:l OPTR:l OUT:f N:i P:i HAS_ACC:c BLOCK:c"
)

_RUNNING_STATS = "MEAN:f INVSTD:f STAT:l RM:f RV:f NBT:l CONSTS:f R:i K:i n:i BLOCK:c"

_DW_SHAPES = "E1:i E2:i E3:i OFF0:i OFF1:i OFF2:i OFF3:i P0:i P1:i P2:i P3:i"
_DW_CONSTS = "K0:c K1:c K2:c K3:c D0:c D1:c D2:c D3:c STRIDE:c RELU:c BLOCK:c"
_DW_PLANES = "CIN:i H:i W:i COUT:i HO:i WO:i"
_DW_ARGS = {
    "forward": f"X:f W0:f W1:f W2:f W3:f OUT:f {_DW_PLANES} S:i VDIV:i {_DW_SHAPES}",
    "grad_x": f"G:f X:f W0:f W1:f W2:f W3:f DX:f {_DW_PLANES} S:i VDIV:i {_DW_SHAPES}",
    "grad_w": f"G:f X:f DW0:f DW1:f DW2:f DW3:f B:i {_DW_PLANES} VDIV:i BSTEP:i {_DW_SHAPES}",
}
# A group's two depthwise stages: the four first-stage shapes (3×3 and 5×5 at dilations 1
# and 2) at stride 1 or 2 through the ReLU, and the sep convs' second stage (3×3, 5×5).
_DW_STAGES = {
    "stage1": {"K0": 3, "K1": 5, "K2": 3, "K3": 5, "D0": 1, "D1": 1, "D2": 2, "D3": 2},
    "stage2": {"K0": 3, "K1": 5, "K2": 1, "K3": 1, "D0": 1, "D1": 1, "D2": 1, "D3": 1},
}
_DW_LAUNCHES = {
    f"dw_{kernel}_{stage}_s{stride}": Launch(
        "depthwise",
        f"_{kernel}_kernel",
        f"{_DW_ARGS[kernel]} {_DW_CONSTS}",
        {**_DW_STAGES[stage], "STRIDE": stride, "RELU": True},
    )
    for kernel in _DW_ARGS
    for stage, stride in (("stage1", 1), ("stage1", 2), ("stage2", 1))
}

_BN_FORWARD = (
    "S:f CH:f P:f Y:f INVSTD:f MEAN:f RM:f RV:f HMASK:f MASKED:f n:i B:i ND:i D:i factor:d eps:d"
)
_BN_TILE = "BLOCK_B:c BLOCK_C:c"
_RNN_TILE = triton_kernels("recurrent_cell").tile_options(256)

# Every launch the launchers in kernels/ make (conv_mixed's forward with and without an
# accumulator, the depthwise kernels per stage, the pools per stride, the running BatchNorm
# statistics, the cross-entropy); a test checks each argument list against the kernel's.
LAUNCHES = {
    "conv_forward_acc": Launch("conv_mixed", "_forward_kernel", _CONV_FORWARD, {"HAS_ACC": True}),
    "conv_forward": Launch("conv_mixed", "_forward_kernel", _CONV_FORWARD, {"HAS_ACC": False}),
    "conv_grad_src": Launch(
        "conv_mixed",
        "_grad_src_kernel",
        "G:f ALPHA:f ROUT:l PERM:l SPTR:l DSRC:f S:i N:i P:i BLOCK:c",
    ),
    "conv_grad_coef": Launch(
        "conv_mixed",
        "_grad_coef_kernel",
        f"G:f {_CONV_SOURCES} ALPHA:f SHIFT:f RSRC:l ROUT:l DALPHA:f DSHIFT:f B:i N:i P:i BLOCK:c",
    ),
    "rnn_forward": Launch(
        "recurrent_mixed",
        "_forward_kernel",
        "S:f CH:f P:f OUT:f n:i B:i D:i BLOCK:c",
    ),
    "rnn_backward": Launch(
        "recurrent_mixed",
        "_backward_kernel",
        "G:f S:f CH:f P:f DS:f DCH:f DP_PART:f n:i B:i D:i BLOCK:c",
    ),
    # The whole cell's fused BatchNorm kernels at the search's batch of 256 (one row chunk
    # of 256 by 4 columns): the states' forward in training (updating the running
    # statistics and masked, as the w step's passes; neither, as the α step's) and in
    # evaluation, and the backwards in training.
    **{
        f"rnn_{state}_bn_forward{suffix}": Launch(
            "recurrent_cell",
            "_bn_forward_kernel",
            f"{_BN_FORWARD} S0:c TRAINING:c UPDATE:c HAS_MASK:c {_BN_TILE}",
            {"S0": state == "s0", "TRAINING": train, "UPDATE": train and mask},
            _RNN_TILE,
        )
        for state in ("s0", "node")
        for suffix, train, mask in (
            ("_masked", True, True),
            ("", True, False),
            ("_eval", False, False),
        )
    },
    **{
        f"rnn_{state}_bn_backward{suffix}": Launch(
            "recurrent_cell",
            f"_{state}_bn_backward_kernel",
            args,
            # The node's dP sums the paper cell's E·5 apart.
            {
                "TRAINING": True,
                "HAS_MASK": mask,
                **({"DP_STRIDE": 36 * 5} if state == "node" else {}),
            },
            _RNN_TILE,
        )
        for state, args in (
            (
                "node",
                f"G:f GM:f MASK:f Y:f INVSTD:f S:f CH:f P:f DS:f DCH:f DP_PART:f n:i B:i "
                f"ND:i D:i DP_STRIDE:c TRAINING:c HAS_MASK:c {_BN_TILE}",
            ),
            (
                "s0",
                f"G:f GM:f MASK:f Y:f INVSTD:f C0H0:f H:f CARRY:f GXP:f B:i ND:i D:i "
                f"TRAINING:c HAS_MASK:c {_BN_TILE}",
            ),
        )
        for suffix, mask in (("_masked", True), ("", False))
    },
    **{
        f"rnn_{name}{suffix}": Launch(
            "recurrent_cell",
            f"_{name}_kernel",
            args,
            {"HAS_MASK": mask, "BLOCK": triton_kernels("recurrent_cell").STEP_BLOCK},
        )
        for name, args in (
            ("hidden", "STATES:f H:f HM:f MASK:f S:i total:i ND:i D:i HAS_MASK:c BLOCK:c"),
            (
                "step_grads",
                "GRAD:f CARRY:f GC:f MASK:f GS:f GM:f S:i total:i ND:i D:i HAS_MASK:c BLOCK:c",
            ),
        )
        for suffix, mask in (("_masked", True), ("", False))
    },
    **_DW_LAUNCHES,
    "bn_running_stats": Launch("running_stats", "_update_kernel", _RUNNING_STATS),
    # Triton makes an integer argument equal to 1 a constant: n = 1 (a batch of one 1×1 map).
    "bn_running_stats_n1": Launch(
        "running_stats", "_update_kernel", _RUNNING_STATS.replace("n:i", "n:c"), {"n": 1}
    ),
    "ce_forward": Launch(
        "cross_entropy", "_forward_kernel", "X:f T:l LOSS:f LSE:f V:i NT:i BLOCK:c"
    ),
    "ce_backward": Launch(
        "cross_entropy",
        "_backward_kernel",
        "X:f T:l LSE:f G:f DX:f V:i NT:i ROWS:i BLOCK:c",
    ),
    **{
        f"pools_{kernel}_s{stride}": Launch("pools", f"_{kernel}_kernel", args, {"STRIDE": stride})
        for kernel, args in (
            ("forward", "X:f X_B:i OUT:f C:i H:i W:i HO:i WO:i STRIDE:c BLOCK:c"),
            ("backward", "G:f G_B:i X:f X_B:i DX:f C:i H:i W:i HO:i WO:i STRIDE:c BLOCK:c"),
        )
        for stride in (1, 2)
    },
}


def compile_launch(name: str, dtype: str, arch: int):
    """``LAUNCHES[name]`` compiled for sm_<arch> in ``dtype``: Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = LAUNCHES[name]
    source = ASTSource(
        fn=launch.function(),
        signature=signature(launch.args, dtype),
        constexprs=launch.constexpr_values(),
    )
    options = {"num_warps": launch.options.get("num_warps", 4)}  # 4: Triton's default
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def cuobjdump() -> str | None:
    """The cuobjdump Triton ships (or one on PATH); None if there is none."""
    import triton

    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if shipped.is_file() and os.access(shipped, os.X_OK):
        return str(shipped)
    return shutil.which("cuobjdump")


def resource_usage(cubin: bytes, tool: str) -> dict[str, int]:
    """Registers per thread and stack, local (spill), static shared and constant-bank-0
    bytes of a one-kernel cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"([A-Z]+(?:\[0\])?):(\d+)", out))
    if "REG" not in fields:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    keys = {"REG": "registers", "STACK": "stack_bytes", "LOCAL": "local_bytes"}
    keys |= {"SHARED": "static_shared_bytes", "CONSTANT[0]": "param_bytes"}
    return {key: int(fields.get(field, 0)) for field, key in keys.items()}


def resident_warps(registers: int, num_warps: int) -> int:
    """Warps of this kernel one SM holds by its register file alone (registers are allocated
    per warp in units of 256; blocks are whole)."""
    per_warp = -(-registers * 32 // 256) * 256
    blocks = REGISTERS_PER_SM // (per_warp * num_warps)
    return min(blocks * num_warps, MAX_WARPS_PER_SM // num_warps * num_warps)


def row(name: str, dtype: str, arch: int, tool: str) -> dict[str, Any]:
    """One table row: the launch compiled, its resources and warps per SM."""
    compiled = compile_launch(name, dtype, arch)
    usage = resource_usage(compiled.asm["cubin"], tool)
    num_warps = compiled.metadata.num_warps
    return {
        "triton_kernel": name,
        "dtype": dtype,
        "arch": f"sm_{arch}",
        "num_warps": num_warps,
        **usage,
        "dynamic_shared_bytes": compiled.metadata.shared,
        "warps_per_sm": resident_warps(usage["registers"], num_warps),
    }


COLUMNS = [
    ("kernel", "triton_kernel"),
    ("dtype", "dtype"),
    ("arch", "arch"),
    ("warps", "num_warps"),
    ("regs/thread", "registers"),
    ("stack B/thread", "stack_bytes"),
    ("local B/thread", "local_bytes"),
    ("static shared B", "static_shared_bytes"),
    ("dynamic shared B", "dynamic_shared_bytes"),
    ("warps/SM (regs)", "warps_per_sm"),
]


def archs(text: str) -> list[int]:
    """argparse type of ``--archs``: compute capabilities ×10 (90, 80), comma-separated."""
    try:
        return [harness.positive_int(a) for a in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected compute capabilities ×10, comma-separated (e.g. 90,80), got {text!r}"
        ) from None


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    """This process's stdout and stderr (the file descriptors: compilers print from C++ too)
    sent to /dev/null for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)


def _fatal_line(lines: list[str]) -> str:
    """The line of a compiler's message that says what failed (ptxas's "fatal"), else its
    first."""
    return next((ln.strip() for ln in lines if "fatal" in ln), lines[0].strip())


def main(argv: list[str] | None = None) -> dict:
    """Compiles every launch for each target; returns (and optionally writes) the document."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--archs",
        type=archs,
        default=",".join(map(str, ARCHS)),
        help="compute capabilities ×10, comma-separated (default: %(default)s)",
    )
    p.add_argument("--json", help="write the result document here")
    args = p.parse_args(argv)
    harness.check_json_path(p, args.json)
    tool = cuobjdump()
    if tool is None:
        raise SystemExit(
            "no cuobjdump here: Triton's NVIDIA backend ships one (pip install triton)"
        )
    from triton.runtime.errors import PTXASError

    for arch in args.archs:  # one launch first: a target this ptxas lacks is one line
        try:
            with _silenced():  # what LLVM and Triton print of a failure on their own
                compile_launch(next(iter(LAUNCHES)), DTYPES[0], arch)
        except PTXASError as e:
            lines = str(e).splitlines() or [type(e).__name__]
            if any("is not defined for option 'gpu-name'" in line for line in lines):
                p.error(f"--archs: {arch} does not compile here: {_fatal_line(lines)}")
            raise  # the kernel's, not the target's: ptxas's whole message
    rows = [row(n, d, a, tool) for a in args.archs for n in LAUNCHES for d in DTYPES]
    argv = sys.argv[1:] if argv is None else argv
    doc = {
        "env": harness.env_info(torch.device("cpu"), [SCRIPT, *argv]),
        "rows": rows,
        "run": {
            "what": "each launch compiled ahead of time (no GPU); resources from cuobjdump",
            "stack_bytes": "stack frame per thread, where ptxas spills registers (0: none)",
            "local_bytes": "local memory per thread (0: none)",
            "warps_per_sm": "resident warps the register file allows (65,536 registers, "
            "at most 64 warps per SM); shared memory and blocks per SM may lower it",
        },
    }
    return harness.report(doc, COLUMNS, args.json)


if __name__ == "__main__":
    main()
