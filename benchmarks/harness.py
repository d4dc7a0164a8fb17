"""What every benchmark shares: environment, timing, op and launch counts, memory, output.

- ``env_info``: the facts a result needs to be read later (versions, machine, commit, command).
- ``interleaved``: runs configurations A B A B … after warm-up, so drift in the machine's
  load (other processes, clocks, thermals) spreads over all of them alike.
- ``OpCounter``: counts every ATen operator dispatched — the CPU-measurable stand-in for GPU
  kernel launches — including those a torch.library custom op dispatches inside itself; the
  custom op counts once as well, so a fused kernel with no ATen calls inside counts one.
- ``count_kernel_launches``: on CUDA, device kernels per call from torch.profiler (the
  authoritative figure there).
- ``peak_memory_in_subprocess``: each configuration in its own process, so they don't mask
  each other (CPU: the child's peak RSS; CUDA: max allocated).
- ``projected_gpu_hours``: a full paper search from one step's time.
"""

from __future__ import annotations

import argparse
import collections
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastdarts.utils import atomic_write_text

REPO = Path(__file__).resolve().parents[1]

# -- environment --------------------------------------------------------------------------


def _triton_version() -> str | None:
    # Package metadata, not an import: importing triton is slow and may touch the GPU driver.
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def git_commit() -> str | None:
    """HEAD's hash, with ``+dirty`` when the tree has uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def add_threads_argument(parser: argparse.ArgumentParser) -> None:
    """``--threads``, shared by the benchmark scripts."""
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads (default: torch's); on a shared CPU use 1: busy cores make\n"
        "OpenMP threads wait for each other at every op, up to 70x slower",
    )


def _at_least(text: str, kind: type, minimum: float, what: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not minimum <= value < math.inf:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _at_least(text, int, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _at_least(text, int, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    return _at_least(text, float, math.ulp(0.0), "a positive number")


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """Exits through ``parser.error`` (a usage error, exit 2) for ``--device cuda`` where
    no CUDA device is."""
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")


def check_json_path(parser: argparse.ArgumentParser, path: str | None) -> None:
    """Exits through ``parser.error`` when ``--json PATH`` could not be written: checked
    before the work, so a long run does not end in a traceback and a lost result. Creates
    the missing folders, as :func:`write_json` would."""
    if not path:
        return
    target = Path(path)
    if not target.name or target.is_dir():
        parser.error(f"--json {path}: is a folder; give a file path")
    folder = target.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        parser.error(f"--json {path}: {folder} is a file, not a folder")
    # Tried rather than predicted from permissions (root, read-only or special file systems).
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as e:
        parser.error(f"--json {path}: cannot write there ({e.strerror or e})")


def setup(device: str, threads: int | None) -> torch.device:
    """Apply ``--threads`` and check ``--device``; the benchmark scripts' common start."""
    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here")
    return torch.device(device)


def env_info(device: torch.device, argv: Sequence[str]) -> dict[str, Any]:
    """The ``env`` block of a result: versions, machine, threads, date, commit and command."""
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": shlex.join(["python", *argv]),
    }


# -- timing -------------------------------------------------------------------------------


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What to call before reading the clock: waits for queued GPU work on CUDA."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 0,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
    number: int = 1,
    after_round: Callable[[dict[str, list[float]]], None] = lambda times: None,
) -> dict[str, list[float]]:
    """Seconds per call of each function, run A B A B …: ``warmup`` untimed rounds first.
    Each sample times ``number`` back-to-back calls between two syncs and divides: for
    calls of tens of microseconds, which one sync pair would otherwise inflate.
    ``after_round`` gets the samples so far after each timed round (a caller saving them
    keeps what a run stopped by a time limit had measured)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            for _ in range(number):
                fn()
            sync()
            times[name].append((clock() - start) / number)
        after_round(times)
    return times


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Summary:
        return cls(statistics.median(samples), min(samples), max(samples))


# -- op and kernel-launch counts ----------------------------------------------------------

_ATEN_NAMESPACES = ("aten", "prim", "prims")


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active, by name (``aten.add.Tensor``).

    Ops reaching this mode are the ATen ops left after autograd, which is what runs on the
    device. A torch.library custom op arrives here whole: it is counted, then its kernel is
    run below the Python dispatch key with this mode active again, so the ATen ops its
    implementation calls are counted too (a Triton kernel inside adds nothing).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.counts[str(func)] += 1
        if func.namespace in _ATEN_NAMESPACES:
            return func(*args, **kwargs)
        keys = None
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                k = torch._C._dispatch_keys(t)
                keys = k if keys is None else keys | k
        if keys is None:
            return func(*args, **kwargs)
        # The tensors' own backend keys below Python (CPU, CUDA): the custom op's kernel
        # itself, not this handler again; re-entering the mode lets it see the ops inside.
        keys = keys & torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)
        with self:
            return func.redispatch(keys, *args, **kwargs)


def count_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """Operators dispatched by one call of ``fn``, by name."""
    with OpCounter() as counter:
        fn()
    return counter.counts


def profiled_events(
    fn: Callable[[], object], activities: Sequence[Any]
) -> list[tuple[torch.autograd.DeviceType, str, int, int]]:
    """(device type, name, start ns, duration ns) of every event torch.profiler records
    during one call of ``fn``, less user annotations (record_function ranges, which Kineto
    can mirror on the device's timeline: not kernels).

    Read from the raw Kineto results: building the profiler's FunctionEvents for the ~10⁵
    kernels of a reference step takes longer than the step.
    """
    from torch.profiler import profile

    with profile(activities=list(activities)) as prof:
        fn()
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is None:  # a torch without the raw results: the slower public route
        return [
            (e.device_type, e.name, 1000 * e.time_range.start, 1000 * e.time_range.elapsed_us())
            for e in prof.events()
            if not getattr(e, "is_user_annotation", False)
        ]
    return [
        (e.device_type(), e.name(), e.start_ns(), e.duration_ns())
        for e in results.events()
        if not e.is_user_annotation()
    ]


# The ops whose time ``time_split`` reports on its own: dense matmuls and convolutions
# (what MKL/oneDNN/cuBLAS do, and what fusion around them cannot shrink) and the decoder's
# output softmax and loss.
TIME_GROUPS: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
    "conv": (
        "aten::mkldnn_convolution",
        "aten::convolution_backward",
        "aten::_slow_conv2d_forward",
    ),
    "softmax+loss": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    ),
}


def time_split(
    fn: Callable[[], object], groups: Mapping[str, Sequence[str]] = TIME_GROUPS
) -> dict[str, float]:
    """Seconds of one profiled call of ``fn``: ``total``, each group's time (inclusive time of
    its ops, counting a call nested in another of the same group once) and ``rest``.

    The profiler adds a few microseconds per op, so ``rest`` is inflated where ops are many
    and small; compare it between backends, not with the untimed step.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        total = time.perf_counter() - start
    names = {name: group for group, members in groups.items() for name in members}
    results = getattr(getattr(prof, "profiler", None), "kineto_results", None)
    if results is not None:
        spans = [
            (e.start_thread_id(), e.start_ns(), e.start_ns() + e.duration_ns(), names[e.name()])
            for e in results.events()
            if e.name() in names
        ]
    else:  # a torch without the raw results: the slower public route
        spans = [
            (e.thread, 1000 * e.time_range.start, 1000 * e.time_range.end, names[e.name])
            for e in prof.events()
            if e.name in names
        ]
    out = dict.fromkeys(groups, 0.0)
    open_until: dict[tuple[int, str], float] = {}
    for thread, begin, end, group in sorted(spans):
        if begin < open_until.get((thread, group), -1):
            continue  # nested in a call of the same group, already counted
        open_until[(thread, group)] = end
        out[group] += (end - begin) / 1e9
    out["rest"] = total - sum(out.values())
    return {"total": total, **out}


@dataclass(frozen=True)
class DeviceProfile:
    """The kernels of one call: how many, the seconds at least one of them ran (their
    intervals' union, so kernels overlapping on several streams count once), and per kernel
    name its launches and summed seconds, longest first."""

    launches: int
    busy_s: float
    by_kernel: dict[str, tuple[int, float]]

    @classmethod
    def of(cls, spans: Sequence[tuple[str, int, int]]) -> DeviceProfile:
        """From (name, start ns, duration ns) per kernel."""
        busy_ns, reached = 0, None
        by_name: dict[str, list[int]] = {}
        for name, start, duration in sorted(spans, key=lambda s: s[1]):
            end = start + duration
            if reached is None or start >= reached:
                busy_ns += duration
            elif end > reached:
                busy_ns += end - reached
            reached = end if reached is None else max(reached, end)
            entry = by_name.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += duration
        ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])
        return cls(len(spans), busy_ns / 1e9, {k: (n, ns / 1e9) for k, (n, ns) in ranked})

    def top(self, n: int, width: int = 120) -> list[dict[str, Any]]:
        """The ``n`` kernels with the most seconds; names cut to ``width`` characters."""
        return [
            {"kernel": name[:width], "launches": count, "seconds": seconds}
            for name, (count, seconds) in list(self.by_kernel.items())[:n]
        ]


def device_profile(fn: Callable[[], object], device: torch.device) -> DeviceProfile | None:
    """The device kernels of one call of ``fn`` (CUDA, from torch.profiler); None elsewhere.

    Copies and memsets are left out: they are not kernels the code chose to launch.
    """
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity

    def synced() -> None:
        fn()
        torch.cuda.synchronize(device)

    torch.cuda.synchronize(device)
    events = profiled_events(synced, [ProfilerActivity.CUDA])
    return DeviceProfile.of(
        [
            (name, start, duration)
            for kind, name, start, duration in events
            if kind == torch.autograd.DeviceType.CUDA and not name.startswith(("Memcpy", "Memset"))
        ]
    )


def count_kernel_launches(fn: Callable[[], object], device: torch.device) -> int | None:
    """Device kernels one call of ``fn`` launches (CUDA); None elsewhere (see
    :func:`device_profile`)."""
    profile = device_profile(fn, device)
    return None if profile is None else profile.launches


# -- memory -------------------------------------------------------------------------------


_PROC = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak over: CUDA's allocator statistics; on Linux, the process's peak RSS
    (writing 5 to clear_refs), so importing torch and building the data — whose transient
    peak hid the step's own (the CPU column once read the same for every backend) — no
    longer count."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif (_PROC / "clear_refs").exists():
        (_PROC / "clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak since :func:`reset_peak_memory` (or its start): max allocated on
    CUDA, peak RSS on CPU (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = _PROC / "status"
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


MEMORY_TAG = "PEAK_MEM_MB"


def print_peak_memory(device: torch.device) -> None:
    """What a memory child prints last; ``peak_memory_in_subprocess`` reads it back."""
    print(f"{MEMORY_TAG} {peak_memory_mb(device):.3f}", flush=True)


def peak_memory_in_subprocess(
    cmd: Sequence[str], timeout: float | None = None
) -> tuple[float | None, str | None]:
    """Runs ``cmd`` (a child that ends with ``print_peak_memory``): (its peak in MiB, None),
    or (None, why) if the child fails, the reason also on stderr: a long benchmark keeps
    its timings, and its result says why a peak is missing."""
    try:
        done = subprocess.run(
            list(cmd), capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False
        )
    except subprocess.TimeoutExpired:
        why = f"memory child timed out after {timeout} s"
    else:
        for line in reversed(done.stdout.splitlines()):
            if line.startswith(MEMORY_TAG):
                return float(line.split()[1]), None
        tail = " | ".join(done.stderr.splitlines()[-5:])
        why = f"memory child failed (exit {done.returncode}): {tail}"
    print(f"{why}: {shlex.join(cmd)}", file=sys.stderr)
    return None, why


# -- GPU-hours projection -----------------------------------------------------------------

SEARCH_EPOCHS = 50
PTB_TRAIN_TOKENS = 929_589
# RNN: PTB train batchified into 929589 // 256 = 3631 rows; an epoch runs until its position
# reaches rows − 2, so at the full bptt of 35 it is ceil((3631 − 2) / 35) = 104 steps. The
# paper's random halving (5 % of steps at bptt/2) covers the same rows in more, shorter
# steps, so 104 full-length steps is the epoch's work to within a few per cent.
RNN_STEPS_PER_EPOCH = math.ceil((PTB_TRAIN_TOKENS // 256 - 2) / 35)
# CNN: half of CIFAR-10's 50,000 training images train the weights, at batch 64.
CNN_STEPS_PER_EPOCH = math.ceil(25_000 / 64)
STEPS_PER_EPOCH = {"rnn": RNN_STEPS_PER_EPOCH, "cnn": CNN_STEPS_PER_EPOCH}
PROJECTION_FORMULA = {
    "rnn": f"step_s * {SEARCH_EPOCHS} * ceil((929589 // 256 - 2) / 35) / 3600"
    f" = step_s * {SEARCH_EPOCHS * RNN_STEPS_PER_EPOCH} / 3600",
    "cnn": f"step_s * {SEARCH_EPOCHS} * ceil(25000 / 64) / 3600"
    f" = step_s * {SEARCH_EPOCHS * CNN_STEPS_PER_EPOCH} / 3600",
}
# One second-order search in the DARTS paper (Liu et al., 2019), on one GTX 1080 Ti.
PAPER_GPU_HOURS = {"rnn": 6.0, "cnn": 24.0}


def projected_gpu_hours(space: str, step_s: float) -> float:
    """Hours for a full paper search (50 epochs) at ``step_s`` seconds per step."""
    return step_s * SEARCH_EPOCHS * STEPS_PER_EPOCH[space] / 3600


# -- output -------------------------------------------------------------------------------

# Row keys of each script, in the schema order.
SEARCH_ROW_KEYS = (
    "space",
    "order",
    "config",
    "backend",
    "flags",
    "device",
    "median_s",
    "min_s",
    "max_s",
    "ratio_vs_reference",
    "ops_per_step",
    "kernel_launches_per_step",
    "peak_mem_mb",
    "projected_gpu_hours",
)
KERNEL_ROW_KEYS = (
    "kernel",
    "shape",
    "pass",
    *SEARCH_ROW_KEYS[2:],
    "speedup",
    "bytes",
    "gb_per_s",
    "bandwidth_fraction",
    "implementation",
)


def write_json(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Writes ``doc`` as indented JSON, creating the folder; through a temporary file and a
    rename, so a process stopped mid-write (a time limit) leaves the previous version."""
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def report(
    doc: dict[str, Any],
    columns: Sequence[tuple[str, str]],
    path: str | os.PathLike | None,
    rows: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A tool's ending: ``rows`` (default: the document's) printed as a table, the document
    written to ``path`` when given; returns the document."""
    print(markdown_table(doc["rows"] if rows is None else rows, columns))
    if path:
        write_json(path, doc)
    return doc


def _escape(text: str) -> str:
    # A bare | would end the cell (ab.py's "max |Δα|" header, a flag's value).
    return text.replace("|", "\\|")


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return _escape(" ".join(map(str, value))) or "—"
    return _escape(str(value))


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows``; ``columns`` are (header, key) pairs. A | in a header or
    a cell is escaped (\\|)."""
    lines = [
        "| " + " | ".join(_escape(h) for h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)
