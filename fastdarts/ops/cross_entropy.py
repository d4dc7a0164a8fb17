"""The fused cross-entropy of the RNN search's decoder: F.cross_entropy(logits, targets)
(the mean over rows of logsumexp(x) − x[t]) for logits (N, V), float32 or float64.

On CUDA with Triton it is two kernels (``fastdarts.kernels.cross_entropy``): the forward
reads the logits once, keeping each row's log-sum-exp, and the backward reads them once
more and writes their gradient; log-softmax, the NLL loss and their backwards move a
logits-sized tensor eight times (977 MiB of a small RNN step's 2,390 on the CUDA code
path, ``benchmarks/results/cuda-path-ops-rnn-small.json`` before this op). The kernels are
the custom ops ``torch.ops.fastdarts.cross_entropy_rows`` and ``cross_entropy_backward``
(fake impls for torch.compile; torch ops off CUDA); one autograd Function ties them
together, with a differentiable backward (under create_graph it takes the torch-op
formula) and a vmap rule that folds the samples into the rows. Elsewhere (the CPU, CUDA
without Triton) :func:`cross_entropy` is F.cross_entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts.ops.extension import triton_kernels, triton_ready
from fastdarts.ops.vmap import batch_first

_DTYPES = (torch.float32, torch.float64)


def _row_targets(targets: Tensor, rows: int) -> Tensor:
    """Row n's target, targets[n mod T] (S samples' rows sharing T = N / S targets)."""
    return targets.repeat(rows // targets.numel())


def rows_reference(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(loss (N,), lse (N,)): each row's logsumexp(x) − x[t] and its log-sum-exp."""
    lse = torch.logsumexp(logits, 1)
    t = _row_targets(targets, logits.shape[0])
    return lse - logits.gather(1, t[:, None]).squeeze(1), lse


def backward_reference(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    """d_logits (N, V) for grad (S,), the gradient of S samples' mean losses over N / S
    consecutive rows each: (softmax(x) − one_hot(t)) · grad / (N / S). Differentiable."""
    n, v = logits.shape
    rows = n // grad.numel()
    g = (grad / rows).repeat_interleave(rows)
    p = torch.exp(logits - lse[:, None])
    # A comparison, not F.one_hot, whose range check reads a value (refused under vmap).
    hot = torch.arange(v, device=logits.device) == _row_targets(targets, n)[:, None]
    return ((p - hot.to(p.dtype)) * g[:, None]).contiguous()


@torch.library.custom_op("fastdarts::cross_entropy_rows", mutates_args=())
def _rows_op(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    if triton_ready(logits.device):
        return triton_kernels("cross_entropy").forward(logits.contiguous(), targets.contiguous())
    return rows_reference(logits, targets)


@_rows_op.register_fake
def _(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return logits.new_empty(logits.shape[0]), logits.new_empty(logits.shape[0])


@torch.library.custom_op("fastdarts::cross_entropy_backward", mutates_args=())
def _backward_op(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    if triton_ready(logits.device):
        args = (logits.contiguous(), targets.contiguous(), lse.contiguous(), grad.contiguous())
        return triton_kernels("cross_entropy").backward(*args)
    return backward_reference(logits, targets, lse, grad)


@_backward_op.register_fake
def _(logits: Tensor, targets: Tensor, lse: Tensor, grad: Tensor) -> Tensor:
    return logits.new_empty(logits.shape)  # contiguous, as both implementations return it


class CrossEntropyFunction(torch.autograd.Function):
    """(S samples' mean losses (S,), each row's log-sum-exp (N,)) for logits (N, V), each
    sample N / S consecutive rows, and targets (T,), row n's at n mod T. Forward and
    backward each one kernel on CUDA; the backward is differentiable; vmap folds the batch
    into the rows."""

    @staticmethod
    def forward(logits: Tensor, targets: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        rows, lse = _rows_op(logits, targets)
        return rows.view(samples, -1).mean(1), lse

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        logits, targets, _ = inputs
        ctx.mark_non_differentiable(output[1])
        # No zeros made for the log-sum-exp's gradient (a launch per backward on CUDA).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, output[1])
        ctx.save_for_forward(logits, targets, output[1])
        ctx.samples = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_lse: None) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None
        logits, targets, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph (double backward, exact HVP): the torch-op formula, with the
            # log-sum-exp recomputed so that it is differentiated too.
            lse = torch.logsumexp(logits, 1)
            return backward_reference(logits, targets, lse, grad), None, None
        return _backward_op(logits, targets, lse, grad), None, None

    @staticmethod
    def jvp(
        ctx, t_logits: Tensor | None, _t_targets: None, _t_samples: None
    ) -> tuple[Tensor | None, ...]:
        """Forward mode (torch.func.jvp, forward-over-reverse), in torch ops: a row's loss
        moves by Σ_v softmax(x)_v t_v − t[target] (the log-sum-exp is not differentiable)."""
        logits, targets, lse = ctx.saved_tensors
        if t_logits is None:
            return None, None
        p = torch.exp(logits - lse[:, None])
        t = _row_targets(targets, logits.shape[0])
        t_rows = (p * t_logits).sum(1) - t_logits.gather(1, t[:, None])[:, 0]
        return t_rows.view(ctx.samples, -1).mean(1), None

    @staticmethod
    def vmap(info, in_dims, logits: Tensor, targets: Tensor, samples: int):
        size, (d_logits, d_targets, _) = info.batch_size, in_dims
        x = batch_first(logits, d_logits, size)
        if d_targets is not None:
            # Each vmap sample's own targets: its rows' (T < N repeated, as row n reads n mod T).
            targets = targets.movedim(d_targets, 0)
            targets = targets.repeat(1, x.shape[1] // targets.shape[1]).reshape(-1)
        loss, lse = CrossEntropyFunction.apply(
            x.reshape(-1, x.shape[-1]).contiguous(), targets, size * samples
        )
        return (loss.view(size, samples), lse.view(size, -1)), (0, 0)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """F.cross_entropy(logits, targets) for logits (N, V) and targets (N,) class indices
    (mean reduction, no weights, ignore index or smoothing): the fused kernels on CUDA with
    Triton (float16/bfloat16 logits computed in float32, as autocast does; a target out of
    range, -100 included, gives a NaN loss, where F.cross_entropy raises, asserts on the
    device or ignores the row), else F.cross_entropy itself (which also takes every other
    form of its arguments)."""
    fused = logits.dim() == 2 and targets.dim() == 1 and targets.dtype == torch.long
    if not (fused and triton_ready(logits.device) and targets.shape[0] == logits.shape[0]):
        return F.cross_entropy(logits, targets)
    if logits.dtype not in _DTYPES:
        logits = logits.float()
    return CrossEntropyFunction.apply(logits, targets, 1)[0].reshape(())
