"""What the search and training runs share: devices, generator state, checkpoint files and
the epoch loop with its run folder (settings, metrics, checkpoints, progress bar, resume).

A run folder holds ``config.json`` (the settings), ``metrics.jsonl`` (one JSON object per
logged step and per epoch) and ``checkpoint.pt`` (everything needed to continue exactly,
written atomically and loaded with ``weights_only=True``). In a distributed run only rank 0
writes them (and shows the progress bar); every rank reads the checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from fastdarts import distributed
from fastdarts.errors import ConfigError, DivergedError
from fastdarts.utils import atomic_torch_save, atomic_write_text

CHECKPOINT_FORMAT = 1
TRAIN_KIND = "fastdarts-train"  # a training checkpoint's "kind"; a search's has no "kind"
# Each kind's noun and adjective, for messages.
_KIND_WORDS = {"search": ("search", "search"), "train": ("training run", "training")}
SPACES = {"rnn": "ptb", "cnn": "cifar10"}  # space -> its dataset

# Settings that may differ between a run and its resumption: where things are and how long
# to go on, not what is computed.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "data", "out", "resume", "device", "threads", "checkpoint_every", "log_every"}
    | {"seeds", "rank_train"}  # the search's --seeds driver, not what one search computes
)


def default_out(kind: str, space: str) -> str:
    """A run's folder when ``--out`` is not given: runs/KIND-SPACE."""
    return f"runs/{kind}-{space}"


class RunSettings:
    """Base of a run's settings dataclass (``None`` fields stand for the paper's defaults)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def unset(self, defaults: dict) -> dict:
        """Those of ``defaults`` whose field is still None."""
        return {k: v for k, v in defaults.items() if getattr(self, k) is None}


def check_settings(cfg: RunSettings, verb: str, more: list[tuple[bool, str]]) -> None:
    """ConfigError with the message of the first failed check: those every run's settings
    share (``verb``: what the rnn space does on ptb, "searches" or "trains"), then ``more``."""
    checks = [
        (cfg.space in SPACES, f"unknown space '{cfg.space}' (choose from rnn, cnn)"),
        (
            cfg.dataset == SPACES.get(cfg.space),
            f"dataset '{cfg.dataset}' does not go with space '{cfg.space}' "
            f"(rnn {verb} on ptb, cnn on cifar10)",
        ),
        (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
        (cfg.batch_size >= 1, f"--batch-size must be positive, got {cfg.batch_size}"),
        (cfg.max_steps is None or cfg.max_steps >= 0, "--max-steps must be non-negative"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be positive"),
        (cfg.bptt >= 2, f"--bptt must be at least 2, got {cfg.bptt}"),
        *_range_checks(cfg),
        *more,
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


# The numeric settings' ranges, for those a run's settings have (and has set).
_NON_NEGATIVE = (
    *("lr", "weight_decay", "arch_lr", "arch_weight_decay", "lr_min"),
    *("tar", "momentum", "max_seq_len_delta", "auxiliary_weight"),
)
# A gradient-norm clip of 0 would zero every weight's gradient.
_POSITIVE_REAL = ("clip", "grad_clip")
_PROBABILITIES = ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute", "drop_path")
_POSITIVE = (
    *("epoch_steps", "eval_batches", "log_every", "eval_batch_size", "test_batch_size"),
    *("threads", "init_channels", "emsize", "nhid"),
)


def _range_checks(cfg: RunSettings) -> list[tuple[bool, str]]:
    """(ok, message) for each numeric setting ``cfg`` has and has set: a learning rate,
    decay or weight non-negative and finite, a clip positive and finite, a dropout in
    [0, 1), a count positive, a seed NumPy takes (NaN fails every check)."""

    def given(names: tuple[str, ...]):
        for name in names:
            value = getattr(cfg, name, None)
            if value is not None:
                yield f"--{name.replace('_', '-')}", value

    checks = [
        (0 <= v < math.inf, f"{f} must be non-negative and finite, got {v}")
        for f, v in given(_NON_NEGATIVE)
    ]
    checks += [
        (0 < v < math.inf, f"{f} must be positive and finite, got {v}")
        for f, v in given(_POSITIVE_REAL)
    ]
    checks += [(0 <= v < 1, f"{f} must lie in [0, 1), got {v}") for f, v in given(_PROBABILITIES)]
    checks += [(v >= 1, f"{f} must be positive, got {v}") for f, v in given(_POSITIVE)]
    checks.append((0 <= cfg.seed < 2**32, f"--seed must lie in [0, 2^32), got {cfg.seed}"))
    if getattr(cfg, "layers", None) is not None:
        checks.append((cfg.layers >= 3, f"--layers must be at least 3, got {cfg.layers}"))
    portion = getattr(cfg, "train_portion", None)
    if portion is not None:
        checks.append((0 < portion < 1, f"--train-portion must lie in (0, 1), got {portion}"))
    return checks


def trajectory_mismatch(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's run and this one (and would change it)."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def resolve_device(name: str | None) -> torch.device:
    """``name`` as a device (default: cuda if available); ConfigError if it cannot be used.
    A numbered CUDA device becomes the current one: Triton kernels, cuBLAS handles and CUDA
    graph captures go to the current device, not to their tensors'."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: '{name}' is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: no CUDA device is available here")
        if device.index is not None:
            count = torch.cuda.device_count()
            if device.index >= count:
                raise ConfigError(
                    f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                    f"cuda:{count - 1}"
                )
            torch.cuda.set_device(device)
    return device


def resume_backend(setting: str, ran: str | None, resolve: Callable[[str], Any]) -> Any:
    """The backend a resumed run goes on with: the one its checkpoint says it ran with
    (``ran``: what ``setting`` resolved to when it started, None in older checkpoints) where
    that one runs here (``resolve`` raises ConfigError where not), so the run goes on
    computing what it computed and its optimiser state, laid out per backend, fits; else
    what ``setting`` resolves to here (:func:`load_task_state` says if the state cannot fit)."""
    now = resolve(setting)
    if ran is None or ran == now.name:
        return now
    try:
        before = resolve(ran)
    except ConfigError:
        return now
    if distributed.is_main():
        print(
            f"resuming with backend '{ran}', which this run's '{setting}' chose when it started",
            file=sys.stderr,
        )
    return before


def load_task_state(task: Any, state: dict, ran: str | None, backend: Any, path: Path) -> None:
    """``task.load_state_dict(state)``; a ConfigError where ``state``, saved by backend
    ``ran`` (which does not run here), does not fit ``backend``'s layout."""
    try:
        task.load_state_dict(state)
    except (ValueError, RuntimeError, KeyError) as e:
        if ran is None or ran == backend.name:
            raise
        raise ConfigError(
            f"{path}: saved by backend '{ran}', which does not run here, and its state does "
            f"not fit backend '{backend.name}' ({e}); resume it where '{ran}' runs"
        ) from e


def seed_everything(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict:
    """The global generators' state (torch, NumPy and Python as JSON, CUDA if in use)."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state(legacy=False), default=_json_array),
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _json_array(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state_file(path: Path, what: str = "fastdarts checkpoint") -> Any:
    """``torch.load`` (CPU, ``weights_only``); ConfigError naming ``what`` if unreadable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: any unpickling error lands here
        raise ConfigError(f"{path}: not a readable {what} ({e})") from e


def checkpoint_kind(saved: Any) -> str | None:
    """What a loaded checkpoint holds: "search", "train", or None (not a fastdarts
    checkpoint of this format)."""
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        return None
    if saved.get("kind") == TRAIN_KIND:
        return "train"
    if "kind" not in saved and all(isinstance(saved.get(k), dict) for k in ("task", "config")):
        return "search"
    return None


def read_checkpoint(path: Path, kind: str) -> dict:
    """The checkpoint at ``path``, which must be a ``kind`` ("search" or "train") one;
    ConfigError in one line saying what it is otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    saved = load_state_file(path)
    found = checkpoint_kind(saved)
    if found == kind:
        return saved
    if found is not None:
        noun, wanted = _KIND_WORDS[found][0], _KIND_WORDS[kind][0]
        raise ConfigError(f"{path}: a {noun}'s checkpoint, not a {wanted}'s")
    if isinstance(saved, dict) and saved.get("format") not in (None, CHECKPOINT_FORMAT):
        raise ConfigError(f"{path}: checkpoint format {saved['format']} unknown")
    raise ConfigError(f"{path}: not a fastdarts {_KIND_WORDS[kind][1]} checkpoint")


@contextlib.contextmanager
def _stop_on_interrupt(noun: str) -> Iterator[list[bool]]:
    """Within the block a first Ctrl-C only sets the flag yielded (the loop checkpoints at the
    next step boundary and stops: a long step's work is kept); a second stops at once. In
    one process's main thread with Python's own SIGINT handler only (ranks under torchrun
    could stop at different steps and wait on each other)."""
    stop = [False]
    own = (
        distributed.world_size() == 1
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    )
    if not own:
        yield stop
        return

    def first(signum, frame) -> None:
        stop[0] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print(
            f"\ninterrupted: the {noun} stops after this step, with a checkpoint (Ctrl-C again "
            "to stop now)",
            file=sys.stderr,
        )

    signal.signal(signal.SIGINT, first)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class EpochRun:
    """The loop a search and a training run share, over a task with ``begin_epoch(epoch)``,
    ``steps_per_epoch()``, ``epoch_done()``, ``state_dict()``/``load_state_dict()`` and a
    ``model``. Subclasses say what a step, an epoch's end and a checkpoint's extras are."""

    noun = "run"  # what the run folder holds, for messages
    kind = "train"  # its checkpoints' kind (checkpoint_kind)
    cfg: Any  # the run's settings (a RunSettings dataclass with the fields used here)
    task: Any
    device: torch.device  # where it runs, and its backend (fastdarts.ops.backends.Backend)
    backend: Any

    def _open(self, cfg) -> dict | None:
        """Set up the run folder's paths; read the checkpoint to resume from (or None)."""
        self.cfg = cfg
        self.out = Path(cfg.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: a file, not a folder; choose another --out")
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        saved = self._read_checkpoint() if cfg.resume else None
        if not cfg.resume and self.ckpt_path.exists():
            raise ConfigError(
                f"{self.out} already holds a {self.noun} (checkpoint.pt); pass --resume to "
                "continue it, or choose another --out"
            )
        self.step = self.epoch = self.epoch_step = 0
        self.epoch_started = False
        self.last_checkpoint: int | None = None
        return saved

    def _prepare(self, saved: dict | None) -> torch.device:
        """Threads (a resumed run keeps its own unless given), the device, the seeds."""
        threads = self.cfg.threads or (saved["threads"] if saved else None)
        if threads:
            torch.set_num_threads(threads)
        device = resolve_device(self.cfg.device)
        seed_everything(self.cfg.seed)
        return device

    # -- checkpoints -------------------------------------------------------------------------

    def _read_checkpoint(self) -> dict:
        """The checkpoint to resume from: this kind of run's, saved with these settings."""
        if not self.ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint.pt in {self.out} to resume from")
        saved = read_checkpoint(self.ckpt_path, self.kind)
        self._check_saved(saved)
        self._check_settings(saved)
        return saved

    def _check_saved(self, saved: dict) -> None:
        """A subclass's checks of the checkpoint before its settings are compared."""

    def _resolve(self, name: str, device_type: str) -> Any:
        """The backend ``name`` resolves to on ``device_type`` for this kind of run."""
        raise NotImplementedError

    def _accept_equal_backend(self, config: dict) -> None:
        """A backend given on resume that resolves (on this run's device) to the one the
        saved setting resolves to is the same setting: the run goes on with its saved name
        (which it keeps saving: ``auto`` given for ``reference`` must not become the run's
        ``auto``, which another device would resolve otherwise)."""
        if self.cfg.backend == config.get("backend"):
            return
        device_type = resolve_device(self.cfg.device).type

        def resolve(name: str) -> Any:
            return self._resolve(name, device_type)

        try:
            before = resolve(config.get("backend"))
        except ConfigError:  # the saved one cannot run here: nothing to be equal to
            return
        if resolve(self.cfg.backend) is before:
            self.cfg = dataclasses.replace(self.cfg, backend=config["backend"])

    def _check_settings(self, saved: dict) -> None:
        diff = trajectory_mismatch(saved["config"], self.cfg.to_dict())
        if diff:
            shown = ", ".join(f"{k}={saved['config'].get(k)!r}" for k in diff[:4])
            raise ConfigError(
                f"{self.ckpt_path}: saved with other settings ({shown}); resume with the same "
                "flags or choose another --out"
            )

    def _checkpoint_extras(self) -> dict:
        """What a subclass adds to the checkpoint."""
        return {}

    def _checkpoint(self) -> None:
        # A step can leave non-finite weights behind a finite loss: never save those.
        if not all(torch.isfinite(p).all() for p in self.task.model.parameters()):
            self._diverged("the weights are not finite")
        # Every rank builds the state (it may gather across ranks); rank 0 saves it.
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "task": self.task.state_dict(),
            "rng": rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_started": self.epoch_started,
            "epoch_step": self.epoch_step,
            "threads": torch.get_num_threads(),
            "backend": self.backend.name,  # what the setting resolved to: see resume_backend
            **self._checkpoint_extras(),
        }
        if distributed.is_main():
            atomic_torch_save(state, self.ckpt_path)
        self.last_checkpoint = self.step

    def _backend_to_resume(self, saved: dict | None) -> Any:
        """The backend the run takes on its device (after :meth:`_prepare`)."""
        ran = saved.get("backend") if saved else None
        return resume_backend(
            self.cfg.backend, ran, lambda name: self._resolve(name, self.device.type)
        )

    def _restore(self, saved: dict) -> None:
        load_task_state(
            self.task, saved["task"], saved.get("backend"), self.backend, self.ckpt_path
        )
        set_rng_state(saved["rng"])
        self.step, self.epoch = saved["step"], saved["epoch"]
        self.epoch_started, self.epoch_step = saved["epoch_started"], saved["epoch_step"]
        self.last_checkpoint = self.step
        self._truncate_metrics(self.step)
        if distributed.is_main():
            cfg = self.cfg
            done = cfg.max_steps is not None and self.step >= cfg.max_steps
            left = (
                f"; already at --max-steps {cfg.max_steps}: pass a larger one to go on"
                if done
                else "; all its epochs are done"
                if self.epoch >= cfg.epochs
                else ""
            )
            print(
                f"resuming the {self.noun} in {self.out} at step {self.step} (epoch "
                f"{min(self.epoch + 1, cfg.epochs)}/{cfg.epochs}){left}",
                file=sys.stderr,
            )

    def _keep_record(self, record: dict, step: int) -> bool:
        """Whether a metrics record survives a resume from ``step`` (later ones come again)."""
        return record["step"] <= step

    def _truncate_metrics(self, step: int) -> None:
        """Drop the metrics a resume from ``step`` will log again."""
        if not distributed.is_main() or not self.metrics_path.exists():
            return
        lines = [line for line in self.metrics_path.read_text().splitlines() if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if number == len(lines):
                    break  # the record being appended when the run was killed
                raise ConfigError(f"{self.metrics_path}, line {number}: not JSON ({e})") from e
            if self._keep_record(record, step):
                kept.append(line)
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    # -- outputs and checks ------------------------------------------------------------------

    def _start_folder(self) -> None:
        """Create the run folder; a new run writes its settings and empties the metrics."""
        if not distributed.is_main() or (self.cfg.resume and not self._budget_left()):
            return  # a resume already at its --max-steps keeps the settings its steps had
        self.out.mkdir(parents=True, exist_ok=True)
        # Rewritten on resume too: the flags a resume may change (--max-steps, …) are current.
        settings = {**self.cfg.to_dict(), **self._resolved()}
        atomic_write_text(self.out / "config.json", json.dumps(settings, indent=1))
        if not self.cfg.resume:
            self.metrics_path.write_text("")

    def _resolved(self) -> dict:
        """What the settings left to the run and it chose (the device, the backend), under
        ``resolved`` in config.json."""
        return {"resolved": {"device": str(self.device), "backend": self.backend.name}}

    def _log(self, record: dict) -> None:
        if not distributed.is_main():
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_finite(self, metrics: dict) -> None:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            self._diverged(", ".join(f"{k}={v}" for k, v in bad.items()))

    def _diverged(self, what: str, step: int | None = None) -> None:
        kept = (
            f"the last good checkpoint (step {self.last_checkpoint}) is kept in {self.out}"
            if self.last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        step = self.step if step is None else step
        raise DivergedError(
            f"training diverged at step {step} (epoch {self.epoch + 1}): {what}; stopped, "
            f"{kept}; lower the learning rate"
        )

    def _watched(self) -> dict[str, torch.Tensor]:
        """Tensors besides a step's metrics that must stay finite, by name (the searcher's α)."""
        return {}

    # -- the loop ----------------------------------------------------------------------------

    def _budget_left(self) -> bool:
        return self.cfg.max_steps is None or self.step < self.cfg.max_steps

    @property
    def last_epoch(self) -> int:
        """The epoch (from 1) of the last step taken, as metrics.jsonl labels it: the one under
        way (a run stopped by --max-steps), else the last finished (0 before any)."""
        return self.epoch + 1 if self.epoch_started else self.epoch

    def _epoch_finished(self) -> bool:
        cap = self.cfg.epoch_steps
        return self.task.epoch_done() or bool(cap and self.epoch_step >= cap)

    def _run_epochs(
        self,
        step: Callable[[], dict],
        end_epoch: Callable[[], dict],
        epoch_outputs: Callable[[], None] = lambda: None,
    ) -> None:
        """Epochs until ``epochs`` or ``max_steps``: ``step()`` takes one step and returns
        its metrics; after an epoch's last step ``end_epoch()`` evaluates (its metrics are
        logged) and ``epoch_outputs()`` writes what the epoch produced before the checkpoint."""
        with _stop_on_interrupt(self.noun) as stop:
            self._epochs(step, end_epoch, epoch_outputs, stop)

    def _epochs(self, step, end_epoch, epoch_outputs, stop: list[bool]) -> None:
        """:meth:`_run_epochs`' loop; ``stop[0]`` set (Ctrl-C): a checkpoint at the next step
        boundary, then KeyboardInterrupt."""
        cfg, task = self.cfg, self.task
        task.model.train()
        start = time.perf_counter()
        while self.epoch < cfg.epochs and self._budget_left():
            if stop[0]:  # the epoch's end checkpointed
                raise KeyboardInterrupt
            if not self.epoch_started:
                task.begin_epoch(self.epoch)
                self.epoch_started, self.epoch_step = True, 0
            per_epoch = task.steps_per_epoch()
            if cfg.epoch_steps:
                per_epoch = min(per_epoch, cfg.epoch_steps)
            bar = tqdm(
                total=per_epoch,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                disable=None if distributed.is_main() else True,
                dynamic_ncols=True,
                leave=False,
            )
            bar.update(self.epoch_step)
            monitor = StepMonitor(self._watched)
            while not self._epoch_finished() and self._budget_left():
                if stop[0]:
                    self._read(monitor)  # a diverged step is not checkpointed
                    self._checkpoint()
                    raise KeyboardInterrupt
                metrics = step()
                self.step += 1
                self.epoch_step += 1
                monitor.track(self.step, metrics)
                bar.update(1)
                logged = self.step % cfg.log_every == 0 or self.step == 1
                # An epoch's last step checkpoints after the epoch's evaluation instead: one
                # taken before it would, resumed, log the evaluation a second time.
                finished = self._epoch_finished()
                checkpoint = self.step % cfg.checkpoint_every == 0 and not finished
                last = finished or not self._budget_left()
                if not (logged or checkpoint or last):
                    continue
                values = self._read(monitor)
                bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
                if logged:
                    record = {"step": self.step, "epoch": self.epoch + 1, **values}
                    self._log({**record, "time_s": round(time.perf_counter() - start, 3)})
                if checkpoint:
                    self._checkpoint()
            bar.close()
            if not self._epoch_finished():
                break
            evaluation = end_epoch()
            self.epoch += 1
            self.epoch_started = False
            self._log({"step": self.step, "epoch": self.epoch, **evaluation})
            epoch_outputs()
            self._checkpoint()
            summary = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items())
            if distributed.is_main():
                print(f"epoch {self.epoch}/{cfg.epochs}: {summary}", file=sys.stderr)

    def _read(self, monitor: StepMonitor) -> dict[str, float]:
        """The latest step's metrics as numbers (one host read); stops the run, naming the
        step, if any step since the last read left a metric or a watched tensor non-finite."""
        values, bad = monitor.read()
        if bad is not None:
            step, what = bad
            self._diverged(what, step)
        return values

    def _final_checkpoint(self) -> None:
        if self.last_checkpoint != self.step:
            self._checkpoint()


class StepMonitor:
    """Watches a run's steps without reading the device inside them.

    A step returns its metrics as 0-d tensors (left on the device) or numbers; ``track``
    records, on the device, the first step whose tensor metrics or watched tensors were not
    finite (and their values then), and ``read`` fetches that and the latest metrics in one
    host transfer. The loop reads every ``log_every`` steps, at checkpoints and at an epoch's
    end, so a GPU step never waits for the host (an ``.item()`` per step would serialise it).
    """

    def __init__(self, watched: Callable[[], dict[str, torch.Tensor]]) -> None:
        self.watched = watched
        self.latest: dict[str, Any] = {}
        self.names: list[str] = []  # what the device row holds, metrics then watched tensors
        self.watched_names: set[str] = set()
        self.first_bad: torch.Tensor | None = None  # a step number, -1 while all is finite
        self.bad_row: torch.Tensor | None = None
        self.bad_number: tuple[int, str] | None = None  # the first non-finite number metric

    def track(self, step: int, metrics: dict[str, Any]) -> None:
        self.latest = metrics
        if self.bad_number is None:
            bad = [f"{k}={v}" for k, v in metrics.items() if _non_finite_number(v)]
            if bad:
                self.bad_number = (step, ", ".join(bad))
        row = {
            k: v.detach().reshape(()).to(torch.float64)
            for k, v in metrics.items()
            if isinstance(v, torch.Tensor)
        }
        watched = self.watched()
        for name, t in watched.items():
            # NaN in the row stands for "not finite".
            row[name] = torch.where(torch.isfinite(t.detach()).all(), 0.0, math.nan).double()
        if not row:
            return
        values = torch.stack(list(row.values()))
        if self.first_bad is None or list(row) != self.names:
            self.names, self.watched_names = list(row), set(watched)
            self.first_bad = torch.full((), -1, dtype=torch.long, device=values.device)
            self.bad_row = torch.zeros_like(values)
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(values).all()
        self.first_bad = torch.where(newly_bad, step, self.first_bad)
        self.bad_row = torch.where(newly_bad, values, self.bad_row)

    def read(self) -> tuple[dict[str, float], tuple[int, str] | None]:
        """The latest metrics as numbers, and (step, what) of the first non-finite step since
        tracking began, or None."""
        tensors = [k for k, v in self.latest.items() if isinstance(v, torch.Tensor)]
        parts = [self.latest[k].detach().reshape(1).to(torch.float64) for k in tensors]
        if self.first_bad is not None:
            parts = [self.first_bad.reshape(1).double(), self.bad_row, *parts]
        flat = torch.cat(parts).tolist() if parts else []
        bad = self.bad_number
        if self.first_bad is not None:
            first, bad_values = int(flat[0]), flat[1 : 1 + len(self.names)]
            flat = flat[1 + len(self.names) :]
            if first >= 0 and (bad is None or first < bad[0]):
                what = [
                    f"{k} is not finite" if k in self.watched_names else f"{k}={v}"
                    for k, v in zip(self.names, bad_values)
                    if not math.isfinite(v)
                ]
                bad = (first, ", ".join(what))
        read = dict(zip(tensors, flat))
        return {k: read.get(k, v) for k, v in self.latest.items()}, bad


def _non_finite_number(value: Any) -> bool:
    return not isinstance(value, torch.Tensor) and not math.isfinite(value)
