"""The whole recurrent search cell in one op: every time step, node, mixture and BatchNorm.

The node op (:mod:`fastdarts.ops.recurrent_mixed`) fuses one node's mixture; around it the
cell still dispatches the masks, the projection, the BatchNorm, the state concatenation and
their backward ops, for every node of every time step (about 35 ops per node and pass; the
node kernel is one of them). ``fastdarts::recurrent_cell`` runs the cell over the whole
sequence as one op with a hand-written backward, in one of two implementations that save the
same tensors:

- on the CPU with the extension, one C++ call (``csrc/recurrent_cell.cpp``): per time step
  one at::mm per projection (9 forward, 18 backward) and no other dispatched op;
- elsewhere (CUDA), :func:`_forward_torch` / :func:`_backward_torch`: the same algorithm in
  torch ops around the node op's kernels, into preallocated buffers, without autograd
  recording each op: per node 4 launches forward and 8 backward, where the node-by-node
  cell takes about 21 (counted by ``benchmarks/cuda_path_ops.py``).

Both reproduce the shared BatchNorm exactly, including the order and formula of its
running-statistic updates, so a search gives the same result as the reference. Under
autocast (``--amp bf16``) the cell runs node by node, where the projections are cast. The
op's backward is differentiable: under create_graph it recomputes the cell node by node in
differentiable ops.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts.ops.extension import extension
from fastdarts.ops.recurrent_mixed import K, recurrent_mixed
from fastdarts.spaces.rnn import RecurrentSearchCell, cell_forward_nodes

aten = torch.ops.aten


def cell_kernel_ready(device: torch.device) -> bool:
    """Whether the whole-cell kernel runs on ``device`` (the CPU, with the extension)."""
    return device.type == "cpu" and hasattr(extension(), "recurrent_cell_forward")


def _shapes(inputs: Tensor, hidden: Tensor, n_nodes: int):
    t, b, _ = inputs.shape
    d = hidden.shape[1]
    e = n_nodes * (n_nodes + 1) // 2
    return [(t, b, d), (t, n_nodes + 1, b, d), (t, e, b, 2 * d), (t, b, 2 * d), (t, n_nodes + 1, d)]


def _check_cell(inputs, hidden, probs, x_mask, h_mask, w0, ws) -> None:
    """The C++ kernel's input checks, with its messages (ValueError / TypeError here)."""
    if inputs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"recurrent_cell: dtype must be float32 or float64, got {inputs.dtype}")
    if inputs.dim() != 3:
        raise ValueError(f"recurrent_cell: inputs must be (T, B, I), got {list(inputs.shape)}")
    _, b, i = inputs.shape
    if hidden.dim() != 2 or hidden.shape[0] != b:
        raise ValueError(f"recurrent_cell: hidden must be ({b}, D), got {list(hidden.shape)}")
    d, s = hidden.shape[1], len(ws)
    if s < 1:
        raise ValueError("recurrent_cell: needs at least one node weight")
    expected = [
        ("inputs", inputs, tuple(inputs.shape)),
        ("hidden", hidden, (b, d)),
        ("probs", probs, (s * (s + 1) // 2, K)),
        ("W0", w0, (i + d, 2 * d)),
        *(("each W_j", w, (d, 2 * d)) for w in ws),
        *((name, m, shape) for name, m, shape in (("x_mask", x_mask, (b, i)),
                                                  ("h_mask", h_mask, (b, d))) if m is not None),
    ]  # fmt: skip
    for name, x, shape in expected:
        same = x.dtype == inputs.dtype and x.device == inputs.device and x.is_contiguous()
        if tuple(x.shape) != shape or not same:
            raise ValueError(
                f"recurrent_cell: {name} must be a contiguous {inputs.dtype} tensor of shape "
                f"{list(shape)} on {inputs.device}, got {list(x.shape)} {x.dtype} on {x.device}"
                f"{'' if x.is_contiguous() else ' (not contiguous)'}"
            )


def _forward_torch(
    inputs, hidden, probs, x_mask, h_mask, w0, ws, running_mean, running_var,
    num_batches_tracked, training, update, momentum, eps, hiddens, states, ch, c0h0, invstd,
) -> None:  # fmt: skip
    """The C++ kernel's forward in torch ops (any device), into the same outputs.

    Per node: the projection (one mm into ``ch``), the mixture (the node op's kernel), the
    BatchNorm (one native_batch_norm into ``states`` and ``invstd``, updating the running
    statistics) and the masked state for the next projections (one mul).
    """
    _check_cell(inputs, hidden, probs, x_mask, h_mask, w0, ws)
    (t_len, b, i), d, s = inputs.shape, hidden.shape[1], len(ws)
    if training and b < 2:
        raise ValueError(
            f"recurrent_cell: BatchNorm in training needs a batch of more than one, got {b}"
        )
    update = training and update
    # A cumulative average (momentum < 0) updates the k-th BatchNorm call of the sequence
    # with factor 1 / (count before + k): one host read per sequence, where torch's
    # BatchNorm reads the count once per call. The count itself moves once.
    count = int(num_batches_tracked) if update and momentum < 0 else 0
    if update:
        num_batches_tracked.add_(t_len * (s + 1))
    calls = itertools.count(count + 1)
    stats = (running_mean, running_var) if update else (None, None)
    mean = running_mean.new_empty(d)
    if not training:
        invstd.copy_((running_var + eps).rsqrt().expand_as(invstd))

    def batch_norm(x: Tensor, out: Tensor, out_invstd: Tensor) -> None:
        if not training:
            torch.mul(x - running_mean, out_invstd, out=out)
            return
        factor = 1.0 / next(calls) if momentum < 0 else momentum
        aten.native_batch_norm.out(
            x, None, None, *stats, True, factor, eps,
            out=out, save_mean=mean, save_invstd=out_invstd,
        )  # fmt: skip

    node = torch.ops.fastdarts.recurrent_mixed
    xm = inputs if x_mask is None else inputs * x_mask
    torch.mm(xm.view(t_len * b, i), w0[:i], out=c0h0.view(t_len * b, 2 * d))
    w0h = w0[i:]
    # The masked states (s_0..S ⊙ mh), the projections' left operand.
    masked = states.new_empty(s + 1, b, d) if h_mask is not None else None
    previous = hidden
    for t in range(t_len):
        st, c0 = states[t], c0h0[t]
        c0.addmm_(previous if h_mask is None else previous * h_mask, w0h)
        u = torch.lerp(previous, torch.tanh(c0[:, d:]), torch.sigmoid(c0[:, :d]))
        batch_norm(u, st[0], invstd[t, 0])
        if masked is not None:
            torch.mul(st[0], h_mask, out=masked[0])
        m = st if masked is None else masked
        offset = 0
        for j, w in enumerate(ws):
            n = j + 1
            chj = ch[t, offset : offset + n]
            torch.mm(m[:n].view(n * b, d), w, out=chj.view(n * b, 2 * d))
            batch_norm(node(st[:n], chj, probs[offset : offset + n]), st[n], invstd[t, n])
            if masked is not None:
                torch.mul(st[n], h_mask, out=masked[n])
            offset += n
        torch.mean(st[1:], 0, out=hiddens[t])
        previous = hiddens[t]


def _backward_torch(
    grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, hiddens, states, ch, c0h0, invstd,
    training, d_inputs, d_hidden, d_probs, d_w0, d_ws,
) -> None:  # fmt: skip
    """The C++ kernel's backward in torch ops (any device), into the same gradients.

    Per node: the BatchNorm's backward (one native_batch_norm_backward, from the normalised
    output), the mixture's (the node op's kernel), and the projection's (two matmuls), with
    the gradients accumulated in place.
    """
    (t_len, b, i), d, s = inputs.shape, hidden.shape[1], len(ws)
    node_backward = torch.ops.fastdarts.recurrent_mixed_backward
    # BatchNorm's gradient from its output y = x̂: native_batch_norm_backward with input y,
    # mean 0, invstd 1 and the real invstd as the weight gives invstd·(g − ḡ − y·mean(g·y)).
    zeros, ones = hidden.new_zeros(d), hidden.new_ones(d)

    def batch_norm_backward(g: Tensor, y: Tensor, istd: Tensor) -> Tensor:
        if not training:
            return g * istd
        return aten.native_batch_norm_backward(
            g, y, istd, None, None, zeros, ones, True, 0.0, [True, False, False]
        )[0]

    w0h, d_w0h = w0[i:], d_w0[i:]
    carry = torch.zeros_like(hidden)  # ∂L/∂h_{t} from the later steps
    gs = states.new_empty(s + 1, b, d)  # ∂L/∂s_k of the current step
    gxp = c0h0.new_empty(t_len, b, 2 * d)  # ∂L/∂[c0, h0] of every step
    for t in reversed(range(t_len)):
        last = t == t_len - 1
        previous = hidden if t == 0 else hiddens[t - 1]
        st, c0 = states[t], c0h0[t]
        gs[0].zero_()
        torch.div(grad[t] + carry, s, out=gs[1])
        gs[2:].copy_(gs[1].expand(s - 1, b, d))
        m = st if h_mask is None else st * h_mask
        offset = ch.shape[1]
        for j in reversed(range(s)):
            n = j + 1
            offset -= n
            chj = ch[t, offset : offset + n]
            gx = batch_norm_backward(gs[n], st[n], invstd[t, n])
            d_s, d_ch, d_p = node_backward(gx, st[:n], chj, probs[offset : offset + n])
            d_ch = d_ch.view(n * b, 2 * d)
            if last:  # the gradients' first terms: written, not added to zeros
                d_probs[offset : offset + n].copy_(d_p)
                torch.mm(m[:n].view(n * b, d).t(), d_ch, out=d_ws[j])
            else:
                d_probs[offset : offset + n].add_(d_p)
                d_ws[j].addmm_(m[:n].view(n * b, d).t(), d_ch)
            gs[:n].add_(d_s)
            if h_mask is None:
                gs[:n].view(n * b, d).addmm_(d_ch, ws[j].t())
            else:
                gs[:n].addcmul_((d_ch @ ws[j].t()).view(n, b, d), h_mask)
        # s0 = BN(u), u = h + σ(c0) (tanh(h0) − h)
        gu = batch_norm_backward(gs[0], st[0], invstd[t, 0])
        sg, th = torch.sigmoid(c0[:, :d]), torch.tanh(c0[:, d:])
        torch.mul(gu, 1 - sg, out=carry)
        aten.sigmoid_backward.grad_input(gu * (th - previous), sg, grad_input=gxp[t, :, :d])
        aten.tanh_backward.grad_input(gu * sg, th, grad_input=gxp[t, :, d:])
        hm = previous if h_mask is None else previous * h_mask
        if last:
            torch.mm(hm.t(), gxp[t], out=d_w0h)
        else:
            d_w0h.addmm_(hm.t(), gxp[t])
        if h_mask is None:
            carry.addmm_(gxp[t], w0h.t())
        else:
            carry.addcmul_(gxp[t] @ w0h.t(), h_mask)
    d_hidden.copy_(carry)
    gxp = gxp.view(t_len * b, 2 * d)
    xm = inputs if x_mask is None else inputs * x_mask
    torch.mm(xm.view(t_len * b, i).t(), gxp, out=d_w0[:i])
    torch.mm(gxp, w0[:i].t(), out=d_inputs.view(t_len * b, i))
    if x_mask is not None:
        d_inputs.mul_(x_mask)


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
    forward = (
        extension().recurrent_cell_forward if cell_kernel_ready(inputs.device) else _forward_torch
    )
    forward(
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
    backward = (
        extension().recurrent_cell_backward if cell_kernel_ready(inputs.device) else _backward_torch
    )
    backward(
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
    """``cell`` over the sequence in one op: inputs (T, B, ninp), hidden (B, nhid),
    probs (E, 5) → hidden states (T, B, nhid), updating ``cell.bn``'s running statistics as
    the reference would. Under autocast: node by node with the cell's ``node_op``, where
    the projections run in the autocast dtype. A ``RecurrentSearchCell.cell_op``."""
    if torch.is_autocast_enabled(inputs.device.type):
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
