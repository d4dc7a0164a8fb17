"""A search stopped or killed at any point and resumed ends exactly where an uninterrupted
one does: same α, weights, genotype and metrics (CPU, same thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CNN_TINY, REPO, RNN_TINY, assert_equal_state

from fastdarts.ops.extension import unavailable_reason
from fastdarts.search.__main__ import main

# An epoch boundary (with its evaluation) falls inside each run: epochs of 3 steps.
RNN_RUN = [*RNN_TINY, "--epoch-steps", "3", "--checkpoint-every", "2"]
CNN_RUN = [*CNN_TINY, "--epoch-steps", "2", "--checkpoint-every", "2"]


def final_state(out: Path) -> dict:
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    metrics = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        record.pop("time_s", None)
        metrics.append(record)
    return {
        "step": ckpt["step"],
        "model": ckpt["task"]["model"],
        # The rest of the task's state: optimisers, generators, data positions.
        "task": {k: v for k, v in ckpt["task"].items() if k != "model"},
        "genotype": (out / "genotype.json").read_text(),
        "alpha": json.loads((out / "alpha.json").read_text()),
        "metrics": metrics,
    }


def assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert_equal_state(a["task"], b["task"], "task")
    assert a["genotype"] == b["genotype"]
    assert a["alpha"] == b["alpha"]
    assert a["metrics"] == b["metrics"]


@pytest.mark.parametrize(
    ("args", "steps", "stop_at"),
    [
        (RNN_RUN, 7, 3),
        # Seed 1 draws a half-length step (bptt / 2) at step 2 and at step 5 (after the stop):
        # its draws must continue where they were.
        ([*RNN_RUN, "--seed", "1"], 7, 3),
        (CNN_RUN, 5, 3),
    ],
    ids=["rnn", "rnn-short-steps", "cnn"],
)
def test_stop_then_resume_equals_straight_run(tmp_path, args, steps, stop_at):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*args, "--max-steps", str(steps), "--out", str(straight)]) == 0
    assert main([*args, "--max-steps", str(stop_at), "--out", str(split)]) == 0
    # The resumed run takes its settings from the run folder: no need to repeat them.
    assert main(["--resume", "--out", str(split), "--max-steps", str(steps)]) == 0
    assert_same_run(final_state(straight), final_state(split))


@pytest.mark.skipif(unavailable_reason() is not None, reason="needs the C++ extension")
def test_a_resume_goes_on_with_the_backend_the_run_started_with(tmp_path, capsys, monkeypatch):
    """The checkpoint records what --backend auto resolved to (the fused backend, on the CPU
    with the C++ kernels). Where that one still runs but auto now picks another, the run
    goes on with it, as a straight run; where it cannot run and its state does not fit the
    other (the fused CNN steps its weights as fewer, stacked tensors), one line says so."""
    from fastdarts.ops import backends

    straight, split = tmp_path / "straight", tmp_path / "split"
    args = [*CNN_RUN, "--backend", "auto"]
    assert main([*args, "--max-steps", "4", "--out", str(straight)]) == 0
    assert main([*args, "--max-steps", "2", "--out", str(split)]) == 0
    assert torch.load(split / "checkpoint.pt", weights_only=True)["backend"] == "fused"
    monkeypatch.setattr(backends, "AUTO_ORDER", ("reference", "fused"))
    capsys.readouterr()
    assert main(["--resume", "--out", str(split), "--max-steps", "4"]) == 0
    assert "with backend 'fused', which this run's 'auto' chose" in capsys.readouterr().err
    assert_same_run(final_state(straight), final_state(split))
    assert json.loads((split / "config.json").read_text())["backend"] == "auto"

    monkeypatch.setattr(backends, "AUTO_ORDER", ("fused", "reference"))
    monkeypatch.setattr(backends, "unavailable_reason", lambda: "not built (test)")
    assert main(["--resume", "--out", str(split), "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert f"{split / 'checkpoint.pt'}: saved by backend 'fused', which does not run here" in err
    assert err.rstrip().endswith("resume it where 'fused' runs") and err.count("\n") == 1


def test_resume_drops_a_torn_last_metrics_line_and_names_a_bad_one(tmp_path, capsys):
    """A run killed while appending a record leaves half a line: the resume drops it. A bad
    line before the last is not the kill's and is named, not dropped."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main([*RNN_RUN, "--max-steps", "5", "--out", str(straight)]) == 0
    assert main([*RNN_RUN, "--max-steps", "3", "--out", str(split)]) == 0
    metrics = split / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 4, "lo')
    assert main(["--resume", "--out", str(split), "--max-steps", "5"]) == 0
    assert_same_run(final_state(straight), final_state(split))

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert main(["--resume", "--out", str(split), "--max-steps", "6"]) == 2
    assert f"{metrics}, line 2: not JSON" in capsys.readouterr().err


def test_killed_after_an_epochs_evaluation_resumes_without_repeating_it(tmp_path, monkeypatch):
    """--checkpoint-every on an epoch's last step: a run that dies between the epoch's
    evaluation (logged) and its outputs resumes from a checkpoint taken before that step,
    and logs the evaluation once, as a straight run does."""
    from fastdarts.search.loop import Searcher

    args = [*RNN_TINY, "--epoch-steps", "3", "--checkpoint-every", "3", "--max-steps", "7"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*args, "--out", str(straight)]) == 0
    outputs = Searcher._epoch_outputs

    def die_in_the_second(self):
        if self.epoch == 2:
            raise KeyboardInterrupt
        outputs(self)

    monkeypatch.setattr(Searcher, "_epoch_outputs", die_in_the_second)
    assert main([*args, "--out", str(killed)]) == 130
    assert sum('"valid_loss"' in line for line in (killed / "metrics.jsonl").open()) == 2
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(Searcher, "_epoch_outputs", outputs)
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert_same_run(final_state(straight), final_state(killed))


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_checkpoints_at_the_next_step_then_resumes_exactly(
    tmp_path, monkeypatch, capsys, presses
):
    """Ctrl-C during step 2 (no checkpoint due until step 100): the step finishes, a
    checkpoint is taken, the run stops (130) and resumes to the straight run's end. A second
    Ctrl-C stops at once, with nothing to resume."""
    from fastdarts.search.tasks import RNNTask

    args = [*RNN_RUN, "--checkpoint-every", "100", "--max-steps", "7"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main([*args, "--out", str(straight)]) == 0
    calls, step = [], RNNTask.step

    def pressed_during_the_second(self):
        calls.append(None)
        if len(calls) == 2:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
        return step(self)

    monkeypatch.setattr(RNNTask, "step", pressed_during_the_second)
    capsys.readouterr()
    assert main([*args, "--out", str(stopped)]) == 130
    err = capsys.readouterr().err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if presses == 2:
        assert "interrupted before a checkpoint (nothing to resume)" in err
        assert not (stopped / "checkpoint.pt").exists()
        return
    assert "stops after this step, with a checkpoint" in err
    assert f"interrupted; continue with --resume --out {stopped}" in err
    assert torch.load(stopped / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(RNNTask, "step", step)
    assert main([*args, "--out", str(stopped), "--resume"]) == 0
    assert_same_run(final_state(straight), final_state(stopped))


def test_sigkill_then_resume_equals_straight_run(tmp_path):
    """Kill the process with SIGKILL mid-run (after a checkpoint, at a step that is not one),
    resume: metrics logged after the checkpoint are dropped and the run ends identical."""
    args = [*RNN_RUN, "--max-steps", "8"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main([*args, "--out", str(straight)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "fastdarts.search", *args, "--out", str(killed)]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        logged = metrics.read_text().count('"loss"') if metrics.exists() else 0
        if logged >= 5 and (killed / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    logged = metrics.read_text().count('"loss"')
    assert saved < logged <= 8, (saved, logged)  # killed past its last checkpoint

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert_same_run(final_state(straight), final_state(killed))
