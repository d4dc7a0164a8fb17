"""Ops and kernel launches per search step on the CUDA code path, counted on this CPU.

    python benchmarks/cuda_path_ops.py --space cnn --order 2 --config small \\
        --backends reference,fast --json out.json

Without a GPU, the dispatch is made to take its CUDA branches: the Triton kernels are
launched as on CUDA but not run (each launch is counted; their outputs stay uninitialised,
which a step with no host reads and no value-dependent branch does not notice), the CPU's
C++ kernels are off, and the rest runs as torch ops on CPU tensors, as it would on the GPU.
Counted in one step after a first (lazily created state): every ATen op dispatched, the
"launching" ones among them (leaving out views and allocations, which launch nothing on a
GPU), and the Triton launches. A cuDNN or cuBLAS call can launch more than one kernel, so
launching ops + Triton launches is a floor on a step's kernel launches, not a count.

Also counted, by op and by Triton kernel: the bytes of the tensors each launch takes and
returns, every one once and whole (an in-place op's tensor twice, read and written; a
broadcast dimension once). It is the traffic of a kernel that reads each input once and
writes each output once, an estimate of what memory-bound kernels move: a convolution or a
BatchNorm may read its input more than once, and a Triton kernel handed a whole tensor may
read only some of its channels.

``--steps N`` also times N steps of each configuration on this path, interleaved (after
``--warmup`` untimed ones). With the Triton kernels not run, what is left is the host's work
(Python, dispatch, autograd) plus the CPU's arithmetic, which at ``--config tiny`` is small:
a proxy for the host cost a GPU step pays when the device keeps up. It understates the
launching ops against the views (a CUDA launch costs the host more than a tiny CPU op) and
leaves out the Triton launcher's own cost.

``--depthwise torch`` runs torch's convolutions for the CNN's depthwise stages on this path
(what fastdarts did before its Triton depthwise kernels, and does on CUDA without Triton).

The JSON is rewritten after each configuration's counts and each timed round, so a run
stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import collections
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from benchmarks.search_step import (
    DTYPES,
    add_step_arguments,
    build_task,
    parse_backends,
    row_config,
    step_fn,
)
from fastdarts.errors import ConfigError
from fastdarts.ops import conv_mixed, cross_entropy, recurrent_cell, recurrent_mixed
from fastdarts.ops.backends import resolve

# ATen ops that launch no kernel on a GPU (views, aliases, allocations), by base name; the
# fastdarts custom ops count through the ATen ops and Triton launches inside them.
NO_LAUNCH = frozenset(
    {
        "_reshape_alias",
        "_unsafe_view",
        "alias",
        "as_strided",
        "detach",
        "empty",
        "empty_like",
        "empty_strided",
        "expand",
        "lift_fresh",
        "narrow",
        "new_empty",
        "new_empty_strided",
        "permute",
        "select",
        "slice",
        "split",
        "split_with_sizes",
        "squeeze",
        "t",
        "transpose",
        "unbind",
        "unsqueeze",
        "view",
    }
)


def launches_kernel(op: str) -> bool:
    """Whether the op named ``op`` ('aten.add.Tensor') launches a kernel on a GPU."""
    namespace, base = op.split(".")[:2]
    return namespace != "fastdarts" and base not in NO_LAUNCH


def tensor_bytes(tree: object) -> int:
    """Bytes of the tensors in ``tree``, each once and whole: a dimension of stride 0
    (broadcast) counts once, and so does a tensor given twice (``mul(x, x)``, a kernel's
    padded argument slots)."""
    total, seen = 0, set()
    for t in tree_leaves(tree):
        if isinstance(t, torch.Tensor):
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key in seen:
                continue
            seen.add(key)
            elements = 1
            for size, stride in zip(t.shape, t.stride()):
                elements *= size if stride else min(size, 1)
            total += elements * t.element_size()
    return total


# In-place ops that write their first argument without reading it.
WRITE_ONLY_SELF = frozenset(
    {"aten.copy_.default", "aten.fill_.Scalar", "aten.fill_.Tensor", "aten.zero_.default"}
)


class TrafficCounter(harness.OpCounter):
    """:class:`harness.OpCounter` that also sums, by op, the :func:`tensor_bytes` of the
    launching ops' arguments and results."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = str(func)
        if launches_kernel(name):
            # Read: the arguments (an out= tensor, and the tensor a copy_ or fill_ overwrites,
            # are only written); written: the results (an in-place op's tensor so counts
            # twice).
            if name in WRITE_ONLY_SELF:
                args = args[1:]
            read = (args, {k: v for k, v in (kwargs or {}).items() if k != "out"})
            self.bytes[name] += tensor_bytes(read) + tensor_bytes(out)
        return out


COLUMNS = [
    ("backend", "backend"),
    ("depthwise", "depthwise"),
    ("space", "space"),
    ("order", "order"),
    ("config", "config"),
    ("ops/step", "ops_per_step"),
    ("launching ops/step", "launching_ops_per_step"),
    ("Triton launches/step", "triton_launches_per_step"),
    ("launches/step (floor)", "launches_floor_per_step"),
    ("tensor MiB/step", "tensor_mib_per_step"),
    ("host s/step (median)", "host_s_median"),
]


class Launches(collections.Counter):
    """Triton launches by kernel ('depthwise._forward_kernel'); ``bytes``: the
    :func:`tensor_bytes` of their arguments, by kernel too, while ``count_bytes`` (off for
    host timing: summing the bytes of every launch's arguments costs the host more than the
    launch stub itself, a third of a tiny RNN step's time)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[str] = collections.Counter()
        self.count_bytes = True

    def clear(self) -> None:
        super().clear()
        self.bytes.clear()


@contextmanager
def cuda_dispatch(depthwise: str = "triton", run: bool = False) -> Iterator[Launches]:
    """Within the block the ops take their CUDA branches on CPU tensors; yields the count of
    Triton launches (and their bytes), which are counted and, with ``run`` (under
    TRITON_INTERPRET=1, set before triton is imported), also run."""
    import triton.runtime.jit as jit

    launches = Launches()
    launcher = jit.KernelInterface.__getitem__

    def getitem(fn, grid):
        def launch(*args, **kwargs):
            name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}.{fn.fn.__name__}"
            launches[name] += 1
            if launches.count_bytes:
                launches.bytes[name] += tensor_bytes((args, kwargs))
            if run:
                launcher(fn, grid)(*args, **kwargs)

        return launch

    saved = [
        (jit.KernelInterface, "__getitem__", getitem),
        (conv_mixed, "kernel_name", lambda device: "triton"),
        (conv_mixed, "_cpp", lambda x, name="": False),
        (recurrent_mixed, "triton_ready", lambda device: True),
        (cross_entropy, "triton_ready", lambda device: True),
        (recurrent_cell, "cell_kernel_ready", lambda device: False),
    ]
    if depthwise == "torch":
        impl = conv_mixed._impl

        def torch_depthwise(x, op, samples=False):
            return "reference" if op.startswith("depthwise") else impl(x, op, samples)

        saved.append((conv_mixed, "_impl", torch_depthwise))
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in saved]
    try:
        for owner, name, value in saved:
            setattr(owner, name, value)
        yield launches
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def count(args: argparse.Namespace, config, order: int, step, launches) -> dict:
    """One step's ops and Triton launches (``step`` run once before, for lazily created
    state such as the optimiser's)."""
    launches.clear()
    with TrafficCounter() as counter:
        step()
    ops, traffic = counter.counts, counter.bytes + launches.bytes
    launching = sum(n for op, n in ops.items() if launches_kernel(op))
    triton_launches = sum(launches.values())
    return {
        "backend": config.name,
        "flags": list(config.flags),
        "depthwise": args.depthwise,
        "space": args.space,
        "order": order,
        "config": args.config,
        "ops_per_step": sum(ops.values()),
        "launching_ops_per_step": launching,
        "triton_launches_per_step": triton_launches,
        "launches_floor_per_step": launching + triton_launches,
        "tensor_mib_per_step": round(sum(traffic.values()) / 2**20, 1),
        "triton_launches": dict(launches.most_common()),
        "ops_by_name": dict(ops.most_common()),
        "tensor_mib_by_name": {k: round(v / 2**20, 3) for k, v in traffic.most_common()},
    }


def measure(
    args: argparse.Namespace, progress: Callable[[list[dict]], None] = lambda rows: None
) -> list[dict]:
    """Every configuration's counts and, with ``--steps``, its host seconds per step;
    ``progress`` gets the rows so far after each configuration's counts and each timed
    round."""
    configs = parse_backends(args.backends)
    rows, steps = [], {}

    def timed(times: dict[str, list[float]]) -> None:
        for row in rows:
            s = harness.Summary.of(times[row["backend"]])
            row.update(host_s_median=s.median, host_s_min=s.min, host_s_max=s.max)
            row["host_s"] = times[row["backend"]]
        progress(rows)

    with cuda_dispatch(args.depthwise) as launches:
        for config in configs:
            cfg = row_config(args, config)
            # Data for every step run (the lazy first, the count, the timed ones): a task
            # past its data starts a new epoch, whose steps differ (ptb's last is short).
            length = 2 + args.warmup + args.steps
            steps[config.name] = step_fn(
                build_task(cfg, torch.device("cpu"), DTYPES[args.dtype], length)
            )
            steps[config.name]()
            rows.append(count(args, config, cfg.order, steps[config.name], launches))
            progress(rows)
        if args.steps:
            launches.count_bytes = False
            harness.interleaved(steps, args.steps, args.warmup, after_round=timed)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_arguments(p, backends="reference,fast")
    p.add_argument("--depthwise", choices=("triton", "torch"), default="triton")
    p.add_argument("--steps", type=int, default=0, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, interleaved")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    try:
        for config in parse_backends(args.backends):
            cfg = row_config(args, config)
            # What build_task will ask for: the task is built on the CPU.
            resolve(cfg.backend, cfg.space, "cpu")
    except (ValueError, ConfigError) as e:
        p.error(str(e))
    if args.steps < 0 or args.warmup < 0:
        p.error("--steps and --warmup must be non-negative")
    harness.check_json_path(p, args.json)
    return args


def main(argv: list[str] | None = None) -> dict:
    """Counts (and with ``--steps`` times) each configuration; returns (and optionally
    writes) the result document."""
    args = parse_args(argv)
    harness.setup("cpu", args.threads)
    argv = sys.argv if argv is None else ["benchmarks/cuda_path_ops.py", *argv]
    doc = {
        "env": harness.env_info(torch.device("cpu"), argv),
        "rows": [],
        "units": {
            "ops_per_step": "ATen ops dispatched in one step on the CUDA code path",
            "launching_ops_per_step": "those that launch a kernel on a GPU (not views, "
            "aliases or allocations)",
            "triton_launches_per_step": "Triton kernel launches in that step",
            "launches_floor_per_step": "launching ops + Triton launches: a floor on kernel "
            "launches (a cuDNN or cuBLAS call may launch several)",
            "tensor_mib_per_step": "MiB of the tensors the launches take and return, each once "
            "and whole (an estimate of memory-bound kernels' traffic; by op and Triton kernel "
            "in tensor_mib_by_name)",
            "host_s": "seconds per step on this path on the CPU, Triton kernels not run "
            "(--steps; interleaved): host work plus the CPU's arithmetic",
        },
    }

    def save(rows: list[dict]) -> None:
        doc["rows"] = rows
        if args.json:
            harness.write_json(args.json, doc)

    doc["rows"] = measure(args, save)
    return harness.report(doc, COLUMNS, args.json)


if __name__ == "__main__":
    main()
