"""Data-parallel search on torch.distributed: gloo on 2 CPU processes against one process.

- Per-shard BatchNorm: after 3 steps, α, weights and running statistics equal those of one
  process whose model computes the 2 shards one by one with the same masks (loss: the mean
  of the shards' losses; each shard normalised by its own statistics; running statistics
  the mean of the shards'), built here by wrapping the model's forward. With --sync-bn they
  equal one process on the whole batch. Both spaces, first and second order (also with the
  exact HVP, and with the fused backends), float64.
- Every rank holds the same α after every step; only rank 0 writes files; a stopped run
  resumes to the uninterrupted run's state, also with another number of processes.
- Killing one rank of a torchrun launch ends the run within seconds, each survivor saying
  why in one line; the run then resumes from its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import REPO, RNN_TINY, snapshot
from test_recurrent_mixed import _synthetic_corpus
from test_resume import assert_same_run, final_state

from fastdarts import distributed, plot
from fastdarts.data import ptb
from fastdarts.data.cifar import CIFAR10Split
from fastdarts.errors import ConfigError
from fastdarts.ops import backends
from fastdarts.search.__main__ import main
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import Searcher
from fastdarts.search.tasks import CNNTask, RNNTask
from fastdarts.spaces import Batch, SearchOutput

WORLD = 2
STEPS = 3
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "rnn": {"emsize": 8, "nhid": 8, "batch_size": 4, "bptt": 5, "eval_batch_size": 2},
    "cnn": {"init_channels": 4, "layers": 3, "batch_size": 4},
}
# (space, order, sync BN, backend, HVP)
CASES = [
    (space, order, sync_bn, "reference", "fd")
    for space in ("rnn", "cnn")
    for order in (1, 2)
    for sync_bn in (False, True)
]
CASES += [("rnn", 2, False, "reference", "exact"), ("rnn", 2, True, "reference", "exact")]
CASES += [("rnn", 2, False, "fused", "fd"), ("cnn", 2, False, "fused", "fd")]
# A minute each on the 2-core CI machine (the sync BN case: an all-reduce per BatchNorm
# call, ~1000 per pass): run with -m slow.
SLOW_CASES = [("cnn", 2, True, "reference", "fd"), ("cnn", 2, False, "fused", "fd")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, port: int) -> None:
    """What torchrun does for a worker: the environment, then the process group."""
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": WORLD, "MASTER_PORT": port}
    os.environ.update({k: str(v) for k, v in env.items()}, MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    distributed.init(torch.device("cpu"))


def small_images(n: int) -> CIFAR10Split:
    """Random 16×16 images (as test_engine's; at 8×8 rounding grows chaotically)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return CIFAR10Split(images, torch.randint(0, 10, (n,), generator=gen))


def make_task(space: str, order: int, sync_bn: bool, backend: str, hvp: str):
    options = {"order": order, "sync_bn": sync_bn, "backend": backend, "hvp": hvp}
    cfg = SearchConfig(space=space, dtype="float64", seed=3, **options, **TINY[space]).resolved()
    cpu = torch.device("cpu")
    if space == "rnn":
        task = RNNTask(cfg, cpu, torch.float64, corpus=_synthetic_corpus())
    else:
        task = CNNTask(cfg, cpu, torch.float64, images=small_images(8 * (STEPS + 1)))
    task.begin_epoch(0)
    return task


def run_steps(task) -> dict:
    """α after every step; weights, buffers and the last step's metrics at the end."""
    alphas = []
    for _ in range(STEPS):
        metrics = {k: float(v) for k, v in task.step().items()}
        alphas.append([a.detach().clone() for a in task.model.arch_parameters()])
    state = {k: v.clone() for k, v in task.model.state_dict().items()}
    return {"alphas": alphas, "state": state, "metrics": metrics}


def shard_forward(model, world: int = WORLD) -> None:
    """Make ``model`` compute a training pass as ``world`` processes with per-shard BatchNorm
    would: each shard (its block of the batch and of the masks) on its own, from the same
    running statistics, which end as the mean of the shards'; the loss is the shards' mean."""
    forward = model.forward
    # BatchNorm modules, and the fused ops' modules that keep BatchNorm statistics.
    bns = [m for m in model.modules() if m._buffers]

    def set_buffers(values: list[dict[str, torch.Tensor]]) -> None:
        # New tensors, not copies into the old ones: earlier shards' graphs saved those.
        for m, saved in zip(bns, values):
            m._buffers.update({k: v.clone() for k, v in saved.items()})

    def sharded(batch: Batch, masks: dict | None = None) -> SearchOutput:
        if not model.training:
            return forward(batch, masks)
        dim = 1 if model.space == "rnn" else 0  # token batches are (T, B)
        specs = model.mask_specs(batch)
        start = [dict(m.named_buffers()) for m in bns]
        outs, ends = [], []
        n = batch.inputs.shape[dim]
        for r in range(world):
            lo, hi = r * n // world, (r + 1) * n // world
            set_buffers(start)
            state = None if batch.state is None else batch.state[lo:hi]
            inputs, targets = (
                batch.inputs.narrow(dim, lo, hi - lo),
                batch.targets.narrow(dim, lo, hi - lo),
            )
            part_masks = {
                k: v if specs[k].batch_dim is None else v.narrow(specs[k].batch_dim, lo, hi - lo)
                for k, v in (masks or {}).items()
            }
            outs.append(forward(Batch(inputs, targets, state), part_masks))
            ends.append([dict(m.named_buffers()) for m in bns])
        mean = [
            {
                k: sum(e[i][k] for e in ends) / world if v.is_floating_point() else v
                for k, v in ends[0][i].items()
            }
            for i in range(len(bns))
        ]
        set_buffers(mean)
        return SearchOutput(
            sum(o.loss for o in outs) / world,
            sum(o.penalty for o in outs) / world,
            None if outs[0].state is None else torch.cat([o.state for o in outs]),
            None if outs[0].logits is None else torch.cat([o.logits for o in outs]),
        )

    model.forward = sharded


def assert_close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{what}: {m}")


def usable(backend: str, space: str) -> bool:
    return backends.BACKENDS[backend].why_not(space, "cpu") is None


def _worker(rank: int, port: int, folder: Path, cases: list, runs: bool) -> None:
    join_group(rank, port)
    cases = [c for c in cases if usable(c[3], c[0])]
    results = {"cases": {case: run_steps(make_task(*case)) for case in cases}}
    if runs:
        results["runs"] = run_folder_scenario(rank, folder)
    torch.save(results, folder / f"rank{rank}.pt")
    distributed.shutdown()


def launch(folder: Path, cases: list, runs: bool = False) -> list[dict]:
    """Each rank's results: :func:`run_steps` of every case, then (``runs``) what
    :func:`run_folder_scenario` found; by 2 gloo processes."""
    mp.spawn(_worker, args=(free_port(), folder, cases, runs), nprocs=WORLD)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, list[dict]]:
    """One launch for the default run (the processes start once, ~10 s): the equality
    cases, then the run-folder scenario in the launch's folder."""
    folder = tmp_path_factory.mktemp("ranks")
    return folder, launch(folder, [c for c in CASES if c not in SLOW_CASES], runs=True)


@pytest.mark.parametrize(
    ("space", "order", "sync_bn", "backend", "hvp"),
    [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES],
)
def test_two_processes_equal_one(request, tmp_path, space, order, sync_bn, backend, hvp):
    case = (space, order, sync_bn, backend, hvp)
    if not usable(backend, space):
        pytest.skip(f"{backend} cannot run {space} here")
    if case in SLOW_CASES:
        results = [r["cases"] for r in launch(tmp_path, [case])]
    else:
        results = [r["cases"] for r in request.getfixturevalue("launched")[1]]
    ranks = [r[case] for r in results]
    # Every rank holds the same α after every step, and the same state at the end.
    for step in range(STEPS):
        for a, b in zip(ranks[0]["alphas"][step], ranks[1]["alphas"][step]):
            assert torch.equal(a, b), f"α differs between ranks after step {step + 1}"
    for name, tensor in ranks[0]["state"].items():
        assert torch.equal(tensor, ranks[1]["state"][name]), name
    assert ranks[0]["metrics"] == ranks[1]["metrics"]

    reference = make_task(*case)
    if not sync_bn:
        shard_forward(reference.model)  # else: one process on the whole batch
    ref = run_steps(reference)
    for step in range(STEPS):
        for a, b in zip(ranks[0]["alphas"][step], ref["alphas"][step]):
            assert_close(a, b, f"α after step {step + 1}")
    for name, tensor in ref["state"].items():
        if tensor.is_floating_point():
            assert_close(ranks[0]["state"][name], tensor, name)
    for key, value in ref["metrics"].items():
        assert ranks[0]["metrics"][key] == pytest.approx(value, rel=1e-10), key

    # Not vacuous: α moved, and per-shard BatchNorm is another computation than sync BN.
    start = make_task(*case).model.arch_parameters()
    assert max((a - s).abs().max() for a, s in zip(ref["alphas"][-1], start)) > 1e-5
    other = results[0].get((space, order, not sync_bn, backend, hvp))
    if other is not None:
        differ = max((a - b).abs().max() for a, b in zip(other["alphas"][-1], ref["alphas"][-1]))
        assert differ > 1e-8


# -- the run folder: rank 0 writes, resume ---------------------------------------------------

RUN = {"space": "rnn", **TINY["rnn"], "epoch_steps": 2, "checkpoint_every": 1, "log_every": 1}
RUN |= {"eval_batches": 2, "dtype": "float64", "threads": 1}


def search(out: Path, max_steps: int, resume: bool = False) -> None:
    Searcher(SearchConfig(**RUN, out=str(out), max_steps=max_steps, resume=resume)).run()


def quick_data_and_plots() -> None:
    """The synthetic corpus for PTB (tokenising PTB takes seconds) and an empty alpha.png
    (matplotlib takes ~10 s a plot on the CI machine)."""
    ptb.load_ptb = lambda *args: _synthetic_corpus()
    plot.plot_alpha_history = lambda doc, path: Path(path).write_bytes(b"")


@pytest.fixture
def quick(monkeypatch):
    # Setting each attribute to itself first makes monkeypatch restore it afterwards.
    monkeypatch.setattr(ptb, "load_ptb", ptb.load_ptb)
    monkeypatch.setattr(plot, "plot_alpha_history", plot.plot_alpha_history)
    quick_data_and_plots()


def run_folder_scenario(rank: int, tmp: Path) -> dict[str, bool]:
    """A straight search of 4 steps, and one of 2 resumed to 4. Rank 0 runs in the real
    folders; rank 1 in folders of its own, which must stay absent (or, where it resumes from
    a copy of rank 0's, unchanged), in an empty working directory. What rank 1 found."""
    quick_data_and_plots()
    home = tmp / f"cwd{rank}"
    home.mkdir()
    os.chdir(home)

    def out(name: str) -> Path:
        return tmp / (name if rank == 0 else f"{name}-rank1")

    search(out("straight"), 4)
    search(out("split"), 2)
    torch.distributed.barrier()
    absent = not out("straight").exists() and not out("split").exists()
    if rank == 1:
        shutil.copytree(tmp / "split", out("split"))
    before = snapshot(out("split"))
    torch.distributed.barrier()
    search(out("split"), 4, resume=True)
    unchanged = snapshot(out("split")) == before
    return {"absent": absent, "unchanged": unchanged, "cwd_empty": not any(home.iterdir())}


def test_only_rank0_writes_and_resume_works(launched, quick):
    folder, ranks = launched
    assert ranks[1]["runs"] == {"absent": True, "unchanged": True, "cwd_empty": True}
    assert ranks[0]["runs"]["unchanged"] is False  # rank 0 did write (the poison is live)
    files = {"alpha.json", "alpha.png", "checkpoint.pt", "config.json", "genotype.json"}
    assert files | {"metrics.jsonl"} <= {p.name for p in (folder / "split").iterdir()}
    assert_same_run(final_state(folder / "straight"), final_state(folder / "split"))

    # The checkpoint is global (the hidden states of every rank's columns): one process
    # resumes the 2-process run.
    search(folder / "split", 5, resume=True)
    saved = torch.load(folder / "split" / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 5 and saved["world_size"] == 1


def test_resumes_a_checkpoint_from_before_sync_bn(tmp_path, quick):
    search(tmp_path / "run", 1)
    path = tmp_path / "run" / "checkpoint.pt"
    saved = torch.load(path, weights_only=True)
    del saved["config"]["sync_bn"]
    torch.save(saved, path)
    search(tmp_path / "run", 2, resume=True)
    assert torch.load(path, weights_only=True)["step"] == 2


def test_batch_must_divide(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        Searcher(SearchConfig(**RUN, out=str(tmp_path / "run")))


def test_sync_bn_needs_the_reference_backend(tmp_path):
    with pytest.raises(ConfigError, match="--sync-bn runs with --backend reference"):
        Searcher(SearchConfig(**RUN, out=str(tmp_path / "run"), sync_bn=True, backend="fused"))


# -- failure: a killed rank ------------------------------------------------------------------


def worker_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """The torchrun agent's worker processes by rank (Linux /proc)."""
    pids = {}
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    for pid in map(int, children):
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            for entry in environ:
                if entry.startswith(b"RANK="):
                    pids[int(entry[5:])] = pid
    return pids


def torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD),
        "--master_port",
        str(free_port()),
        "-m",
        "fastdarts.search",
        *args,
    ]


def test_killed_rank_stops_the_run_then_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*RNN_TINY, "--epoch-steps", "1000", "--checkpoint-every", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        torchrun(*args, "--max-steps", "1000"),
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.1)
    assert launcher.poll() is None, launcher.communicate()
    os.kill(worker_pids(launcher)[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=60)
    assert time.monotonic() - killed < 20
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if "[rank 0/2]: error: rank 0:" in line]
    assert len(lines) == 1 and "another process of the run" in lines[0], stderr
    # The launcher's SIGTERM reaching rank 0 as it exits raises nothing more.
    assert "Exception ignored" not in stderr, stderr

    # The killed run resumes from its checkpoint (here in one process: the state is global).
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    monkeypatch.setattr(plot, "plot_alpha_history", lambda doc, path: None)
    assert main(["--resume", "--out", str(out), "--max-steps", str(step + 2)]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step + 2


def test_shutdown_gives_sigterm_back_its_handler_before(monkeypatch):
    """By default a late SIGTERM then ends the process quietly; a handler the embedding
    program installed is the one restored (taking it twice keeps the first one's)."""

    def own(signum, frame):
        return None

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(distributed, "_sigterm_before", signal.SIG_DFL)
    try:
        for handler in (signal.SIG_DFL, own):
            signal.signal(signal.SIGTERM, handler)
            distributed._catch_launcher_sigterm()
            distributed._catch_launcher_sigterm()
            assert signal.getsignal(signal.SIGTERM) is distributed._stopped_by_launcher
            distributed.shutdown()
            assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_torchrun_settings_are_checked_before_joining(monkeypatch):
    """A timeout that is not a number of seconds, or one GPU named for every rank, is one
    line before any process group is joined."""
    from fastdarts.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: pytest.fail())
    for bad in ("5min", "0", "-3", "inf", "nan"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"FASTDARTS_DIST_TIMEOUT='{bad}': give the"):
            distributed.init(torch.device("cpu"))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed._timeout_s() == 12.5
    with pytest.raises(ConfigError, match="--device cuda:0: under torchrun each process"):
        distributed.init(torch.device("cuda", 0))


# -- --seeds ---------------------------------------------------------------------------------


def test_seeds_search_rank_and_summarise(cli, tmp_path, quick):
    out = tmp_path / "seeds"
    train = "--epochs 1 --epoch-steps 2 --emsize 8 --nhid 8 --batch-size 4 --bptt 5 "
    train += "--eval-batches 2 --threads 1"
    args = [*RNN_TINY, "--max-steps", "2", "--threads", "1", "--out", str(out)]
    result = cli("fastdarts.search", *args, "--seeds", "0,1", "--rank-train", train)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary == json.loads(result.stdout)
    ranking = summary["ranking"]
    assert sorted(r["seed"] for r in ranking) == [0, 1]
    assert ranking[0]["score"] <= ranking[1]["score"]  # perplexity: lower first
    assert summary["best_seed"] == ranking[0]["seed"]
    for seed in (0, 1):
        config = json.loads((out / f"seed-{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["seeds"] is None
        assert (out / f"seed-{seed}" / "train" / "result.json").is_file()
    best = out / f"seed-{summary['best_seed']}" / "genotype.json"
    assert (out / "genotype.json").read_text() == best.read_text()
    # Different seeds, different searches.
    alphas = [(out / f"seed-{s}" / "alpha.json").read_text() for s in (0, 1)]
    assert alphas[0] != alphas[1]
    # Each search's and training's epoch lines follow a line saying whose they are.
    said = [line for line in result.stderr.splitlines() if line.startswith("seed ")]
    assert said == [
        f"seed 0: search in {out / 'seed-0'}",
        f"seed 1: search in {out / 'seed-1'}",
        f"seed 0: training its cell in {out / 'seed-0' / 'train'}",
        f"seed 1: training its cell in {out / 'seed-1' / 'train'}",
    ]


def test_seeds_must_be_integers(cli, tmp_path):
    result = cli("fastdarts.search", *RNN_TINY, "--seeds", "0,x", "--out", str(tmp_path / "s"))
    assert result.returncode == 2
    assert "--seeds must be comma-separated integers" in result.stderr


def test_before_the_process_group_only_torchruns_rank_0_is_main(monkeypatch):
    """--seeds prints and writes before the first search joins the group: rank 1 must not."""
    from fastdarts import distributed

    assert not distributed.active()
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.is_main()
    monkeypatch.setenv("RANK", "1")
    assert not distributed.is_main()
    monkeypatch.setenv("RANK", "0")
    assert distributed.is_main()
