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
  torch ops, into preallocated buffers, without autograd recording each op. With Triton,
  each state's input (a node's mixture, or s0's gate), its BatchNorm and its mask are one
  kernel each way (``kernels/recurrent_cell.py``): per node and step 2 launches forward
  (with the projection) and 2 backward (the node-by-node cell took about 17; the backward
  kernels apply the hidden mask to the projections' gradient as they read it), the
  weights' gradients and dP's partial sums once per sequence. Without Triton, the node
  op's kernel with torch's BatchNorm.
  Under vmap over weight samples (the batched w± passes) one call runs every sample, each
  node's kernels once for all (:class:`_BatchedCellFunction`).

Both reproduce the shared BatchNorm exactly, including the order and formula of its
running-statistic updates, so a search gives the same result as the reference. Under
autocast (``--amp bf16``) the cell stays in float32, as the CNN's fused cells do: its
projections are small at the search's sizes (300 × 600 at the paper's), so bfloat16 would
buy little time there and add rounding, while the node-by-node cell that casts them takes
1.7 times the launches (a small step on the CUDA code path: 14,981 against 8,979). The
reference backend's cell casts them. The op's backward is
differentiable: under create_graph it recomputes the cell node by node in differentiable
ops.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdarts.ops import recurrent_mixed as recurrent_mixed_ops
from fastdarts.ops.extension import extension, triton_kernels
from fastdarts.ops.flops import flop_formula
from fastdarts.ops.recurrent_mixed import K, recurrent_mixed
from fastdarts.ops.vmap import batch_first
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


def _float32(like: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``like``'s device (where it has autocast: not the meta device): the
    cell computes in its inputs' dtype."""
    device_type = like.device.type
    if not torch.amp.is_autocast_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _check_bn_batch(training: bool, batch: int) -> None:
    if training and batch < 2:
        raise ValueError(
            f"recurrent_cell: BatchNorm in training needs a batch of 2 or more, got {batch}"
        )


def _check_cell(inputs, hidden, probs, x_mask, h_mask, w0, ws) -> None:
    """The C++ kernel's input checks, with its messages (ValueError / TypeError here)."""
    if inputs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"recurrent_cell: dtype must be float32 or float64, got {inputs.dtype}")
    if inputs.dim() != 3:
        raise ValueError(f"recurrent_cell: inputs must be (T, B, I), got {list(inputs.shape)}")
    t, b, i = inputs.shape
    if t < 1:
        raise ValueError("recurrent_cell: inputs must hold at least one time step, got T = 0")
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


def _cell_kernels(device: torch.device):
    """The Triton kernels for s0 (``kernels/recurrent_cell.py``) where the node op runs
    Triton's, else None (torch ops)."""
    if recurrent_mixed_ops.kernel_name(device) != "triton":
        return None
    return triton_kernels("recurrent_cell")


def _rows(x: Tensor) -> Tensor:
    """(…, B, N, F) → (N, rows, F), a view: sample k's rows, as bmm's operand or output."""
    return x.view(-1, x.shape[-2], x.shape[-1]).transpose(0, 1)


def _samples(x: Tensor, n: int, b: int) -> Tensor:
    """bmm's (N, n·B, F) → the states' layout (n, B, N, F), a view."""
    return x.transpose(0, 1).view(n, b, x.shape[0], x.shape[-1])


def _steps_rows(x: Tensor) -> tuple[Tensor, ...]:
    """(T, n, B, N, F) → per time step :func:`_rows` (N, n·B, F): views, from one view and
    one unbind."""
    t_len, n, b, n_samples, f = x.shape
    return x.view(t_len, n * b, n_samples, f).transpose(1, 2).unbind(0)


def _steps(x: Tensor, *shape: int) -> tuple[Tensor, ...]:
    """(T, …) → per time step a view of ``shape``."""
    return x.view(x.shape[0], *shape).unbind(0)


# The loops below index precomputed tables of views (per node, one view per time step from
# one unbind) where each node of each step took ~20 view ops (indexing, view, transpose):
# about a microsecond of host time each; the small step's views were 44,642 of its 55,012
# ops, most of them here (13,862 ops now; the tiny step's host time −29 %:
# benchmarks/results/README.md).


class _Views(NamedTuple):
    """The views both passes index, per state k = 0..S or node j = 0..S-1 and time step
    (each list item a tuple over t): the BatchNorm's output (B, N·D) and invstd (N·D), the
    mixture's inputs (n, N·B, D) and (n, N·B, 2D) and its op weights (n, 5), each node's
    slice of ch (T, n, B, N, 2D), the edges' offsets, and the state before each step
    (B, N, D)."""

    bn_out: list[tuple[Tensor, ...]]
    bn_invstd: list[tuple[Tensor, ...]]
    node_states: list[tuple[Tensor, ...]]
    node_ch: list[tuple[Tensor, ...]]
    node_probs: list[Tensor]
    ch_nodes: list[Tensor]
    offsets: list[int]
    previous: tuple[Tensor, ...]

    @classmethod
    def of(cls, states, invstd, ch, probs, hidden, hiddens) -> _Views:
        """From :func:`_cell_forward`'s outputs (states (T, S+1, B, N, D), …)."""
        b, d, s = states.shape[2], states.shape[-1], states.shape[1] - 1
        offsets = [j * (j + 1) // 2 for j in range(s)]
        ch_nodes = [ch[:, o : o + j + 1] for j, o in enumerate(offsets)]
        return cls(
            bn_out=[_steps(states[:, k], b, -1) for k in range(s + 1)],
            bn_invstd=[_steps(invstd[:, k], -1) for k in range(s + 1)],
            node_states=[_steps(states[:, : j + 1], j + 1, -1, d) for j in range(s)],
            node_ch=[_steps(c, j + 1, -1, 2 * d) for j, c in enumerate(ch_nodes)],
            node_probs=[probs[o : o + j + 1] for j, o in enumerate(offsets)],
            ch_nodes=ch_nodes,
            offsets=offsets,
            previous=(hidden, *hiddens[:-1].unbind(0)),
        )


def _forward_torch(
    inputs, hidden, probs, x_mask, h_mask, w0, ws, running_mean, running_var,
    num_batches_tracked, training, update, momentum, eps, hiddens, states, ch, c0h0, invstd,
) -> None:  # fmt: skip
    """The C++ kernel's forward in torch ops (any device), into the same outputs."""
    _check_cell(inputs, hidden, probs, x_mask, h_mask, w0, ws)
    _check_bn_batch(training, inputs.shape[1])
    _cell_forward(
        inputs.unsqueeze(0), hidden.unsqueeze(1), probs, x_mask, h_mask, w0.unsqueeze(0),
        [w.unsqueeze(0) for w in ws], (running_mean, running_var, num_batches_tracked,
        training, update, momentum, eps), *_with_samples(hiddens, states, ch, c0h0, invstd),
    )  # fmt: skip


def _with_samples(hiddens, states, ch, c0h0, invstd) -> list[Tensor]:
    """The op's outputs (or saved tensors) as views with a sample dim of 1 (see
    :func:`_cell_forward`)."""
    return [hiddens.unsqueeze(2), states.unsqueeze(3), ch.unsqueeze(3), c0h0.unsqueeze(2),
            invstd.unsqueeze(2)]  # fmt: skip


def _cell_forward(inputs, hidden, probs, x_mask, h_mask, w0, ws, bn, hiddens, states, ch,
                  c0h0, invstd) -> None:  # fmt: skip
    """The cell over a sequence for N weight samples at once (N = 1: the op; N = 2: the w±
    passes under vmap), in torch ops into preallocated outputs.

    inputs (N, T, B, I), hidden (B, N, D), w0 (N, I + D, 2D), ws (N, D, 2D) each; probs and
    the masks shared. Writes hiddens (T, B, N, D), states (T, S+1, B, N, D), ch
    (T, E, B, N, 2D), c0h0 (T, B, N, 2D) and invstd (T, S+1, N, D): sample k's slices are
    the op's outputs, and the samples interleave so that each node's mixture is one kernel
    over N·B rows and each BatchNorm one over N·D features (its statistics per sample).
    Per node: one bmm (the projection), then with Triton one fused kernel (mixture,
    BatchNorm, the masked state for the next projections), else the mixture's op, one
    native_batch_norm and one mul.
    """
    running_mean, running_var, num_batches_tracked, training, update, momentum, eps = bn
    n_samples, t_len, b, i = inputs.shape
    d, s = hidden.shape[-1], len(ws)
    update = training and update
    # A cumulative average (momentum < 0) updates the k-th BatchNorm call of the sequence
    # with factor 1 / (count before + k): one host read per sequence, where torch's
    # BatchNorm reads the count once per call. The count itself moves once.
    count = int(num_batches_tracked) if update and momentum < 0 else 0
    if update:
        num_batches_tracked.add_(t_len * (s + 1))
    calls = itertools.count(count + 1)
    stats = (running_mean, running_var) if update else (None, None)
    mean = hidden.new_empty(n_samples * d)
    if not training:
        invstd.copy_((running_var + eps).rsqrt().expand_as(invstd))
        mean = running_mean.repeat(n_samples)

    def factor() -> float:
        """The next BatchNorm call's running-statistics factor."""
        return 1.0 / next(calls) if momentum < 0 else momentum

    def batch_norm(x: Tensor, out: Tensor, out_invstd: Tensor) -> None:
        """x, out (B, N·D); out_invstd (N·D)."""
        if not training:
            torch.mul(x - mean, out_invstd, out=out)
            return
        aten.native_batch_norm.out(
            x, None, None, *stats, True, factor(), eps, out=out, save_mean=mean,
            save_invstd=out_invstd,
        )  # fmt: skip

    def fused(launch, *args, out: Tensor, out_invstd: Tensor, masked_out) -> None:
        """A state's input, its BatchNorm and mask in one Triton launch (``kernels``')."""
        bn = {"factor": factor(), "running": stats if update else None} if training else {}
        launch(
            *args, out, out_invstd, training=training, mean=mean, eps=eps,
            h_mask=None if masked_out is None else h_mask_flat, masked=masked_out, **bn,
        )  # fmt: skip

    kernels = _cell_kernels(inputs.device)
    h_mask = None if h_mask is None else h_mask.unsqueeze(1)  # (B, 1, D)
    xm = inputs if x_mask is None else inputs * x_mask
    torch.bmm(xm.view(n_samples, t_len * b, i), w0[:, :i], out=_rows(c0h0))
    w0h = w0[:, i:]
    # Per time step: its c0h0 (B, N, 2D) and _rows of it, the previous hidden state and
    # _rows of it (masked: of one buffer rewritten each step), the states after s0.
    c0s, c0_rows = c0h0.unbind(0), c0h0.transpose(1, 2).unbind(0)
    views = _Views.of(states, invstd, ch, probs, hidden, hiddens)
    bn_out, bn_invstd, previous = views.bn_out, views.bn_invstd, views.previous
    if h_mask is None:
        previous_rows = (hidden.transpose(0, 1), *hiddens[:-1].transpose(1, 2).unbind(0))
    else:
        hm = torch.empty_like(hidden)
        previous_rows = (hm.transpose(0, 1),) * t_len
        if kernels is not None:  # then each step's hidden kernel masks the next step's
            torch.mul(hidden, h_mask, out=hm)
    step_hiddens, after_s0 = hiddens.unbind(0), states[:, 1:].unbind(0)
    # The masked states (s_0..S ⊙ mh), the projections' left operand: one buffer rewritten
    # each step, its views made once.
    masked = states.new_empty(states.shape[1:]) if h_mask is not None else None
    h_mask_flat, masked_flat = None, (None,) * (s + 1)
    if masked is not None:  # h_mask over a state's (B, N·D), and the buffer's per state
        h_mask_flat = h_mask.expand(b, n_samples, d).contiguous().view(b, -1)
        masked_flat = masked.view(s + 1, b, -1).unbind(0)
    # Per node j (n = j + 1 predecessors) and time step: the projection's left operand
    # (N, n·B, D) and output (N, n·B, 2D).
    if masked is None:
        lhs = [_steps_rows(states[:, : j + 1]) for j in range(s)]
    else:
        lhs = [(_rows(masked[: j + 1]),) * t_len for j in range(s)]
    proj_out = [_steps_rows(c) for c in views.ch_nodes]
    if kernels is None:
        u = torch.empty_like(hidden)  # s0 before its BatchNorm
        u_flat = u.view(b, -1)
    for t in range(t_len):
        c0 = c0s[t]
        if masked is not None and kernels is None:
            torch.mul(previous[t], h_mask, out=hm)
        c0_rows[t].baddbmm_(previous_rows[t], w0h)
        if kernels is None:
            torch.lerp(previous[t], torch.tanh(c0[..., d:]), torch.sigmoid(c0[..., :d]), out=u)
            batch_norm(u_flat, bn_out[0][t], bn_invstd[0][t])
            if masked is not None:
                torch.mul(bn_out[0][t], h_mask_flat, out=masked_flat[0])
        else:
            fused(kernels.s0_bn_forward, c0, previous[t], out=bn_out[0][t],
                  out_invstd=bn_invstd[0][t], masked_out=masked_flat[0])  # fmt: skip
        for j, w in enumerate(ws):
            torch.bmm(lhs[j][t], w, out=proj_out[j][t])
            args = (views.node_states[j][t], views.node_ch[j][t], views.node_probs[j])
            if kernels is None:
                x_flat = torch.ops.fastdarts.recurrent_mixed(*args).view(b, -1)
                batch_norm(x_flat, bn_out[j + 1][t], bn_invstd[j + 1][t])
                if masked is not None:
                    torch.mul(bn_out[j + 1][t], h_mask_flat, out=masked_flat[j + 1])
            else:
                fused(kernels.node_bn_forward, *args, out=bn_out[j + 1][t],
                      out_invstd=bn_invstd[j + 1][t],
                      masked_out=masked_flat[j + 1])  # fmt: skip
        if kernels is None:
            torch.mean(after_s0[t], 0, out=step_hiddens[t])
        elif masked is None:
            kernels.hidden_out(after_s0[t], step_hiddens[t])
        else:
            kernels.hidden_out(after_s0[t], step_hiddens[t], h_mask.squeeze(1), hm)


def _backward_torch(
    grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, hiddens, states, ch, c0h0, invstd,
    training, d_inputs, d_hidden, d_probs, d_w0, d_ws,
) -> None:  # fmt: skip
    """The C++ kernel's backward in torch ops (any device), into the same gradients."""
    _cell_backward(
        grad.unsqueeze(2), inputs.unsqueeze(0), hidden.unsqueeze(1), probs, x_mask, h_mask,
        w0.unsqueeze(0), [w.unsqueeze(0) for w in ws],
        *_with_samples(hiddens, states, ch, c0h0, invstd), training, d_inputs.unsqueeze(0),
        d_hidden.unsqueeze(1), d_probs, d_w0.unsqueeze(0), [g.unsqueeze(0) for g in d_ws],
    )  # fmt: skip


def _cell_backward(grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, hiddens, states, ch,
                   c0h0, invstd, training, d_inputs, d_hidden, d_probs, d_w0,
                   d_ws) -> None:  # fmt: skip
    """:func:`_cell_forward`'s backward, in its layout: grad (T, B, N, D) → d_inputs, d_hidden,
    d_probs, d_w0 and d_ws, written (d_probs summed over the samples).

    Per node and step: the BatchNorm's backward and the mixture's (with Triton one fused
    kernel, else one native_batch_norm_backward, from the normalised output, and the node
    op's) and the projection's input gradient (a bmm), the gradients accumulated in place.
    The weights' gradients wait for the whole sequence: one bmm per node, and one for W0.
    """
    n_samples, t_len, b, i = inputs.shape
    d, s = hidden.shape[-1], len(ws)
    kernels = _cell_kernels(inputs.device)
    # BatchNorm's gradient from its output y = x̂ (torch ops; the Triton kernels compute it
    # themselves): native_batch_norm_backward with input y, mean 0, invstd 1 and the real
    # invstd as the weight gives invstd·(g − ḡ − y·mean(g·y)).
    if kernels is None:
        zeros, ones = hidden.new_zeros(n_samples * d), hidden.new_ones(n_samples * d)

    def batch_norm_backward(g: Tensor, y: Tensor, istd: Tensor) -> Tensor:
        """g, y (B, N·D), istd (N·D) → (B·N, D)."""
        if not training:
            return (g * istd).view(-1, d)
        return aten.native_batch_norm_backward(
            g, y, istd, None, None, zeros, ones, True, 0.0, [True, False, False]
        )[0].view(-1, d)

    h_mask = None if h_mask is None else h_mask.unsqueeze(1)  # (B, 1, D)
    w0h, d_w0h = w0[:, i:], d_w0[:, i:]
    w0h_t, ws_t = w0h.transpose(1, 2), [w.transpose(1, 2) for w in ws]
    carry = torch.zeros_like(hidden)  # ∂L/∂h_t from the later steps (B, N, D)
    carry_rows = carry.transpose(0, 1)
    if kernels is not None:
        # Every node's and step's partial dP sums, reduced once at the end.
        blocks = kernels.bn_blocks(b, n_samples * d)
        parts = probs.new_empty(t_len, blocks, *probs.shape)
    # Every step's dCH, kept for the weights' gradients (as much memory as ch): node j's
    # (T, n, B, N, 2D) contiguous, so that W_j's gradient is one bmm over the sequence where
    # each step took a baddbmm_ (measured: benchmarks/results/README.md), and its per-step
    # views (n, N·B, 2D) and _rows of them.
    d_ch_seq = ch.new_empty(ch.numel())
    d_ch_nodes = [
        d_ch_seq[t_len * o * b * n_samples * 2 * d :][
            : t_len * (j + 1) * b * n_samples * 2 * d
        ].view(t_len, j + 1, b, n_samples, 2 * d)
        for j, o in enumerate(j * (j + 1) // 2 for j in range(s))
    ]
    d_ch_steps = [_steps(c, j + 1, -1, 2 * d) for j, c in enumerate(d_ch_nodes)]
    d_ch_rows = [_steps_rows(c) for c in d_ch_nodes]
    # ∂L/∂s_k of the current step (S+1, B, N, D), one buffer rewritten each step, and its
    # views made once: per state (B, N·D), per node (n, N·B, D) and _rows.
    gs = states.new_empty(states.shape[1:])
    gs_flat = gs.view(s + 1, b, -1).unbind(0)
    # With Triton and the hidden mask: ∂L/∂(s_k ⊙ mh) from the projections, which the state
    # kernels add to gs times mh themselves (one launch per node, where an addcmul took two).
    fold_mask = kernels is not None and h_mask is not None
    if fold_mask:
        gm = torch.empty_like(gs)
        gm_flat = gm.view(s + 1, b, -1).unbind(0)
        gm_rows = [_rows(gm[: j + 1]) for j in range(s)]
        # Likewise ∂L/∂(h_t ⊙ mh) from the next step's projection, which the next step's
        # start adds to carry times mh.
        carry_masked = torch.zeros_like(carry)
        carry_masked_rows = carry_masked.transpose(0, 1)
    else:
        gm_flat = (None,) * (s + 1)
    gs_nodes = [gs[: j + 1].view(j + 1, -1, d) for j in range(s)]
    gs_rows = [_rows(gs[: j + 1]) for j in range(s)]
    gxp = c0h0.new_empty(c0h0.shape)  # ∂L/∂[c0, h0] of every step
    views = _Views.of(states, invstd, ch, probs, hidden, hiddens)
    bn_out, bn_invstd, previous, offsets = (
        views.bn_out,
        views.bn_invstd,
        views.previous,
        views.offsets,
    )
    if kernels is not None:
        node_parts = [parts[:, :, o : o + j + 1].unbind(0) for j, o in enumerate(offsets)]
    grads = grad.unbind(0)
    c0s, gxps, gxp_rows = c0h0.unbind(0), gxp.unbind(0), gxp.transpose(1, 2).unbind(0)
    mask = None if h_mask is None else h_mask.squeeze(1)
    for t in reversed(range(t_len)):
        last = t == t_len - 1
        c0 = c0s[t]
        if kernels is None:
            gs[0].zero_()
            torch.div((grads[t] + carry).expand(s, *carry.shape), s, out=gs[1:])
        elif fold_mask:
            kernels.step_grads(grads[t], carry, gs, carry_masked=carry_masked, h_mask=mask, gm=gm)
        else:
            kernels.step_grads(grads[t], carry, gs)
        for j in reversed(range(s)):
            n, offset = j + 1, offsets[j]
            node = (views.node_states[j][t], views.node_ch[j][t], views.node_probs[j])
            if kernels is None:
                gx = batch_norm_backward(gs_flat[n], bn_out[n][t], bn_invstd[n][t])
                d_s, d_ch, d_p = torch.ops.fastdarts.recurrent_mixed_backward(gx, *node)
                gs[:n].add_(d_s.view(gs[:n].shape))
                if last:  # the gradient's first term: written, not added to zeros
                    d_probs[offset : offset + n].copy_(d_p)
                else:
                    d_probs[offset : offset + n].add_(d_p)
                d_ch_steps[j][t].copy_(d_ch)
            else:  # BatchNorm's and the node's backward: dS added to gs, dP sums to parts
                kernels.node_bn_backward(
                    gs_flat[n], bn_out[n][t], bn_invstd[n][t], *node, gs_nodes[j],
                    d_ch_steps[j][t], node_parts[j][t], training=training,
                    grad_masked=gm_flat[n], h_mask=mask if fold_mask else None,
                )  # fmt: skip
            d_ch = d_ch_rows[j][t]
            if h_mask is None:
                gs_rows[j].baddbmm_(d_ch, ws_t[j])
            elif fold_mask:
                gm_rows[j].baddbmm_(d_ch, ws_t[j])
            else:
                gs[:n].addcmul_(_samples(torch.bmm(d_ch, ws_t[j]), n, b), h_mask)
        # s0 = BN(u), u = h + σ(c0) (tanh(h0) − h)
        if kernels is None:
            gu = batch_norm_backward(gs_flat[0], bn_out[0][t], bn_invstd[0][t]).view(carry.shape)
            sg, th = torch.sigmoid(c0[..., :d]), torch.tanh(c0[..., d:])
            torch.mul(gu, 1 - sg, out=carry)
            aten.sigmoid_backward.grad_input(
                gu * (th - previous[t]), sg, grad_input=gxps[t][..., :d]
            )
            aten.tanh_backward.grad_input(gu * sg, th, grad_input=gxps[t][..., d:])
        else:
            kernels.s0_bn_backward(
                gs_flat[0], bn_out[0][t], bn_invstd[0][t], c0, previous[t], carry, gxps[t],
                training=training, grad_masked=gm_flat[0], h_mask=mask if fold_mask else None,
            )  # fmt: skip
        if h_mask is None:
            carry_rows.baddbmm_(gxp_rows[t], w0h_t)
        elif fold_mask:
            torch.bmm(gxp_rows[t], w0h_t, out=carry_masked_rows)
        else:
            carry.addcmul_(_samples(torch.bmm(gxp_rows[t], w0h_t), 1, b)[0], h_mask)
    if fold_mask:
        torch.addcmul(carry, carry_masked, h_mask, out=d_hidden)
    else:
        d_hidden.copy_(carry)
    if kernels is not None:
        torch.sum(parts, (0, 1), out=d_probs)
    # The weights' gradients over the whole sequence: per node, its states of every step
    # (masked) into one buffer, one bmm with its dCH; for W0's hidden rows, the previous
    # hidden states (masked) with ∂L/∂[c0, h0].
    lhs = states.new_empty(t_len * s * b * n_samples * d)
    for j in range(s):
        lhs_j = lhs[: t_len * (j + 1) * b * n_samples * d].view(t_len, j + 1, b, n_samples, d)
        if h_mask is None:
            lhs_j.copy_(states[:, : j + 1])
        else:
            torch.mul(states[:, : j + 1], h_mask, out=lhs_j)
        torch.bmm(_rows(lhs_j).transpose(1, 2), _rows(d_ch_nodes[j]), out=d_ws[j])
    previous_seq = lhs[: t_len * b * n_samples * d].view(t_len, b, n_samples, d)
    previous_seq[0].copy_(hidden)
    previous_seq[1:].copy_(hiddens[:-1])
    if h_mask is not None:
        previous_seq.mul_(h_mask)
    torch.bmm(_rows(previous_seq).transpose(1, 2), _rows(gxp), out=d_w0h)
    xm = inputs if x_mask is None else inputs * x_mask
    torch.bmm(xm.view(n_samples, t_len * b, i).transpose(1, 2), _rows(gxp), out=d_w0[:, :i])
    torch.bmm(_rows(gxp), w0[:, :i].transpose(1, 2), out=d_inputs.view(n_samples, t_len * b, i))
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
    Under vmap (the batched w± passes, weights stacked on a leading dim): off the C++
    kernel, with probs and masks shared and no running statistics to update, all samples
    in one :class:`_BatchedCellFunction`; else the op once per sample (the C++ kernel's
    matmuls are per sample anyway).
    """

    @staticmethod
    def forward(
        bn: tuple,
        inputs: Tensor,
        hidden: Tensor,
        probs: Tensor,
        x_mask: Tensor | None,
        h_mask: Tensor | None,
        w0: Tensor,
        *ws: Tensor,
    ) -> tuple[Tensor, ...]:
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
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        if grad is None:
            return (None,) * (7 + ctx.n_nodes)
        inputs, hidden, probs, x_mask, h_mask, w0 = saved[:6]
        ws = list(saved[6 : 6 + ctx.n_nodes])
        outs = list(saved[6 + ctx.n_nodes :])
        running_mean, running_var, _, training, *_ = ctx.bn
        with _float32(grad):  # as the forward (see recurrent_cell)
            if torch.is_grad_enabled():
                # create_graph (double backward, exact HVP): the kernel is not
                # differentiable; recompute node by node in differentiable ops (no
                # running-statistic update).
                return (None, *_differentiable_backward(ctx, grad, running_mean, running_var))
            d_inputs, d_hidden, d_probs, d_w0, *d_ws = _backward_op(
                grad.contiguous(), inputs, hidden, probs, x_mask, h_mask, w0, ws, outs, training
            )
        return (None, d_inputs, d_hidden, d_probs, None, None, d_w0, *d_ws)

    @staticmethod
    def vmap(info, in_dims, bn, *tensors):
        shared = all(d is None for d in in_dims[3:6])  # probs, x_mask, h_mask
        updates = bn[3] and bn[4]
        if shared and not updates and not cell_kernel_ready(tensors[0].device):
            return _vmap_batched(info.batch_size, in_dims[1:], bn, tensors)
        return _vmap_per_sample(RecurrentCellFunction, info.batch_size, in_dims[1:], bn, tensors)


def _vmap_batched(size: int, dims, bn, tensors):
    """RecurrentCellFunction's vmap rule as one :class:`_BatchedCellFunction`: the batched
    tensors moved to its layout (differentiably), its outputs' sample dims returned."""
    inputs, hidden, probs, x_mask, h_mask, w0, *ws = tensors
    in_inputs, in_hidden, _, _, _, in_w0, *in_ws = dims

    def leading(x: Tensor, dim: int | None) -> Tensor:
        return batch_first(x, dim, size).contiguous()

    inputs, hidden, w0 = leading(inputs, in_inputs), leading(hidden, in_hidden), leading(w0, in_w0)
    ws = list(map(leading, ws, in_ws))
    _check_cell(inputs[0], hidden[0], probs, x_mask, h_mask, w0[0], [w[0] for w in ws])
    outs = _BatchedCellFunction.apply(
        bn, inputs, hidden.transpose(0, 1).contiguous(), probs, x_mask, h_mask, w0, *ws
    )
    return outs, (2, 3, 3, 2, 2)


def _vmap_per_sample(function, size: int, in_dims, bn, tensors):
    """A vmap rule for ``function`` (an autograd Function taking (bn, *tensors)): one call
    per sample, the outputs stacked on dim 0."""
    per_sample = [
        function.apply(
            bn, *(t if t is None or d is None else t.select(d, i) for t, d in zip(tensors, in_dims))
        )
        for i in range(size)
    ]
    return tuple(torch.stack(o) for o in zip(*per_sample)), (0,) * len(per_sample[0])


class _BatchedCellFunction(torch.autograd.Function):
    """The cell for N weight samples in :func:`_cell_forward`'s layout: inputs (N, T, B, I),
    hidden (B, N, D), w0 and ws with N leading, probs and masks shared; returns hiddens
    (T, B, N, D) and the tensors backward needs. Frozen or evaluation BatchNorm only (the
    samples would update one set of running statistics)."""

    @staticmethod
    def forward(
        bn: tuple,
        inputs: Tensor,
        hidden: Tensor,
        probs: Tensor,
        x_mask: Tensor | None,
        h_mask: Tensor | None,
        w0: Tensor,
        *ws: Tensor,
    ) -> tuple[Tensor, ...]:
        n, t, b, _ = inputs.shape
        d, s = hidden.shape[-1], len(ws)
        e = s * (s + 1) // 2
        shapes = [(t, b, n, d), (t, s + 1, b, n, d), (t, e, b, n, 2 * d), (t, b, n, 2 * d),
                  (t, s + 1, n, d)]  # fmt: skip
        outs = [inputs.new_empty(shape) for shape in shapes]
        _cell_forward(inputs, hidden, probs, x_mask, h_mask, w0, list(ws), bn, *outs)
        return tuple(outs)

    setup_context = RecurrentCellFunction.setup_context

    @staticmethod
    def vmap(info, in_dims, bn, *tensors):
        # Nested vmap (an outer level over the samples' batch): once per outer sample.
        return _vmap_per_sample(_BatchedCellFunction, info.batch_size, in_dims[1:], bn, tensors)

    @staticmethod
    def backward(ctx, grad: Tensor | None, *_) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        if grad is None:
            return (None,) * (7 + ctx.n_nodes)
        running_mean, running_var, _, training, *_ = ctx.bn
        with _float32(grad):
            if torch.is_grad_enabled():
                return (
                    None,
                    *_differentiable_backward(ctx, grad, running_mean, running_var, batched=True),
                )
            inputs, hidden, probs, x_mask, h_mask, w0, *ws = saved[: 6 + ctx.n_nodes]
            grads = [torch.empty_like(t) for t in (inputs, hidden, probs, w0, *ws)]
            _cell_backward(
                grad.contiguous(), inputs, hidden, probs, x_mask, h_mask, w0, ws,
                *saved[6 + ctx.n_nodes :], training, *grads[:4], grads[4:],
            )  # fmt: skip
        d_inputs, d_hidden, d_probs, d_w0, *d_ws = grads
        return (None, d_inputs, d_hidden, d_probs, None, None, d_w0, *d_ws)


def _differentiable_backward(
    ctx, grad: Tensor, running_mean: Tensor, running_var: Tensor, batched: bool = False
):
    """The cell's backward as differentiable ops, recomputing it node by node (``batched``:
    for :class:`_BatchedCellFunction`'s samples, under vmap)."""
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

    def cell(inputs: Tensor, hidden: Tensor, w0: Tensor, *ws: Tensor) -> Tensor:
        return cell_forward_nodes(
            inputs, hidden, probs, x_mask, h_mask, w0, ws, bn, recurrent_mixed
        )

    if batched:
        cell = torch.vmap(cell, in_dims=(0, 1, 0, *[0] * len(ws)), out_dims=2)
    with torch.enable_grad():
        out = cell(inputs, hidden, w0, *ws)
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
    the reference would. In the inputs' dtype, under autocast too (see the module's
    docstring). A ``RecurrentSearchCell.cell_op``."""
    bn = cell.bn
    _check_bn_batch(bn.training, inputs.shape[1])
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
    with _float32(inputs):
        return RecurrentCellFunction.apply(
            bn_args, inputs.contiguous(), hidden.contiguous(), probs.contiguous(), *masks,
            cell._W0.contiguous(), *(w.contiguous() for w in cell._Ws),
        )[0]  # fmt: skip


# -- FLOP counts (FlopCounterMode; see fastdarts.ops.flops) -----------------------------------
# The cell's matrix products, as torch counts the reference's (2·m·k·n each): per time step
# [x, h]·W0 and, for node j, its j + 1 predecessors' states times W_j; the backward makes
# both operands' gradients, twice that. The mixtures and the BatchNorm, elementwise, count
# nothing, as the reference's do not.


def _cell_flops(inputs, w0, ws) -> int:
    steps, batch = inputs[0], inputs[1]
    flops = 2 * batch * w0[0] * w0[1]
    flops += sum(2 * (j + 1) * batch * w[0] * w[1] for j, w in enumerate(ws))
    return steps * flops


@flop_formula("recurrent_cell")
def _forward_flops(inputs, hidden, probs, x_mask, h_mask, w0, ws, *args, **kwargs) -> int:
    return _cell_flops(inputs, w0, ws)


@flop_formula("recurrent_cell_backward")
def _backward_flops(grad, inputs, hidden, probs, x_mask, h_mask, w0, ws, *args, **kwargs) -> int:
    return 2 * _cell_flops(inputs, w0, ws)
