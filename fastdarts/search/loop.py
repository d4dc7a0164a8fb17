"""The search loop: epochs, progress bar, metrics, outputs, checkpoints and resume.

Run folder (see :mod:`fastdarts.runs` for what every run writes):
- ``metrics.jsonl``: one JSON object per logged step and per epoch evaluation;
- ``genotype.json``: the derived genotype, rewritten each epoch and at the end;
- ``alpha.json``: softmax(α) per epoch (and at the end); ``alpha.png``: each edge's op
  weights over the run;
- ``checkpoint.pt``: everything needed to continue exactly (every N steps, each epoch and
  at the end), written atomically and loaded with ``weights_only=True``.

Under torchrun every rank runs the search on its shard of each batch
(:mod:`fastdarts.distributed`); only rank 0 writes the run folder. The checkpoint holds the
global state (weights, α, optimisers and generators are the same on every rank; the RNN's
hidden states are gathered from all ranks), so a run resumes with any number of processes
that divides the batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from fastdarts import distributed, genotypes
from fastdarts.errors import ConfigError
from fastdarts.ops.backends import Backend
from fastdarts.ops.backends import resolve as resolve_backend
from fastdarts.runs import EpochRun, check_settings
from fastdarts.search.architect import AMP_MODES, COMPAT_MODES, HVP_MODES
from fastdarts.search.config import SearchConfig
from fastdarts.search.tasks import TASKS, SearchTask
from fastdarts.utils import atomic_write_text

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Searcher(EpochRun):
    """Runs (or resumes) one search as ``cfg`` says; ``run()`` returns the final genotype."""

    noun = "search"
    kind = "search"

    def __init__(self, cfg: SearchConfig) -> None:
        cfg = cfg.resolved()
        self.validate(cfg)
        saved = self._open(cfg)
        cfg = self.cfg  # a resume keeps the run's own name for a setting given another way
        self.device = distributed.init(self._prepare(saved))
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ConfigError(f"--cuda-graphs needs a CUDA device; this run is on {self.device}")
        self.backend = self._backend_to_resume(saved)
        self.task: SearchTask = TASKS[cfg.space](
            cfg, self.device, DTYPES[cfg.dtype], backend=self.backend
        )
        self.history: list[dict] = []
        if saved:
            self._restore(saved)

    @staticmethod
    def validate(cfg: SearchConfig) -> None:
        """ConfigError unless ``cfg`` (resolved) is a search that can run."""
        more = [
            (cfg.order in (1, 2), f"--order must be 1 or 2, got {cfg.order}"),
            (cfg.dtype in DTYPES, f"--dtype must be float32 or float64, got {cfg.dtype}"),
            (
                cfg.compat in (None, *COMPAT_MODES),
                f"--compat must be one of {', '.join(COMPAT_MODES)}, got {cfg.compat}",
            ),
            (cfg.hvp in HVP_MODES, f"--hvp must be one of {', '.join(HVP_MODES)}, got {cfg.hvp}"),
            (cfg.amp in AMP_MODES, f"--amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp}"),
            (not (cfg.compat and cfg.hvp == "exact"), "--compat darts needs --hvp fd"),
            (not (cfg.compat and cfg.cuda_graphs), "--compat darts cannot run in CUDA graphs"),
            (
                not (cfg.compat and cfg.batched_fd),
                "--compat darts runs w+ and w- one after the other (not --batched-fd)",
            ),
            (
                not (cfg.compat and cfg.foreach),
                "--compat darts steps the weights one by one, as the published code (not "
                "--foreach)",
            ),
            # Flags that would change nothing: said, not silently ignored.
            (
                not (cfg.order == 1 and (cfg.hvp == "exact" or cfg.batched_fd)),
                "--hvp exact and --batched-fd are for --order 2 (first order has no "
                "Hessian-vector product)",
            ),
            (
                not (cfg.amp != "off" and cfg.dtype == "float64"),
                f"--amp {cfg.amp} autocasts float32 weights; with --dtype float64 it does nothing",
            ),
            (
                cfg.batch_size % distributed.env_world_size() == 0,
                f"--batch-size {cfg.batch_size} is not divisible by the "
                f"{distributed.env_world_size()} processes (each takes an equal shard)",
            ),
            (
                not cfg.sync_bn or cfg.backend == "reference",
                "--sync-bn runs with --backend reference only (the fused ops normalise "
                "inside their kernels)",
            ),
            (
                not (cfg.sync_bn and cfg.batched_fd),
                "--sync-bn cannot run with --batched-fd (collectives cannot run under vmap)",
            ),
            (
                not (cfg.cuda_graphs and distributed.env_world_size() > 1),
                "--cuda-graphs runs in one process (not yet under torchrun)",
            ),
        ]
        check_settings(cfg, "searches", more)

    # -- checkpoints -------------------------------------------------------------------------

    def _check_saved(self, saved: dict) -> None:
        if saved["config"].get("space") != self.cfg.space:
            raise ConfigError(
                f"{self.ckpt_path}: a checkpoint of the {saved['config'].get('space')} space, "
                f"but this run searches the {self.cfg.space} space"
            )
        # A checkpoint from before --sync-bn existed ran without it.
        saved["config"].setdefault("sync_bn", False)
        self._accept_equal_backend(saved["config"])

    def _resolve(self, name: str, device_type: str) -> Backend:
        return resolve_backend(name, self.cfg.space, device_type)

    def _checkpoint_extras(self) -> dict:
        return {"history": json.dumps(self.history), "world_size": distributed.world_size()}

    def _restore(self, saved: dict) -> None:
        super()._restore(saved)
        self.history = json.loads(saved["history"])
        before, now = saved.get("world_size", 1), distributed.world_size()
        if before != now and distributed.is_main():
            print(
                f"note: resuming a search of {before} process(es) with {now}; the state is "
                "global, but each shard's BatchNorm statistics change with the shard size "
                "(unless --sync-bn)",
                file=sys.stderr,
            )

    # -- outputs -----------------------------------------------------------------------------

    def _alpha_record(self) -> dict:
        alphas = self.task.model.alpha_probs()
        return {"epoch": self.last_epoch, "step": self.step, "alphas": alphas}

    def _write_outputs(self, final: bool) -> genotypes.Genotype:
        from fastdarts.plot import plot_alpha_history

        genotype = self.task.model.genotype()
        if not distributed.is_main():
            return genotype
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

    def _watched(self) -> dict[str, torch.Tensor]:
        return dict(self.task.model.named_arch_parameters())

    def _end_epoch(self) -> dict:
        evaluation = self.task.evaluate(self.cfg.eval_batches)
        self._check_finite(evaluation)
        self.task.end_epoch()
        return evaluation

    def _epoch_outputs(self) -> None:
        self.history.append(self._alpha_record())
        self._write_outputs(final=False)

    def run(self) -> genotypes.Genotype:
        self._start_folder()
        self._run_epochs(self.task.step, self._end_epoch, self._epoch_outputs)
        genotype = self._write_outputs(final=True)
        self._final_checkpoint()
        return genotype


def run_search(cfg: SearchConfig) -> genotypes.Genotype:
    """Run (or resume, with ``cfg.resume``) a search; returns the final genotype."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    return Searcher(cfg).run()
