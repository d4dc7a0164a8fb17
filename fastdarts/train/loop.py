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

import dataclasses
import json

from fastdarts import genotypes
from fastdarts.ops.backends import Backend, resolve
from fastdarts.runs import TRAIN_KIND, EpochRun, check_settings, load_state_file
from fastdarts.train.config import TrainConfig
from fastdarts.train.tasks import TASKS
from fastdarts.utils import atomic_torch_save, atomic_write_text


class Trainer(EpochRun):
    """Trains (or resumes training) one derived network as ``cfg`` says."""

    def __init__(self, cfg: TrainConfig) -> None:
        cfg = cfg.resolved()
        self.validate(cfg)
        saved = self._open(cfg)
        cfg = self.cfg  # a resume keeps the run's own name for a setting given another way
        genotype_file = self.out / "genotype.json"
        spec = genotype_file if cfg.resume and genotype_file.is_file() else cfg.genotype
        self.genotype = genotypes.load_genotype(spec, cfg.space)
        self.device = self._prepare(saved)
        self.backend = self._backend_to_resume(saved)
        self.task = TASKS[cfg.space](cfg, self.genotype, self.device, self.backend)
        if saved:
            self._restore(saved)

    @staticmethod
    def validate(cfg: TrainConfig) -> None:
        """ConfigError unless ``cfg`` (resolved) is a training that can run."""
        more = [
            (
                cfg.genotype is not None or cfg.resume,
                "--genotype is required (a published name or a file)",
            ),
            (cfg.emsize == cfg.nhid, "--emsize and --nhid must be equal (tied weights)"),
            (cfg.nonmono >= 1, f"--nonmono must be at least 1, got {cfg.nonmono}"),
            (cfg.cutout >= 0, f"--cutout must be non-negative, got {cfg.cutout}"),
        ]
        check_settings(cfg, "trains", more)

    # -- checkpoints -------------------------------------------------------------------------

    def _check_saved(self, saved: dict) -> None:
        # A setting given another way that trains the same network the same way is the same
        # (the run goes on with its saved one): the run's genotype by another name or file,
        # a backend resolving (on this run's device) to the one the saved one resolves to.
        config, cfg = saved["config"], self.cfg
        run_genotype = self.out / "genotype.json"
        if cfg.genotype != config.get("genotype") and run_genotype.is_file():
            ours = genotypes.load_genotype(run_genotype, cfg.space)
            if genotypes.load_genotype(cfg.genotype, cfg.space) == ours:
                self.cfg = dataclasses.replace(cfg, genotype=config["genotype"])
        self._accept_equal_backend(config)

    def _resolve(self, name: str, device_type: str) -> Backend:
        return resolve(name, self.cfg.space, device_type, "train")

    def _checkpoint_extras(self) -> dict:
        return {"kind": TRAIN_KIND}

    def _keep_record(self, record: dict, step: int) -> bool:
        # The test results come again at the end of the resumed run.
        return super()._keep_record(record, step) and record.get("split") != "test"

    # -- the loop ----------------------------------------------------------------------------

    def _end_epoch(self) -> dict:
        evaluation, improved = self.task.end_epoch(self.cfg.eval_batches)
        self._check_finite(evaluation)
        if improved:
            # Before the checkpoint: a resumed run rewrites it identically if it must.
            atomic_torch_save(self.task.best_state(), self.out / "best.pt")
        return evaluation

    def run(self) -> dict:
        """Train until ``epochs`` or ``max_steps``, then test; returns the test metrics."""
        self._start_folder()
        if not self.cfg.resume:
            genotypes.save_genotype(self.genotype, self.out / "genotype.json")
        self._run_epochs(self.task.step, self._end_epoch)
        self._final_checkpoint()
        return self._test()

    def _test(self) -> dict:
        best_path = self.out / "best.pt"
        best = None
        if best_path.is_file():
            best = load_state_file(best_path)
        result = self.task.test(best, self.cfg.eval_batches)
        self._check_finite(result)
        weights = "best" if best is not None else "final"
        record = {"step": self.step, "epoch": self.last_epoch, "split": "test", **result}
        self._log(record)
        doc = {**record, "weights": weights, "complete": self.cfg.eval_batches is None}
        atomic_write_text(self.out / "result.json", json.dumps(doc, indent=1) + "\n")
        return doc


def run_training(cfg: TrainConfig) -> dict:
    """Run (or resume, with ``cfg.resume``) a training run; returns the test result."""
    return Trainer(cfg).run()
