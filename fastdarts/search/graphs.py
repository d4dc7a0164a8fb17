"""``--cuda-graphs``: the whole search step (α step, then weight step) replayed from CUDA graphs.

A second-order step launches thousands of small kernels; the GPU waits on the CPU to issue
them. Captured once per batch shape, the step replays as one graph launch.

What makes the step capturable (and what the eager path shares with it, so the CPU tests
run the same code through :class:`GraphedStep` with ``capture=False``):
- the batch goes in through static buffers, one set per (train shape, validation shape);
  the RNN's two sequence lengths (bptt and bptt/2) and an epoch's ragged last batch each get
  their own graph, all in one memory pool. A shape runs eagerly until it has been seen
  ``warmup`` times (cuBLAS and Triton initialise lazily, on a side stream), then it is
  captured, so an epoch's one-off tail does not cost a capture every epoch;
- ξ (η) is a device tensor filled before each replay: the virtual step reads it, and the
  weight optimiser is SGD with ``fused=True``, which takes a tensor learning rate without a
  host read (foreach SGD reads it with ``.item()``); the α optimiser is Adam with
  ``capturable=True`` (its step count on the device);
- the mask sampler's generator is registered with every graph, so each replay draws new
  dropout masks (its Philox offset advances as an eager step's would);
- no host read inside the step (``tests/test_engine.py`` checks it); what the caller keeps
  of a replay's outputs (losses, carried state, logits) is cloned right after it, because
  the next replay of any graph in the pool may reuse that memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastdarts.spaces.base import Batch, SearchOutput

StepFn = Callable[[Batch, Batch, torch.Tensor], tuple[SearchOutput, SearchOutput]]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    train: Batch
    val: Batch
    outputs: tuple[SearchOutput, SearchOutput]


def _key(batch: Batch) -> tuple:
    state = None if batch.state is None else tuple(batch.state.shape)
    return tuple(batch.inputs.shape), tuple(batch.targets.shape), state


def _static_copy(batch: Batch) -> Batch:
    state = None if batch.state is None else batch.state.clone()
    return Batch(batch.inputs.clone(), batch.targets.clone(), state, batch.share)


def _fill(static: Batch, batch: Batch) -> None:
    static.inputs.copy_(batch.inputs)
    static.targets.copy_(batch.targets)
    if static.state is not None:
        static.state.copy_(batch.state)


def _keep(out: SearchOutput) -> SearchOutput:
    """A replay's output, cloned out of the graph's pool (and detached)."""
    return SearchOutput(*(None if t is None else t.detach().clone() for t in out))


class GraphedStep:
    """Runs ``step(train, val, lr)`` — the α step and the weight step, ``lr`` a 0-d device
    tensor — eagerly for a shape's first ``warmup`` occurrences, then from a CUDA graph
    captured for that shape (``capture=True``, CUDA only). With ``capture=False`` every call
    runs eagerly through the same static buffers, which the CPU tests use to check them.

    ``generators``: the generators the step draws from (the mask sampler's), registered
    with each graph so replays draw fresh numbers.
    """

    def __init__(
        self,
        step: StepFn,
        lr: torch.Tensor,
        *,
        capture: bool,
        generators: tuple[torch.Generator, ...] = (),
        warmup: int = 2,
    ) -> None:
        if capture and lr.device.type != "cuda":
            raise ValueError("CUDA graphs need the step on a CUDA device")
        self.step, self.lr, self.capture = step, lr, capture
        self.generators, self.warmup = generators, warmup
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.replays = 0

    def __call__(self, train: Batch, val: Batch, lr: float) -> tuple[SearchOutput, SearchOutput]:
        """One step; returns (validation output, training output), detached."""
        self.lr.fill_(lr)
        key = (_key(train), _key(val))
        graphed = self.graphs.get(key)
        if graphed is None:
            self.seen[key] = self.seen.get(key, 0) + 1
            if self.seen[key] <= self.warmup or not self.capture:
                return self._eager(train, val)
            graphed = self.graphs[key] = self._capture(train, val)
        _fill(graphed.train, train)
        _fill(graphed.val, val)
        graphed.graph.replay()
        self.replays += 1
        return _keep(graphed.outputs[0]), _keep(graphed.outputs[1])

    def _eager(self, train: Batch, val: Batch) -> tuple[SearchOutput, SearchOutput]:
        static_train, static_val = _static_copy(train), _static_copy(val)
        if not self.capture:
            val_out, out = self.step(static_train, static_val, self.lr)
            return _keep(val_out), _keep(out)
        # Warm-up on a side stream, as capture needs (lazy library initialisation).
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            val_out, out = self.step(static_train, static_val, self.lr)
            kept = _keep(val_out), _keep(out)
        torch.cuda.current_stream().wait_stream(side)
        return kept

    def _capture(self, train: Batch, val: Batch) -> _Graph:
        static_train, static_val = _static_copy(train), _static_copy(val)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step(static_train, static_val, self.lr)
        # Capture recorded the step without running it: the caller replays it next.
        return _Graph(graph, static_train, static_val, outputs)
