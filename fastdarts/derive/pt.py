"""Perturbation-based architecture selection (DARTS-PT; Wang et al., ICLR 2021).

Instead of reading the genotype off α, measure what each op contributes to the trained
supernet. In rounds, each deciding one edge of every cell (a seeded random order per cell):
remove each candidate op and measure the validation metric; keep the op whose removal hurts
most and project the edge onto it; then fine-tune the supernet. Once every edge is decided,
rounds decide one node of every cell: remove each incoming edge in turn and keep the ``k``
edges whose removal hurts most (1 per node in the recurrent cell, 2 in the convolutional
one), fine-tuning again after each round.

Everything is done through α, with no change to the supernet code. softmax puts exactly
zero weight on an entry of -inf, and ``none`` contributes exactly zero to every mixture
(the recurrent mixture skips it; the convolutional ``none`` multiplies by 0), so:

- removing op k (DARTS-PT's masking: its weight becomes 0, the others keep theirs) sets
  α_k = -inf and α_none = logsumexp(α_none, α_k): the softmax is unchanged except that
  op k's weight has moved to ``none`` (equal to the masked weights up to one rounding);
- projecting an edge onto op k sets its α row to -inf except 0 at k (weights exactly
  one-hot); removing an edge puts all its weight on ``none`` (its output is exactly 0).

Fine-tuning takes the search's own steps, α then weights (its data order, dropout masks,
backend), as DARTS-PT's code does: first-order α steps whatever the search's order (its
architect refuses second order there), the α optimiser's state carried on from the search,
and the weight optimiser restarted at a tenth of the search's learning rate (it resets the
optimiser at lr/10; its cosine schedule is made but never stepped, so the rate stays there).
α goes on training on the undecided edges; the decided rows are held where the decisions
put them (their gradient is exactly zero, but Adam's weight decay would move them: each α
step puts them back).

Fine-tuning lasts ``tune_steps`` steps; by default 5 epochs for the convolutional cell
(``proj_intv`` in DARTS-PT's script for the DARTS space) and 1 for the recurrent one, which
DARTS-PT did not search: its 36 edges make 43 rounds (the convolutional cells take 17).
DARTS-PT's code also tunes an epoch after the last round, which changes no decision: here
the selection ends there. Other departures from that code: it measures on freshly
augmented (crop, flip) and reshuffled validation batches, here the task's evaluation runs
unaugmented batches in a fixed order (the same score for the same supernet); an accuracy
tie goes to the lower index there, here to the higher loss; it removes a node's edges one
by one, measuring again between removals (which changes nothing but the noise of its
augmented measurements), here one measurement per edge keeps the ``k`` most harmful; its
DARTS space leaves ``none`` out (7 ops), this one is DARTS's own (8).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastdarts.errors import ConfigError, DivergedError
from fastdarts.genotypes import CNN_STEPS, PRIMITIVES, RNN_STEPS, Genotype, save_genotype
from fastdarts.ops.backends import resolve as resolve_backend
from fastdarts.runs import (
    load_state_file,
    load_task_state,
    read_checkpoint,
    resolve_device,
    resume_backend,
    rng_state,
    seed_everything,
    set_rng_state,
)
from fastdarts.search.config import SearchConfig
from fastdarts.search.loop import DTYPES
from fastdarts.search.tasks import TASKS, SearchTask
from fastdarts.utils import atomic_torch_save, atomic_write_text


@dataclass(frozen=True)
class CellShape:
    """One α matrix's cell: intermediate nodes, inputs before them, edges kept per node."""

    steps: int
    n_inputs: int
    keep: int

    def edges_of(self, node: int) -> range:
        """The α rows of ``node``'s incoming edges (edges are ordered node by node)."""
        start = sum(self.n_inputs + i for i in range(node))
        return range(start, start + self.n_inputs + node)

    @property
    def n_edges(self) -> int:
        return sum(self.n_inputs + i for i in range(self.steps))


CELLS: dict[str, dict[str, CellShape]] = {
    "rnn": {"alphas_recurrent": CellShape(RNN_STEPS, 1, 1)},
    "cnn": {
        "alphas_normal": CellShape(CNN_STEPS, 2, 2),
        "alphas_reduce": CellShape(CNN_STEPS, 2, 2),
    },
}


@dataclass(frozen=True)
class Decision:
    """One selection: the op of edge ``index`` (kind "op") or the edges of node ``index``,
    in round ``round`` (the supernet is fine-tuned between rounds)."""

    kind: str
    alpha: str
    index: int
    round: int


def plan(cells: dict[str, CellShape], seed: int, order: str = "random") -> list[Decision]:
    """DARTS-PT's rounds: each decides one edge's op in every cell until all are decided,
    then each decides one node's edges in every cell (nodes with no more inputs than they
    keep are skipped). Edges and nodes come in a seeded random order per cell (DARTS-PT's
    random edge decision), or in index order; within a round, cells in ``cells``' order."""
    rng = np.random.default_rng(seed)
    decisions: list[Decision] = []
    for kind in ("op", "edge"):
        queues = []
        for name, shape in cells.items():
            if kind == "op":
                items = list(range(shape.n_edges))
            else:
                items = [n for n in range(shape.steps) if shape.n_inputs + n > shape.keep]
            if order == "random":
                items = [items[i] for i in rng.permutation(len(items))]
            queues.append((name, items))
        first = decisions[-1].round + 1 if decisions else 0
        for k in range(max(len(items) for _, items in queues)):
            decisions += [
                Decision(kind, n, items[k], first + k) for n, items in queues if k < len(items)
            ]
    return decisions


def removed_op(row: torch.Tensor, k: int, none: int) -> torch.Tensor:
    """α row (K,) with op k's softmax weight moved onto ``none`` (others unchanged)."""
    out = row.clone()
    out[none] = torch.logaddexp(row[none], row[k])
    out[k] = -math.inf
    return out


def one_hot(row: torch.Tensor, k: int) -> torch.Tensor:
    """An α row whose softmax is exactly one-hot at k."""
    out = torch.full_like(row, -math.inf)
    out[k] = 0.0
    return out


Evaluate = Callable[[], dict[str, float]]  # -> {"loss": ..., "acc": ... (cnn)}


def harm_key(metrics: dict[str, float], crit: str) -> tuple[float, ...]:
    """Larger = the removal hurt more: higher loss, or lower accuracy (then higher loss)."""
    if crit == "acc":
        return (-metrics["acc"], metrics["loss"])
    return (metrics["loss"],)


class Selector:
    """Applies decisions to a supernet's α in place.

    ``arch`` maps each α name to its parameter (E, K); ``evaluate`` measures the supernet
    as it stands. Each decision measures every candidate's removal, keeps the most harmful
    removal's candidate(s) (ties to the lower index), and projects α onto the choice.
    """

    def __init__(
        self,
        arch: dict[str, torch.nn.Parameter],
        cells: dict[str, CellShape],
        evaluate: Evaluate,
        primitives: Sequence[str],
        crit: str = "loss",
    ) -> None:
        self.arch, self.cells, self.evaluate = arch, cells, evaluate
        self.primitives, self.crit = list(primitives), crit
        self.none = self.primitives.index("none")

    def _score(self, alpha: torch.nn.Parameter, rows: dict[int, torch.Tensor]) -> dict:
        """Metrics with the given α rows swapped in; α is restored bit for bit after."""
        saved = {e: alpha.data[e].clone() for e in rows}
        try:
            for e, row in rows.items():
                alpha.data[e] = row
            return self.evaluate()
        finally:
            for e, row in saved.items():
                alpha.data[e] = row

    def decide(self, decision: Decision) -> dict:
        """Measure, choose and project; returns a JSON-ready record of the decision."""
        alpha = self.arch[decision.alpha]
        shape = self.cells[decision.alpha]
        if decision.kind == "op":
            e = decision.index
            candidates = [k for k in range(len(self.primitives)) if k != self.none]
            scores = [
                self._score(alpha, {e: removed_op(alpha.data[e], k, self.none)}) for k in candidates
            ]
            keep = 1
        else:
            candidates = list(shape.edges_of(decision.index))
            scores = [
                self._score(alpha, {e: one_hot(alpha.data[e], self.none)}) for e in candidates
            ]
            keep = shape.keep
        keys = [harm_key(s, self.crit) for s in scores]
        # Stable sort on descending harm: ties keep the lower candidate first.
        ranked = sorted(range(len(candidates)), key=lambda i: tuple(-x for x in keys[i]))
        chosen = sorted(candidates[i] for i in ranked[:keep])
        with torch.no_grad():
            if decision.kind == "op":
                alpha.data[decision.index] = one_hot(alpha.data[decision.index], chosen[0])
            else:
                for e in candidates:
                    if e not in chosen:
                        alpha.data[e] = one_hot(alpha.data[e], self.none)
        names = [self.primitives[k] for k in candidates] if decision.kind == "op" else candidates
        return {
            "round": decision.round,
            "kind": decision.kind,
            "alpha": decision.alpha,
            "index": decision.index,
            "candidates": names,
            "scores": scores,
            "chosen": [names[candidates.index(c)] for c in chosen],
        }


# -- running it on a search's checkpoint ------------------------------------------------------

STATE_KIND = "fastdarts-pt"
STATE_FILE = "pt_state.pt"  # in the run folder: the selection's progress, for --resume
DECISIONS_FILE = "pt_decisions.json"  # every decision with its candidates' scores
TUNE_EPOCHS = {"cnn": 5, "rnn": 1}  # fine-tuning between rounds by default (see the top)


@dataclass
class PTConfig:
    """Settings of a DARTS-PT selection on the search run in ``run``."""

    run: str
    space: str | None = None  # the search's space, if given: checked
    out: str | None = None  # genotype JSON (default: RUN/genotype-pt.json)
    tune_steps: int | None = None  # search steps after each round (default: see the module)
    eval_batches: int | None = None  # validation batches per measurement (default: all)
    crit: str | None = None  # loss or acc (default: loss for rnn, acc for cnn)
    order: str = "random"
    seed: int = 0
    device: str | None = None
    data: str | None = None
    threads: int | None = None
    resume: bool = False
    max_decisions: int | None = None  # stop after this many in all (resume to go on)

    def trajectory(self) -> dict:
        """The settings a resumed selection must share with the one it continues."""
        keys = ("tune_steps", "eval_batches", "crit", "order", "seed")
        return {k: getattr(self, k) for k in keys}


def decided_rows(decision: Decision, cells: dict[str, CellShape]) -> range:
    """The α rows ``decision`` fixes: its edge, or every incoming edge of its node."""
    if decision.kind == "op":
        return range(decision.index, decision.index + 1)
    return cells[decision.alpha].edges_of(decision.index)


class TaskSupernet:
    """The search task's supernet as DARTS-PT uses it: measured on the validation data,
    fine-tuned with the search's own steps (α and weights) at ``TUNE_LR`` times its
    learning rate, the decided α rows held where the decisions put them."""

    TUNE_LR = 0.1

    def __init__(self, task: SearchTask, space: str, eval_batches: int | None) -> None:
        self.task, self.space, self.eval_batches = task, space, eval_batches
        self.epoch = 0  # fine-tuning epochs begun (the data order's epoch index)
        self.arch = dict(task.model.named_arch_parameters())
        # Per α matrix: which rows are decided (E, 1), and α as the latest decision left it.
        self.held = {
            name: torch.zeros(len(a), 1, dtype=torch.bool, device=a.device)
            for name, a in self.arch.items()
        }
        self.held_values = {name: a.detach().clone() for name, a in self.arch.items()}
        task.arch_optimizer.register_step_post_hook(self._restore_held)

    def hold(self, name: str, rows: range) -> None:
        """From now on α ``name``'s ``rows`` keep their present values through tuning."""
        self.held[name][rows.start : rows.stop] = True
        self.held_values[name] = self.arch[name].detach().clone()

    @torch.no_grad()
    def _restore_held(self, optimizer: torch.optim.Optimizer, *_) -> None:
        # After each α step: the decided rows back (-inf entries under Adam's weight decay
        # become NaN; their gradient is exactly 0, so nothing else moves them) and their
        # moments zeroed, so the optimiser's state stays finite. No host sync (torch.where).
        for name, mask in self.held.items():
            alpha = self.arch[name]
            alpha.copy_(torch.where(mask, self.held_values[name], alpha))
            state = optimizer.state.get(alpha, {})
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state:
                    state[key].masked_fill_(mask, 0.0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """rnn: validation loss, BatchNorm on running statistics (as the search reports);
        cnn: loss and accuracy on the α half, BatchNorm on batch statistics and not
        updated (DARTS-PT's choice: running statistics do not fit a perturbed supernet)."""
        if self.space == "rnn":
            return {"loss": self.task.evaluate(self.eval_batches)["valid_loss"]}
        measured = self.task.evaluate(self.eval_batches, batch_stats=True)
        return {"loss": measured["valid_loss"], "acc": measured["valid_acc"]}

    def restart_optimizer(self) -> None:
        """Forget the search's momentum (DARTS-PT's reset optimiser): once, before the
        first decision's tuning."""
        self.task.weight_optimizer.state.clear()

    def tune(self, steps: int) -> None:
        """``steps`` search steps (α, then weights), continuing the search's data order."""
        task = self.task
        task.model.train()
        for _ in tqdm(range(steps), desc="fine-tuning", leave=False, disable=None):
            if task.epoch_done():
                self.epoch += 1
                task.begin_epoch(self.epoch)
            loss = float(task.step(base_lr=task.cfg.lr * self.TUNE_LR)["loss"])
            if not math.isfinite(loss):
                raise DivergedError(
                    f"fine-tuning diverged (loss {loss}); lower the search's learning rate "
                    "or --tune-steps"
                )


def run_pt(cfg: PTConfig) -> tuple[Genotype | None, list[dict]]:
    """DARTS-PT on the search run ``cfg.run``: returns the genotype (None if stopped early
    by ``max_decisions``) and the decisions so far, and writes both. Progress is saved
    atomically after each decision; ``cfg.resume`` continues it exactly."""
    run = Path(cfg.run)
    saved = read_checkpoint(run / "checkpoint.pt", "search")
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    settings = {k: v for k, v in saved["config"].items() if k in known}
    space = settings["space"]
    if cfg.space is not None and cfg.space != space:
        raise ConfigError(
            f"{run / 'checkpoint.pt'}: a search of the {space} space, but --space is {cfg.space}"
        )
    for key in ("data", "device", "threads"):
        if getattr(cfg, key) is not None:
            settings[key] = getattr(cfg, key)
    # Tuning takes first-order α steps, as DARTS-PT's code does whatever the search took
    # (its architect refuses second order there), and no captured graph: the α rows it holds
    # change with every decision, which a graph would not see.
    settings["order"], settings["cuda_graphs"] = 1, False
    search_cfg = SearchConfig(**settings).resolved()
    crit = cfg.crit or ("loss" if space == "rnn" else "acc")
    if crit not in ("loss", "acc") or (crit == "acc" and space == "rnn"):
        raise ConfigError(f"--crit {crit}: choose loss (rnn, cnn) or acc (cnn)")
    if cfg.order not in ("random", "sequential"):
        raise ConfigError(f"--order must be random or sequential, got {cfg.order}")
    cfg = dataclasses.replace(cfg, crit=crit)
    state_path = run / STATE_FILE
    state = None
    if cfg.resume:
        state = _read_state(state_path)
    elif state_path.exists():
        raise ConfigError(
            f"{state_path}: a selection was started here; pass --resume to continue it, or "
            "delete it to start again"
        )
    threads = search_cfg.threads or saved.get("threads")
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(search_cfg.device)
    ran = saved.get("backend")
    backend = resume_backend(
        search_cfg.backend, ran, lambda name: resolve_backend(name, space, device.type)
    )
    task = TASKS[space](search_cfg, device, DTYPES[search_cfg.dtype], backend=backend)
    load_task_state(task, saved["task"], ran, backend, run / "checkpoint.pt")
    if cfg.tune_steps is None:
        cfg = dataclasses.replace(cfg, tune_steps=TUNE_EPOCHS[space] * task.steps_per_epoch())
    supernet = TaskSupernet(task, space, cfg.eval_batches)
    seed_everything(cfg.seed)
    cells = CELLS[space]
    decisions = plan(cells, cfg.seed, cfg.order)
    plan_doc = json.dumps([dataclasses.astuple(d) for d in decisions])
    records: list[dict] = []
    if state is not None:
        if state["search_step"] != saved["step"]:
            raise ConfigError(
                f"{state_path}: started on the search at step {state['search_step']}, but "
                f"its checkpoint is now at step {saved['step']}; delete it to start again"
            )
        if state.get("plan") != plan_doc:
            raise ConfigError(
                f"{state_path}: started by an older fastdarts, which orders the decisions "
                "otherwise; delete it to start again"
            )
        if state["settings"] != cfg.trajectory():
            theirs = ", ".join(f"{k}={v!r}" for k, v in state["settings"].items())
            raise ConfigError(
                f"{state_path}: started with other settings ({theirs}); resume with those"
            )
        task.load_state_dict(state["task"])
        supernet.epoch = state["epoch"]
        records = json.loads(state["records"])
        set_rng_state(state["rng"])
    else:
        supernet.restart_optimizer()
    selector = Selector(supernet.arch, cells, supernet.evaluate, PRIMITIVES[space], crit)
    for done in decisions[: len(records)]:
        supernet.hold(done.alpha, decided_rows(done, cells))
    bar = tqdm(total=len(decisions), initial=len(records), desc="DARTS-PT", disable=None)
    for i in range(len(records), len(decisions)):
        if cfg.max_decisions is not None and i >= cfg.max_decisions:
            break
        record = selector.decide(decisions[i])
        supernet.hold(decisions[i].alpha, decided_rows(decisions[i], cells))
        if i + 1 < len(decisions) and decisions[i + 1].round != decisions[i].round:
            supernet.tune(cfg.tune_steps)
        records.append(record)
        state = {
            "kind": STATE_KIND,
            "settings": cfg.trajectory(),
            "plan": plan_doc,
            "search_step": saved["step"],
            "task": task.state_dict(),
            "epoch": supernet.epoch,
            "records": json.dumps(records),
            "rng": rng_state(),
        }
        atomic_torch_save(state, state_path)
        atomic_write_text(run / DECISIONS_FILE, json.dumps(records, indent=1) + "\n")
        bar.update(1)
        bar.set_postfix_str(
            f"{record['alpha']} {record['kind']} {record['index']}: {record['chosen']}"
        )
    bar.close()
    if len(records) < len(decisions):
        return None, records
    genotype = task.model.genotype()
    save_genotype(genotype, Path(cfg.out) if cfg.out else run / "genotype-pt.json")
    return genotype, records


def _read_state(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--resume: no {STATE_FILE} in {path.parent} to resume from")
    state = load_state_file(path, "DARTS-PT state")
    if not isinstance(state, dict) or state.get("kind") != STATE_KIND:
        raise ConfigError(f"{path}: not a DARTS-PT state file")
    return state
