"""The benchmark harness: op counting, interleaving, ablation flags and both JSON schemas."""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ``benchmarks`` is a folder of the repository, not installed

from benchmarks import (  # noqa: E402
    ab,
    alpha_grad_error,
    cuda_path_ops,
    harness,
    kernels,
    search_step,
    summary,
    triton_resources,
)
from fastdarts.ops import backends, conv_mixed, cross_entropy  # noqa: E402


@torch.library.custom_op("fastdarts_bench_test::axpy", mutates_args=())
def axpy(a: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return a * x + y


@pytest.fixture
def restore_threads():
    """The scripts set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -- op counter ---------------------------------------------------------------------------


def test_op_counter_counts_a_known_sequence_exactly():
    a, b = torch.randn(4), torch.randn(4)
    counts = harness.count_ops(lambda: (a + b).mul(b).sum())
    assert counts == {"aten.add.Tensor": 1, "aten.mul.Tensor": 1, "aten.sum.default": 1}


def test_op_counter_counts_backward_ops():
    x = torch.randn(3, requires_grad=True)
    counts = harness.count_ops(lambda: torch.autograd.grad((x * 2).sum(), x))
    # Forward mul and sum; backward seeds ones, expands the sum's grad and multiplies by 2.
    assert counts == {
        "aten.mul.Tensor": 2,
        "aten.sum.default": 1,
        "aten.ones_like.default": 1,
        "aten.expand.default": 1,
    }


def test_op_counter_counts_a_custom_op_once_plus_the_aten_ops_inside():
    a, x, y = torch.randn(5), torch.randn(5), torch.randn(5)
    with harness.OpCounter() as counter:
        out = axpy(a, x, y)
        twice = axpy(a, x, out)
    assert counter.counts == {
        "fastdarts_bench_test.axpy.default": 2,
        "aten.mul.Tensor": 2,
        "aten.add.Tensor": 2,
    }
    assert counter.total == 6
    torch.testing.assert_close(twice, a * x + (a * x + y))


def test_profiled_events_and_launch_counts():
    from torch.profiler import ProfilerActivity

    a = torch.randn(3)

    def annotated():
        with torch.profiler.record_function("a range"):
            a + a

    events = harness.profiled_events(annotated, [ProfilerActivity.CPU])
    adds = [e for e in events if e[:2] == (torch.autograd.DeviceType.CPU, "aten::add")]
    assert len(adds) == 1 and adds[0][2] > 0 and adds[0][3] >= 0
    assert not any(e[1] == "a range" for e in events)  # a user annotation, not an op
    # Kernel launches are a CUDA figure.
    assert harness.count_kernel_launches(lambda: a + a, torch.device("cpu")) is None
    assert harness.device_profile(lambda: a + a, torch.device("cpu")) is None


def test_device_profile_counts_overlapping_kernels_once():
    # b overlaps a (another stream), c lies inside a, then a gap, then a again.
    spans = [("a", 100, 50), ("b", 140, 30), ("c", 110, 10), ("a", 300, 20)]
    profile = harness.DeviceProfile.of(spans)
    assert profile.launches == 4
    assert profile.busy_s == pytest.approx((170 - 100 + 20) / 1e9)
    assert profile.by_kernel == {"a": (2, 70e-9), "b": (1, 30e-9), "c": (1, 10e-9)}
    assert profile.top(2, width=1) == [
        {"kernel": "a", "launches": 2, "seconds": 70e-9},
        {"kernel": "b", "launches": 1, "seconds": 30e-9},
    ]
    assert harness.DeviceProfile.of([]) == harness.DeviceProfile(0, 0.0, {})


# -- timing -------------------------------------------------------------------------------


def test_interleaved_runs_a_b_a_b_after_warmup():
    calls: list[str] = []
    ticks = iter(range(100))
    fns = {"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}
    rounds = []
    times = harness.interleaved(
        fns,
        repeats=3,
        warmup=2,
        clock=lambda: float(next(ticks)),
        after_round=lambda t: rounds.append({k: len(v) for k, v in t.items()}),
    )
    assert rounds == [{"A": n, "B": n} for n in (1, 2, 3)]  # after each timed round
    assert calls == ["A", "B"] * 5
    # Each timed call reads the clock twice in a row: one tick apart.
    assert times == {"A": [1.0, 1.0, 1.0], "B": [1.0, 1.0, 1.0]}
    s = harness.Summary.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max) == (2.0, 1.0, 3.0)


def test_interleaved_averages_back_to_back_calls_between_syncs():
    events: list[str] = []
    clock = iter([0.0, 8.0, 8.0, 12.0])
    fns = {"A": lambda: events.append("A"), "B": lambda: events.append("B")}
    times = harness.interleaved(
        fns, repeats=1, sync=lambda: events.append("sync"), clock=lambda: next(clock), number=4
    )
    assert events == ["sync", *["sync", *"AAAA", "sync", "sync", *"BBBB", "sync"]]
    assert times == {"A": [2.0], "B": [1.0]}


def test_projection_counts_paper_steps():
    assert harness.RNN_STEPS_PER_EPOCH == math.ceil((929_589 // 256 - 2) / 35) == 104
    assert harness.CNN_STEPS_PER_EPOCH == 391
    assert harness.projected_gpu_hours("cnn", 1.0) == pytest.approx(50 * 391 / 3600)
    assert harness.projected_gpu_hours("rnn", 2.0) == pytest.approx(2 * 50 * 104 / 3600)


def test_markdown_table():
    rows = [{"a": 1.23456, "b": None, "c": ["--order", "1"]}]
    table = harness.markdown_table(rows, [("A", "a"), ("B", "b"), ("C", "c")])
    assert table.splitlines() == ["| A | B | C |", "|---|---|---|", "| 1.235 | — | --order 1 |"]


def test_markdown_table_escapes_pipes():
    """A | in a header (ab.py's "max |Δα|") or a cell would split its column."""
    rows = [{"alpha_max_abs_diff": 0.5, "f": "a|b", "l": ["x|y"]}]
    table = harness.markdown_table(rows, [ab.COLUMNS[-1], ("f", "f"), ("l", "l")])
    head, _, row = table.splitlines()
    assert head == r"| max \|Δα\| | f | l |"
    assert row == r"| 0.5 | a\|b | x\|y |"


# -- ablation flags -----------------------------------------------------------------------


def test_parse_backends_names_and_ablation_rows():
    configs = search_step.parse_backends(
        "reference,first=--order,1,hvp_exact=--hvp,exact,darts=--compat=darts,--lr,0.5,fast"
    )
    assert [c.name for c in configs] == ["reference", "first", "hvp_exact", "darts", "fast"]
    assert configs[1].flags == ("--order", "1")
    assert [c.overrides() for c in configs] == [
        {},
        {"order": 1},
        {"hvp": "exact"},
        {"compat": "darts", "lr": 0.5},
        {"fast": True},
    ]
    assert configs[1].spec == "first=--order,1"
    assert configs[0].spec == "reference"


def test_parse_flags_types_and_switches():
    assert search_step.parse_flags(["--batch-size", "7", "--epoch-steps", "none"]) == {
        "batch_size": 7,
        "epoch_steps": None,
    }
    # A bool field takes no value, so the word after it starts the next configuration.
    configs = search_step.parse_backends("r=--resume,reference")
    assert [(c.name, c.overrides()) for c in configs] == [
        ("r", {"resume": True}),
        ("reference", {}),
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bad=--no-such-flag,1", "not a search setting"),
        ("x=--space,cnn", "whole run"),
        ("x=--order", "needs a value"),
        ("x=--order,two", "expected int"),
        ("turbo", "unknown configuration"),
        ("reference,reference", "repeat"),
        ("=--order,1", "needs a label"),
        ("x=--order,3", "--order: expected one of 1, 2, got '3'"),
        ("x=--hvp,approx", "--hvp: expected one of fd, exact"),
    ],
)
def test_parse_backends_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        search_step.parse_backends(spec)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--order", "1", "--backends", "x=--hvp,exact"], "--backends x: --hvp exact and"),
        (["--backends", "x=--amp,bf16", "--dtype", "float64"], "with --dtype float64 it does"),
        (["--space", "cnn", "--backends", "x=--backend,fused,--sync-bn"], "--sync-bn runs with"),
        (["--backends", "x=--lr,-1"], "--backends x: --lr must be non-negative"),
        (["--backends", ","], "--backends: no configuration given"),
    ],
)
def test_rows_the_search_would_refuse_are_usage_errors(argv, message, capsys):
    """A row is not timed doing what the search refuses (a flag that would change nothing,
    a value out of range): one usage line, before anything runs."""
    space = [] if "--space" in argv else ["--space", "rnn"]
    for parse in (search_step.parse_args, cuda_path_ops.parse_args):
        with pytest.raises(SystemExit) as stop:
            parse([*space, "--config", "tiny", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_ablation_row_config():
    (config,) = search_step.parse_backends("first=--order,1")
    cfg = search_step.search_config("rnn", 2, "small", config.overrides())
    assert (cfg.order, cfg.nhid, cfg.emsize, cfg.batch_size, cfg.bptt) == (1, 64, 64, 32, 20)
    assert cfg.lr == 20.0  # paper defaults filled in by resolved()


def test_fast_config_turns_on_the_engine_options():
    (config,) = search_step.parse_backends("fast")
    cfg = search_step.search_config("rnn", 2, "tiny", config.overrides())
    assert (cfg.backend, cfg.batched_fd) == ("auto", False)  # batching saves nothing on a CPU
    gpu = search_step.search_config("rnn", 2, "tiny", {**config.overrides(), "device": "cuda"})
    assert (gpu.backend, gpu.batched_fd) == ("auto", True)
    first = search_step.search_config("cnn", 1, "tiny", {**config.overrides(), "device": "cuda"})
    assert (first.backend, first.batched_fd) == ("auto", False)  # no w± at first order
    # The CNN's batched w± passes: fewer launches, more copies; not --fast's until timed.
    cnn = search_step.search_config("cnn", 2, "tiny", {**config.overrides(), "device": "cuda"})
    assert (cnn.backend, cnn.batched_fd) == ("auto", False)


def test_synthetic_rnn_data_has_full_length_steps():
    cfg = search_step.search_config("rnn", 1, "tiny", {})
    task = search_step.build_task(cfg, torch.device("cpu"), torch.float32, steps=3)
    assert task.model.ntoken == search_step.PTB_VOCAB
    for _ in range(3):
        assert task.rng.random() < 0.95  # never halves the sequence
    assert len(task.train_data) >= 4 * cfg.bptt + 2


# -- the scripts' JSON --------------------------------------------------------------------

ENV_TYPES = {
    "torch": str,
    "triton": (str, type(None)),
    "python": str,
    "device_name": str,
    "cpu_count": int,
    "threads": int,
    "date": str,
    "git_commit": (str, type(None)),
    "command": str,
}
OPTIONAL_FLOAT = (float, type(None))
COMMON_ROW_TYPES = {
    "config": str,
    "backend": str,
    "flags": list,
    "device": str,
    "median_s": float,
    "min_s": float,
    "max_s": float,
    "ratio_vs_reference": OPTIONAL_FLOAT,
    "ops_per_step": int,
    "kernel_launches_per_step": (int, type(None)),
    "peak_mem_mb": OPTIONAL_FLOAT,
    "projected_gpu_hours": OPTIONAL_FLOAT,
}


def _check(doc: dict, row_types: dict) -> None:
    assert set(doc["env"]) == set(ENV_TYPES)
    for key, kind in ENV_TYPES.items():
        assert isinstance(doc["env"][key], kind), key
    assert doc["rows"]
    for row in doc["rows"]:
        assert set(row) == set(row_types)
        for key, kind in row_types.items():
            assert isinstance(row[key], kind), (key, row[key])
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["ops_per_step"] > 0
        assert row["kernel_launches_per_step"] is None  # CPU
        assert row["projected_gpu_hours"] is None


GPU_ONLY_REASON = "backend 'gpu_only' does not run on cpu"


def test_search_step_json_schema(tmp_path, restore_threads, capsys, monkeypatch):
    # A backend the registry says cannot run here is skipped with the registry's reason.
    gpu_only = backends.Backend("gpu_only", frozenset({"rnn", "cnn"}), frozenset({"cuda"}))
    monkeypatch.setitem(backends.BACKENDS, "gpu_only", gpu_only)
    out = tmp_path / "rnn.json"
    argv = ["--space", "rnn", "--order", "2", "--config", "tiny", "--steps", "2", "--warmup", "0"]
    argv += ["--backends", "reference,first=--order,1,gpu=--backend,gpu_only", "--device", "cpu"]
    argv += ["--threads", "1", "--no-memory", "--json", str(out)]
    returned = search_step.main(argv)
    doc = json.loads(out.read_text())
    assert doc == json.loads(json.dumps(returned))
    _check(doc, {"space": str, "order": int, **COMMON_ROW_TYPES})
    assert list(doc["rows"][0]) == list(harness.SEARCH_ROW_KEYS)
    ref, first = doc["rows"]
    assert (ref["backend"], ref["order"], ref["flags"]) == ("reference", 2, [])
    assert (first["backend"], first["order"], first["flags"]) == ("first", 1, ["--order", "1"])
    assert ref["ratio_vs_reference"] == 1.0
    # First order runs one pass where second order runs four: fewer ops.
    assert first["ops_per_step"] < ref["ops_per_step"]
    assert doc["skipped"] == [
        {"backend": "gpu", "flags": ["--backend", "gpu_only"], "reason": GPU_ONLY_REASON}
    ]
    assert doc["env"]["command"].startswith("python benchmarks/search_step.py --space rnn")
    printed = capsys.readouterr().out
    assert "| reference |" in printed and "skipped gpu:" in printed


def test_search_step_cnn_with_memory_child(tmp_path, restore_threads):
    out = tmp_path / "cnn.json"
    argv = ["--space", "cnn", "--order", "1", "--config", "tiny", "--steps", "1", "--warmup", "0"]
    argv += ["--threads", "1", "--json", str(out)]
    doc = search_step.main(argv)
    (row,) = doc["rows"]
    assert (row["space"], row["order"], row["backend"]) == ("cnn", 1, "reference")
    # Peak RSS of a child that imported torch and ran two steps.
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] > 50
    assert json.loads(out.read_text())["rows"] == doc["rows"]


def test_search_step_writes_its_timings_before_the_memory_children(
    tmp_path, restore_threads, monkeypatch
):
    """A run stopped by a time limit during its (slow) memory subprocesses keeps its timings
    and counts: the JSON is rewritten after each stage."""
    out = tmp_path / "rnn.json"
    seen = []

    def child(cmd, timeout=None):
        seen.append(json.loads(out.read_text())["rows"])
        return (123.0, None) if len(seen) == 1 else (None, "memory child timed out after 9 s")

    monkeypatch.setattr(harness, "peak_memory_in_subprocess", child)
    argv = ["--space", "rnn", "--order", "1", "--config", "tiny", "--steps", "1", "--warmup", "0"]
    search_step.main([*argv, "--threads", "1", "--json", str(out)])
    ((row,),) = seen
    assert row["median_s"] > 0 and row["ops_per_step"] > 0 and row["peak_mem_mb"] is None
    assert _rows(out)[0]["peak_mem_mb"] == 123.0 and "peak_mem_error" not in _rows(out)[0]
    # A child that fails leaves its reason in the row, not only on stderr.
    search_step.main([*argv, "--threads", "1", "--json", str(out)])
    assert _rows(out)[0]["peak_mem_error"] == "memory child timed out after 9 s"
    monkeypatch.undo()
    cmd = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert harness.peak_memory_in_subprocess(cmd, 0.5) == (
        None,
        "memory child timed out after 0.5 s",
    )
    cmd = [sys.executable, "-c", "raise SystemExit('no luck')"]
    peak, why = harness.peak_memory_in_subprocess(cmd)
    assert peak is None and why == "memory child failed (exit 1): no luck"


def test_search_step_reports_the_device_profile(tmp_path, restore_threads, monkeypatch, capsys):
    """On CUDA each configuration's kernels are profiled in one more step: launches, busy
    seconds and their share of the step, the longest kernels (a fake profile here)."""
    profile = harness.DeviceProfile(3, 0.002, {"gemm": (2, 0.0015), "add": (1, 0.0005)})
    monkeypatch.setattr(harness, "device_profile", lambda fn, device: profile)
    out = tmp_path / "rnn.json"
    argv = ["--space", "rnn", "--order", "1", "--config", "tiny", "--steps", "1", "--warmup", "0"]
    doc = search_step.main([*argv, "--threads", "1", "--no-memory", "--json", str(out)])
    (row,) = doc["rows"]
    assert row["kernel_launches_per_step"] == 3
    (entry,) = doc["device_profile"].values()
    assert entry["busy_fraction"] == pytest.approx(0.002 / row["median_s"])
    assert entry["top_kernels"][0] == {"kernel": "gemm", "launches": 2, "seconds": 0.0015}
    assert json.loads(out.read_text())["device_profile"] == doc["device_profile"]
    assert "gemm (2, 0.0015); add (1, 0.0005)" in capsys.readouterr().out


def test_search_step_writes_each_timed_round(tmp_path, restore_threads, monkeypatch):
    """A run stopped by a time limit during its timed steps keeps the rounds it finished:
    the JSON is rewritten after each (rows of the steps so far, and their samples)."""
    out = tmp_path / "rnn.json"
    seen = []
    interleaved = harness.interleaved

    def spy(fns, repeats, warmup=0, after_round=lambda times: None, **kwargs):
        def after(times):
            after_round(times)
            doc = json.loads(out.read_text())
            seen.append(({r["backend"] for r in doc["rows"]}, doc["samples_s"]))

        return interleaved(fns, repeats, warmup, after_round=after, **kwargs)

    monkeypatch.setattr(harness, "interleaved", spy)
    argv = ["--space", "rnn", "--order", "1", "--config", "tiny", "--steps", "2", "--warmup", "0"]
    argv += ["--backends", "reference,fast", "--no-memory", "--threads", "1"]
    doc = search_step.main([*argv, "--json", str(out)])
    assert [(names, {k: len(v) for k, v in samples.items()}) for names, samples in seen] == [
        ({"reference", "fast"}, {"reference": 1, "fast": 1}),
        ({"reference", "fast"}, {"reference": 2, "fast": 2}),
    ]
    assert doc["samples_s"] == seen[-1][1]
    for row in doc["rows"]:
        assert row["median_s"] == statistics.median(doc["samples_s"][row["backend"]])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time-split", "--device", "cuda"], "--time-split profiles the CPU only"),
        (
            ["--backends", "reference,graphs", "--device", "cuda", "--warmup", "2"],
            "--warmup 2: graphs would be timed before its CUDA graph is captured; "
            "give --warmup 3 or more",
        ),
        (["--backends", "x=--order,3"], "--order: expected one of 1, 2, got '3'"),
        (["--memory-timeout", "-1"], "--memory-timeout: expected a positive number, got '-1'"),
        (["--memory-timeout", "0"], "--memory-timeout: expected a positive number, got '0'"),
    ],
)
def test_search_step_rejects_before_running(args, message, capsys):
    """Usage errors in one line, before a step runs (checked ahead of the CUDA device, so
    they are checked here too)."""
    with pytest.raises(SystemExit) as stop:
        search_step.main(["--space", "rnn", "--config", "tiny", *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_kernels_json_schema(tmp_path, restore_threads):
    out = tmp_path / "kernels.json"
    argv = ["--configs", "tiny", "--repeats", "2", "--warmup", "0", "--copy-mib", "8"]
    argv += ["--threads", "1", "--json", str(out)]
    kernels.main(argv)
    doc = json.loads(out.read_text())
    row_types = {
        "kernel": str,
        "shape": str,
        "pass": str,
        **COMMON_ROW_TYPES,
        "speedup": float,
        "bytes": int,
        "gb_per_s": float,
        "bandwidth_fraction": OPTIONAL_FLOAT,
        "implementation": str,
    }
    _check(doc, row_types)
    assert list(doc["rows"][0]) == list(harness.KERNEL_ROW_KEYS)
    seen = {(r["kernel"], r["pass"], r["backend"]) for r in doc["rows"]}
    assert seen == {
        (k.name, p, impl) for k in kernels.KERNELS for p in kernels.PASSES for impl in k.impls
    }
    assert doc["run"]["copy_gb_s"] > 0
    # What ran: the reference is torch's ops; the fused ops' C++ kernels on this CPU when the
    # extension is built (their fallback, torch's ops, without it); the cross-entropy is
    # torch's op off CUDA.
    fused = "cpp" if conv_mixed._has_cpp() else "torch"
    assert {(r["backend"], r["implementation"]) for r in doc["rows"]} == {
        ("reference", "torch"),
        ("fused", fused),
        ("fused", "torch"),
    }
    assert {r["implementation"] for r in doc["rows"] if r["kernel"] == "rnn_cross_entropy"} == {
        "torch"
    }


def test_kernels_name_what_the_fused_version_runs(monkeypatch):
    """A kernel's fused version runs the C++ extension, its CUDA kernel, Triton or torch's
    ops, as fastdarts.ops decides; a fused group lists its parts by kind where they differ."""
    cpu = torch.device("cpu")
    by_name = {k.name: k for k in kernels.KERNELS}
    # As on CUDA with Triton: the mixture, depthwise and pools kernels are Triton's, the 1x1
    # convolutions and BatchNorm torch's (cuDNN's).
    monkeypatch.setattr(conv_mixed, "kernel_name", lambda device: "triton")
    monkeypatch.setattr(conv_mixed, "_cpp", lambda x, name="": False)
    assert kernels.implementation(by_name["cnn_depthwise"], "fused", "fwd+bwd", cpu) == "triton"
    assert kernels.implementation(by_name["cnn_pointwise"], "fused", "fwd", cpu) == "torch"
    assert kernels.implementation(by_name["cnn_cell_fused"], "fused", "fwd", cpu) == (
        "triton: mix, depthwise, pools; torch: pointwise, batch_norm"
    )
    assert kernels.implementation(by_name["cnn_cell_fused"], "reference", "fwd", cpu) == "torch"
    ce = by_name["rnn_cross_entropy"]
    assert kernels.implementation(ce, "fused", "fwd+bwd", cpu) == "torch"
    monkeypatch.setattr(cross_entropy, "triton_ready", lambda device: True)
    assert kernels.implementation(ce, "fused", "fwd+bwd", cpu) == "triton"
    # An extension without one direction's kernel: that direction runs torch's op.
    monkeypatch.setattr(conv_mixed, "kernel_name", lambda device: "cpp")
    monkeypatch.setattr(conv_mixed, "_cpp", lambda x, name="": name != "pointwise_backward")
    pointwise = by_name["cnn_pointwise"]
    assert kernels.implementation(pointwise, "fused", "fwd", cpu) == "cpp"
    assert kernels.implementation(pointwise, "fused", "fwd+bwd", cpu) == (
        "cpp: pointwise fwd; torch: pointwise bwd"
    )


def test_kernels_write_each_row_as_it_ends(tmp_path, restore_threads, monkeypatch):
    """A run stopped by a time limit keeps the rows it finished: the JSON is rewritten after
    each one (here read back while the next row is being measured)."""
    out = tmp_path / "kernels.json"
    on_disk = []
    launches = harness.count_kernel_launches

    def count(fn, device):
        on_disk.append(len(_rows(out)) if out.exists() else 0)
        return launches(fn, device)

    monkeypatch.setattr(harness, "count_kernel_launches", count)
    argv = ["--configs", "tiny", "--kernels", "rnn_node_mixture", "--repeats", "1"]
    argv += ["--warmup", "0", "--copy-mib", "1", "--threads", "1", "--json", str(out)]
    doc = kernels.main(argv)
    assert on_disk == [0, 1, 2, 3]  # fwd and fwd+bwd, reference and fused
    assert _rows(out) == doc["rows"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--configs", "bogus"], "unknown bogus; have paper, large, tiny"),
        (["--configs", ","], "--configs: no name given"),
        (["--kernels", "nope"], "unknown nope; have rnn_node_mixture"),
        (["--repeats", "-1"], "--repeats: expected a positive integer, got '-1'"),
        (["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
        (["--number", "0"], "--number: expected a positive integer"),
        (["--number", "-1"], "--number: expected a positive integer"),
        (["--warmup", "-1"], "--warmup: expected an integer >= 0"),
        (["--copy-mib", "0"], "--copy-mib: expected a positive integer"),
        (["--threads", "0"], "--threads: expected a positive integer"),
    ],
)
def test_kernels_reject_bad_values_before_measuring(args, message, capsys):
    # A small run where the bad value is let through (the last of an option counts).
    small = ["--configs", "tiny", "--kernels", "rnn_node_mixture", "--copy-mib", "1"]
    with pytest.raises(SystemExit) as stop:
        kernels.main([*small, *args])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_kernels_help_gives_the_defaults(capsys):
    with pytest.raises(SystemExit):
        kernels.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: paper,large)", "(default: cuda 20, cpu 5)", "(default: all)"):
        assert default in help_text


# Each tool with --json, and arguments that would otherwise run it.
JSON_TOOLS = {
    "kernels": (kernels.main, ["--configs", "tiny"]),
    "search_step": (search_step.main, ["--space", "rnn", "--config", "tiny"]),
    "cuda_path_ops": (cuda_path_ops.main, ["--space", "rnn", "--config", "tiny"]),
    "alpha_grad_error": (alpha_grad_error.main, ["--space", "rnn", "--config", "tiny"]),
    "triton_resources": (triton_resources.main, ["--archs", "90"]),
    "ab": (ab.main, ["--base", "HEAD", "--space", "rnn", "--config", "tiny", "--rounds", "1"]),
}


@pytest.mark.parametrize("tool", JSON_TOOLS)
def test_json_path_is_checked_before_the_work(tool, tmp_path, capsys):
    """--json naming a folder, or a path through a file, is a usage error before anything
    runs, not a traceback at the end (which left FOLDER.partial behind)."""
    main, args = JSON_TOOLS[tool]
    (tmp_path / "file").write_text("")
    for path, message in [
        (tmp_path, f"--json {tmp_path}: is a folder; give a file path"),
        (tmp_path / "file" / "out.json", f"{tmp_path / 'file'} is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main([*args, "--json", str(path)])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_check_json_path_creates_the_folders(tmp_path):
    parser = harness.argparse.ArgumentParser()
    harness.check_json_path(parser, str(tmp_path / "a" / "b" / "out.json"))
    assert (tmp_path / "a" / "b").is_dir() and not list((tmp_path / "a" / "b").iterdir())
    harness.check_json_path(parser, None)  # no --json: nothing to check


def test_kernel_bytes_formulas():
    shape = {"n": 8, "B": 256, "D": 300}
    n, b, d, k = 8, 256, 300, kernels.K_RNN
    assert kernels._recurrent_bytes(shape, "fwd", 4) == 4 * (3 * n * b * d + n * k + b * d)
    assert kernels._recurrent_bytes(shape, "fwd+bwd", 4) == 4 * (
        9 * n * b * d + 3 * n * k + 2 * b * d
    )
    # The reference recurrent mixture is what the entry times.
    inputs = kernels.RECURRENT.make({"n": 2, "B": 3, "D": 4}, torch.device("cpu"), torch.float64)
    out = kernels.RECURRENT.impls["reference"](inputs.args)
    assert out.shape == (3, 4)


def test_time_split_attributes_matmul_time_once():
    a = torch.randn(200, 200)
    split = harness.time_split(lambda: torch.matmul(torch.mm(a, a), a).relu())
    assert split["matmul"] > 0 and split["conv"] == 0 and split["softmax+loss"] == 0
    assert split["total"] >= split["matmul"]
    parts = sum(v for k, v in split.items() if k != "total")
    assert parts == pytest.approx(split["total"], abs=1e-9)
    # Both products count, each once (torch.matmul's own event wraps an aten::mm).
    nested = harness.time_split(lambda: torch.mm(a, a), {"matmul": ("aten::matmul", "aten::mm")})
    assert nested["matmul"] <= nested["total"]


# -- the GPU suite ------------------------------------------------------------------------


def test_gpu_suite_rehearsal_runs_every_command(tmp_path):
    """benchmarks/gpu_suite.sh --rehearse: the script's every command, on the CPU at the tiny
    configuration, ends well; so the suite does not spend a GPU lease on its own mistakes."""
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--rehearse", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "timed out" not in proc.stdout and "exit " not in proc.stdout, proc.stdout
    assert "skipped" in (tmp_path / "tests.log").read_text()  # the CUDA tests, without CUDA
    summary = (tmp_path / "summary.md").read_text()
    for name in ("gpu-rnn-paper-o2", "gpu-cnn-paper-o2", "gpu-rnn-paper-o1"):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        done = {row["backend"] for row in result["rows"]}
        batched = {"batched"} if name == "gpu-cnn-paper-o2" else set()
        assert done == {"reference", "fused", "fast", "amp", *batched}, (name, done)
        assert [(s["backend"], s["reason"]) for s in result["skipped"]] == [
            ("graphs", "--cuda-graphs needs a CUDA device, not cpu")
        ]
        assert f"| {name} |" in summary
    for space in ("rnn", "cnn"):
        memory = _rows(tmp_path / f"gpu-{space}-paper-o2-memory.json")
        assert [r["backend"] for r in memory] == ["reference", "fast"]  # graphs: no CUDA
        assert all(r["peak_mem_mb"] for r in memory)
    kernels_run = {row["kernel"] for row in _rows(tmp_path / "gpu-kernels.json")}
    kernels = {
        "rnn_node_mixture",
        "rnn_cross_entropy",
        "cnn_cell_fused",
        "cnn_pools",
        "cnn_batch_norm",
    }
    assert kernels <= kernels_run
    for space in ("rnn", "cnn"):
        assert {r["space"] for r in _rows(tmp_path / f"gpu-alpha-grad-error-{space}.json")} == {
            space
        }


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"]


def _suite_with_a_stub_python(tmp_path: Path, budget: str | None = None):
    """benchmarks/gpu_suite.sh (GPU mode) in a folder of its own, every Python command a stub
    that logs its arguments and succeeds, except the extension's build, which fails the way
    setup.py does: "could not build", exit 0. Returns (the finished process, the commands)."""
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "csrc").mkdir()
    (repo / "csrc" / "ext.cpp").write_text("")
    suite = repo / "benchmarks" / "gpu_suite.sh"
    suite.write_bytes((REPO / "benchmarks" / "gpu_suite.sh").read_bytes())
    log = tmp_path / "commands.log"
    stub = tmp_path / "python"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\n" "$*" >>"{log}"\n'
        "if [[ $* == *build_ext* ]]; then\n"
        '    echo "fastdarts setup: could not build the C++ extension (no nvcc)" >&2\n'
        "fi\n"
    )
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub)}
    if budget is not None:
        env["GPU_SUITE_BUDGET"] = budget
    proc = subprocess.run(
        ["bash", str(suite), str(tmp_path / "out")], capture_output=True, text=True, env=env,
        timeout=60,
    )  # fmt: skip
    commands = log.read_text().splitlines() if log.exists() else []
    return proc, commands


@pytest.mark.parametrize(
    ("args", "code"),
    [(["-h"], 0), (["--rehearse", "--help"], 0), (["--bogus"], 2), (["a", "b"], 2), ([], 2)],
)
def test_gpu_suite_help_and_bad_arguments_run_nothing(tmp_path, args, code):
    """-h prints the usage and what the suite does; an option or a second folder in OUTDIR's
    place is refused: neither starts a command or writes a file (in the working folder)."""
    env = {**os.environ, "PYTHON": str(tmp_path / "no-python")}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "usage:" in (proc.stdout if code == 0 else proc.stderr)
    if code == 0:
        assert "--rehearse runs the same commands on the CPU" in proc.stdout
    assert list(tmp_path.iterdir()) == []


def test_gpu_suite_counts_a_build_without_extension_as_failed(tmp_path):
    """setup.py exits 0 when its compile fails ("could not build", a pure-Python build): the
    suite says the build failed and does not run the extension's test, which would skip."""
    proc, commands = _suite_with_a_stub_python(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "failed: build"
    assert any("build_ext" in c for c in commands)
    assert not any("cuda_extension" in c for c in commands)


def test_gpu_suite_times_graphs_after_its_capture(tmp_path):
    """Every search_step.py run with the graphs configuration warms up the 3 steps after
    which its timed steps are CUDA-graph replays (the last --warmup given counts)."""
    _, commands = _suite_with_a_stub_python(tmp_path)
    graphed = [c.split() for c in commands if "search_step.py" in c and "graphs" in c]
    assert len(graphed) == 5  # three at the paper configuration, two for memory
    for args in graphed:
        warmups = [int(args[i + 1]) for i, a in enumerate(args) if a == "--warmup"]
        assert warmups and warmups[-1] >= search_step.GRAPHS_WARMUP, args


def test_gpu_suite_skips_what_the_budget_leaves_no_time_for(tmp_path):
    """A command skipped because the budget is spent is reported as skipped, not failed: the
    suite exits 0 when everything that ran succeeded."""
    proc, commands = _suite_with_a_stub_python(tmp_path, budget="5")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("skipped, the 5-second budget spent: tests gpu-rnn-paper-o2 ")
    assert last.endswith(" build") and "failed" not in proc.stdout
    assert not any("benchmarks/" in c for c in commands[:-1])  # only summary.py ran


@pytest.mark.parametrize("kernel", kernels.KERNELS, ids=lambda k: k.name)
def test_kernel_impls_compute_the_same(kernel):
    """Every implementation of a benchmark entry computes the reference's output and input
    gradients (float64, the tiny shapes): the timings compare like with like."""
    device = torch.device("cpu")
    for shape in kernel.shapes["tiny"]:
        inputs = kernel.make(shape, device, torch.float64)
        ref = kernel.impls["reference"](inputs.args)
        grad_out = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, inputs.leaves, grad_out)
        for name, impl in kernel.impls.items():
            if name == "reference":
                continue
            out = impl(inputs.args)
            torch.testing.assert_close(out, ref, msg=f"{kernel.name} {name}")
            grads = torch.autograd.grad(out, inputs.leaves, grad_out)
            for leaf, (got, want) in enumerate(zip(grads, ref_grads)):
                torch.testing.assert_close(got, want, msg=f"{kernel.name} {name} leaf {leaf}")


def test_summary_gives_each_kind_of_result_its_own_table(tmp_path):
    rows = {
        "step": {"space": "rnn", "backend": "fast", "median_s": 1.5},
        "kern": {"kernel": "cnn_pools", "shape": "B=2", "pass": "fwd", "backend": "fused"},
        "alpha": {"space": "cnn", "dtype": "float64", "hvp": "fd", "radius": 1e-8, "rel_error": 0},
        "triton": {"triton_kernel": "conv_forward", "arch": "sm_90", "registers": 32},
    }
    for name, row in rows.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": [row]}))
    profile = {"device_profile": {"fast": {"busy_fraction": 0.25}}}
    (tmp_path / "step.json").write_text(json.dumps({"rows": [rows["step"]], **profile}))
    tables = [t for t in summary.summarize(tmp_path).split("\n\n") if t.startswith("|")]
    assert "| device busy |" in tables[0] and "| 0.25 |" in tables[0]
    expected = [
        ("s/step", "| step |"),
        ("pass", "| cnn_pools |"),
        ("radius r", "| alpha |"),
        ("regs/thread", "| triton |"),
    ]
    assert len(tables) == len(expected)
    for table, (column, cell) in zip(tables, expected):
        assert f"| {column} |" in table.splitlines()[0], table
        assert sum(cell in t for t in tables) == 1 and cell in table, (cell, table)
    # Every table says which file each row came from, the kernels' too.
    assert all(t.startswith("| file |") for t in tables)
    assert "| kern | cnn_pools |" in tables[1]


def test_summary_cli(tmp_path, capsys):
    """--help works; a missing path is a usage error (exit 2), not "no results"; one file is
    summarised on its own."""
    with pytest.raises(SystemExit) as stop:
        summary.main(["--help"])
    assert stop.value.code == 0 and "usage:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        summary.main([str(tmp_path / "missing")])
    assert stop.value.code == 2
    assert f"{tmp_path / 'missing'}: no such folder or file" in capsys.readouterr().err
    for name, kernel in (("a", "cnn_pools"), ("b", "cnn_depthwise")):
        row = {"kernel": kernel, "shape": "B=2", "pass": "fwd", "backend": "fused"}
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": [row]}))
    one = summary.main([str(tmp_path / "a.json")])
    assert "| a | cnn_pools |" in one and "cnn_depthwise" not in one
    both = summary.main([str(tmp_path)])
    assert "| a | cnn_pools |" in both and "| b | cnn_depthwise |" in both
    # A file named that is not a results file is a usage error; in a folder, a note.
    (tmp_path / "bad.json").write_text("{")
    (tmp_path / "other.json").write_text(json.dumps({"name": "x"}))
    for name, message in (("bad", "unreadable ("), ("other", "not a results file")):
        with pytest.raises(SystemExit) as stop:
            summary.main([str(tmp_path / f"{name}.json")])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert "bad.json: unreadable" in summary.main([str(tmp_path)])
    (tmp_path / "list.json").write_text("[1, 2]")
    assert "list.json: not a results file (no rows)" in summary.main([str(tmp_path)])


def test_triton_resources_refuses_a_target_it_cannot_compile(capsys):
    """An --archs value this Triton's ptxas lacks is one line before the work (it was a
    traceback after ptxas's and the PTX's whole text)."""
    pytest.importorskip("triton")
    with pytest.raises(SystemExit) as stop:
        triton_resources.main(["--archs", "90,999"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and "error: --archs: 999 does not compile here" in err[-1]
    assert len(err) == 2  # the usage line, then the error


# -- before/after timing of two versions ------------------------------------------------------


def _clone(tmp_path: Path) -> tuple[Path, list[str]]:
    """A clone of this repository with its built extension and this checkout's benchmarks
    (committed or not: ab.py and the harness it imports are under test); the clone and the
    git command that runs in it."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    for so in (REPO / "fastdarts").glob("_C.*"):
        (clone / "fastdarts" / so.name).write_bytes(so.read_bytes())
    for script in (REPO / "benchmarks").glob("*.py"):
        (clone / "benchmarks" / script.name).write_bytes(script.read_bytes())
    return clone, ["git", "-C", str(clone), "-c", "user.name=t", "-c", "user.email=t@t"]


def test_ab_times_each_version_from_its_own_tree(tmp_path):
    """benchmarks/ab.py in a clone with one more commit, which adds an op to the weight step:
    head runs the new code and base (a worktree of HEAD~1) the old, so head counts more ops
    per step, with the same α (the op multiplies by one)."""
    clone, git = _clone(tmp_path)
    subprocess.run([*git, "add", "benchmarks"], check=True)
    subprocess.run(
        [*git, "commit", "-qm", "benchmarks as checked out", "--allow-empty"], check=True
    )
    tasks = clone / "fastdarts" / "search" / "tasks.py"
    source = tasks.read_text()
    step = "        loss = distributed.scale(out.loss + out.penalty, batch.share)\n"
    assert step in source
    tasks.write_text(source.replace(step, step + "        loss = loss * 1.0\n"))
    subprocess.run([*git, "commit", "-qam", "one more op"], check=True)
    out = tmp_path / "ab.json"
    cmd = [sys.executable, str(clone / "benchmarks" / "ab.py"), "--base", "HEAD~1"]
    cmd += ["--space", "rnn", "--config", "tiny", "--backend", "reference", "--order", "1"]
    cmd += ["--rounds", "2", "--warmup", "0", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    base, head = doc["rows"]
    assert (base["version"], head["version"]) == ("base", "head")
    assert head["ops_per_step"] == base["ops_per_step"] + 2  # the mul and its backward
    assert head["alpha_max_abs_diff"] == 0
    assert len(doc["samples_s"]["base"]) == len(doc["samples_s"]["head"]) == 2
    assert head["paired_ratio_min"] <= head["paired_ratio_median"] <= head["paired_ratio_max"]
    assert not list(tmp_path.glob("fastdarts-ab-*"))
    worktrees = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True).stdout
    assert len(worktrees.strip().splitlines()) == 1  # the base worktree was removed
    assert "| head |" in summary.summarize(tmp_path)
    # On the CUDA code path (Triton launched, not run): the same op, α not compared.
    cmd[cmd.index("reference")] = "fast"
    cmd += ["--cuda-path"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, head = json.loads(out.read_text())["rows"]
    assert head["cuda_path"] and head["ops_per_step"] == base["ops_per_step"] + 2
    assert head["alpha_max_abs_diff"] is None


def test_ab_removes_its_worktree_when_stopped_by_sigterm(tmp_path):
    """A time limit's SIGTERM runs the same cleanup as a normal end: the base worktree is
    unregistered and the temporary folder removed."""
    clone, git = _clone(tmp_path)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    cmd = [sys.executable, str(clone / "benchmarks" / "ab.py"), "--base", "HEAD"]
    cmd += ["--space", "rnn", "--config", "tiny", "--backend", "reference", "--order", "1"]
    cmd += ["--rounds", "50", "--threads", "1"]
    env = {**os.environ, "TMPDIR": str(scratch)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        # The base worker's log exists once the worktree is complete and the workers start.
        deadline = time.monotonic() + 120
        while not list(scratch.glob("fastdarts-ab-*/base.log")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.1)
        worktrees = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True)
        assert len(worktrees.stdout.strip().splitlines()) == 2
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    worktrees = subprocess.run([*git, "worktree", "list"], capture_output=True, text=True)
    assert len(worktrees.stdout.strip().splitlines()) == 1
    assert not list(scratch.iterdir())
    assert proc.returncode == 128 + signal.SIGTERM, err


def test_ab_checks_its_arguments_before_the_worktree(capsys, monkeypatch):
    """--base is required (usage shows it so); --device cuda without CUDA is refused before a
    worktree is made."""
    with pytest.raises(SystemExit):
        ab.main(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "--base BASE --space {rnn,cnn}" in usage and "[--base" not in usage
    made = []
    monkeypatch.setattr(ab, "base_tree", lambda rev: made.append(rev))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        ab.main(["--base", "HEAD", "--space", "rnn", "--device", "cuda"])
    assert stop.value.code == 2 and not made
    assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err
    # The other tools say it alike: a usage error, before any work.
    for start, argv in (
        (search_step.parse_args, ["--space", "rnn"]),
        (kernels.parse_args, []),
        (alpha_grad_error.main, ["--space", "rnn"]),
    ):
        with pytest.raises(SystemExit) as stop:
            start([*argv, "--device", "cuda"])
        assert stop.value.code == 2, start
        assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


def test_ab_reports_a_bad_revision_in_one_line():
    proc = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--base", "no-such-rev", "--space", "rnn"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ab.py: --base no-such-rev: not a revision of {REPO}"


# -- ops on the CUDA code path, counted on the CPU ----------------------------------------


def test_cuda_path_ops_count_triton_launches_and_restore_the_dispatch():
    from benchmarks import cuda_path_ops
    from fastdarts.ops import conv_mixed

    pytest.importorskip("triton")
    kernel_name = conv_mixed.kernel_name
    args = ["--space", "cnn", "--config", "tiny", "--backends", "reference,fast"]
    fused = {}
    for depthwise in ("triton", "torch"):
        reference, fast = cuda_path_ops.main([*args, "--depthwise", depthwise])["rows"]
        assert reference["triton_launches_per_step"] == 0
        assert 0 < fast["launching_ops_per_step"] < fast["ops_per_step"]
        # Each conv_mix call launches the mixture's forward kernel once.
        launches, calls = fast["triton_launches"], fast["ops_by_name"]
        assert launches["conv_mixed._forward_kernel"] == calls["fastdarts.conv_mix.default"]
        # Bytes for every Triton kernel and launching op, none for the custom ops themselves
        # (their launches inside count) nor for views.
        traffic = fast["tensor_mib_by_name"]
        assert all(traffic[k] > 0 for k in launches)
        assert "fastdarts.conv_mix.default" not in traffic and "aten.view.default" not in traffic
        assert fast["tensor_mib_per_step"] == pytest.approx(sum(traffic.values()), abs=0.1)
        assert ("depthwise._forward_kernel" in launches) == (depthwise == "triton")
        fused[depthwise] = fast
    assert fused["triton"]["launches_floor_per_step"] < fused["torch"]["launches_floor_per_step"]
    assert conv_mixed.kernel_name is kernel_name  # the dispatch is as it was
    assert conv_mixed.kernel_name(torch.device("cpu")) != "triton"


def test_traffic_counts_each_tensor_once_and_whole():
    """tensor_bytes: a broadcast dimension once, a view's own elements; the counter: the
    launching ops' arguments and results (an in-place op's tensor read and written, but
    the one a copy_ or zero_ overwrites only written), views and allocations nothing."""
    from benchmarks import cuda_path_ops

    a, b = torch.randn(10), torch.randn(10)
    wide = torch.zeros(4, 6, dtype=torch.float64)
    assert cuda_path_ops.tensor_bytes([a, (wide, 3.0), a]) == 40 + 192
    assert cuda_path_ops.tensor_bytes(wide[:, 1:3]) == 64
    assert cuda_path_ops.tensor_bytes(torch.ones(1).expand(5, 7)) == 4
    out = torch.empty(10)
    with cuda_path_ops.TrafficCounter() as counter:
        c = a + b
        c.add_(b)
        torch.mul(a, a, out=out)
        c.view(2, 5).t()
        torch.empty(100)
        wide[:, :2].copy_(torch.ones(4, 2))
        wide.zero_()
    assert dict(counter.bytes) == {
        "aten.add.Tensor": 120,  # a and b read, c written
        "aten.add_.Tensor": 120,  # c and b read, c written
        "aten.mul.out": 80,  # a read (once), out written
        "aten.ones.default": 32,  # written
        "aten.copy_.default": 32 + 64,  # the ones read, the view of wide written
        "aten.zero_.default": 192,  # wide written
    }
    assert counter.counts["aten.view.default"] == 1


def test_launch_stub_sums_bytes_only_while_counting():
    """A Triton launch on the CUDA path is counted; its arguments' bytes are summed only while
    ``count_bytes`` (off in timed steps, where summing them was most of the stub's cost)."""
    pytest.importorskip("triton")
    from fastdarts.ops.extension import triton_kernels

    kernel = triton_kernels("cross_entropy")._forward_kernel
    x = torch.zeros(4, 8)
    with cuda_path_ops.cuda_dispatch() as launches:
        kernel[(1,)](x, x, x, x)
        assert launches["cross_entropy._forward_kernel"] == 1
        assert launches.bytes["cross_entropy._forward_kernel"] == 128
        launches.count_bytes = False
        kernel[(1,)](x, x, x, x)
        assert launches["cross_entropy._forward_kernel"] == 2
        assert launches.bytes["cross_entropy._forward_kernel"] == 128


def test_cuda_path_ops_writes_each_row_as_it_ends(tmp_path, restore_threads, monkeypatch):
    """A run stopped by a time limit keeps the configurations it counted: the JSON is
    rewritten after each one's counts and each timed round."""
    pytest.importorskip("triton")
    out = tmp_path / "ops.json"
    on_disk = []
    count_step = cuda_path_ops.count

    def count(*args):
        on_disk.append([r["backend"] for r in _rows(out)] if out.exists() else [])
        return count_step(*args)

    monkeypatch.setattr(cuda_path_ops, "count", count)
    args = ["--space", "rnn", "--config", "tiny", "--backends", "reference,fast", "--steps", "1"]
    doc = cuda_path_ops.main([*args, "--warmup", "0", "--threads", "1", "--json", str(out)])
    assert on_disk == [[], ["reference"]]
    assert [len(r["host_s"]) for r in _rows(out)] == [1, 1]
    assert _rows(out) == doc["rows"]


@pytest.mark.parametrize(
    "main, args, message",
    [
        (
            cuda_path_ops.main,
            ["--space", "rnn", "--backends", "x=--backend,bogus"],
            "unknown backend 'bogus' (available: auto, reference, fused)",
        ),
        (
            cuda_path_ops.main,
            ["--space", "rnn", "--backends", "x=--order,3"],
            "--order: expected one of 1, 2, got '3'",
        ),
        (triton_resources.main, ["--archs", "x"], "--archs: expected compute capabilities"),
        (triton_resources.main, ["--archs", "90,0"], "got '90,0'"),
        (alpha_grad_error.main, ["--space", "rnn", "--radii", "abc"], "--radii: expected positive"),
        (alpha_grad_error.main, ["--space", "rnn", "--radii", "1e-3,0"], "got '1e-3,0'"),
        (alpha_grad_error.main, ["--space", "rnn", "--radii=-1e-3"], "got '-1e-3'"),
    ],
)
def test_tools_reject_bad_values_in_one_line(main, args, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
