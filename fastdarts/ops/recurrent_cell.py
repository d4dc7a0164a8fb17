"""The whole recurrent search cell in one op: every time step, node, mixture and BatchNorm.

The node op (:mod:`fastdarts.ops.recurrent_mixed`) fuses one node's mixture; around it the
cell still dispatches the masks, the projection, the BatchNorm, the state concatenation and
their backward ops, for every node of every time step (about 35 ops per node and pass; the
node kernel is one of them). ``fastdarts::recurrent_cell`` runs the cell over the whole
sequence in one C++ call (``csrc/recurrent_cell.cpp``): per time step one at::mm per
projection (9 forward, 18 backward) and no other dispatched op. It reproduces the shared
BatchNorm exactly, including the order and formula of its running-statistic updates, so a
search gives the same result as the reference.

Only the CPU has this kernel; elsewhere (and without the extension) :func:`recurrent_cell`
runs the cell node by node with the fused node op. Its backward is differentiable: under
create_graph it recomputes the cell node by node in differentiable ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts.ops.extension import extension
from fastdarts.ops.recurrent_mixed import recurrent_mixed
from fastdarts.spaces.rnn import RecurrentSearchCell, cell_forward_nodes


def cell_kernel_ready(device: torch.device) -> bool:
    """Whether the whole-cell kernel runs on ``device`` (the CPU, with the extension)."""
    return device.type == "cpu" and hasattr(extension(), "recurrent_cell_forward")


def _shapes(inputs: Tensor, hidden: Tensor, n_nodes: int):
    t, b, _ = inputs.shape
    d = hidden.shape[1]
    e = n_nodes * (n_nodes + 1) // 2
    return [(t, b, d), (t, n_nodes + 1, b, d), (t, e, b, 2 * d), (t, b, 2 * d), (t, n_nodes + 1, d)]


@torch.library.custom_op(
    "fastdarts::recurrent_cell", mutates_args=("running_mean", "running_var", "num_batches_tracked")
)
def _forward_op(
    inputs: Tensor,
    hidden: Tensor,
    probs: Tensor,
    x_mask: Tensor | None,
    h_mask: Tensor | None,
    w0: Tensor,
    ws: list[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    training: bool,
    update: bool,
    momentum: float,
    eps: float,
) -> list[Tensor]:
    """(hiddens (T, B, D), states (T, S+1, B, D), ch (T, E, B, 2D), c0h0 (T, B, 2D),
    invstd (T, S+1, D)); the last four are what backward needs."""
    outs = [inputs.new_empty(s) for s in _shapes(inputs, hidden, len(ws))]
    extension().recurrent_cell_forward(
        inputs, hidden, probs, x_mask, h_mask, w0, ws, running_mean, running_var,
        num_batches_tracked, training, update, momentum, eps, *outs,
    )  # fmt: skip
    return outs


@_forward_op.register_fake
def _(inputs, hidden, probs, x_mask, h_mask, w0, ws, *bn_args) -> list[Tensor]:
    return [inputs.new_empty(s) for s in _shapes(inputs, hidden, len(ws))]


@torch.library.custom_op("fastdarts::recurrent_cell_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    inputs: Tensor,
    hidden: Tensor,
    probs: Tensor,
    x_mask: Tensor | None,
    h_mask: Tensor | None,
    w0: Tensor,
    ws: list[Tensor],
    saved: list[Tensor],
    training: bool,
) -> list[Tensor]:
    """[d_inputs, d_hidden, d_probs, d_w0, *d_ws] from grad (T, B, D) and the forward's
    outputs ``saved``."""
    grads = [torch.empty_like(t) for t in (inputs, hidden, probs, w0, *ws)]
    extension().recurrent_cell_backward(
        grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, *saved, training, *grads[:4],
        grads[4:],
    )  # fmt: skip
    return grads


@_backward_op.register_fake
def _(grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, saved, training) -> list[Tensor]:
    return [torch.empty_like(t) for t in (inputs, hidden, probs, w0, *ws)]


class RecurrentCellFunction(torch.autograd.Function):
    """The cell over a sequence; forward and backward each one kernel call. ``bn`` is
    (running_mean, running_var, num_batches_tracked, training, update, momentum, eps).

    Returns the forward op's five outputs; only the first (hiddens) is differentiable.
    Under vmap (the batched w± passes, weights stacked on a leading dim) it runs the kernel
    once per sample: each sample has its own weights, so its matmuls are separate anyway.
    """

    @staticmethod
    def forward(bn, inputs, hidden, probs, x_mask, h_mask, w0, *ws):
        return tuple(_forward_op(inputs, hidden, probs, x_mask, h_mask, w0, list(ws), *bn))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        bn, *tensors = inputs
        ctx.bn = bn
        ctx.n_nodes = len(tensors) - 6
        ctx.save_for_backward(*tensors, *output)
        ctx.mark_non_differentiable(*output[1:])
        # Autograd would otherwise fill zero gradients for the four saved outputs (ch alone
        # is T·E·B·2D: 110 MB at the paper's size, 18 ms to fill, per backward).
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_):
        saved = ctx.saved_tensors
        if grad is None:
            return (None,) * (7 + ctx.n_nodes)
        inputs, hidden, probs, x_mask, h_mask, w0 = saved[:6]
        ws = list(saved[6 : 6 + ctx.n_nodes])
        outs = list(saved[6 + ctx.n_nodes :])
        running_mean, running_var, _, training, *_ = ctx.bn
        if torch.is_grad_enabled():
            # create_graph (double backward, exact HVP): the kernel is not differentiable;
            # recompute node by node in differentiable ops (no running-statistic update).
            return (None, *_differentiable_backward(ctx, grad, running_mean, running_var))
        d_inputs, d_hidden, d_probs, d_w0, *d_ws = _backward_op(
            grad.contiguous(), inputs, hidden, probs, x_mask, h_mask, w0, ws, outs, training
        )
        return (None, d_inputs, d_hidden, d_probs, None, None, d_w0, *d_ws)

    @staticmethod
    def vmap(info, in_dims, bn, *tensors):
        per_sample = [
            RecurrentCellFunction.apply(
                bn,
                *(
                    t if t is None or d is None else t.select(d, i)
                    for t, d in zip(tensors, in_dims[1:])
                ),
            )
            for i in range(info.batch_size)
        ]
        return tuple(torch.stack(o) for o in zip(*per_sample)), (0,) * 5


def _differentiable_backward(ctx, grad: Tensor, running_mean: Tensor, running_var: Tensor):
    saved = ctx.saved_tensors
    inputs, hidden, probs, x_mask, h_mask, w0 = saved[:6]
    ws = list(saved[6 : 6 + ctx.n_nodes])
    _, _, _, training, _, _, eps = ctx.bn

    def bn(x: Tensor) -> Tensor:
        if training:
            return F.batch_norm(x, None, None, training=True, eps=eps)
        return F.batch_norm(x, running_mean, running_var, training=False, eps=eps)

    diff = [inputs, hidden, probs, None, None, w0, *ws]
    wanted = [t for t, need in zip(diff, ctx.needs_input_grad[1:]) if need]
    with torch.enable_grad():
        out = cell_forward_nodes(inputs, hidden, probs, x_mask, h_mask, w0, ws, bn, recurrent_mixed)
        grads = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
    return [next(grads) if need else None for need in ctx.needs_input_grad[1:]]


def recurrent_cell(
    cell: RecurrentSearchCell,
    inputs: Tensor,
    hidden: Tensor,
    probs: Tensor,
    x_mask: Tensor | None = None,
    h_mask: Tensor | None = None,
) -> Tensor:
    """``cell`` over the sequence in one kernel: inputs (T, B, ninp), hidden (B, nhid),
    probs (E, 5) → hidden states (T, B, nhid), updating ``cell.bn``'s running statistics as
    the reference would. Off the CPU (or without the extension): node by node with the
    cell's ``node_op``. A ``RecurrentSearchCell.cell_op``."""
    if not cell_kernel_ready(inputs.device):
        return cell.forward_nodes(inputs, hidden, probs, x_mask, h_mask)
    bn = cell.bn
    if bn.training and inputs.shape[1] < 2:
        raise ValueError(
            "recurrent_cell: BatchNorm in training needs a batch of 2 or more, got "
            f"{inputs.shape[1]}"
        )
    momentum = -1.0 if bn.momentum is None else float(bn.momentum)
    bn_args = (
        bn.running_mean,
        bn.running_var,
        bn.num_batches_tracked,
        bn.training,
        bn.training and bn.track_running_stats,
        momentum,
        float(bn.eps),
    )
    masks = [None if m is None else m.contiguous() for m in (x_mask, h_mask)]
    return RecurrentCellFunction.apply(
        bn_args, inputs.contiguous(), hidden.contiguous(), probs.contiguous(), *masks,
        cell._W0.contiguous(), *(w.contiguous() for w in cell._Ws),
    )[0]  # fmt: skip
