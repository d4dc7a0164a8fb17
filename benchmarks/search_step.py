"""Seconds, ops, kernel launches and peak memory per DARTS search step, per configuration.

One step is exactly what the search loop runs: ``task.step()`` (α step, then weight step)
on synthetic data of the real shapes (PTB's vocabulary of 10,000 tokens; CIFAR-10's
3×32×32 images in 10 classes), drawn from a fixed seed.

    python benchmarks/search_step.py --space rnn --order 2 --config small \\
        --backends reference,first=--order,1 --steps 5 --warmup 1 --device cpu --json out.json

``--backends`` names configurations, comma-separated: ``reference``, ``fused``, ``fast``,
``graphs`` (``--fast --cuda-graphs``), or ``label=--flag,value,--flag,value`` for an
ablation row (flags are SearchConfig fields, as the search CLI spells them, applied over the
reference configuration). A configuration
whose backend cannot run here is listed as skipped, with the backend registry's reason.
Configurations run interleaved (A B A B …) in one process; ops per step are counted on a
separate untimed step after the timed ones; peak memory comes from a subprocess per
configuration (``--no-memory`` skips it). The JSON is rewritten after each timed round and
each later stage, so a run stopped by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):
    # Run as a script: make ``benchmarks`` and an uninstalled ``fastdarts`` importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from fastdarts.data.cifar import CIFAR10Split
from fastdarts.data.ptb import Corpus
from fastdarts.errors import ConfigError
from fastdarts.ops.backends import resolve
from fastdarts.search.__main__ import CHOICES
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import Searcher
from fastdarts.search.tasks import CNNTask, RNNTask, SearchTask

SCRIPT = "benchmarks/search_step.py"
PTB_VOCAB = 10_000
DTYPES = {"float32": torch.float32, "float64": torch.float64}

# Model and batch sizes per space; ``tiny`` (undocumented in the issue) is for the tests.
PRESETS: dict[str, dict[str, dict]] = {
    "rnn": {
        "paper": {"emsize": 300, "nhid": 300, "batch_size": 256, "bptt": 35},
        "small": {"emsize": 64, "nhid": 64, "batch_size": 32, "bptt": 20},
        "tiny": {"emsize": 8, "nhid": 8, "batch_size": 4, "bptt": 5},
    },
    "cnn": {
        "paper": {"init_channels": 16, "layers": 8, "batch_size": 64},
        "small": {"init_channels": 16, "layers": 8, "batch_size": 8},
        "tiny": {"init_channels": 4, "layers": 3, "batch_size": 2},
    },
}

# The named configurations, as the flags they set over the reference.
BUILTIN: dict[str, tuple[str, ...]] = {
    "reference": (),
    "fused": ("--backend", "fused"),
    "fast": ("--fast",),
    # The whole step replayed from CUDA graphs (captured after 2 eager steps per batch shape:
    # give it --warmup GRAPHS_WARMUP or more).
    "graphs": ("--fast", "--cuda-graphs"),
}
# Untimed steps a --cuda-graphs configuration needs before its timed ones are replays:
# fastdarts.search.graphs.GraphedStep runs a shape's first 2 steps eagerly, captures the third.
GRAPHS_WARMUP = 3
# Set once for the whole run by this script's own options, so no row may change them.
RUN_WIDE = frozenset({"space", "device", "dtype", "threads"})
_FIELDS = {f.name: f for f in dataclasses.fields(SearchConfig)}


# -- configurations -----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    """One row's configuration: its name and the SearchConfig flags it sets."""

    name: str
    flags: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        """How ``--backends`` spells it (passed to the memory child)."""
        if self.name in BUILTIN and BUILTIN[self.name] == self.flags:
            return self.name
        return f"{self.name}=" + ",".join(self.flags)

    def overrides(self) -> dict:
        return parse_flags(self.flags)


def _field(flag: str) -> str:
    name = flag.removeprefix("--").partition("=")[0].replace("-", "_")
    if not flag.startswith("--") or name not in _FIELDS:
        raise ValueError(f"{flag}: not a search setting (a SearchConfig field, e.g. --order)")
    if name in RUN_WIDE:
        raise ValueError(f"{flag}: set for the whole run by this script's own --{name}")
    return name


def _is_switch(flag: str) -> bool:
    return _FIELDS[_field(flag)].type == "bool" and "=" not in flag


def _convert(name: str, text: str):
    kind = str(_FIELDS[name].type)
    optional = kind.endswith("| None")
    if optional and text.lower() == "none":
        return None
    base = kind.removesuffix("| None").strip()
    if base == "bool":
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--{name}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    try:
        value = {"int": int, "float": float}.get(base, str)(text)
    except ValueError:
        raise ValueError(f"--{name}: expected {base}, got {text!r}") from None
    # The search CLI's own choices (its --order 1 or 2, ...).
    if name in CHOICES and value not in CHOICES[name]:
        have = ", ".join(map(str, CHOICES[name]))
        raise ValueError(f"--{name}: expected one of {have}, got {text!r}")
    return value


def parse_flags(flags: tuple[str, ...] | list[str]) -> dict:
    """SearchConfig overrides from flags: ``--order 1``, ``--hvp=exact``, ``--compat darts``.

    A bool field given without a value is switched on.
    """
    out: dict = {}
    i = 0
    while i < len(flags):
        flag = flags[i]
        name = _field(flag)
        if "=" in flag:
            out[name] = _convert(name, flag.partition("=")[2])
        elif _is_switch(flag):
            out[name] = True
        else:
            if i + 1 >= len(flags):
                raise ValueError(f"{flag} needs a value")
            i += 1
            out[name] = _convert(name, flags[i])
        i += 1
    return out


def parse_backends(spec: str) -> list[BenchConfig]:
    """The configurations of ``--backends``: names and ``label=--flag,value,…`` rows.

    Commas separate both configurations and an ablation's flags: after a flag that takes a
    value comes its value, and a bare word where a flag could start begins the next
    configuration (``a=--order,1,reference`` is two configurations).
    """
    tokens: list[str] = []
    for raw in spec.split(","):
        tok = raw.strip()
        if "=" in tok and not tok.startswith("--"):
            label, rest = tok.split("=", 1)
            tokens.append(label + "=")
            tokens.extend([rest] if rest else [])
        elif tok:
            tokens.append(tok)
    configs: list[BenchConfig] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok.endswith("="):
            flags: list[str] = []
            while i < len(tokens) and tokens[i].startswith("--"):
                flags.append(tokens[i])
                takes_value = "=" not in tokens[i] and not _is_switch(tokens[i])
                i += 1
                if takes_value and i < len(tokens):
                    flags.append(tokens[i])
                    i += 1
            name = tok[:-1]
            if not name:
                raise ValueError(f"--backends: an ablation row needs a label: {spec!r}")
            configs.append(BenchConfig(name, tuple(flags)))
        elif tok in BUILTIN:
            configs.append(BenchConfig(tok, BUILTIN[tok]))
        else:
            raise ValueError(
                f"--backends: unknown configuration {tok!r} (use {', '.join(BUILTIN)} "
                "or label=--flag,value)"
            )
    if not configs:
        raise ValueError("--backends: no configuration given")
    for c in configs:
        c.overrides()  # reject bad flags before anything runs
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"--backends: configuration names repeat: {names}")
    return configs


def search_config(
    space: str, order: int, preset: str, overrides: dict, dtype: str = "float32"
) -> SearchConfig:
    """The SearchConfig of one row: preset sizes, then the row's own flags; ConfigError
    where the search would refuse them (a row must not time a flag that does nothing)."""
    cfg = SearchConfig(space=space, order=order, dtype=dtype, **PRESETS[space][preset])
    cfg = dataclasses.replace(cfg, **overrides).resolved()
    Searcher.validate(cfg)
    return cfg


def row_config(args: argparse.Namespace, config: BenchConfig) -> SearchConfig:
    """:func:`search_config` of a row of ``--backends`` (``args``: --space, --order, --config,
    --dtype); ValueError naming the row where the search would refuse it."""
    try:
        return search_config(args.space, args.order, args.config, config.overrides(), args.dtype)
    except ConfigError as e:
        raise ValueError(f"--backends {config.name}: {e}") from None


def unavailable(cfg: SearchConfig, device: torch.device) -> str | None:
    """Why ``cfg`` cannot run here (the backend registry's reason, or CUDA graphs off a
    CUDA device), or None."""
    if cfg.cuda_graphs and device.type != "cuda":
        return f"--cuda-graphs needs a CUDA device, not {device.type}"
    try:
        resolve(cfg.backend, cfg.space, device.type)
    except ConfigError as e:
        return str(e)
    return None


# -- synthetic data and tasks -------------------------------------------------------------


class _FullLength:
    """Stands in for RNNTask's NumPy generator: ``random()`` of 0.0 always draws the full
    bptt (the task halves it when the draw is ≥ 0.95), so every timed step is equally long."""

    def random(self) -> float:
        return 0.0


def synthetic_corpus(batch_size: int, bptt: int, steps: int, seed: int = 0) -> Corpus:
    """Random token ids over a 10,000-word vocabulary, enough for ``steps`` full steps."""
    g = torch.Generator().manual_seed(seed)
    # Each step consumes bptt rows of the batchified data; +1 step and 3 rows of margin keep
    # the task short of its epoch end and the α batch at full length.
    tokens = batch_size * ((steps + 1) * bptt + 3)
    train = torch.randint(0, PTB_VOCAB, (tokens,), generator=g)
    valid = torch.randint(0, PTB_VOCAB, (tokens,), generator=g)
    test = torch.randint(0, PTB_VOCAB, (bptt + 2,), generator=g)
    return Corpus(train, valid, test, [f"w{i}" for i in range(PTB_VOCAB)])


def synthetic_images(batch_size: int, steps: int, seed: int = 0) -> CIFAR10Split:
    """Random uint8 3×32×32 images in 10 classes: the weight half holds ``steps`` + 1 batches."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * batch_size * (steps + 1)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return CIFAR10Split(images, torch.randint(0, 10, (n,), generator=g))


def build_task(
    cfg: SearchConfig, device: torch.device, dtype: torch.dtype, steps: int
) -> SearchTask:
    """A task on synthetic data for ``steps`` steps, at the start of an epoch."""
    task: SearchTask
    if cfg.space == "rnn":
        corpus = synthetic_corpus(cfg.batch_size, cfg.bptt, steps)
        task = RNNTask(cfg, device, dtype, corpus=corpus)
        task.rng = _FullLength()
    else:
        task = CNNTask(cfg, device, dtype, images=synthetic_images(cfg.batch_size, steps))
    task.begin_epoch(0)
    return task


def step_fn(task: SearchTask):
    """One search step as the loop runs it (a new epoch begins if the data ran out)."""

    def step() -> None:
        if task.epoch_done():
            task.begin_epoch(0)
        task.step()

    return step


# -- CLI ----------------------------------------------------------------------------------


def add_step_arguments(p: argparse.ArgumentParser, backends: str) -> None:
    """The options that choose the steps to measure: --space, --order, --config, --backends
    (default ``backends``), --dtype and --threads (shared with cuda_path_ops.py)."""
    p.add_argument("--space", choices=("rnn", "cnn"), required=True)
    p.add_argument("--order", type=int, choices=(1, 2), default=2)
    p.add_argument("--config", choices=("paper", "small", "tiny"), default="small")
    p.add_argument("--backends", default=backends, help="configurations, comma-separated")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    harness.add_threads_argument(p)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_step_arguments(p, backends="reference")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, interleaved")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument(
        "--time-split",
        action="store_true",
        help="profile one more step per configuration: seconds in matmuls, convolutions, the "
        "output softmax and loss, and the rest",
    )
    p.add_argument(
        "--memory-timeout",
        type=harness.positive_float,
        default=None,
        help="seconds per memory child (default: no limit)",
    )
    # Internal: run one configuration for two steps and print its peak memory.
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup non-negative")
    if args.time_split and args.device == "cuda":
        # Its profiler records the CPU and syncs nothing: on CUDA it would time the launches.
        p.error("--time-split profiles the CPU only: not with --device cuda")
    try:
        configs = parse_backends(args.backends)
        cfgs = {c.name: row_config(args, c) for c in configs}
    except ValueError as e:
        p.error(str(e))  # a usage error, not a traceback
    graphed = [c.name for c in configs if cfgs[c.name].cuda_graphs]
    # The memory child runs its own steps (captured and replayed, see _memory_child).
    if graphed and args.device == "cuda" and not args.memory_child and args.warmup < GRAPHS_WARMUP:
        p.error(
            f"--warmup {args.warmup}: {', '.join(graphed)} would be timed before its CUDA "
            f"graph is captured; give --warmup {GRAPHS_WARMUP} or more"
        )
    harness.check_device(p, args.device)
    harness.check_json_path(p, args.json)
    return args


def _memory_child(args: argparse.Namespace, device: torch.device) -> None:
    (config,) = parse_backends(args.backends)
    cfg = row_config(args, config)
    # The peak of the steps (with the model, data and optimiser state they hold). Two steps:
    # the first allocates optimiser state, the second runs at steady state; under CUDA
    # graphs four, so that the graph is captured (third) and replayed (fourth) from its pool.
    n = 4 if cfg.cuda_graphs else 2
    step = step_fn(build_task(cfg, device, DTYPES[args.dtype], n))
    harness.reset_peak_memory(device)
    for _ in range(n):
        step()
    harness.print_peak_memory(device)


def _memory_cmd(args: argparse.Namespace, config: BenchConfig) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child"]
    cmd += ["--space", args.space, "--order", str(args.order), "--config", args.config]
    cmd += ["--backends", config.spec, "--device", args.device, "--dtype", args.dtype]
    return cmd + (["--threads", str(args.threads)] if args.threads else [])


COLUMNS = [
    ("backend", "backend"),
    ("flags", "flags"),
    ("space", "space"),
    ("order", "order"),
    ("config", "config"),
    ("median s/step", "median_s"),
    ("min s", "min_s"),
    ("max s", "max_s"),
    ("× reference", "ratio_vs_reference"),
    ("ops/step", "ops_per_step"),
    ("launches/step", "kernel_launches_per_step"),
    ("peak MiB", "peak_mem_mb"),
    ("projected GPU-h", "projected_gpu_hours"),
]


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns (and optionally writes) the result document."""
    args = parse_args(argv)
    device = harness.setup(args.device, args.threads)
    if args.memory_child:
        _memory_child(args, device)
        return {}

    dtype = DTYPES[args.dtype]
    configs, skipped, cfgs = [], [], {}
    for config in parse_backends(args.backends):
        cfg = row_config(args, config)
        reason = unavailable(cfg, device)
        if reason:
            skipped.append({"backend": config.name, "flags": list(config.flags), "reason": reason})
        else:
            configs.append(config)
            cfgs[config.name] = cfg

    # Timed steps, the op-count step, (CUDA) the profiled step and the time split need data.
    total = args.warmup + args.steps + 3
    steps = {c.name: step_fn(build_task(cfgs[c.name], device, dtype, total)) for c in configs}
    doc = {
        "env": harness.env_info(device, [SCRIPT, *(sys.argv[1:] if argv is None else argv)]),
        "rows": [],
        "run": _run_info(args, device),
        "skipped": skipped,
        "samples_s": {},
        "ops_by_name": None,
        "time_split_s": None,
    }
    # The document is rewritten after each timed round and each later stage, so a run
    # stopped by a time limit keeps what it measured (the timings first).
    save = (lambda: harness.write_json(args.json, doc)) if args.json else (lambda: None)

    def timed(times: dict[str, list[float]]) -> None:
        doc["rows"], doc["samples_s"] = _timing_rows(args, configs, cfgs, device, times), times
        save()

    harness.interleaved(
        steps, args.steps, args.warmup, sync=harness.synchronizer(device), after_round=timed
    )
    rows = doc["rows"]
    # Counted after the timed steps, so lazily created optimiser state is not in the count.
    ops = {name: harness.count_ops(fn) for name, fn in steps.items()}
    doc["ops_by_name"] = {name: dict(ops[name].most_common()) for name in ops}
    for r in rows:
        r["ops_per_step"] = sum(ops[r["backend"]].values())
    save()
    profiles = {r["backend"]: harness.device_profile(steps[r["backend"]], device) for r in rows}
    for r in rows:
        profile = profiles[r["backend"]]
        r["kernel_launches_per_step"] = None if profile is None else profile.launches
    if any(p is not None for p in profiles.values()):  # on CUDA
        doc["device_profile"] = {
            r["backend"]: {
                "busy_s": profiles[r["backend"]].busy_s,
                "busy_fraction": profiles[r["backend"]].busy_s / r["median_s"],
                "top_kernels": profiles[r["backend"]].top(12),
            }
            for r in rows
        }
    save()
    splits = {name: harness.time_split(fn) for name, fn in steps.items()} if args.time_split else {}
    if splits:
        doc["time_split_s"] = splits
        save()
    if not args.no_memory:
        for c, r in zip(configs, rows):
            r["peak_mem_mb"], why = harness.peak_memory_in_subprocess(
                _memory_cmd(args, c), args.memory_timeout
            )
            if why is not None:
                r["peak_mem_error"] = why
            save()

    print(harness.markdown_table(rows, COLUMNS))
    if "device_profile" in doc:
        print("\nthe device's share of a step, and its longest kernels:\n")
        print(harness.markdown_table(_profile_rows(doc["device_profile"]), PROFILE_COLUMNS))
    if splits:
        print("\nwhere the time goes (seconds in one profiled step):\n")
        split_rows = [{"backend": name, **split} for name, split in splits.items()]
        keys = ["total", *harness.TIME_GROUPS, "rest"]
        print(harness.markdown_table(split_rows, [("backend", "backend")] + [(k, k) for k in keys]))
    for s in skipped:
        print(f"skipped {s['backend']}: {s['reason']}")
    if any(r["projected_gpu_hours"] is not None for r in rows):
        print(
            f"paper: one second-order {args.space.upper()} search takes about "
            f"{harness.PAPER_GPU_HOURS[args.space]:g} GPU-hours on one GTX 1080 Ti"
        )
    return doc


def _timing_rows(
    args: argparse.Namespace,
    configs: list[BenchConfig],
    cfgs: dict[str, SearchConfig],
    device: torch.device,
    times: dict[str, list[float]],
) -> list[dict]:
    """One row per configuration from its timed steps so far; the later stages' columns
    empty."""
    rows = []
    for c in configs:
        s = harness.Summary.of(times[c.name])
        hours = None
        if device.type == "cuda" and args.config == "paper":
            hours = harness.projected_gpu_hours(args.space, s.median)
        rows.append(
            {
                "space": args.space,
                "order": cfgs[c.name].order,
                "config": args.config,
                "backend": c.name,
                "flags": list(c.flags),
                "device": str(device),
                "median_s": s.median,
                "min_s": s.min,
                "max_s": s.max,
                "ratio_vs_reference": None,
                "ops_per_step": None,
                "kernel_launches_per_step": None,
                "peak_mem_mb": None,
                "projected_gpu_hours": hours,
            }
        )
    ref = next((r for r in rows if r["backend"] == "reference"), None)
    for r in rows:
        r["ratio_vs_reference"] = r["median_s"] / ref["median_s"] if ref else None
    return rows


PROFILE_COLUMNS = [
    ("backend", "backend"),
    ("device busy s", "busy_s"),
    ("of the step", "busy_fraction"),
    ("top kernels (launches, s)", "top"),
]


def _profile_rows(profiles: dict[str, dict]) -> list[dict]:
    return [
        {
            "backend": name,
            "busy_s": p["busy_s"],
            "busy_fraction": p["busy_fraction"],
            "top": "; ".join(
                f"{k['kernel'][:40]} ({k['launches']}, {k['seconds']:.3g})"
                for k in p["top_kernels"][:3]
            ),
        }
        for name, p in profiles.items()
    ]


def _run_info(args: argparse.Namespace, device: torch.device) -> dict:
    """The result document's "run" block: settings and what each column means."""
    return {
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "preset": PRESETS[args.space][args.config],
        "data": "synthetic, seed 0: PTB-sized vocabulary (10,000) / CIFAR-10 3x32x32 uint8",
        "seq_len": (
            f"fixed at bptt = {PRESETS['rnn'][args.config]['bptt']} (the random halving "
            "is disabled so every timed step has the same length)"
            if args.space == "rnn"
            else None
        ),
        "ratio_vs_reference": "median_s / reference median_s (below 1 is faster)",
        "samples_s": "each timed step's seconds, per configuration (fewer than steps: the "
        "run was stopped; the rows are of those)",
        "ops_per_step": "ATen ops dispatched in one untimed step (custom ops count once "
        "plus the ATen ops inside them)",
        "time_split_s": "one more step under torch.profiler (CPU): inclusive seconds in "
        + ", ".join(f"{g} ({', '.join(n)})" for g, n in harness.TIME_GROUPS.items())
        + "; rest = the remainder (inflated by the profiler's per-op cost)",
        "peak_mem_mb": "per configuration in its own process, two steps (four under "
        "CUDA graphs: captured and replayed): "
        + ("max allocated (CUDA)" if device.type == "cuda" else "peak RSS (CPU)"),
        "projection": harness.PROJECTION_FORMULA[args.space]
        + " (paper configuration on CUDA only)",
        "paper_gpu_hours_second_order": harness.PAPER_GPU_HOURS[args.space],
        "device_profile": "CUDA only, one more step under torch.profiler: busy_s, the "
        "seconds at least one kernel ran (copies and memsets left out); busy_fraction, "
        "busy_s / median_s (well below 1: the host, launching, is what limits the step); "
        "top_kernels, by summed seconds",
    }


if __name__ == "__main__":
    main()
