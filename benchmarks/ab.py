"""Two versions of the code, one search step each in turn: a before/after timing on a noisy
machine.

    python benchmarks/ab.py --base HEAD~1 --space cnn --order 2 --config small \\
        --backend fast --rounds 9 --warmup 1 --threads 1 --json out.json

``base`` is a git revision, checked out into a temporary worktree; ``head`` is this checkout
as it is (uncommitted changes included). Each version runs in its own worker process, which
imports fastdarts and ``benchmarks/search_step.py`` from its own tree, builds the same task
(same configuration, seed and synthetic data) and waits. The workers then take one step
each in turn, never together, in the order A B B A A B … (each round swaps who goes first),
so the machine's drift falls on both alike; a round's ratio head/base pairs two steps taken
seconds apart. Reported: each version's median, min and max seconds, the ratio of medians,
the median (min, max) of the paired ratios, ops per step, and the largest difference
between the two versions' α after the last step (an optimisation should leave it at
rounding).

``--cuda-path`` steps on the CUDA code path on this CPU, as ``benchmarks/cuda_path_ops.py``
runs it (each worker with its own tree's): Triton launches not run, so a tiny step's time is
mostly the host's work, and α is not compared (the kernels' outputs are left unwritten).

The C++ extension: when ``csrc/`` and ``setup.py`` are the same in both trees, base uses
head's built ``fastdarts/_C``; otherwise it is built in the worktree first (minutes).

The worktree and its temporary folder are removed at the end, also when the run is stopped
(Ctrl-C, SIGTERM from a time limit); a failure keeps the folder, for the workers' logs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VERSIONS = ("base", "head")
COLUMNS = [
    ("version", "version"),
    ("commit", "commit"),
    ("space", "space"),
    ("order", "order"),
    ("config", "config"),
    ("backend", "backend"),
    ("median s/step", "median_s"),
    ("min s", "min_s"),
    ("max s", "max_s"),
    ("× base", "ratio_vs_base"),
    ("paired × base (median)", "paired_ratio_median"),
    ("paired min", "paired_ratio_min"),
    ("paired max", "paired_ratio_max"),
    ("ops/step", "ops_per_step"),
    ("max |Δα|", "alpha_max_abs_diff"),
]


class ABError(Exception):
    """A problem to report in one line (exit 2)."""


# -- the worker: one version's task, stepping on request ----------------------------------


def _import_from(tree: Path) -> None:
    """fastdarts, fastdarts.kernels and benchmarks from ``tree``, whatever is installed (an
    editable install's finder would otherwise give ``fastdarts.kernels`` from its checkout)."""
    sys.path.insert(0, str(tree))
    import fastdarts

    kernels = tree / "kernels"
    spec = importlib.util.spec_from_file_location(
        "fastdarts.kernels", kernels / "__init__.py", submodule_search_locations=[str(kernels)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    spec.loader.exec_module(package)
    import benchmarks

    for module in (fastdarts, package, benchmarks):
        if tree not in Path(module.__file__).resolve().parents:
            raise ABError(f"{module.__name__} came from {module.__file__}, not from {tree}")


def worker(args: argparse.Namespace) -> None:
    """Reads commands on stdin, one per line, and answers each with one line on stdout:
    ``step`` → its seconds; ``ops`` → ops in one more step and α after it (JSON)."""
    _import_from(Path(args.tree).resolve())
    from benchmarks import harness
    from benchmarks.search_step import DTYPES, build_task, parse_backends, search_config, step_fn

    device = harness.setup(args.device, args.threads)
    path = contextlib.nullcontext()
    if args.cuda_path:
        from benchmarks.cuda_path_ops import cuda_dispatch

        path = cuda_dispatch()
    with path as launches:
        if launches is not None:
            launches.count_bytes = False  # timing: the stub alone
        (config,) = parse_backends(args.backend)
        # search_config's first four arguments: every revision's search_step.py has them.
        cfg = search_config(args.space, args.order, args.config, config.overrides())
        task = build_task(cfg, device, DTYPES[args.dtype], args.steps)
        step, sync = step_fn(task), harness.synchronizer(device)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "step":
                sync()
                start = time.perf_counter()
                step()
                sync()
                print(time.perf_counter() - start, flush=True)
            elif line.strip() == "ops":
                ops = sum(harness.count_ops(step).values())
                alphas = task.model.arch_parameters()
                alpha = [a.detach().double().flatten().tolist() for a in alphas]
                print(json.dumps({"ops": ops, "alpha": alpha}), flush=True)
            else:
                return


class Worker:
    """A worker process of one tree; ``ask(command)`` returns its one-line answer."""

    def __init__(self, name: str, tree: Path, args: argparse.Namespace, log: Path):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tree", str(tree)]
        # --base too: the parser requires it (the worker does not read it).
        cmd += ["--base", args.base, "--space", args.space, "--order", str(args.order)]
        cmd += ["--config", args.config]
        cmd += ["--backend", args.backend, "--device", args.device, "--dtype", args.dtype]
        cmd += ["--steps", str(args.warmup + args.rounds + 1)]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--cuda-path"] if args.cuda_path else []
        self.name, self.log = name, log
        self.stderr = log.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            text=True, bufsize=1,
        )  # fmt: skip
        self._expect("ready")

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.stderr.flush()
            tail = self.log.read_text().strip().splitlines()[-1:] or ["no output"]
            raise ABError(
                f"the {self.name} worker exited ({self.proc.returncode}): {tail[0]} (log: "
                f"{self.log})"
            )
        return line.strip()

    def _expect(self, word: str) -> None:
        line = self._read()
        if line != word:
            raise ABError(f"the {self.name} worker said {line!r}, not {word!r}")

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.stderr.close()


# -- the base tree ------------------------------------------------------------------------


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise ABError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


@contextlib.contextmanager
def base_tree(rev: str) -> Iterator[tuple[Path, str, Path]]:
    """A temporary worktree of ``rev`` with an importable extension; yields (path, commit,
    a folder for logs). The worktree is removed afterwards, the folder too unless an error
    (not an interruption: KeyboardInterrupt, SystemExit) left logs in it."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except ABError:
        raise ABError(f"--base {rev}: not a revision of {REPO}") from None
    scratch = Path(tempfile.mkdtemp(prefix="fastdarts-ab-"))
    tree = scratch / "base"
    _git("worktree", "add", "--detach", "--quiet", str(tree), commit)
    failed = False
    try:
        same_ext = subprocess.run(
            ["git", "diff", "--quiet", commit, "--", "csrc", "setup.py"], cwd=REPO
        ).returncode == 0  # fmt: skip
        if same_ext:
            for so in sorted((REPO / "fastdarts").glob("_C.*")):
                shutil.copy2(so, tree / "fastdarts" / so.name)
        elif (tree / "csrc").is_dir():
            print(f"building the extension of {commit[:10]} (csrc/ differs)", file=sys.stderr)
            build = subprocess.run(
                [sys.executable, "setup.py", "build_ext", "--inplace"],
                cwd=tree, capture_output=True, text=True,
            )  # fmt: skip
            if build.returncode:
                log = scratch / "base-build.log"
                log.write_text(build.stdout + build.stderr)
                raise ABError(f"building {commit[:10]}'s extension failed: see {log}")
        yield tree, commit, scratch
    except Exception:
        failed = True
        raise
    finally:
        _git("worktree", "remove", "--force", str(tree))
        if not failed:
            shutil.rmtree(scratch, ignore_errors=True)


# -- the comparison -----------------------------------------------------------------------


def compare(args: argparse.Namespace, trees: dict[str, Path], logs: Path) -> tuple[dict, dict]:
    """Seconds per step of each version (interleaved, first mover swapped each round), then
    each one's ops and α; the workers' stderr goes to ``logs``."""
    workers: dict[str, Worker] = {}
    try:
        for name in VERSIONS:
            workers[name] = Worker(name, trees[name], args, logs / f"{name}.log")
        times: dict[str, list[float]] = {name: [] for name in VERSIONS}
        for i in range(args.warmup + args.rounds):
            order = VERSIONS if i % 2 == 0 else VERSIONS[::-1]
            for name in order:
                seconds = float(workers[name].ask("step"))
                if i >= args.warmup:
                    times[name].append(seconds)
        final = {name: json.loads(workers[name].ask("ops")) for name in VERSIONS}
    finally:
        for w in workers.values():
            w.close()
    return times, final


def rows_of(args: argparse.Namespace, commits: dict[str, str], times: dict, final: dict) -> list:
    base_alpha = [x for a in final["base"]["alpha"] for x in a]
    head_alpha = [x for a in final["head"]["alpha"] for x in a]
    diff = (
        max(abs(x - y) for x, y in zip(base_alpha, head_alpha))
        if len(base_alpha) == len(head_alpha) and not args.cuda_path
        else None
    )
    paired = [h / b for b, h in zip(times["base"], times["head"])]
    rows = []
    for name in VERSIONS:
        t = times[name]
        head = name == "head"
        rows.append(
            {
                "version": name,
                "commit": commits[name],
                "space": args.space,
                "order": args.order,
                "config": args.config,
                "backend": args.backend,
                "cuda_path": args.cuda_path,
                "median_s": statistics.median(t),
                "min_s": min(t),
                "max_s": max(t),
                "ratio_vs_base": statistics.median(t) / statistics.median(times["base"]),
                "paired_ratio_median": statistics.median(paired) if head else None,
                "paired_ratio_min": min(paired) if head else None,
                "paired_ratio_max": max(paired) if head else None,
                "ops_per_step": final[name]["ops"],
                "alpha_max_abs_diff": diff if head else None,
            }
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--base", required=True, help="the git revision to compare this checkout with")
    p.add_argument("--space", choices=("rnn", "cnn"), required=True)
    p.add_argument("--order", type=int, choices=(1, 2), default=2)
    p.add_argument("--config", choices=("paper", "small", "tiny"), default="small")
    p.add_argument(
        "--backend", default="fast", help="one configuration, as search_step.py's --backends"
    )
    p.add_argument("--rounds", type=int, default=7, help="timed steps per version")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per version first")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    p.add_argument(
        "--cuda-path",
        action="store_true",
        help="step on the CUDA code path on this CPU (Triton launches not run; see above)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    # Internal: one version's worker.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        if args.rounds < 1 or args.warmup < 0:
            p.error("--rounds must be at least 1 and --warmup non-negative")
        if args.threads is not None and args.threads < 1:
            p.error("--threads must be at least 1")
        if args.cuda_path and args.device != "cpu":
            p.error("--cuda-path runs the CUDA code path on the CPU: not with --device cuda")
        # This checkout's benchmarks, to check --backend (a worker imports its own tree's).
        sys.path.insert(0, str(REPO))

        from benchmarks import harness
        from benchmarks.search_step import parse_backends, row_config

        try:
            configs = parse_backends(args.backend)
        except ValueError as e:
            p.error(f"--backend: {e}")
        if len(configs) != 1:
            p.error("--backend takes one configuration")
        try:
            row_config(args, configs[0])  # what the search would refuse, before any worktree
        except ValueError as e:
            p.error(str(e))
        harness.check_device(p, args.device)
        harness.check_json_path(p, args.json)
    return args


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (a time limit) as an exit: the finally blocks remove the worktree."""
    signal.signal(signum, signal.SIG_IGN)  # a second one must not cut the cleanup short
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> dict:
    """Times base against head; returns (and optionally writes) the result document."""
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    import torch

    from benchmarks import harness

    with base_tree(args.base) as (tree, commit, logs):
        commits = {"base": commit, "head": harness.git_commit()}
        times, final = compare(args, {"base": tree, "head": REPO}, logs)
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = sys.argv if argv is None else ["benchmarks/ab.py", *argv]
    doc = {
        "env": harness.env_info(torch.device(args.device), argv),
        "base": {"rev": args.base, "commit": commits["base"]},
        "rows": rows_of(args, commits, times, final),
        "samples_s": times,
        "units": {
            "median_s": "seconds per search step (α step + weight step), per version",
            "ratio_vs_base": "median_s / base median_s (below 1: head is faster)",
            "paired_ratio_median": "median over rounds of head's step / base's step in the "
            "same round (the two taken back to back, first mover swapped each round)",
            "ops_per_step": "ATen ops dispatched in one more step",
            "alpha_max_abs_diff": "largest |α_head − α_base| after the last step (not "
            "with --cuda-path)",
        },
    }
    return harness.report(doc, COLUMNS, args.json)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    try:
        main()
    except ABError as e:
        print(f"ab.py: {e}", file=sys.stderr)
        sys.exit(2)
