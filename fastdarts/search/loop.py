"""The search loop: epochs, progress bar, metrics, outputs, checkpoints and resume.

Run folder:
- ``metrics.jsonl``: one JSON object per logged step and per epoch evaluation;
- ``genotype.json``: the derived genotype, rewritten each epoch and at the end;
- ``alpha.json``: softmax(α) per epoch (and at the end); ``alpha.png``: each edge's op
  weights over the run;
- ``checkpoint.pt``: everything needed to continue exactly (every N steps, each epoch and
  at the end), written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastdarts import genotypes
from fastdarts.errors import ConfigError, DivergedError
from fastdarts.ops.backends import resolve as resolve_backend
from fastdarts.search.config import SearchConfig, trajectory_mismatch
from fastdarts.search.tasks import TASKS, SearchTask
from fastdarts.utils import atomic_torch_save, atomic_write_text

CHECKPOINT_FORMAT = 1
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _rng_state() -> dict:
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


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(state["numpy"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: '{name}' is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    return device


class Searcher:
    """Runs (or resumes) one search as ``cfg`` says; ``run()`` returns the final genotype."""

    def __init__(self, cfg: SearchConfig) -> None:
        self.cfg = cfg = cfg.resolved()
        self._validate()
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        saved = self._read_checkpoint() if cfg.resume else None
        if not cfg.resume and self.ckpt_path.exists():
            raise ConfigError(
                f"{self.out} already holds a search (checkpoint.pt); pass --resume to continue "
                "it, or choose another --out"
            )
        threads = cfg.threads or (saved["threads"] if saved else None)
        if threads:
            torch.set_num_threads(threads)
        self.device = _device(cfg.device)
        resolve_backend(cfg.backend, cfg.space, self.device.type)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.task: SearchTask = TASKS[cfg.space](cfg, self.device, DTYPES[cfg.dtype])
        self.step = self.epoch = 0
        self.epoch_started = False
        self.epoch_step = 0  # steps taken in the current epoch
        self.last_checkpoint = None
        self.history: list[dict] = []
        if saved:
            self._restore(saved)

    def _validate(self) -> None:
        cfg = self.cfg
        checks = [
            (cfg.space in TASKS, f"unknown space '{cfg.space}' (choose from rnn, cnn)"),
            (
                cfg.dataset == {"rnn": "ptb", "cnn": "cifar10"}.get(cfg.space),
                f"dataset '{cfg.dataset}' does not go with space '{cfg.space}' "
                "(rnn searches on ptb, cnn on cifar10)",
            ),
            (cfg.order in (1, 2), f"--order must be 1 or 2, got {cfg.order}"),
            (cfg.dtype in DTYPES, f"--dtype must be float32 or float64, got {cfg.dtype}"),
            (cfg.compat in (None, "darts"), f"--compat must be 'darts', got {cfg.compat}"),
            (cfg.hvp in ("fd", "exact"), f"--hvp must be fd or exact, got {cfg.hvp}"),
            (not (cfg.compat and cfg.hvp == "exact"), "--compat darts needs --hvp fd"),
            (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
            (cfg.batch_size >= 1, f"--batch-size must be positive, got {cfg.batch_size}"),
            (cfg.bptt >= 2, f"--bptt must be at least 2, got {cfg.bptt}"),
            (cfg.checkpoint_every >= 1, "--checkpoint-every must be positive"),
            (cfg.max_steps is None or cfg.max_steps >= 0, "--max-steps must be non-negative"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # -- checkpoints -------------------------------------------------------------------------

    def _read_checkpoint(self) -> dict:
        if not self.ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint.pt in {self.out} to resume from")
        try:
            saved = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged or foreign file: any unpickling error lands here
            raise ConfigError(f"{self.ckpt_path}: not a readable fastdarts checkpoint ({e})") from e
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.ckpt_path}: not a fastdarts checkpoint (format unknown)")
        if saved["config"].get("space") != self.cfg.space:
            raise ConfigError(
                f"{self.ckpt_path}: a checkpoint of the {saved['config'].get('space')} space, "
                f"but this run searches the {self.cfg.space} space"
            )
        diff = trajectory_mismatch(saved["config"], self.cfg.to_dict())
        if diff:
            shown = ", ".join(f"{k}={saved['config'].get(k)!r}" for k in diff[:4])
            raise ConfigError(
                f"{self.ckpt_path}: saved with other settings ({shown}); resume with the same "
                "flags or choose another --out"
            )
        return saved

    def _checkpoint(self) -> None:
        # A step can leave non-finite weights behind a finite loss: never save those.
        if not all(torch.isfinite(p).all() for p in self.task.model.parameters()):
            self._diverged("the weights are not finite")
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "task": self.task.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_started": self.epoch_started,
            "epoch_step": self.epoch_step,
            "history": json.dumps(self.history),
            "threads": torch.get_num_threads(),
        }
        atomic_torch_save(state, self.ckpt_path)
        self.last_checkpoint = self.step

    def _restore(self, saved: dict) -> None:
        self.task.load_state_dict(saved["task"])
        _set_rng_state(saved["rng"])
        self.step, self.epoch = saved["step"], saved["epoch"]
        self.epoch_started, self.epoch_step = saved["epoch_started"], saved["epoch_step"]
        self.history = json.loads(saved["history"])
        self.last_checkpoint = self.step
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint (they will be logged again)."""
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    # -- outputs -----------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _alpha_record(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "alphas": self.task.model.alpha_probs()}

    def _write_outputs(self, final: bool) -> genotypes.Genotype:
        from fastdarts.plot import plot_alpha_history

        genotype = self.task.model.genotype()
        genotypes.save_genotype(genotype, self.out / "genotype.json")
        history = list(self.history)
        if final and (not history or history[-1]["step"] != self.step):
            history.append(self._alpha_record())
        primitives = list(genotypes.PRIMITIVES[self.cfg.space])
        doc = {"space": self.cfg.space, "primitives": primitives, "history": history}
        atomic_write_text(self.out / "alpha.json", json.dumps(doc) + "\n")
        plot_alpha_history(doc, self.out / "alpha.png")
        return genotype

    # -- the loop ----------------------------------------------------------------------------

    def _check_finite(self, metrics: dict) -> None:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        alphas_ok = all(torch.isfinite(a).all() for a in self.task.model.arch_parameters())
        if bad or not alphas_ok:
            self._diverged(", ".join(f"{k}={v}" for k, v in bad.items()) or "α is not finite")

    def _diverged(self, what: str) -> None:
        kept = (
            f"the last good checkpoint (step {self.last_checkpoint}) is kept in {self.out}"
            if self.last_checkpoint is not None
            else "no checkpoint was written yet"
        )
        raise DivergedError(
            f"training diverged at step {self.step} (epoch {self.epoch + 1}): {what}; stopped, "
            f"{kept}; lower the learning rate"
        )

    def _budget_left(self) -> bool:
        return self.cfg.max_steps is None or self.step < self.cfg.max_steps

    def run(self) -> genotypes.Genotype:
        cfg, task = self.cfg, self.task
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=1))
            self.metrics_path.write_text("")
        task.model.train()
        start = time.perf_counter()
        while self.epoch < cfg.epochs and self._budget_left():
            if not self.epoch_started:
                task.begin_epoch(self.epoch)
                self.epoch_started = True
                self.epoch_step = 0
            per_epoch = task.steps_per_epoch()
            if cfg.epoch_steps:
                per_epoch = min(per_epoch, cfg.epoch_steps)
            bar = tqdm(
                total=per_epoch,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                disable=None,
                dynamic_ncols=True,
                leave=False,
            )
            bar.update(self.epoch_step)
            while not task.epoch_done() and self._budget_left():
                if cfg.epoch_steps and self.epoch_step >= cfg.epoch_steps:
                    break
                metrics = task.step()
                self.step += 1
                self.epoch_step += 1
                self._check_finite(metrics)
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
                if self.step % cfg.log_every == 0 or self.step == 1:
                    record = {"step": self.step, "epoch": self.epoch + 1, **metrics}
                    self._log({**record, "time_s": round(time.perf_counter() - start, 3)})
                if self.step % cfg.checkpoint_every == 0:
                    self._checkpoint()
            bar.close()
            finished = task.epoch_done() or (
                cfg.epoch_steps is not None and self.epoch_step >= cfg.epoch_steps
            )
            if not finished:
                break
            evaluation = task.evaluate(cfg.eval_batches)
            self._check_finite(evaluation)
            task.end_epoch()
            self.epoch += 1
            self.epoch_started = False
            self.history.append(self._alpha_record())
            self._log({"step": self.step, "epoch": self.epoch, **evaluation})
            self._write_outputs(final=False)
            self._checkpoint()
            summary = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items())
            print(f"epoch {self.epoch}/{cfg.epochs}: {summary}", file=sys.stderr)
        genotype = self._write_outputs(final=True)
        if self.last_checkpoint != self.step:
            self._checkpoint()
        return genotype


def run_search(cfg: SearchConfig) -> genotypes.Genotype:
    """Run (or resume, with ``cfg.resume``) a search; returns the final genotype."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    return Searcher(cfg).run()
