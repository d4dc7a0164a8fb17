"""python -m fastdarts.search end to end on the real data, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CNN_TINY, RNN_TINY, snapshot

from fastdarts.genotypes import load_genotype, to_dict
from fastdarts.ops.backends import BACKENDS

SEARCH = "fastdarts.search"


def check_outputs(cli, out: Path, proc, space: str, steps: int, epochs_done: int) -> None:
    assert proc.returncode == 0, proc.stderr
    for name in ("metrics.jsonl", "genotype.json", "alpha.json", "alpha.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    genotype = load_genotype(out / "genotype.json", space)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == to_dict(genotype)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_records] == list(range(1, steps + 1))
    evals = [r for r in records if "valid_loss" in r]
    assert len(evals) == epochs_done
    key = "valid_ppl" if space == "rnn" else "valid_acc"
    assert all(key in r for r in evals)

    alpha = json.loads((out / "alpha.json").read_text())
    assert alpha["space"] == space and alpha["history"][-1]["step"] == steps
    # Each α record's epoch is its step's in metrics.jsonl (mid-epoch too, at --max-steps).
    epoch_of = {r["step"]: r["epoch"] for r in step_records}
    assert [e["epoch"] for e in alpha["history"]] == [epoch_of[e["step"]] for e in alpha["history"]]
    names = ["recurrent"] if space == "rnn" else ["normal", "reduce"]
    for entry in alpha["history"]:
        assert sorted(entry["alphas"]) == sorted(names)
        for rows in entry["alphas"].values():
            assert all(abs(sum(row) - 1) < 1e-9 for row in rows)  # softmax rows
    assert (out / "alpha.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == steps and ckpt["config"]["space"] == space
    derived = cli("fastdarts.derive", str(out))
    assert derived.returncode == 0, derived.stderr
    assert json.loads(derived.stdout) == to_dict(genotype)


def test_rnn_search_on_ptb_writes_every_output(tmp_path, cli):
    out = tmp_path / "rnn"
    args = ["--dataset", "ptb", "--max-steps", "3", "--epoch-steps", "2", "--out", str(out)]
    proc = cli(SEARCH, *RNN_TINY, *args)
    check_outputs(cli, out, proc, "rnn", steps=3, epochs_done=1)


@pytest.mark.parametrize("order", ["1", "2"])
def test_cnn_search_on_cifar10_writes_every_output(tmp_path, cli, cache_env, order):
    out = tmp_path / "cnn"
    args = ["--dataset", "cifar10", "--order", order, "--max-steps", "2", "--epoch-steps", "1"]
    proc = cli(SEARCH, *CNN_TINY, *args, "--out", str(out))
    check_outputs(cli, out, proc, "cnn", steps=2, epochs_done=2)


# -- bad input: one line on stderr, a non-zero exit, earlier outputs intact ------------------


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory) -> Path:
    from fastdarts.search.__main__ import main

    out = tmp_path_factory.mktemp("earlier") / "run"
    assert main([*RNN_TINY, "--max-steps", "2", "--out", str(out)]) == 0
    return out


def assert_error(proc, code: int, *fragments: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--space", "lstm"], ["invalid choice", "lstm"]),
        (["--space", "rnn", "--dataset", "cifar10"], ["does not go with", "cifar10"]),
        (["--space", "rnn", "--dataset", "imagenet"], ["invalid choice", "imagenet"]),
        (["--space", "rnn", "--backend", "cuda-magic"], ["unknown backend", "cuda-magic"]),
        (["--space", "rnn", "--device", "cuda"], ["no CUDA device"]),
        (["--space", "rnn", "--order", "3"], ["invalid choice"]),
    ],
)
def test_bad_flags(tmp_path, args, fragments, cli):
    proc = cli(SEARCH, *args, "--out", str(tmp_path / "x"))
    assert_error(proc, 2, *fragments)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--eval-batches", "0"], "--eval-batches must be positive, got 0"),
        (["--epoch-steps", "-1"], "--epoch-steps must be positive"),
        (["--log-every", "0"], "--log-every must be positive"),
        (["--lr", "-1"], "--lr must be non-negative and finite, got -1.0"),
        (["--lr", "inf"], "--lr must be non-negative and finite, got inf"),
        (["--arch-weight-decay", "-1"], "--arch-weight-decay must be non-negative"),
        (["--clip", "nan"], "--clip must be positive and finite, got nan"),
        (["--clip", "0"], "--clip must be positive and finite, got 0.0"),
        (["--space", "cnn", "--grad-clip", "0"], "--grad-clip must be positive and finite"),
        (["--dropout", "1.5"], "--dropout must lie in [0, 1), got 1.5"),
        (["--dropoute", "-0.1"], "--dropoute must lie in [0, 1)"),
        (["--seed", "-1"], "--seed must lie in [0, 2^32), got -1"),
        (["--threads", "0"], "--threads must be positive"),
        (["--space", "cnn", "--layers", "2"], "--layers must be at least 3, got 2"),
        (["--space", "cnn", "--train-portion", "1.5"], "--train-portion must lie in (0, 1)"),
        (["--space", "cnn", "--momentum", "-1"], "--momentum must be non-negative"),
        (["--seeds", "0", "--rank-train", "--bogus 1"], "--rank-train: unrecognized arguments"),
        (["--seeds", "0", "--rank-train", "--dropout 2"], "--rank-train: --dropout must lie in"),
        (["--seeds", "0", "--rank-train", "--epochs 1 --help"], "the training's flags are"),
        (["--seeds", "0,-1"], "--seed must lie in [0, 2^32), got -1"),
        (["--emsize", "0", "--nhid", "0"], "--emsize must be positive, got 0"),
        (["--fast", "--backend", "reference"], "--fast picks the fastest backend itself"),
        (["--order", "1", "--hvp", "exact"], "are for --order 2"),
        (["--compat", "darts", "--order", "2", "--batched-fd"], "w+ and w- one after the other"),
        (["--compat", "darts", "--foreach"], "steps the weights one by one"),
        (["--order", "1", "--batched-fd"], "are for --order 2"),
        (["--amp", "bf16", "--dtype", "float64"], "with --dtype float64 it does nothing"),
    ],
)
def test_bad_numbers_are_one_line_before_anything_runs(tmp_path, capsys, args, fragment):
    """Checked with the settings, before any data, step or search (--rank-train's training
    flags too, which run only after every search)."""
    from fastdarts.search.__main__ import main

    out = tmp_path / "x"
    assert main([*RNN_TINY, "--max-steps", "1", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1, err
    assert not (out / "seed-0" / "checkpoint.pt").exists() and not (out / "checkpoint.pt").exists()


@pytest.mark.skipif(
    BACKENDS["fused"].why_not("rnn", "cpu") is not None, reason="no fused backend here"
)
def test_resume_takes_a_backend_resolving_to_the_runs_as_the_same(tmp_path, capsys):
    """--backend auto, which resolves to fused here, resumes a fused run, which keeps its own
    name (auto would resolve otherwise on another device); reference does not."""
    from fastdarts.search.__main__ import main

    out = tmp_path / "r"
    assert main([*RNN_TINY, "--backend", "fused", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["--resume", "--backend", "auto", "--max-steps", "2", "--out", str(out)]) == 0
    assert "at step 1" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["backend"] == "fused" and config["max_steps"] == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["config"]["backend"] == "fused"
    assert main(["--resume", "--backend", "reference", "--out", str(out)]) == 2
    assert "other settings (backend='fused')" in capsys.readouterr().err


def test_resume_of_a_fast_run_refuses_a_backend(tmp_path, capsys):
    """--fast's run picks its backend itself, so a --backend given to its resume (which the
    settings would drop) is refused."""
    from fastdarts.search.__main__ import main

    out = tmp_path / "r"
    assert main([*RNN_TINY, "--fast", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["--resume", "--backend", "reference", "--out", str(out)]) == 2
    assert "was started with --fast" in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    from fastdarts.search.__main__ import main

    afile = tmp_path / "afile"
    afile.write_text("mine")
    for seeds in ([], ["--seeds", "0,1"]):
        assert main([*RNN_TINY, *seeds, "--out", str(afile)]) == 2
        assert "a file, not a folder" in capsys.readouterr().err
        assert afile.read_text() == "mine"


def test_resume_says_where_it_goes_on_and_when_nothing_is_left(tmp_path, capsys):
    """A resume names its step; one at its --max-steps says to pass a larger one. The run's
    files take the umask's mode (not mkstemp's 0600), and config.json the current flags
    and what the run chose, unless nothing is left to run."""
    from fastdarts.search.__main__ import main

    out = tmp_path / "r"
    old = os.umask(0o022)
    try:
        assert main([*RNN_TINY, "--max-steps", "1", "--out", str(out)]) == 0
        capsys.readouterr()
        assert main(["--resume", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "resuming the search" in err and "at step 1" in err
        assert "already at --max-steps 1: pass a larger one" in err
        assert main(["--resume", "--max-steps", "2", "--out", str(out)]) == 0
        err = capsys.readouterr().err
        assert "at step 1" in err and "already at" not in err
    finally:
        os.umask(old)
    config = json.loads((out / "config.json").read_text())
    assert config["max_steps"] == 2
    assert config["resolved"] == {"device": "cpu", "backend": "reference"}
    for name in ("config.json", "alpha.json", "genotype.json", "checkpoint.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name
    # A resume with nothing left to run (here a smaller --max-steps) leaves config.json.
    assert main(["--resume", "--max-steps", "1", "--out", str(out)]) == 0
    assert "already at --max-steps 1" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text()) == config
    # A file replaced keeps its mode.
    (out / "config.json").chmod(0o640)
    assert main(["--resume", "--max-steps", "3", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["max_steps"] == 3
    assert (out / "config.json").stat().st_mode & 0o777 == 0o640


def test_device_numbers_are_checked_and_made_current(monkeypatch):
    """A numbered CUDA device must exist, and becomes the current one (Triton launches there)."""
    from fastdarts.errors import ConfigError
    from fastdarts.runs import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with pytest.raises(ConfigError, match=r"has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    assert current == []
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda")  # the current one, unchanged
    assert resolve_device("cpu") == torch.device("cpu") and len(current) == 1


def test_missing_data(tmp_path, cli):
    missing = tmp_path / "nowhere"
    proc = cli(SEARCH, *RNN_TINY, "--data", str(missing), "--out", str(tmp_path / "x"))
    assert_error(proc, 2, str(missing))


def test_corrupt_data(tmp_path, cli):
    data = tmp_path / "ptb"
    shutil.copytree(Path(os.environ["FASTDARTS_DATA"]) / "ptb", data)  # set by conftest
    with (data / "ptb.valid.txt").open("ab") as f:
        f.write(b"extra words\n")
    proc = cli(SEARCH, *RNN_TINY, "--data", str(data), "--out", str(tmp_path / "x"))
    assert_error(proc, 2, "md5", "ptb.valid.txt")


def test_existing_run_is_not_overwritten(earlier_run, cli):
    before = snapshot(earlier_run)
    proc = cli(SEARCH, *RNN_TINY, "--max-steps", "2", "--out", str(earlier_run))
    assert_error(proc, 2, "already holds a search", "--resume")
    assert snapshot(earlier_run) == before


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (CNN_TINY, ["of the rnn space", "cnn"]),
        ([*RNN_TINY, "--nhid", "12", "--emsize", "12"], ["other settings", "nhid=8"]),
        ([*RNN_TINY, "--order", "1"], ["other settings", "order=2"]),
    ],
)
def test_resume_refuses_another_configuration(earlier_run, args, fragments, cli):
    before = snapshot(earlier_run)
    proc = cli(SEARCH, *args, "--resume", "--max-steps", "3", "--out", str(earlier_run))
    assert_error(proc, 2, *fragments)
    assert snapshot(earlier_run) == before


def test_resume_without_checkpoint(tmp_path, cli):
    proc = cli(SEARCH, *RNN_TINY, "--resume", "--out", str(tmp_path))
    assert_error(proc, 2, "no checkpoint.pt")


def test_resume_from_damaged_checkpoint(tmp_path, earlier_run, cli):
    out = tmp_path / "run"
    shutil.copytree(earlier_run, out)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    before = snapshot(out)
    proc = cli(SEARCH, *RNN_TINY, "--resume", "--max-steps", "3", "--out", str(out))
    assert_error(proc, 2, "checkpoint.pt", "not a readable fastdarts checkpoint")
    assert snapshot(out) == before


def test_diverging_loss_stops_and_keeps_last_good_checkpoint(tmp_path, cli):
    out = tmp_path / "nan"
    args = ["--order", "1", "--lr", "1e30", "--checkpoint-every", "1", "--max-steps", "20"]
    proc = cli(SEARCH, *RNN_TINY, *args, "--out", str(out))
    assert_error(proc, 3, "diverged at step 2", "last good checkpoint (step 1)", str(out))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 1
    assert all(torch.isfinite(t).all() for t in ckpt["task"]["model"].values())
    assert cli("fastdarts.derive", str(out)).returncode == 0


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ("{not json", ["not valid JSON"]),
        ('{"recurrent": [["gelu", 0]], "concat": [1]}', ["unknown op 'gelu'"]),
        ('{"normal": [], "reduce": []}', ["match neither"]),
    ],
)
def test_bad_genotype_file(tmp_path, content, fragments, cli):
    path = tmp_path / "genotype.json"
    path.write_text(content)
    proc = cli("fastdarts.derive", str(path))
    assert_error(proc, 2, str(path), *fragments)


def test_published_genotype_by_name(cli):
    proc = cli("fastdarts.derive", "DARTS_V2", "--space", "cnn")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["normal"][-1] == ["dil_conv_3x3", 2]


def test_an_interrupt_says_how_to_resume_only_when_there_is_a_checkpoint(tmp_path, capsys):
    """The hint names the run folder (without --out, the space's default: not 'SPACE'), and
    offers --resume only once a checkpoint exists."""
    from fastdarts.cli import run_folder, run_reporting
    from fastdarts.search.config import SearchConfig
    from fastdarts.train.config import TrainConfig

    def interrupted():
        raise KeyboardInterrupt

    assert run_folder({"space": "cnn"}, "search") == "runs/search-cnn"
    assert run_folder({}, "train") == "runs/train-rnn"
    assert run_folder({"out": "x", "space": "cnn"}, "search") == "x"
    # The settings' own default (a library user's) is the same folder.
    assert SearchConfig(space="cnn").resolved().out == "runs/search-cnn"
    assert TrainConfig().resolved().out == "runs/train-rnn"
    out = tmp_path / "run"
    assert run_reporting("prog", str(out), interrupted) == 130
    assert capsys.readouterr().err == "prog: interrupted before a checkpoint (nothing to resume)\n"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    assert run_reporting("prog", str(out), interrupted) == 130
    assert capsys.readouterr().err == f"prog: interrupted; continue with --resume --out {out}\n"


def test_running_out_of_memory_is_one_line(capsys):
    """The CPU allocator's error and CUDA's OutOfMemoryError say how much and what to lower
    in one line (exit 2); any other RuntimeError is not swallowed."""
    from fastdarts.cli import run_reporting

    def cpu():
        torch.empty(2**60, dtype=torch.uint8)

    def cuda():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 …")

    def other():
        raise RuntimeError("shape mismatch")

    for work, amount in ((cpu, f"{2**60} bytes"), (cuda, "20.00 GiB")):
        assert run_reporting("prog", "out", work) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"prog: error: out of memory (tried to allocate {amount})"), err
        assert "--batch-size" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_reporting("prog", "out", other)


def test_a_warning_inside_a_run_is_one_line():
    """Formatted as the program's name and the message (the category where it is not a
    UserWarning), not Python's file:line and source line; still recorded by a recorder;
    the formatting restored afterwards."""
    import warnings

    from fastdarts.cli import run_reporting

    shown = []

    def work():
        shown.append(warnings.formatwarning("md5 mismatch", UserWarning, "x.py", 3))
        shown.append(warnings.formatwarning("old", DeprecationWarning, "x.py", 3))
        warnings.warn("ignoring PTB in /x", stacklevel=1)

    before = warnings.formatwarning
    with pytest.warns(UserWarning, match="ignoring PTB"):
        assert run_reporting("prog", "out", work) == 0
    assert shown == ["prog: warning: md5 mismatch\n", "prog: DeprecationWarning: old\n"]
    assert warnings.formatwarning is before
