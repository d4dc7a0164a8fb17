"""The fused recurrent MixedOp: one node of the DARTS PTB search cell in one kernel.

With S (n, B, D) the node's predecessors, CH = [C, H] (n, B, 2D) their projections and
P (n, 5) the edges' op weights (``none`` first), σ = sigmoid(C), T_i = Σ_{k≥1} P[i,k] and
F_i = Σ_{k≥1} P[i,k] f_k(H_i) for f = tanh, relu, sigmoid, identity:

    out (B, D) = Σ_i Σ_{k≥1} P[i,k] (S_i + σ_i (f_k(H_i) − S_i)) = Σ_i (1 − σ_i) T_i S_i + σ_i F_i

The forward (every op, weight and predecessor) and the backward (dS, dCH and dP) are each one
kernel: C++ on the CPU (``fastdarts._C``), Triton on CUDA (else the extension's CUDA kernel);
without one, the same formulas in torch ops. The kernels are the custom ops
``torch.ops.fastdarts.recurrent_mixed`` and ``recurrent_mixed_backward`` (fake impls for
torch.compile); one autograd Function ties them together, with a differentiable backward
(under create_graph it takes the torch-op formula) and a vmap rule that folds a batch
dimension into B instead of looping.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastdarts.genotypes import RNN_PRIMITIVES
from fastdarts.ops.extension import extension, triton_kernels, triton_ready
from fastdarts.ops.vmap import batch_first
from fastdarts.spaces.rnn import recurrent_mixed_reference

K = len(RNN_PRIMITIVES)
_DTYPES = (torch.float32, torch.float64)


def check_inputs(states: Tensor, ch: Tensor, probs: Tensor) -> None:
    """Raise ValueError / TypeError naming the offending argument."""
    for name, t in (("states", states), ("ch", ch), ("probs", probs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"recurrent_mixed: {name} must be a Tensor, got {type(t).__name__}")
    if states.dim() != 3 or states.shape[0] < 1:
        raise ValueError(
            f"recurrent_mixed: states must be (n, B, D) with n >= 1, got {tuple(states.shape)}"
        )
    n, b, d = states.shape
    if tuple(ch.shape) != (n, b, 2 * d):
        raise ValueError(
            f"recurrent_mixed: ch must be (n, B, 2D) = {(n, b, 2 * d)} for states "
            f"{tuple(states.shape)}, got {tuple(ch.shape)}"
        )
    if tuple(probs.shape) != (n, K):
        raise ValueError(
            f"recurrent_mixed: probs must be (n, {K}) = {(n, K)} (ops {', '.join(RNN_PRIMITIVES)})"
            f", got {tuple(probs.shape)}"
        )
    if states.dtype not in _DTYPES or ch.dtype != states.dtype or probs.dtype != states.dtype:
        raise TypeError(
            "recurrent_mixed: states, ch and probs must all be float32 or all float64, got "
            f"{states.dtype}, {ch.dtype}, {probs.dtype}"
        )
    if ch.device != states.device or probs.device != states.device:
        raise ValueError(
            "recurrent_mixed: states, ch and probs must be on one device, got "
            f"{states.device}, {ch.device}, {probs.device}"
        )


def backward_reference(
    grad: Tensor, states: Tensor, ch: Tensor, probs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(dS (…, n, B, D), dCH (…, n, B, 2D), dP (…, n, K)) for grad (…, B, D), in
    differentiable torch ops (relu' at 0 = 0, as torch), over any leading batch dims."""
    c, h = ch.chunk(2, dim=-1)
    sg = torch.sigmoid(c)
    sh = torch.sigmoid(h)
    th = torch.tanh(h)
    p = probs[..., 1:, None, None]  # (…, n, K-1, 1, 1)
    t = p.sum(-3)
    f = torch.stack([th, torch.relu(h), sh, h], dim=-3)  # (…, n, K-1, B, D)
    df = torch.stack([1 - th * th, (h > 0).to(h.dtype), sh * (1 - sh), torch.ones_like(h)], -3)
    g = grad.unsqueeze(-3)
    d_states = g * t * (1 - sg)
    d_c = g * sg * (1 - sg) * ((p * f).sum(-3) - t * states)
    d_h = g * sg * (p * df).sum(-3)
    s = states.unsqueeze(-3)
    d_p = (g.unsqueeze(-3) * (s + sg.unsqueeze(-3) * (f - s))).sum((-2, -1))
    d_none = torch.zeros_like(d_p[..., :1])
    return d_states, torch.cat([d_c, d_h], -1), torch.cat([d_none, d_p], -1)


def kernel_name(device: torch.device) -> str:
    """Which implementation runs on ``device``: 'triton', 'cuda', 'cpp' or 'reference'."""
    if triton_ready(device):
        return "triton"
    ext = extension()
    if device.type == "cuda" and hasattr(ext, "recurrent_mixed_forward_cuda"):
        return "cuda"
    if device.type == "cpu" and ext is not None:
        return "cpp"
    return "reference"


@torch.library.custom_op("fastdarts::recurrent_mixed", mutates_args=())
def _forward_op(states: Tensor, ch: Tensor, probs: Tensor) -> Tensor:
    kind = kernel_name(states.device)
    if kind == "triton":
        return triton_kernels("recurrent_mixed").forward(states, ch, probs)
    if kind in ("cpp", "cuda"):
        out = states.new_empty(states.shape[1:])
        fn = "recurrent_mixed_forward" + ("_cuda" if kind == "cuda" else "")
        getattr(extension(), fn)(states, ch, probs, out)
        return out
    return recurrent_mixed_reference(states, ch, probs)


@_forward_op.register_fake
def _(states: Tensor, ch: Tensor, probs: Tensor) -> Tensor:
    return states.new_empty(states.shape[1:])


@torch.library.custom_op("fastdarts::recurrent_mixed_backward", mutates_args=())
def _backward_op(grad: Tensor, states: Tensor, ch: Tensor, probs: Tensor) -> list[Tensor]:
    kind = kernel_name(states.device)
    if kind == "triton":
        return list(triton_kernels("recurrent_mixed").backward(grad, states, ch, probs))
    if kind in ("cpp", "cuda"):
        grads = [torch.empty_like(states), torch.empty_like(ch), torch.empty_like(probs)]
        fn = "recurrent_mixed_backward" + ("_cuda" if kind == "cuda" else "")
        getattr(extension(), fn)(grad, states, ch, probs, *grads)
        return grads
    return list(backward_reference(grad, states, ch, probs))


@_backward_op.register_fake
def _(grad: Tensor, states: Tensor, ch: Tensor, probs: Tensor) -> list[Tensor]:
    return [torch.empty_like(states), torch.empty_like(ch), torch.empty_like(probs)]


def _fold(x: Tensor, bdim: int | None, size: int) -> Tensor:
    """(n, B, D) with a batch dim at ``bdim`` → (n, size·B, D): the batch folded into B."""
    x = batch_first(x, bdim, size).transpose(0, 1)
    return x.reshape(x.shape[0], size * x.shape[2], x.shape[3])


@_backward_op.register_vmap
def _(info, in_dims, grad: Tensor, states: Tensor, ch: Tensor, probs: Tensor):
    # dP sums over B, so a kernel over the folded batch would mix the samples: batched
    # torch ops instead (no per-sample loop).
    size = info.batch_size
    args = [batch_first(x, d, size) for x, d in zip((grad, states, ch, probs), in_dims)]
    return list(backward_reference(*args)), [0, 0, 0]


class RecurrentMixedFunction(torch.autograd.Function):
    """Forward and backward each one kernel; the backward is differentiable (under
    create_graph it takes the torch-op formula, same values); vmap folds the batch into B."""

    @staticmethod
    def forward(states: Tensor, ch: Tensor, probs: Tensor) -> Tensor:
        return _forward_op(states, ch, probs)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        states, ch, probs = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph (double backward, exact HVP, torch.func.grad): the kernel is not
            # differentiable, the torch-op formula is.
            return backward_reference(grad, states, ch, probs)
        return tuple(_backward_op(grad, states, ch, probs))

    @staticmethod
    def vmap(info, in_dims, states: Tensor, ch: Tensor, probs: Tensor):
        return _vmap_forward(RecurrentMixedFunction.apply, info, in_dims, states, ch, probs)


def _vmap_forward(fn, info, in_dims, states: Tensor, ch: Tensor, probs: Tensor):
    """``fn`` (the Function or the op) on the batch folded into B, when probs is shared."""
    size = info.batch_size
    if in_dims[2] is not None:
        # Per-sample weights do not fold into B: batched torch ops (no per-sample loop).
        args = [batch_first(x, d, size) for x, d in zip((states, ch, probs), in_dims)]
        return recurrent_mixed_reference(*args), 0
    out = fn(_fold(states, in_dims[0], size), _fold(ch, in_dims[1], size), probs)
    return out.view(size, -1, out.shape[-1]), 0


@_forward_op.register_vmap
def _(info, in_dims, states: Tensor, ch: Tensor, probs: Tensor):
    return _vmap_forward(_forward_op, info, in_dims, states, ch, probs)


# torch.ops.fastdarts.recurrent_mixed is differentiable too, with the same formula (the
# Function above is what the torch.func transforms need).
_forward_op.register_autograd(
    RecurrentMixedFunction.backward, setup_context=RecurrentMixedFunction.setup_context
)


def recurrent_mixed(states: Tensor, ch: Tensor, probs: Tensor) -> Tensor:
    """One node's fused mixture: states (n, B, D), ch (n, B, 2D), probs (n, 5) → (B, D).

    Same values and gradients as :func:`fastdarts.recurrent_mixed_reference`; float32 or
    float64, inputs on one device, any strides (made contiguous for the kernel).
    """
    check_inputs(states, ch, probs)
    return RecurrentMixedFunction.apply(states.contiguous(), ch.contiguous(), probs.contiguous())


class RecurrentMixedOp(nn.Module):
    """:func:`recurrent_mixed` as a module: forward(states, ch, probs) → (B, D)."""

    def forward(self, states: Tensor, ch: Tensor, probs: Tensor) -> Tensor:
        return recurrent_mixed(states, ch, probs)
