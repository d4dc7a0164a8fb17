"""The training loop: epochs, progress bar, metrics, outputs, checkpoints and resume.

Run folder (the search's conventions):
- ``config.json``: the run's settings; ``genotype.json``: the genotype trained;
- ``metrics.jsonl``: one JSON object per logged step, per epoch evaluation and for the test;
- ``checkpoint.pt``: everything needed to continue exactly (every N steps, each epoch and
  at the end), written atomically and loaded with ``weights_only=True``;
- ``best.pt`` (rnn): the weights with the best validation perplexity so far;
- ``result.json``: the test perplexity (rnn) or error (cnn) at the end of the run.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastdarts import genotypes
from fastdarts.errors import ConfigError, DivergedError
from fastdarts.search.loop import _device, _rng_state, _set_rng_state
from fastdarts.train.config import SPACES, TrainConfig, trajectory_mismatch
from fastdarts.train.tasks import TASKS
from fastdarts.utils import atomic_torch_save, atomic_write_text

CHECKPOINT_FORMAT = 1
KIND = "fastdarts-train"  # tells a training checkpoint from a search one


class Trainer:
    """Trains (or resumes training) one derived network as ``cfg`` says."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg = cfg.resolved()
        self._validate()
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        saved = self._read_checkpoint() if cfg.resume else None
        if not cfg.resume and self.ckpt_path.exists():
            raise ConfigError(
                f"{self.out} already holds a run (checkpoint.pt); pass --resume to continue "
                "it, or choose another --out"
            )
        genotype_file = self.out / "genotype.json"
        spec = genotype_file if cfg.resume and genotype_file.is_file() else cfg.genotype
        self.genotype = genotypes.load_genotype(spec, cfg.space)
        threads = cfg.threads or (saved["threads"] if saved else None)
        if threads:
            torch.set_num_threads(threads)
        self.device = _device(cfg.device)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.task = TASKS[cfg.space](cfg, self.genotype, self.device)
        self.step = self.epoch = self.epoch_step = 0
        self.epoch_started = False
        self.last_checkpoint: int | None = None
        if saved:
            self._restore(saved)

    def _validate(self) -> None:
        cfg = self.cfg
        checks = [
            (cfg.space in SPACES, f"unknown space '{cfg.space}' (choose from rnn, cnn)"),
            (
                cfg.dataset == SPACES.get(cfg.space),
                f"dataset '{cfg.dataset}' does not go with space '{cfg.space}' "
                "(rnn trains on ptb, cnn on cifar10)",
            ),
            (
                cfg.genotype is not None or cfg.resume,
                "--genotype is required (a published name or a file)",
            ),
            (cfg.epochs >= 1, f"--epochs must be at least 1, got {cfg.epochs}"),
            (cfg.batch_size >= 1, f"--batch-size must be positive, got {cfg.batch_size}"),
            (cfg.max_steps is None or cfg.max_steps >= 0, "--max-steps must be non-negative"),
            (cfg.epoch_steps is None or cfg.epoch_steps >= 1, "--epoch-steps must be positive"),
            (cfg.eval_batches is None or cfg.eval_batches >= 1, "--eval-batches must be positive"),
            (cfg.checkpoint_every >= 1, "--checkpoint-every must be positive"),
            (cfg.log_every >= 1, "--log-every must be positive"),
            (cfg.emsize == cfg.nhid, "--emsize and --nhid must be equal (tied weights)"),
            (cfg.nonmono >= 1, f"--nonmono must be at least 1, got {cfg.nonmono}"),
            (cfg.bptt >= 2, f"--bptt must be at least 2, got {cfg.bptt}"),
            (cfg.eval_batch_size >= 1 and cfg.test_batch_size >= 1, "batch sizes must be >= 1"),
            (cfg.layers >= 3, f"--layers must be at least 3, got {cfg.layers}"),
            (cfg.init_channels >= 1, "--init-channels must be positive"),
            (0 <= cfg.drop_path < 1, f"--drop-path must lie in [0, 1), got {cfg.drop_path}"),
            (cfg.cutout >= 0, f"--cutout must be non-negative, got {cfg.cutout}"),
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
        if not isinstance(saved, dict) or saved.get("kind") != KIND:
            raise ConfigError(f"{self.ckpt_path}: not a fastdarts training checkpoint")
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"{self.ckpt_path}: checkpoint format {saved.get('format')} unknown")
        diff = trajectory_mismatch(saved["config"], self.cfg.to_dict())
        if diff:
            shown = ", ".join(f"{k}={saved['config'].get(k)!r}" for k in diff[:4])
            raise ConfigError(
                f"{self.ckpt_path}: saved with other settings ({shown}); resume with the same "
                "flags or choose another --out"
            )
        return saved

    def _checkpoint(self) -> None:
        if not all(torch.isfinite(p).all() for p in self.task.model.parameters()):
            self._diverged("the weights are not finite")
        state = {
            "kind": KIND,
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "task": self.task.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_started": self.epoch_started,
            "epoch_step": self.epoch_step,
            "threads": torch.get_num_threads(),
        }
        atomic_torch_save(state, self.ckpt_path)
        self.last_checkpoint = self.step

    def _restore(self, saved: dict) -> None:
        self.task.load_state_dict(saved["task"])
        _set_rng_state(saved["rng"])
        self.step, self.epoch = saved["step"], saved["epoch"]
        self.epoch_started, self.epoch_step = saved["epoch_started"], saved["epoch_step"]
        self.last_checkpoint = self.step
        self._truncate_metrics(self.step)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint, and test results (both come again)."""
        if not self.metrics_path.exists():
            return
        kept = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if record["step"] <= step and record.get("split") != "test":
                    kept.append(line)
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in kept))

    # -- the loop ----------------------------------------------------------------------------

    def _log(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _check_finite(self, metrics: dict) -> None:
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            self._diverged(", ".join(f"{k}={v}" for k, v in bad.items()))

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

    def _epoch_finished(self) -> bool:
        cap = self.cfg.epoch_steps
        return self.task.epoch_done() or (cap is not None and self.epoch_step >= cap)

    def run(self) -> dict:
        """Train until ``epochs`` or ``max_steps``, then test; returns the test metrics."""
        cfg, task = self.cfg, self.task
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            atomic_write_text(self.out / "config.json", json.dumps(cfg.to_dict(), indent=1))
            genotypes.save_genotype(self.genotype, self.out / "genotype.json")
            self.metrics_path.write_text("")
        task.model.train()
        start = time.perf_counter()
        while self.epoch < cfg.epochs and self._budget_left():
            if not self.epoch_started:
                task.begin_epoch(self.epoch)
                self.epoch_started, self.epoch_step = True, 0
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
            while not self._epoch_finished() and self._budget_left():
                metrics = task.step(self.epoch)
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
            if not self._epoch_finished():
                break
            evaluation, improved = task.end_epoch(cfg.eval_batches)
            self._check_finite(evaluation)
            if improved:
                # Before the checkpoint: a resumed run rewrites it identically if it must.
                atomic_torch_save(task.best_state(), self.out / "best.pt")
            self.epoch += 1
            self.epoch_started = False
            self._log({"step": self.step, "epoch": self.epoch, **evaluation})
            self._checkpoint()
            summary = ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items())
            print(f"epoch {self.epoch}/{cfg.epochs}: {summary}", file=sys.stderr)
        if self.last_checkpoint != self.step:
            self._checkpoint()
        return self._test()

    def _test(self) -> dict:
        best_path = self.out / "best.pt"
        best = None
        if best_path.is_file():
            best = torch.load(best_path, map_location="cpu", weights_only=True)
        result = self.task.test(best, self.cfg.eval_batches)
        self._check_finite(result)
        weights = "best" if best is not None else "final"
        record = {"step": self.step, "epoch": self.epoch, "split": "test", **result}
        self._log(record)
        doc = {**record, "weights": weights, "complete": self.cfg.eval_batches is None}
        atomic_write_text(self.out / "result.json", json.dumps(doc, indent=1) + "\n")
        return doc


def run_training(cfg: TrainConfig) -> dict:
    """Run (or resume, with ``cfg.resume``) a training run; returns the test result."""
    return Trainer(cfg).run()
