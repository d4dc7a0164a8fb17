"""The fused convolutional MixedOp: edges of the DARTS CIFAR search cell, batched.

A group is a set of E edges (one stride) reading n_in input states X_i (B, C, H, W); a search
cell runs as 4 groups (the 8 edges from its two inputs, then each node's outgoing edges).
All the convolutional ops of all the group's edges run together: the first depthwise stage
of sep_conv_3x3, sep_conv_5x5, dil_conv_3x3 and dil_conv_5x5 as one call of
:func:`depthwise` (a kernel that runs several kernel sizes and dilations at once, E·C
channels each, and their shared ReLU of the inputs on the way in); their pointwise
convolutions as one grouped 1×1 (4E groups, :func:`pointwise`); one BatchNorm over those
4EC channels; the sep convs' second stage likewise (one depthwise call with its ReLU, one
grouped 1×1). max_pool and avg_pool run once per input
state, both in one call of :func:`pools`; skip_connect is the input (or FactorizedReduce,
two grouped 1×1, at stride 2).

The rest — the α-weighted sum of the eight ops of every edge into its target node, with
skip_connect, `none` (no term) and, in eval, the BatchNorm of the pools, the sep convs'
second stage and FactorizedReduce (in training one BatchNorm over all of those runs first)
— is one kernel, :func:`conv_mix`, over the channels src (B, S, H', W') of its sources (the
stage-1 block, the normalised block, the inputs; read in place, not concatenated):

    out[b, o] = acc[b, o] + Σ_{routes r into o} alpha_r · (src[b, s_r] − shift_r)

with one route per (edge, op, channel): alpha = α-weight (· 1/√(running var + eps) in
eval), shift = 0 (the running mean in eval). The kernels are custom ops
(``torch.ops.fastdarts.conv_mix`` / ``depthwise`` / ``pointwise`` / ``pools`` and their
``_backward``): C++ on the CPU (functions of ``fastdarts._C`` that allocate their outputs),
Triton on CUDA for the mixture, the depthwise convolutions and the pools (cuDNN's and
torch's ops for the others), else torch ops.
An autograd Function ties each pair; under create_graph its backward takes torch-op
formulas (differentiable), and a vmap rule folds the vmap dim into the batch (into the
channels where each sample has its own weights or BatchNorm statistics: the batched w±
passes).

:class:`MixedOp` is the drop-in module for one edge; :class:`FusedCellOps` holds all 14
edges of a search cell (``SearchCell._ops`` under ``--backend fused``). Both keep their
weights in the batched layout and read and write the reference state_dict keys.
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdarts.genotypes import CNN_PRIMITIVES
from fastdarts.ops.extension import extension, triton_kernels, triton_ready
from fastdarts.ops.flops import flop_formula
from fastdarts.ops.vmap import batch_first

K = len(CNN_PRIMITIVES)
BN_MOMENTUM, BN_EPS = 0.1, 1e-5
_DTYPES = (torch.float32, torch.float64)
# Sources conv_mix reads in place (kernels/conv_mixed.py's MAX_SOURCES).
_MAX_SOURCES = 4
# First-stage convolutions of the four conv ops: (primitive index, kernel, padding, dilation).
_STAGE1 = ((4, 3, 1, 1), (5, 5, 2, 1), (6, 3, 2, 2), (7, 5, 4, 2))
_STAGE2 = ((4, 3, 1), (5, 5, 2))  # the sep convs' second stage: (primitive, kernel, padding)


# -- the mixture kernel ------------------------------------------------------------------


def mix_reference(
    src: Tensor,
    alpha: Tensor,
    shift: Tensor,
    acc: Tensor | None,
    route_src: Tensor,
    route_out: Tensor,
    n_out: int,
) -> Tensor:
    """:func:`conv_mix` in torch ops, over any leading batch dims: src (…, B, S, H, W),
    alpha and shift (…, R) → (…, B, n_out, H, W). On CUDA ``index_add`` (here and in the
    backward formulas) sums with atomics, in no fixed order, unless
    ``torch.use_deterministic_algorithms(True)``."""
    terms = alpha[..., None, :, None, None] * (
        src.index_select(-3, route_src) - shift[..., None, :, None, None]
    )
    shape = (*terms.shape[:-3], n_out, *terms.shape[-2:])
    out = terms.new_zeros(shape).index_add(-3, route_out, terms)
    return out if acc is None else acc + out


def mix_backward_reference(
    grad: Tensor, src: Tensor, alpha: Tensor, shift: Tensor, route_src: Tensor, route_out: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(d_src, d_alpha, d_shift) of :func:`conv_mix` for grad (…, B, n_out, H, W), in
    differentiable torch ops (d_acc is grad itself)."""
    g = grad.index_select(-3, route_out)
    d_src = torch.zeros_like(src).index_add(-3, route_src, g * alpha[..., None, :, None, None])
    x = src.index_select(-3, route_src) - shift[..., None, :, None, None]
    d_alpha = (g * x).sum((-4, -2, -1))
    d_shift = -alpha * g.sum((-4, -2, -1))
    return d_src, d_alpha, d_shift


def _has_cpp(op: str = "conv_mix_forward") -> bool:
    # An extension built before a kernel existed lacks its function.
    return hasattr(extension(), op)


# A constant to torch.compile, which would otherwise trace into extension() (Dynamo ignores
# its functools.cache) and break the graph at the import there. This is what
# torch.compiler.assume_constant_result sets; that function imports torch._dynamo, and with
# it Triton, which ``import fastdarts`` must not.
_has_cpp._dynamo_marked_constant = True


def _cpp(x: Tensor, name: str) -> bool:
    """Whether the C++ kernel ``name`` runs for x (on the CPU, with the extension)."""
    return x.device.type == "cpu" and _has_cpp(name)


def kernel_name(device: torch.device) -> str:
    """Which mixture kernel runs on ``device``: 'triton', 'cpp' or 'reference'."""
    if triton_ready(device):
        return "triton"
    if device.type == "cpu" and _has_cpp():
        return "cpp"
    return "reference"


def _kernel_op(name: str, impl, fake, autograd=None):
    """Registers ``impl`` as the custom op torch.ops.fastdarts.<name> (schema from its
    annotations, mutating nothing) with its fake (shapes-only) implementation and, with
    ``autograd`` = (backward, setup_context), the op's own autograd formula. The kernels'
    autograd Functions call these ops; the formula makes the op usable on its own too."""
    op = torch.library.custom_op(f"fastdarts::{name}", impl, mutates_args=())
    op.register_fake(fake)
    if autograd is not None:
        op.register_autograd(autograd[0], setup_context=autograd[1])
    return op


def _joined(srcs: list[Tensor]) -> Tensor:
    """The sources' channels as one tensor (B, S, H, W): the C++ kernels' and the torch-op
    formulas' src (the Triton kernels read the sources in place)."""
    return srcs[0] if len(srcs) == 1 else torch.cat(srcs, -3)


def _split(d_src: Tensor, srcs: list[Tensor]) -> list[Tensor]:
    """d_src (…, S, H, W) as each source's gradient (views)."""
    return list(d_src.split([x.shape[-3] for x in srcs], -3))


def _mix_op(
    srcs: list[Tensor],
    alpha: Tensor,
    shift: Tensor,
    acc: Tensor | None,
    route_src: Tensor,
    route_out: Tensor,
    out_ptr: Tensor,
    n_out: int,
) -> Tensor:
    kind = kernel_name(srcs[0].device)
    if kind == "reference":
        return mix_reference(_joined(srcs), alpha, shift, acc, route_src, route_out, n_out)
    if kind == "cpp":
        src = _joined(srcs).contiguous()
        return extension().conv_mix_forward(src, alpha, shift, acc, route_src, out_ptr)
    out = _mix_fake(srcs, n_out)
    return triton_kernels("conv_mixed").forward(srcs, alpha, shift, acc, route_src, out_ptr, out)


def _mix_backward_op(
    grad: Tensor,
    srcs: list[Tensor],
    alpha: Tensor,
    shift: Tensor,
    route_src: Tensor,
    route_out: Tensor,
    src_perm: Tensor,
    src_ptr: Tensor,
) -> list[Tensor]:
    """[d_src (B, S, H, W): all the sources' channels, d_alpha, d_shift]."""
    kind = kernel_name(srcs[0].device)
    if kind == "reference":
        src = _joined(srcs)
        return list(mix_backward_reference(grad, src, alpha, shift, route_src, route_out))
    if kind == "cpp":
        args = (grad, _joined(srcs).contiguous(), alpha, shift, route_src, route_out)
        return extension().conv_mix_backward(*args, src_perm, src_ptr)
    grads = _mix_backward_fake(grad, srcs, alpha, shift)
    args = (grad, srcs, alpha, shift, route_src, route_out, src_perm, src_ptr)
    return list(triton_kernels("conv_mixed").backward(*args, out=grads))


def _mix_setup_context(ctx, inputs, output) -> None:
    srcs, alpha, shift, acc, route_src, route_out, _, _ = inputs
    ctx.has_acc = acc is not None
    ctx.save_for_backward(alpha, shift, route_src, route_out, *srcs)


def _mix_op_backward(ctx, grad):
    # The op alone has no by-source tables for the kernel: the torch-op formula.
    alpha, shift, route_src, route_out, *srcs = ctx.saved_tensors
    d_src, d_alpha, d_shift = mix_backward_reference(
        grad, _joined(srcs), alpha, shift, route_src, route_out
    )
    d_acc = grad if ctx.has_acc else None
    return _split(d_src, srcs), d_alpha, d_shift, d_acc, None, None, None, None


def _mix_fake(srcs: list[Tensor], *args) -> Tensor:
    """The output, unwritten (the op's fake, and the Triton kernel's out): n_out = args[-1]."""
    return srcs[0].new_empty(srcs[0].shape[0], args[-1], *srcs[0].shape[2:])


def _mix_backward_fake(grad: Tensor, srcs: list[Tensor], alpha: Tensor, shift: Tensor, *_):
    """[d_src, d_alpha, d_shift] unwritten (the op's fake, and the Triton kernels' outs)."""
    d_src = grad.new_empty(grad.shape[0], sum(x.shape[1] for x in srcs), *grad.shape[2:])
    return [d_src, torch.empty_like(alpha), torch.empty_like(shift)]


_mix_op = _kernel_op("conv_mix", _mix_op, _mix_fake, (_mix_op_backward, _mix_setup_context))
_mix_backward_op = _kernel_op("conv_mix_backward", _mix_backward_op, _mix_backward_fake)


def _fold(x: Tensor, bdim: int | None, size: int, dim: int | None = None) -> tuple[Tensor, int]:
    """x (B, ·, H, W) with a vmap dim of ``size`` folded into its rows → ((size·B, ·, H, W),
    the dim the rows unfold to): interleaved (memory (B, size), dim 1) when x's vmap dim is
    1, as torch's batched convolutions leave it, else sample-major (dim 0), so that either
    folds without a copy; ``dim`` imposes one (to fold a second tensor as the first)."""
    if dim is None:
        dim = 1 if bdim == 1 else 0
    x = batch_first(x, bdim, size).movedim(0, dim)
    return x.reshape(-1, *x.shape[2:]), dim


def _unfold(out: Tensor, dim: int, size: int) -> tuple[Tensor, int]:
    """The rows of an op's output on :func:`_fold`'s rows back to (vmapped output, its dim)."""
    return out.unflatten(0, (size, -1) if dim == 0 else (-1, size)), dim


def _contiguous(x: Tensor) -> Tensor:
    """x contiguous for a kernel, except under vmap: the op's vmap rule folds the vmap dim in
    and makes the folded tensor contiguous, without a copy when x is laid out as it folds
    (``contiguous()`` of a vmapped tensor would move its vmap dim to the front, a copy)."""
    return x if _vmapped(x) else x.contiguous()


def _sample_rows(x: Tensor, samples: int, interleaved: bool) -> tuple[Tensor, ...]:
    """The rows (N, …) of each of ``samples`` weight samples (see :func:`depthwise`): the
    rows unfolded as :func:`_unfold` does, split."""
    out, dim = _unfold(x, int(interleaved), samples)
    return out.unbind(dim)


def _join_rows(parts: list[Tensor], interleaved: bool) -> Tensor:
    """:func:`_sample_rows`' inverse."""
    return torch.stack(parts, int(interleaved)).flatten(0, 1)


def _check_routes_unbatched(in_dims, first: int) -> None:
    if any(d is not None for d in in_dims[first:]):
        raise ValueError("conv_mix: the route tables cannot be batched under vmap")


def _vmap_forward(call, info, src_dims, in_dims, srcs, alpha, shift, acc, *routes):
    """``call(srcs, alpha, shift, acc)`` on the vmap batch folded into B when alpha and
    shift are shared; ``src_dims`` the sources' vmap dims, ``in_dims`` those of alpha,
    shift, acc and the route tables."""
    _check_routes_unbatched(in_dims, 3)
    size, n_out = info.batch_size, routes[-1]
    if in_dims[0] is not None or in_dims[1] is not None:
        # Per-sample coefficients do not fold into B: batched torch ops (no per-sample loop).
        s = _joined([batch_first(x, d, size) for x, d in zip(srcs, src_dims)])
        a, h = batch_first(alpha, in_dims[0], size), batch_first(shift, in_dims[1], size)
        c = None if acc is None else batch_first(acc, in_dims[2], size)
        return mix_reference(s, a, h, c, routes[0], routes[1], n_out), 0
    first, dim = _fold(srcs[0], src_dims[0], size)
    # The others folded as the first (a copy only where one's layout differs).
    rest = [_fold(x, d, size, dim)[0] for x, d in zip(srcs[1:], src_dims[1:])]
    acc = None if acc is None else _fold(acc, in_dims[2], size, dim)[0]
    folded = [x.contiguous() for x in (first, *rest)]
    return _unfold(call(folded, alpha, shift, acc), dim, size)


@_mix_op.register_vmap
def _(info, in_dims, srcs, alpha, shift, acc, route_src, route_out, out_ptr, n_out):
    routes = (route_src, route_out, out_ptr, n_out)

    def call(srcs, alpha, shift, acc):
        return _mix_op(srcs, alpha, shift, acc, *routes)

    src_dims = in_dims[0] if in_dims[0] is not None else [None] * len(srcs)
    return _vmap_forward(call, info, src_dims, in_dims[1:], srcs, alpha, shift, acc, *routes)


@_mix_backward_op.register_vmap
def _(info, in_dims, grad, srcs, alpha, shift, route_src, route_out, src_perm, src_ptr):
    # d_alpha sums over B, so a kernel over the folded batch would mix the samples.
    _check_routes_unbatched(in_dims, 4)
    size = info.batch_size
    src_dims = in_dims[1] if in_dims[1] is not None else [None] * len(srcs)
    src = _joined([batch_first(x, d, size) for x, d in zip(srcs, src_dims)])
    g, a, h = (batch_first(x, in_dims[i], size) for i, x in ((0, grad), (2, alpha), (3, shift)))
    return list(mix_backward_reference(g, src, a, h, route_src, route_out)), [0, 0, 0]


class ConvMixFunction(torch.autograd.Function):
    """Forward and backward each one kernel; the backward is differentiable (under
    create_graph it takes the torch-op formula, same values); vmap folds the batch into B.
    The sources come last, in four slots (None past the last): the channels of all of them
    are src. (Named slots, not ``*srcs``: Dynamo cannot trace a Function's varargs.)"""

    @staticmethod
    def forward(
        alpha: Tensor,
        shift: Tensor,
        acc: Tensor | None,
        route_src: Tensor,
        route_out: Tensor,
        out_ptr: Tensor,
        src_perm: Tensor,
        src_ptr: Tensor,
        n_out: int,
        s0: Tensor,
        s1: Tensor | None,
        s2: Tensor | None,
        s3: Tensor | None,
    ) -> Tensor:
        srcs = [x for x in (s0, s1, s2, s3) if x is not None]
        return _mix_op(srcs, alpha, shift, acc, route_src, route_out, out_ptr, n_out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        alpha, shift, acc, route_src, route_out, _, src_perm, src_ptr, _ = inputs[:9]
        s0, s1, s2, s3 = inputs[9:]
        ctx.has_acc = acc is not None
        ctx.save_for_backward(alpha, shift, route_src, route_out, src_perm, src_ptr, s0, s1, s2, s3)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        alpha, shift, route_src, route_out, src_perm, src_ptr, *slots = ctx.saved_tensors
        srcs = [x for x in slots if x is not None]
        if torch.is_grad_enabled():
            # create_graph (double backward, exact HVP): the torch-op formula is differentiable.
            src = _joined(srcs)
            d_src, d_alpha, d_shift = mix_backward_reference(
                grad, src, alpha, shift, route_src, route_out
            )
        else:
            args = (grad.contiguous(), srcs, alpha, shift, route_src, route_out, src_perm, src_ptr)
            d_src, d_alpha, d_shift = _mix_backward_op(*args)
        d_srcs = _split(d_src, srcs) + [None] * (_MAX_SOURCES - len(srcs))
        d_acc = grad if ctx.has_acc else None
        return d_alpha, d_shift, d_acc, None, None, None, None, None, None, *d_srcs

    @staticmethod
    def vmap(
        info, in_dims, alpha, shift, acc, route_src, route_out, out_ptr, src_perm, src_ptr, n_out,
        s0, s1, s2, s3,
    ):  # fmt: skip
        routes = (route_src, route_out, out_ptr, src_perm, src_ptr, n_out)
        srcs = [x for x in (s0, s1, s2, s3) if x is not None]

        def call(srcs, alpha, shift, acc):
            return ConvMixFunction.apply(alpha, shift, acc, *routes, *_slots(srcs))

        args = (info, in_dims[9 : 9 + len(srcs)], in_dims[:9], srcs, alpha, shift, acc)
        return _vmap_forward(call, *args, routes[0], routes[1], routes[-1])


def _slots(srcs: list[Tensor]) -> list[Tensor | None]:
    """The sources in :class:`ConvMixFunction`'s four slots (the last ones joined if more)."""
    if len(srcs) > _MAX_SOURCES:
        srcs = [*srcs[: _MAX_SOURCES - 1], torch.cat(srcs[_MAX_SOURCES - 1 :], -3)]
    return [*srcs, *[None] * (_MAX_SOURCES - len(srcs))]


class Routes(nn.Module):
    """The static route tables of one :func:`conv_mix` (non-persistent buffers, so they
    follow the module's device): route r adds source channel ``src[r]`` into output channel
    ``out[r]``; routes are sorted by output channel (CSR ``out_ptr``), and ``src_perm`` /
    ``src_ptr`` list them by source channel for the backward."""

    def __init__(self, src: list[int], out: list[int], n_src: int, n_out: int):
        super().__init__()
        order = sorted(range(len(out)), key=lambda r: (out[r], r))
        self.order = order  # position here → the route's index in the caller's order
        self._src, self._out = [src[r] for r in order], [out[r] for r in order]
        self.n_src, self.n_out = n_src, n_out
        self.build(torch.get_default_device())  # where a buffer made here would go

    def build(self, device: torch.device) -> None:
        """(Re)make the tables on ``device``: computed on the CPU (also under a meta default
        device, which has no bincount), then moved."""
        src_t = torch.tensor(self._src, dtype=torch.long, device="cpu")
        out_t = torch.tensor(self._out, dtype=torch.long, device="cpu")
        perm = torch.sort(src_t, stable=True).indices
        tables = {
            "src": src_t,
            "out": out_t,
            "out_ptr": _csr(out_t, self.n_out),
            "src_perm": perm,
            "src_ptr": _csr(src_t[perm], self.n_src),
        }
        for name, t in tables.items():
            self.register_buffer(name, t.to(device), persistent=False)

    def _apply(self, fn, recurse=True):
        # Constants, rebuilt where fn put them: to_empty() leaves them uninitialised.
        super()._apply(fn, recurse)
        self.build(self.src.device)
        return self

    def tables(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
        return self.src, self.out, self.out_ptr, self.src_perm, self.src_ptr, self.n_out


def _csr(sorted_keys: Tensor, n: int) -> Tensor:
    counts = torch.bincount(sorted_keys, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def check_mix_inputs(
    srcs: list[Tensor], alpha: Tensor, shift: Tensor, acc: Tensor | None, routes: Routes
) -> None:
    """Raise ValueError / TypeError naming the offending argument."""
    named = [(f"src[{i}]" if len(srcs) > 1 else "src", t) for i, t in enumerate(srcs)]
    for name, t in (*named, ("alpha", alpha), ("shift", shift)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv_mix: {name} must be a Tensor, got {type(t).__name__}")
    shapes = [tuple(t.shape) for t in srcs]
    # Compared, not put in a set: hashing a symbolic size under torch.compile makes it a
    # constant, and each new batch size a recompilation.
    if len(srcs) > 1 and (
        any(t.dim() != 4 for t in srcs)
        or any((x[0], *x[2:]) != (shapes[0][0], *shapes[0][2:]) for x in shapes[1:])
    ):
        raise ValueError(f"conv_mix: the sources must be (B, S_t, H, W) alike, got {shapes}")
    src = srcs[0]
    if src.dim() != 4 or sum(t.shape[1] for t in srcs) != routes.n_src:
        what = "src" if len(srcs) == 1 else "the sources' channels"
        raise ValueError(f"conv_mix: {what} must be (B, {routes.n_src}, H, W), got {shapes}")
    n_routes = routes.src.numel()
    if tuple(alpha.shape) != (n_routes,) or tuple(shift.shape) != (n_routes,):
        raise ValueError(
            f"conv_mix: alpha and shift must be ({n_routes},), got {tuple(alpha.shape)} "
            f"and {tuple(shift.shape)}"
        )
    want = (src.shape[0], routes.n_out, *src.shape[2:])
    if acc is not None and tuple(acc.shape) != want:
        raise ValueError(f"conv_mix: acc must be {want}, got {tuple(acc.shape)}")
    dtypes = [t.dtype for t in (*srcs, alpha, shift, acc) if t is not None]
    if src.dtype not in _DTYPES or any(d != src.dtype for d in dtypes):
        raise TypeError(f"conv_mix: inputs must all be float32 or all float64, got {dtypes}")
    devices = [t.device for t in (*srcs, alpha, shift, acc, routes.src) if t is not None]
    if any(d != src.device for d in devices):
        raise ValueError(f"conv_mix: inputs must be on one device, got {devices}")


def conv_mix(
    src: Tensor | Sequence[Tensor],
    alpha: Tensor,
    shift: Tensor,
    routes: Routes,
    acc: Tensor | None = None,
) -> Tensor:
    """out (B, n_out, H, W) = acc + Σ_r alpha_r·(src[:, src_r] − shift_r) into channel out_r.

    src (B, S, H, W), or a sequence of tensors (B, S_t, H, W) whose channels, in order, are
    src's: the Triton kernels read each in place (no concatenated copy), as they do acc, when
    its planes are dense (a channel block of a larger tensor qualifies); alpha, shift (R,)
    in ``routes``' order (sorted by output channel); float32 or float64, one device.
    """
    srcs = [src] if isinstance(src, Tensor) else list(src)
    if not srcs:
        raise ValueError("conv_mix: no source given")
    check_mix_inputs(srcs, alpha, shift, acc, routes)
    # acc as it is: the kernels read a channel block of a larger tensor in place.
    # The sources as they are: the Triton kernels read channel blocks of larger tensors in
    # place (a node state is one), the C++ kernels a contiguous join of them.
    slots = _slots(srcs)
    return ConvMixFunction.apply(
        alpha.contiguous(), shift.contiguous(), acc, *routes.tables(), *slots
    )


# -- depthwise convolutions of several shapes ------------------------------------------


def depthwise_reference(
    x: Tensor,
    weights: list[Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    relu: bool = False,
    interleaved: bool = False,
) -> Tensor:
    """:func:`depthwise` in torch ops (one grouped convolution per shape, concatenated; per
    weight sample, stacked)."""
    if weights[0].dim() == 5:
        rows = _sample_rows(x, weights[0].shape[0], interleaved)
        geometry = (stride, pads, dils, in_offsets, relu)
        parts = [
            depthwise_reference(xv, [w[v] for w in weights], *geometry) for v, xv in enumerate(rows)
        ]
        return _join_rows(parts, interleaved)
    if relu:
        x = torch.relu(x)
    outs = []
    for w, pad, dil, off in zip(weights, pads, dils, in_offsets):
        ch = w.shape[0]
        xs = x if off == 0 and ch == x.shape[-3] else x[..., off : off + ch, :, :]
        outs.append(F.conv2d(xs, w, None, stride, pad, dil, ch))
    return torch.cat(outs, -3)


def depthwise_backward_reference(
    grad: Tensor,
    x: Tensor,
    weights: list[Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    grad_weights: bool = True,
    relu: bool = False,
    interleaved: bool = False,
) -> list[Tensor]:
    """[d_x, *d_weights] of :func:`depthwise` ([d_x] without ``grad_weights``), in
    differentiable torch ops."""
    if weights[0].dim() == 5:
        n = weights[0].shape[0]
        pairs = zip(_sample_rows(grad, n, interleaved), _sample_rows(x, n, interleaved))
        geometry = (stride, pads, dils, in_offsets, grad_weights, relu)
        parts = [
            depthwise_backward_reference(g, xv, [w[v] for w in weights], *geometry)
            for v, (g, xv) in enumerate(pairs)
        ]
        d_ws = [torch.stack([p[1 + t] for p in parts]) for t in range(len(parts[0]) - 1)]
        return [_join_rows([p[0] for p in parts], interleaved), *d_ws]
    mask = None
    if relu:
        mask, x = x > 0, torch.relu(x)
    d_x, d_ws, start, cin = None, [], 0, x.shape[-3]
    for w, pad, dil, off in zip(weights, pads, dils, in_offsets):
        ch = w.shape[0]
        g = grad if len(weights) == 1 else grad[:, start : start + ch]
        xs = x if off == 0 and ch == cin else x[:, off : off + ch]
        start += ch
        gx = torch.nn.grad.conv2d_input(xs.shape, w, g, stride, pad, dil, ch)
        if ch != cin:
            gx = F.pad(gx, (0, 0, 0, 0, off, cin - off - ch))
        d_x = gx if d_x is None else d_x + gx
        if grad_weights:
            d_ws.append(torch.nn.grad.conv2d_weight(xs, w.shape, g, stride, pad, dil, ch))
    if mask is not None:
        d_x = d_x * mask
    return [d_x, *d_ws]


def _dw_out_shape(x: Tensor, weights: list[Tensor], stride: int, pads, dils) -> list[int]:
    w, pad, dil = weights[0], pads[0], dils[0]
    size = [(n + 2 * pad - dil * (w.shape[-1] - 1) - 1) // stride + 1 for n in x.shape[-2:]]
    return [x.shape[0], sum(t.shape[-4] for t in weights), *size]


# On the CPU the C++ kernel runs both strides (stride 2 on the input planes' phases); against
# torch's (oneDNN) grouped convolutions see benchmarks/results/cpu-kernels-depthwise-pools.json.
# On CUDA the Triton kernels: one launch each way where torch's ops take one convolution per
# shape and a concatenation (forward), and per shape an input-gradient convolution, a padding
# and a sum, and a weight-gradient convolution (backward). Not yet timed on a GPU against
# cuDNN (benchmarks/kernels.py's cnn_depthwise entry does it).


def _impl(x: Tensor, cpp_op: str, samples: bool = False) -> str:
    """Which implementation of a kernel with Triton and C++ versions runs for x: 'triton'
    (CUDA), 'cpp' (the CPU, with the extension's ``cpp_op``, which takes no weight
    ``samples``) or 'reference'."""
    if kernel_name(x.device) == "triton":
        return "triton"
    return "cpp" if _cpp(x, cpp_op) and not samples else "reference"


def _dw_op(
    x: Tensor,
    weights: list[Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    relu: bool,
    interleaved: bool,
) -> Tensor:
    kind = _impl(x, "depthwise_forward", weights[0].dim() == 5)
    if kind == "reference":
        return depthwise_reference(x, weights, stride, pads, dils, in_offsets, relu, interleaved)
    if kind == "cpp":
        return extension().depthwise_forward(x, weights, stride, pads, dils, in_offsets, relu)
    weights = [w.contiguous() for w in weights]
    out = x.new_empty(_dw_out_shape(x, weights, stride, pads, dils))
    kernels = triton_kernels("depthwise")
    return kernels.forward(x, weights, stride, pads, dils, in_offsets, relu, out, interleaved)


def _dw_backward_op(
    grad: Tensor,
    x: Tensor,
    weights: list[Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    grad_weights: bool,
    relu: bool,
    interleaved: bool,
) -> list[Tensor]:
    geometry = (stride, pads, dils, in_offsets, grad_weights, relu)
    kind = _impl(x, "depthwise_backward", weights[0].dim() == 5)
    if kind == "reference":
        return depthwise_backward_reference(grad, x, weights, *geometry, interleaved)
    if kind == "cpp":
        return extension().depthwise_backward(grad, x, weights, *geometry)
    weights = [w.contiguous() for w in weights]
    return triton_kernels("depthwise").backward(grad, x, weights, *geometry, interleaved)


def _dw_setup_context(ctx, inputs, output) -> None:
    x, weights, stride, pads, dils, in_offsets, relu, interleaved = inputs
    ctx.geometry = (stride, pads, dils, in_offsets)
    ctx.relu, ctx.interleaved = relu, interleaved
    ctx.save_for_backward(x, *weights)


def _dw_op_backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    flags = (True, ctx.relu, ctx.interleaved)
    grads = depthwise_backward_reference(grad, x, weights, *ctx.geometry, *flags)
    return grads[0], grads[1:], None, None, None, None, None, None


_dw_op = _kernel_op(
    "depthwise",
    _dw_op,
    lambda x, weights, stride, pads, dils, *_: x.new_empty(
        _dw_out_shape(x, weights, stride, pads, dils)
    ),
    (_dw_op_backward, _dw_setup_context),
)
_dw_backward_op = _kernel_op(
    "depthwise_backward",
    _dw_backward_op,
    lambda grad, x, weights, *args: [
        torch.empty_like(t) for t in (x, *(weights if args[-3] else []))
    ],
)


def _engine_wants(ctx, arg: int, edge: int) -> bool:
    """Whether the running backward pass uses the gradient of the Function's argument
    ``arg``, its ``edge``-th tensor argument (``next_functions`` lists tensors only).

    ``ctx.needs_input_grad`` only says the input requires grad; the engine's plan says
    whether this pass reaches it (``autograd.grad(loss, alphas)`` does not reach the weights).
    Traced (torch.compile) there is no engine to ask, nor ``next_functions``: every gradient.
    """
    if torch.compiler.is_compiling():
        return ctx.needs_input_grad[arg]
    node = ctx.next_functions[edge][0] if ctx.needs_input_grad[arg] else None
    if node is None:
        return False
    if _will_execute is None:  # a torch without the engine's query: compute it
        return True
    try:
        return _will_execute(node)
    except RuntimeError:
        # Raised for a leaf that autograd.grad() captures, i.e. exactly when it is wanted.
        return True


# A private query of the autograd engine (torch 2.11 and 2.14 have it); without it every
# wanted-looking gradient is computed, which is correct, only slower.
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


class DepthwiseFunction(torch.autograd.Function):
    """Depthwise convolutions of several shapes in one kernel each way; the backward is
    differentiable (under create_graph, torch's convolution gradients). vmap folds the vmap
    dim into the rows, the weights' too where they are batched (the batched w± passes):
    each sample's rows then read its own weights, in the same kernels."""

    @staticmethod
    def forward(
        x: Tensor,
        stride: int,
        pads: list[int],
        dils: list[int],
        in_offsets: list[int],
        relu: bool,
        interleaved: bool,
        *weights: Tensor,
    ) -> Tensor:
        return _dw_op(x, list(weights), stride, pads, dils, in_offsets, relu, interleaved)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, stride, pads, dils, in_offsets, relu, interleaved, *weights = inputs
        ctx.geometry = (stride, pads, dils, in_offsets)
        ctx.relu, ctx.interleaved = relu, interleaved
        ctx.save_for_backward(x, *weights)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, *weights = ctx.saved_tensors
        # The weights' gradient only when the engine will use it: not in the α step, which
        # asks autograd.grad for α alone (the reference's convolution nodes skip it there
        # too). It was half of this kernel's time in a first-order step (small CNN, one
        # thread: 0.93 of 1.8 s, both passes).
        want_w = any(_engine_wants(ctx, 7 + t, 1 + t) for t in range(len(weights)))
        args = (grad, x, weights, *ctx.geometry, want_w, ctx.relu, ctx.interleaved)
        if torch.is_grad_enabled():
            grads = depthwise_backward_reference(*args)
        else:
            grads = _dw_backward_op(grad.contiguous(), *args[1:])
        d_ws = grads[1:] or [None] * len(weights)
        return grads[0], None, None, None, None, None, None, *d_ws

    @staticmethod
    def vmap(info, in_dims, x, stride, pads, dils, in_offsets, relu, interleaved, *weights):
        size, w_dims = info.batch_size, in_dims[7:]
        geometry = (stride, pads, dils, in_offsets, relu)
        if weights[0].dim() - (w_dims[0] is not None) == 5:
            # Weight samples already (a vmap inside the batched passes): torch's convolutions.
            x = batch_first(x, in_dims[0], size)
            ws = [batch_first(w, d, size) for w, d in zip(weights, w_dims)]
            fn = functools.partial(depthwise_reference, interleaved=interleaved)
            return torch.vmap(lambda a, *b: fn(a, list(b), *geometry))(x, *ws), 0
        # The weights are one sample each here, so the op's rows need no sample layout of
        # their own: the fold's (interleaved when dim 1) is the weight samples' below.
        x, dim = _fold(x, in_dims[0], size)
        if any(d is not None for d in w_dims):
            # Per-sample weights (S, Ch, 1, K, K): the rows of sample v read weights[v].
            weights = [batch_first(w, d, size).contiguous() for w, d in zip(weights, w_dims)]
        out = DepthwiseFunction.apply(x.contiguous(), *geometry, dim == 1, *weights)
        return _unfold(out, dim, size)


def depthwise(
    x: Tensor,
    weights: list[Tensor],
    stride: int,
    pads: list[int],
    dils: list[int],
    in_offsets: list[int],
    relu: bool = False,
    interleaved: bool = False,
) -> Tensor:
    """Depthwise convolutions of several shapes at once: x (N, Cin, H, W); shape t has
    weight (Ch_t, 1, k_t, k_t), padding, dilation and the first input channel it reads;
    one stride; every shape gives the same H', W' → (N, Σ Ch_t, H', W'), shapes in order.
    With ``relu`` they read relu(x) (fused: no ReLU output, and its gradient's mask applied
    in the backward kernel).

    Weights (S, Ch_t, 1, k_t, k_t) are S samples, each for N / S of the rows: rows
    v·N/S … (v + 1)·N/S − 1 take sample v, or with ``interleaved`` rows v, v + S, v + 2S, …
    (the batched w± passes run w⁺ and w⁻ so, under vmap)."""
    x = _contiguous(x)
    if torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in (x, *weights))
    ):
        # Dynamo (torch 2.14) traces a Function that needs no gradient by inlining its
        # forward, and hands a forward with *args its ctx as the first argument (as x
        # here): the op that the forward calls, directly.
        return _dw_op(x, list(weights), stride, pads, dils, in_offsets, relu, interleaved)
    return DepthwiseFunction.apply(x, stride, pads, dils, in_offsets, relu, interleaved, *weights)


# -- grouped pointwise (1×1) convolutions -------------------------------------------------


def pointwise_backward_reference(
    grad: Tensor, x: Tensor, weight: Tensor, groups: int, grad_weight: bool = True
) -> list[Tensor]:
    """[d_x, d_weight] of :func:`pointwise` ([d_x] without ``grad_weight``), in
    differentiable torch ops."""
    d_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, groups=groups)
    if not grad_weight:
        return [d_x]
    return [d_x, torch.nn.grad.conv2d_weight(x, weight.shape, grad, groups=groups)]


def _pw_op(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    if not _cpp(x, "pointwise_forward"):
        return F.conv2d(x, weight, groups=groups)
    return extension().pointwise_forward(x, weight, groups)


def _pw_backward_op(
    grad: Tensor, x: Tensor, weight: Tensor, groups: int, grad_weight: bool
) -> list[Tensor]:
    if not _cpp(x, "pointwise_backward"):
        return pointwise_backward_reference(grad, x, weight, groups, grad_weight)
    return extension().pointwise_backward(grad, x, weight, groups, grad_weight)


def _pw_setup_context(ctx, inputs, output) -> None:
    x, weight, groups = inputs
    ctx.groups = groups
    ctx.save_for_backward(x, weight)


def _pw_op_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    d_x, d_w = pointwise_backward_reference(grad, x, weight, ctx.groups)
    return d_x, d_w, None


_pw_op = _kernel_op(
    "pointwise",
    _pw_op,
    lambda x, weight, groups: x.new_empty(x.shape[0], weight.shape[0], *x.shape[2:]),
    (_pw_op_backward, _pw_setup_context),
)
_pw_backward_op = _kernel_op(
    "pointwise_backward",
    _pw_backward_op,
    lambda grad, x, weight, groups, grad_weight: [
        torch.empty_like(t) for t in (x, *([weight] if grad_weight else []))
    ],
)


class PointwiseFunction(torch.autograd.Function):
    """A grouped 1×1 convolution in one kernel each way; the backward is differentiable
    (under create_graph, torch's convolution gradients); vmap folds the vmap dim into the
    batch, or with per-sample weights into the channels (more groups)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, groups: int) -> Tensor:
        return _pw_op(x, weight, groups)

    setup_context = staticmethod(_pw_setup_context)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        want_w = _engine_wants(ctx, 1, 1)  # not in the α step (see DepthwiseFunction)
        if torch.is_grad_enabled():
            grads = pointwise_backward_reference(grad, x, weight, ctx.groups, want_w)
        else:
            # Any strides (the C++ kernel reads a channel block of a concatenation in place).
            grads = _pw_backward_op(grad, x, weight, ctx.groups, want_w)
        return grads[0], grads[1] if want_w else None, None

    @staticmethod
    def vmap(info, in_dims, x, weight, groups):
        size = info.batch_size
        if in_dims[1] is None:
            x, dim = _fold(x, in_dims[0], size)
            return _unfold(pointwise(x, weight, groups), dim, size)
        # Per-sample weights: each sample's groups are more groups of one convolution, over
        # x as (B, size·G·Ci, H, W) (a view when x comes interleaved, as from the kernels).
        x, weight = batch_first(x, in_dims[0], size).movedim(0, 1), weight.movedim(in_dims[1], 0)
        out = pointwise(x.flatten(1, 2), weight.flatten(0, 1), size * groups)
        return out.unflatten(1, (size, -1)), 1


def pointwise(x: Tensor, weight: Tensor, groups: int) -> Tensor:
    """``F.conv2d(x, weight, groups=groups)`` for a 1×1 weight at stride 1: x (B, G·Ci, H, W),
    weight (G·Co, Ci, 1, 1) → (B, G·Co, H, W)."""
    return PointwiseFunction.apply(_contiguous(x), weight.contiguous(), groups)


# -- max_pool_3x3 and avg_pool_3x3 of one input -------------------------------------------


def _torch_pools(x: Tensor, stride: int) -> list[Tensor]:
    return [F.max_pool2d(x, 3, stride, 1), F.avg_pool2d(x, 3, stride, 1, count_include_pad=False)]


def pools_reference(x: Tensor, stride: int) -> Tensor:
    """:func:`pools` in torch ops."""
    return torch.cat(_torch_pools(x, stride), -3)


def pools_backward_reference(grad: Tensor, x: Tensor, stride: int) -> Tensor:
    """d_x of :func:`pools` in differentiable torch ops (torch's pooling backward ops)."""
    g_max, g_avg = grad.split(x.shape[-3], -3)
    size, step, pad = [3, 3], [stride, stride], [1, 1]
    _, idx = torch.ops.aten.max_pool2d_with_indices(x, size, step, pad)
    d_x = torch.ops.aten.max_pool2d_with_indices_backward(
        g_max, x, size, step, pad, [1, 1], False, idx
    )
    return d_x + torch.ops.aten.avg_pool2d_backward(g_avg, x, size, step, pad, False, False, None)


def _pools_op(x: Tensor, stride: int) -> Tensor:
    kind = _impl(x, "pools_forward")
    if kind == "reference":
        return pools_reference(x, stride)
    if kind == "cpp":
        return extension().pools_forward(x, stride)
    return triton_kernels("pools").forward(x, stride)


def _pools_backward_op(grad: Tensor, x: Tensor, stride: int) -> Tensor:
    kind = _impl(x, "pools_backward")
    if kind == "reference":
        return pools_backward_reference(grad, x, stride)
    if kind == "cpp":
        return extension().pools_backward(grad, x, stride)
    return triton_kernels("pools").backward(grad, x, stride)


def _pools_setup_context(ctx, inputs, output) -> None:
    x, ctx.stride = inputs
    ctx.save_for_backward(x)


def _pools_op_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return pools_backward_reference(grad, x, ctx.stride), None


def _pools_shape(x: Tensor, stride: int) -> list[int]:
    return [x.shape[0], 2 * x.shape[1], *((n - 1) // stride + 1 for n in x.shape[2:])]


_pools_op = _kernel_op(
    "pools",
    _pools_op,
    lambda x, stride: x.new_empty(_pools_shape(x, stride)),
    (_pools_op_backward, _pools_setup_context),
)
_pools_backward_op = _kernel_op(
    "pools_backward", _pools_backward_op, lambda grad, x, stride: torch.empty_like(x)
)


class PoolsFunction(torch.autograd.Function):
    """Both pools in one kernel each way; the backward is differentiable (under create_graph,
    torch's pooling backward ops); vmap folds the batch into B."""

    @staticmethod
    def forward(x: Tensor, stride: int) -> Tensor:
        return _pools_op(x, stride)

    setup_context = staticmethod(_pools_setup_context)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return pools_backward_reference(grad, x, ctx.stride), None
        return _pools_backward_op(grad, x, ctx.stride), None  # any strides, as pointwise

    @staticmethod
    def vmap(info, in_dims, x, stride):
        x, dim = _fold(x, in_dims[0], info.batch_size)
        return _unfold(PoolsFunction.apply(x, stride), dim, info.batch_size)


def pools(x: Tensor, stride: int) -> Tensor:
    """[max_pool_3x3 | avg_pool_3x3] of x at ``stride``, padding 1, the average over the
    window's pixels inside the image (DARTS' count_include_pad=False): x (B, C, H, W) →
    (B, 2C, (H − 1) // stride + 1, (W − 1) // stride + 1)."""
    return PoolsFunction.apply(x, stride)  # any strides (the C++ kernel copies if it must)


def _pooled(x: Tensor, stride: int) -> list[Tensor]:
    """The [max | avg] pool block of x as a group's BatchNorm reads it: one :func:`pools`
    call with the C++ or Triton kernels, else torch's two pooling ops (whose autograd keeps
    the max's indices, where :func:`pools`' torch-op backward would pool again)."""
    if _impl(x, "pools_forward") == "reference":
        return _torch_pools(x, stride)
    return [pools(x, stride)]


# -- BatchNorm's training forward (batch statistics, no affine) ---------------------------


@torch.library.custom_op("fastdarts::batch_norm", mutates_args=("running_mean", "running_var"))
def _bn_op(
    x: Tensor,
    eps: float,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
) -> tuple[Tensor, Tensor, Tensor]:
    if not _cpp(x, "batch_norm_forward"):
        return _batch_norm_torch(x, running_mean, running_var, momentum, eps)
    return tuple(extension().batch_norm_forward(x, eps, running_mean, running_var, momentum))


def _batch_norm_torch(x, running_mean, running_var, momentum, eps):
    return torch.native_batch_norm(x, None, None, running_mean, running_var, True, momentum, eps)


@_bn_op.register_fake
def _(x, eps, running_mean, running_var, momentum):
    return torch.empty_like(x), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])


def batch_norm_backward_reference(
    grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, eps: float
) -> Tensor:
    """d_x of :func:`batch_norm`'s y, torch's own: its derivative (batchnorm_double_backward)
    takes mean and invstd as the functions of x they are, so it is differentiable under
    create_graph too."""
    mask = [True, False, False]
    args = (grad, x, None, None, None, mean, invstd, True, eps, mask)
    return torch.ops.aten.native_batch_norm_backward(*args)[0]


def _bn_backward_op(grad: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, eps: float) -> Tensor:
    if not _cpp(x, "batch_norm_backward"):
        return batch_norm_backward_reference(grad, x, mean, invstd, eps)
    return extension().batch_norm_backward(grad, x, mean, invstd)


_bn_backward_op = _kernel_op(
    "batch_norm_backward", _bn_backward_op, lambda grad, x, *args: torch.empty_like(x)
)


class BatchNormFunction(torch.autograd.Function):
    """BatchNorm's training forward in one kernel (y, mean, invstd; the statistics carry no
    gradient), its backward in another (torch's formula under create_graph). Under vmap each
    sample keeps its own statistics. (The forward op
    mutates the running statistics, so torch.library takes no autograd formula for it: this
    Function is its autograd.)"""

    @staticmethod
    def forward(
        x: Tensor,
        eps: float,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        return _bn_op(x, eps, running_mean, running_var, momentum)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.eps = inputs[:2]
        ctx.save_for_backward(x, output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics

    @staticmethod
    def backward(ctx, grad: Tensor | None, _grad_mean, _grad_invstd) -> tuple[Tensor | None, ...]:
        if grad is None:
            return None, None, None, None, None
        x, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph (double backward, exact HVP): torch's differentiable formula.
            d_x = batch_norm_backward_reference(grad, x, mean, invstd, ctx.eps)
        else:
            d_x = _bn_backward_op(grad, x, mean, invstd, ctx.eps)  # any layout: no copy op
        return d_x, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, x, eps, running_mean, running_var, momentum):
        if running_mean is not None:
            raise ValueError("batch_norm: no running statistics under vmap")
        # (B, V, C, H, W) → (B, V·C, H, W): each sample's channels are channels of their own
        # (a view when x comes interleaved, as from the depthwise and pointwise rules).
        v = info.batch_size
        x = batch_first(x, in_dims[0], v).movedim(0, 1)
        y, mean, invstd = BatchNormFunction.apply(
            x.flatten(1, 2).contiguous(), eps, None, None, momentum
        )
        return (y.unflatten(1, (v, -1)), mean.view(v, -1), invstd.view(v, -1)), (1, 0, 0)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    momentum: float = BN_MOMENTUM,
    eps: float = BN_EPS,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) = ``torch.native_batch_norm(x, None, None, running_mean,
    running_var, True, momentum, eps)`` for x (B, C, H, W): BatchNorm's training forward,
    no affine, the running statistics (if given) updated in place. C++ kernels each way on
    the CPU; elsewhere (and without the extension) torch's op itself, no custom op around it,
    except under vmap (the batched w± passes), where this op's rule folds the samples into
    channels as a view where torch's copies and makes a unit weight and zero bias (without
    running statistics: the w± passes update none)."""
    if not _cpp(x, "batch_norm_forward") and not (running_mean is None and _vmapped(x)):
        return _batch_norm_torch(x, running_mean, running_var, momentum, eps)
    return BatchNormFunction.apply(_contiguous(x), eps, running_mean, running_var, momentum)


def _vmapped(x: Tensor) -> bool:
    """Whether x is a tensor under vmap (its innermost transform). Not asked when traced."""
    return not torch.compiler.is_compiling() and torch._C._functorch.is_batchedtensor(x)


# -- the batched edges -------------------------------------------------------------------


class _Group:
    """Static layout of one group: E edges (all of one stride) over n_in inputs.

    edges[e] = (state_dict key prefix, input index, output slot, row of α). Channel layouts
    (t the op, e the edge, c the channel, i the input): stage-1 outputs [t][e][c] (4EC),
    stage-2 [t][e][c] (2EC), pools [p][i][c], FactorizedReduce [half][e][c'] (EC). The
    mixture's sources: [dil convs (the stage-1 block's last 2EC) | sep convs (2EC) | pools
    (2·n_in·C) | skip: the inputs (n_in·C) or FR (EC)]. Running
    statistics of the BNs folded into the mixture: [sep convs (2EC) | pools [p][e][c] (2EC) |
    FR [e][c] (EC)]. Every reference state_dict entry is a basic slice of one tensor (see
    :meth:`state_map`), so state_dict() can return views.
    """

    def __init__(self, C: int, stride: int, n_in: int, n_out: int, edges: list[tuple]):
        self.C, self.stride, self.n_in, self.n_out, self.edges = C, stride, n_in, n_out, edges
        self.E = len(edges)
        self.fr = stride == 2
        self.bn_keys = ["_ops.1.1", "_ops.2.1", *(["_ops.3.bn"] if self.fr else [])]
        self.bn_keys += ["_ops.4.op.3", "_ops.4.op.7", "_ops.5.op.3", "_ops.5.op.7"]
        self.bn_keys += ["_ops.6.op.3", "_ops.7.op.3"]
        E = self.E
        # The mixture's sources: the dil convs (the stage-1 block's last 2EC channels, read
        # in place), then the normalised block [sep convs | pools | FR], then the inputs.
        self.offsets = {"dil": 0, "sep": 2 * E * C, "pools": 4 * E * C}
        self.offsets["skip"] = 4 * E * C + 2 * n_in * C
        self.n_src = self.offsets["skip"] + (E * C if self.fr else n_in * C)
        self.n_run = 4 * E * C + (E * C if self.fr else 0)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter shapes, by name."""
        C, E = self.C, self.E
        shapes = {f"dw1_{k}": (E * C, 1, size, size) for k, size, _, _ in _STAGE1}
        shapes["pw1"] = (4 * E * C, C, 1, 1)
        shapes.update({f"dw2_{k}": (E * C, 1, size, size) for k, size, _ in _STAGE2})
        shapes["pw2"] = (2 * E * C, C, 1, 1)
        if self.fr:
            shapes["fr1"] = shapes["fr2"] = (E * C // 2, C, 1, 1)
        return shapes

    def fr_channels(self, e: int) -> list[int]:
        """FR output channels (layout [half][e][c']) of edge e's channels 0..C-1."""
        h = self.C // 2
        return [(c // h) * self.E * h + e * h + c % h for c in range(self.C)]

    def state_map(self, e: int) -> list[tuple[str, str, tuple[int | slice, ...]]]:
        """(key, storage, index) of edge e's reference state_dict entries, in the reference
        order: ``storage[index]`` (a basic index, so a view) is the entry, of its shape."""
        C, E = self.C, self.E
        prefix, entries = self.edges[e][0], []

        def weight(key: str, name: str, first_row: int, rows: int) -> None:
            entries.append((prefix + key, name, (slice(first_row, first_row + rows),)))

        def bn(key: str, store: str, first: int) -> None:
            for stat in ("running_mean", "running_var"):
                index = (slice(first, first + C),)
                entries.append((f"{prefix}{key}.{stat}", f"{store}_{stat[8:]}", index))
            nbt = (e, self.bn_keys.index(key))
            entries.append((f"{prefix}{key}.num_batches_tracked", "nbt", nbt))

        for p in range(2):
            bn(f"_ops.{p + 1}.1", "run2", 2 * E * C + (p * E + e) * C)
        if self.fr:
            weight("_ops.3.conv_1.weight", "fr1", e * (C // 2), C // 2)
            weight("_ops.3.conv_2.weight", "fr2", e * (C // 2), C // 2)
            bn("_ops.3.bn", "run2", 4 * E * C + e * C)
        stage2 = {k: t for t, (k, _, _) in enumerate(_STAGE2)}
        for t, (k, _, _, _) in enumerate(_STAGE1):
            weight(f"_ops.{k}.op.1.weight", f"dw1_{k}", e * C, C)
            weight(f"_ops.{k}.op.2.weight", "pw1", (t * E + e) * C, C)
            bn(f"_ops.{k}.op.3", "run1", (t * E + e) * C)
            if k in stage2:
                u = stage2[k]
                weight(f"_ops.{k}.op.5.weight", f"dw2_{k}", e * C, C)
                weight(f"_ops.{k}.op.6.weight", "pw2", (u * E + e) * C, C)
                bn(f"_ops.{k}.op.7", "run2", (u * E + e) * C)
        return entries

    def routes(self) -> list[tuple[int, int, int, int]]:
        """(source channel, output channel, index into the flat α-weights, running
        statistic used in eval (-1 for ops without a folded BN)) of every route."""
        C, E, n_in, off = self.C, self.E, self.n_in, self.offsets
        routes = []
        for e, (_, i, slot, row) in enumerate(self.edges):
            for c in range(C):
                o = slot * C + c
                for p in range(2):  # max_pool, avg_pool: BN of the pooled input, per edge
                    s = off["pools"] + (p * n_in + i) * C + c
                    routes.append((s, o, row * K + 1 + p, 2 * E * C + (p * E + e) * C + c))
                if self.fr:
                    j = self.fr_channels(e)[c]
                    routes.append((off["skip"] + j, o, row * K + 3, 4 * E * C + e * C + c))
                else:
                    routes.append((off["skip"] + i * C + c, o, row * K + 3, -1))
                for t in range(2):
                    j = (t * E + e) * C + c
                    routes.append((off["sep"] + j, o, row * K + 4 + t, j))
                    routes.append((off["dil"] + j, o, row * K + 6 + t, -1))
        return routes

    def running_sources(self) -> list[int]:
        """For each running statistic of the folded BNs, its channel in the block they
        normalise in training: [sep convs | pools | FR], the sources from the sep convs on."""
        C, E, n_in = self.C, self.E, self.n_in
        idx = list(range(2 * E * C))
        for p in range(2):
            for _, i, _, _ in self.edges:
                idx += [2 * E * C + (p * n_in + i) * C + c for c in range(C)]
        if self.fr:
            # Stored [e][c] (each edge's statistics one slice), normalised in FR's [half][e][c'].
            idx += [2 * E * C + 2 * n_in * C + j for e in range(E) for j in self.fr_channels(e)]
        return idx

    def replicate(self) -> list[int] | None:
        """Input channel of each edge-major channel [e][c], or None when that is the input."""
        idx = [i * self.C + c for _, i, _, _ in self.edges for c in range(self.C)]
        return None if idx == list(range(self.n_in * self.C)) else idx


@functools.cache
def _bn_consts(device: torch.device, dtype: torch.dtype) -> Tensor:
    """(momentum, eps) for the Triton running-statistics kernel, made once per device and
    dtype (not per call: a host-to-device copy; not a buffer: built in float32, a module
    moved to float64 would hold 0.1 rounded to float32)."""
    return torch.tensor([BN_MOMENTUM, BN_EPS], dtype=dtype, device=device)


class FusedEdges(nn.Module):
    """MixedOps of one channel count C in groups (each group's edges run as one batched
    computation; see the module docstring). Parameters and statistics live in the batched
    layout (``named_parameters()``: ``dw1_4_g0`` …); state_dict and load_state_dict use the
    reference MixedOp keys of each edge.

    ``state_dict()`` values are views of the batched tensors (every reference entry is a
    slice of one), as nn.Module's are of its own: in-place edits through them (EMA updates,
    pruning) reach the module. With ``keep_vars=True`` they are the same views, not detached
    (requires_grad as the batched parameter's), but neither Parameters nor leaves: their
    ``.grad`` stays None, the gradient goes to the batched parameter. As for any view,
    ``torch.save`` of some entries alone stores the whole batched tensors behind them.

    ``load_state_dict`` takes the reference keys and also the module's own names (the
    parameters and persistent buffers, as the second-order DARTS architect writes
    ``named_parameters()`` into a copy of ``state_dict()``); a tensor given under both takes
    the value under its own name. A missing ``num_batches_tracked`` keeps its value where
    BatchNorm's does: while statistics are tracked, for a checkpoint older than BatchNorm's
    version 2 (metadata version below 2, or no metadata). When this module is loaded as a
    child, torch passes it no metadata but its own entry, so there a checkpoint counts as
    older only when it lacks every ``num_batches_tracked`` key of the module.

    The route and index tables are constants made from the layout, not state: built under a
    meta default device, moved by ``to``/``to_empty`` or loaded with ``assign=True`` (which
    materialises a meta module on the values' device), the module remakes them where its
    parameters are.

    ``track_running_stats`` plays the role of BatchNorm's: False (see
    :meth:`SearchModel.frozen_bn_stats`) normalises by batch statistics and updates none.
    """

    def __init__(self, C: int, groups: list[_Group]):
        super().__init__()
        self.C, self._groups, self.track_running_stats = C, groups, True
        self._tables: dict[str, list[int] | None] = {}  # index tables, as lists (see below)
        w_idx: list[int] = []  # every group's routes' α-weight, as flat indices, in order
        self._route_counts: list[int] = []
        for g, grp in enumerate(groups):
            for name, shape in grp.shapes().items():
                weight = torch.empty(shape)
                bound = 1 / math.sqrt(math.prod(shape[1:]))  # nn.Conv2d's default init
                self.register_parameter(
                    f"{name}_g{g}", nn.Parameter(weight.uniform_(-bound, bound))
                )
            E = grp.E
            for name, n in (("run1", 4 * E * grp.C), ("run2", grp.n_run)):
                self.register_buffer(f"{name}_mean_g{g}", torch.zeros(n))
                self.register_buffer(f"{name}_var_g{g}", torch.ones(n))
            self.register_buffer(f"nbt_g{g}", torch.zeros(E, len(grp.bn_keys), dtype=torch.long))
            routes = grp.routes()
            table = Routes(
                [r[0] for r in routes], [r[1] for r in routes], grp.n_src, grp.C * grp.n_out
            )
            self.add_module(f"routes_g{g}", table)
            ordered = [routes[r] for r in table.order]
            w_idx += [r[2] for r in ordered]
            self._route_counts.append(len(ordered))
            # Eval: index n_run is the (mean 0, invstd 1) slot of ops without a folded BN.
            self._tables[f"st_eval_g{g}"] = [grp.n_run if r[3] < 0 else r[3] for r in ordered]
            self._tables[f"runstat_g{g}"] = grp.running_sources()
            self._tables[f"rep_g{g}"] = grp.replicate()
        self._tables["w_idx"] = w_idx
        self._build_tables()
        # (edge row, group, reference key, storage, index), in the reference's order.
        self._entries = sorted(
            (
                (grp.edges[e][3], g, *entry)
                for g, grp in enumerate(groups)
                for e in range(grp.E)
                for entry in grp.state_map(e)
            ),
            key=lambda entry: entry[0],
        )  # edge order, stable within

    def _build_tables(self, routes: bool = True) -> None:
        """(Re)make the constant tables (non-persistent buffers) where the parameters are, in
        their dtype for the zero shifts, and (``routes``) the route tables; built on the CPU
        (a meta default device too)."""
        first = self.pw1_g0
        for name, values in self._tables.items():
            t = None if values is None else torch.tensor(values, device="cpu")
            self.register_buffer(name, _to_device(t, first.device), persistent=False)
        for g in range(len(self._groups)):
            n_routes = self._route_counts[g]
            zeros = torch.zeros(n_routes, dtype=first.dtype, device="cpu")
            self.register_buffer(f"zeros_g{g}", zeros.to(first.device), persistent=False)
            if routes:
                self._get("routes", g).build(first.device)

    def _apply(self, fn, recurse=True):
        # The tables are constants, rebuilt where fn put the parameters: to_empty() leaves
        # them uninitialised (and a module built on meta has no values to move). The route
        # tables, child modules, remade themselves (Routes._apply) when recursed into.
        super()._apply(fn, recurse)
        self._build_tables(routes=not recurse)
        return self

    def _get(self, name: str, g: int) -> Tensor:
        return getattr(self, f"{name}_g{g}")

    def route_alphas(self, weights: Tensor) -> list[Tensor]:
        """Each group's α-weight per route, from the op weights (edges, 8): one gather for all
        the groups (and one scatter back in the backward) instead of one per group."""
        return list(weights.reshape(-1)[self.w_idx].split(self._route_counts))

    def run_group(
        self, g: int, inputs: list[Tensor], alpha: Tensor, acc: Tensor | None = None
    ) -> Tensor:
        """Group g on its inputs (n_in × (B, C, H, W)); alpha: its routes' α-weights (see
        :meth:`route_alphas`); acc (B, n_out·C, H', W') or None → (B, n_out·C, H', W')."""
        device = inputs[0].device.type
        # (Asking about a device autocast does not know, such as meta, raises.)
        if _autocast(device):
            # The kernels are float32/float64: the group runs in the weights' dtype.
            dtype = self._get("pw1", g).dtype
            with torch.autocast(device, enabled=False):
                inputs = [t.to(dtype) for t in inputs]
                return self.run_group(g, inputs, alpha.to(dtype), _to(acc, dtype))
        grp, get = self._groups[g], functools.partial(self._get, g=g)
        C, E, s = self.C, grp.E, grp.stride
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        rep = get("rep")
        xr = x if rep is None else x.index_select(1, rep)
        # The convolutions' ReLU runs inside the depthwise kernels (relu=True), except where
        # the FactorizedReduce convolutions read relu(x) too.
        rr = torch.relu(xr) if grp.fr else xr
        first = depthwise(
            rr,
            [get(f"dw1_{k}") for k, _, _, _ in _STAGE1],
            s,
            [pad for _, _, pad, _ in _STAGE1],
            [dil for _, _, _, dil in _STAGE1],
            [0] * len(_STAGE1),
            relu=not grp.fr,
        )
        y = pointwise(first, get("pw1"), 4 * E)
        training, track = self.training, self.track_running_stats
        # BatchNorm's rules: running statistics in eval; in training, batch statistics, the
        # running ones updated when tracked.
        if training:
            running = (get("run1_mean"), get("run1_var")) if track else (None, None)
            y = batch_norm(y, *running)[0]
        else:
            args = (get("run1_mean"), get("run1_var"), False, BN_MOMENTUM, BN_EPS)
            y = torch.native_batch_norm(y, None, None, *args)[0]
        # The sep convs' second stage reads its channels of the whole block (by offsets,
        # through the kernel's ReLU), the mixture the dil convs' block.
        y, dil = _ShareBlock.apply(y, 2 * E * C, 1)
        second = depthwise(
            y,
            [get(f"dw2_{k}") for k, _, _ in _STAGE2],
            1,
            [pad for _, _, pad in _STAGE2],
            [1] * len(_STAGE2),
            [t * E * C for t in range(len(_STAGE2))],
            relu=True,
        )
        z = pointwise(second, get("pw2"), 2 * E)
        if grp.fr:
            f1 = F.conv2d(rr, get("fr1"), stride=2, groups=E)
            skip = torch.cat([f1, F.conv2d(rr[:, :, 1:, 1:], get("fr2"), stride=2, groups=E)], 1)
        else:
            skip = x
        final = [z, *_pooled(x, s), *([skip] if grp.fr else [])]  # the BNs folded in eval
        if training:
            # One BatchNorm over all of them (batch statistics), then the mixture.
            normed, mean, invstd = batch_norm(torch.cat(final, 1))
            if track:
                self._update_running(g, mean, invstd, normed)
            # The mixture reads its sources in place: no concatenated copy (2.1 GiB of a
            # small step's 27.6 moved on the CUDA path, counted).
            src = [dil, normed, *([] if grp.fr else [skip])]
            return conv_mix(src, alpha, get("zeros"), get("routes"), acc)
        # Eval: the running statistics folded into the mixture's coefficients.
        stat = get("st_eval")
        shift = F.pad(get("run2_mean"), (0, 1))[stat]
        invstd = F.pad(torch.rsqrt(get("run2_var") + BN_EPS), (0, 1), value=1.0)[stat]
        src = [dil, *final, *([] if grp.fr else [skip])]
        return conv_mix(src, alpha * invstd, shift, get("routes"), acc)

    @torch.no_grad()
    def _update_running(self, g: int, mean: Tensor, invstd: Tensor, normed: Tensor) -> None:
        """The folded BNs' running statistics from the batch statistics of the normalised
        block (per channel; ``runstat`` picks each running channel's), and the group's
        num_batches_tracked."""
        stat = self._get("runstat", g)
        n = normed.numel() // normed.shape[1]
        running = [self._get(name, g) for name in ("run2_mean", "run2_var", "nbt")]
        if kernel_name(mean.device) == "triton":
            # One launch for the ten ops below (64 calls in a small search step).
            consts = _bn_consts(mean.device, mean.dtype)
            triton_kernels("running_stats").update(mean, invstd, stat, *running, consts, n)
            return
        run_mean, run_var, nbt = running
        run_mean.mul_(1 - BN_MOMENTUM).add_(mean[stat], alpha=BN_MOMENTUM)
        unbiased = (invstd[stat].pow(-2) - BN_EPS) * (n / max(n - 1, 1))
        run_var.mul_(1 - BN_MOMENTUM).add_(unbiased, alpha=BN_MOMENTUM)
        nbt.add_(1)

    def _own_state(self) -> dict[str, Tensor]:
        """The parameters and persistent buffers under their own (batched) names."""
        own = {name: p for name, p in self._parameters.items() if p is not None}
        own.update(
            (name, b)
            for name, b in self._buffers.items()
            if b is not None and name not in self._non_persistent_buffers_set
        )
        return own

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # Views (basic indexing); with keep_vars, made with gradient mode on so that they
        # require grad as the parameters do even when state_dict() runs under no_grad.
        with torch.enable_grad() if keep_vars else contextlib.nullcontext():
            for _, g, key, name, index in self._entries:
                store = self._get(name, g)
                destination[prefix + key] = (store if keep_vars else store.detach())[index]
        if hasattr(destination, "_metadata"):
            # The emulated BatchNorms' versions, which decide whether their
            # num_batches_tracked may be missing (see _load_from_state_dict).
            for _, _, key, name, _ in self._entries:
                if name == "nbt":
                    bn = prefix + key[: -len(_NBT)]
                    destination._metadata[bn] = {"version": nn.BatchNorm2d._version}

    def _optional_nbt(self, state_dict, prefix: str, local_metadata: dict) -> set[str]:
        """The num_batches_tracked keys that may be missing: BatchNorm's rule (it keeps its
        count while it tracks statistics and its metadata version is None or below 2)."""
        if not self.track_running_stats:
            return set()
        keys = [prefix + key for _, _, key, name, _ in self._entries if name == "nbt"]
        metadata = getattr(state_dict, "_metadata", None)
        if metadata is not None:  # loaded as the root: every BatchNorm's own entry
            versions = {k: metadata.get(k[: -len(_NBT)], {}).get("version") for k in keys}
            return {k for k, v in versions.items() if v is None or v < 2}
        if "version" not in local_metadata:  # no metadata at all: version None
            return set(keys)
        # A child's state_dict comes without the metadata (only this module's entry): a
        # checkpoint from before num_batches_tracked lacks every one of them.
        return set() if any(k in state_dict for k in keys) else set(keys)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        own = self._own_state()
        whole = {name for name in own if prefix + name in state_dict}
        if local_metadata.get("assign_to_params_buffers", False):
            own = self._assign_storage(state_dict, prefix, whole)
        optional = self._optional_nbt(state_dict, prefix, local_metadata)
        expected = set()
        with torch.no_grad():
            for name in whole:  # under its own name: loaded whole, its reference keys ignored
                _copy_in(own[name], prefix + name, state_dict[prefix + name], errors)
            for _, g, key, name, index in self._entries:
                key = prefix + key
                expected.add(key)
                if f"{name}_g{g}" in whole:
                    continue
                if key in state_dict:
                    _copy_in(self._get(name, g)[index], key, state_dict[key], errors)
                elif strict and key not in optional:
                    missing_keys.append(key)
        if not strict:
            return
        for key in state_dict:  # nn.Module's rule, with the reference keys as this module's
            if not key.startswith(prefix) or key in expected:
                continue
            head = key[len(prefix) :].split(".", 1)
            if head[0] not in (self._modules if len(head) > 1 else own):
                unexpected_keys.append(key)

    def _assign_storage(self, state_dict, prefix: str, whole: set[str]) -> dict[str, Tensor]:
        """load_state_dict(assign=True): each batched tensor the state_dict fills becomes a
        new one on its values' device and of their dtype (a module built on meta is
        materialised), the values it lacks kept from the old one where it has any. The
        entries are then copied in as usual. Returns the new own state."""
        incoming: dict[str, Tensor] = {}
        for _, g, key, name, _ in self._entries:
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor):
                incoming.setdefault(f"{name}_g{g}", value)
        for name in whole:
            if isinstance(state_dict[prefix + name], Tensor):
                incoming[name] = state_dict[prefix + name]
        for name, value in incoming.items():
            old = getattr(self, name)
            new = torch.empty(old.shape, dtype=value.dtype, device=value.device)
            if old.device.type != "meta":
                new.copy_(old.detach())
            if name in self._parameters:
                self._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                self._buffers[name] = new
        self._build_tables()
        return self._own_state()


_NBT = ".num_batches_tracked"


def _copy_in(target: Tensor, key: str, value, errors: list[str]) -> None:
    """nn.Module's load of one tensor (under no_grad): checked, copied into target (which
    may be a view) in place, or the error appended."""
    if not isinstance(value, Tensor):
        errors.append(
            f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
            f"object from checkpoint but received {type(value)}"
        )
    elif value.shape != target.shape:
        errors.append(
            f"size mismatch for {key}: copying a param with shape {value.shape} from "
            f"checkpoint, the shape in current model is {target.shape}."
        )
    else:
        target.copy_(value)


def _to_device(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else t.to(device)


def _to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for the device type (the meta device has none). The CPU and
    CUDA always have it, and are not asked: torch 2.11's Dynamo cannot trace the query."""
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


def _as_int(who: str, name: str, value: object) -> int:
    """``value`` as a Python int (numpy's integers too, as the reference's modules take
    them); TypeError for anything else, a bool or a float included."""
    if not isinstance(value, bool):
        with contextlib.suppress(TypeError):
            return operator.index(value)
    raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__}")


def _check_channels(who: str, C: object) -> int:
    """``C`` as an int; TypeError or ValueError unless a positive integer."""
    C = _as_int(who, "C", C)
    if C < 1:
        raise ValueError(f"{who}: C must be positive, got {C}")
    return C


def _check_tensor(
    who: str, name: str, t: object, C: int, stride: int, training: bool = False
) -> None:
    """t is an input state (B, C, H, W): non-empty, H and W even at stride 2, and in
    training more than one value per channel for the BatchNorms after the stride."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}")
    shape = t.shape
    if len(shape) != 4 or shape[1] != C:
        raise ValueError(f"{who}: {name} must be (B, {C}, H, W), got {tuple(shape)}")
    if 0 in shape:
        raise ValueError(f"{who}: {name} must not be empty, got {tuple(shape)}")
    if stride == 2 and (shape[2] % 2 or shape[3] % 2):
        # FactorizedReduce's two convolutions (of x and of x[:, :, 1:, 1:]) differ in size.
        raise ValueError(f"{who}: stride 2 needs an even H and W, got {name} {tuple(shape)}")
    if training and shape[0] * (shape[2] // stride) * (shape[3] // stride) == 1:
        # As nn.BatchNorm2d, named in the caller's shape rather than the kernel's channels.
        raise ValueError(
            f"{who}: training's BatchNorm needs more than 1 value per channel; {name} "
            f"{tuple(shape)} at stride {stride} gives 1"
        )


def _check_like_module(who: str, name: str, t: Tensor, param: Tensor) -> None:
    """t on the device of the module's parameters, in their dtype (under autocast, any
    floating dtype: the groups run in the parameters' dtype)."""
    if t.device != param.device:
        raise ValueError(
            f"{who}: {name} ({t.device}) must be on the device of the module's parameters "
            f"({param.device})"
        )
    if t.dtype != param.dtype and not (t.is_floating_point() and _autocast(t.device.type)):
        raise TypeError(
            f"{who}: {name} ({t.dtype}) must have the dtype of the module's parameters "
            f"({param.dtype})"
        )


def _check_weights(who: str, weights: object, shape: tuple[int, ...], param: Tensor) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"{who}: weights must be a Tensor, got {type(weights).__name__}")
    if weights.shape != shape:
        raise ValueError(
            f"{who}: weights must be {shape} (ops {', '.join(CNN_PRIMITIVES)}), "
            f"got {tuple(weights.shape)}"
        )
    _check_like_module(who, "weights", weights, param)
    if param.dtype not in _DTYPES:
        raise TypeError(f"{who}: the kernels take float32 or float64 parameters, got {param.dtype}")


class MixedOp(FusedEdges):
    """Drop-in for the DARTS MixedOp: Σ_k weights[k]·op_k(x) over the 8 primitives, fused.

    Same constructor, call and state_dict keys and shapes as
    :class:`fastdarts.spaces.cnn.MixedOp` (``_ops.<k>.…`` in PRIMITIVES order), so its
    checkpoints load both ways. x (B, C, H, W), weights (8,) → (B, C, H', W').
    """

    def __init__(self, C: int, stride: int):
        C, stride = _check_channels("MixedOp", C), _as_int("MixedOp", "stride", stride)
        if stride not in (1, 2):
            raise ValueError(f"MixedOp: stride must be 1 or 2, got {stride}")
        if stride == 2 and C % 2:
            raise ValueError(
                f"MixedOp: stride 2 (FactorizedReduce) needs an even channel count, got {C}"
            )
        super().__init__(C, [_Group(C, stride, 1, 1, [("", 0, 0, 0)])])
        self.stride = stride

    def extra_repr(self) -> str:
        return f"C={self.C}, stride={self.stride}"

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        param = self._parameters["pw1_g0"]
        _check_tensor("MixedOp", "x", x, self.C, self.stride, self.training)
        _check_like_module("MixedOp", "x", x, param)
        _check_weights("MixedOp", weights, (K,), param)
        return self.run_group(0, [x], self.route_alphas(weights)[0])


class _ShareBlock(torch.autograd.Function):
    """y → (y whole, its channels from c on along ``dim``), both views, for a consumer of
    the whole that reads no channel from c on (the depthwise kernel, by channel offsets)
    and one of the block. The backward writes the block's gradient into the whole's, zero
    there: autograd's slice would give the block a zero-filled gradient of all the channels
    and add the two (an add of them all per pass: 1.7 GiB of a small step's 25.5 moved on
    the CUDA path, counted)."""

    @staticmethod
    def forward(y: Tensor, c: int, dim: int) -> tuple[Tensor, Tensor]:
        return y.view_as(y), y.narrow(dim, c, y.shape[dim] - c)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.c, ctx.dim = inputs[1:]

    @staticmethod
    def backward(ctx, g_whole: Tensor | None, g_block: Tensor | None) -> tuple[Tensor | None, ...]:
        c, dim = ctx.c, ctx.dim
        if g_block is None:
            return g_whole, None, None
        if g_whole is None:
            shape = list(g_block.shape)
            shape[dim] = c
            return torch.cat([g_block.new_zeros(shape), g_block], dim), None, None
        # In place where the whole's gradient is a plain tensor of this backward's own (the
        # kernels' fresh output, no view); under create_graph, a torch.func transform, the
        # batched gradients of autograd.grad(is_grads_batched=True) or torch.compile (whose
        # tracer cannot ask about functorch), a new one.
        functional = torch.compiler.is_compiling() or torch.is_grad_enabled()
        if functional or not (_plain(g_whole) and _plain(g_block)) or g_whole._base is not None:
            return torch.cat([g_whole.narrow(dim, 0, c), g_block], dim), None, None
        g_whole.narrow(dim, c, g_block.shape[dim]).copy_(g_block)
        return g_whole, None, None

    @staticmethod
    def vmap(info, in_dims, y, c, dim):
        # The Function again on the batched tensor, so that an autograd pass over the vmap
        # meets its backward, not a slice's; the vmap dim stays where it is.
        bdim = in_dims[0]
        return _ShareBlock.apply(y, c, _physical(dim, bdim)), (bdim, bdim)


class _SplitNode(torch.autograd.Function):
    """A group's output (B, n_out·C, H, W) → (its node's block [:, :C], the rest [:, C:]) along
    ``dim``, both views. The backward concatenates the two gradients: autograd's own slices
    would give each a zero-filled gradient of the whole output (a slice_backward each) and
    add the two."""

    @staticmethod
    def forward(out: Tensor, c: int, dim: int) -> tuple[Tensor, Tensor]:
        return out.narrow(dim, 0, c), out.narrow(dim, c, out.shape[dim] - c)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.dim = inputs[2]

    @staticmethod
    def backward(ctx, g_node: Tensor, g_rest: Tensor) -> tuple[Tensor | None, ...]:
        return torch.cat([g_node, g_rest], ctx.dim), None, None

    @staticmethod
    def vmap(info, in_dims, out, c, dim):
        # As _ShareBlock's: an autograd pass over the vmap meets this backward.
        bdim = in_dims[0]
        return _SplitNode.apply(out, c, _physical(dim, bdim)), (bdim, bdim)


def _plain(t: Tensor) -> bool:
    """t is not a tensor of a transform: functorch's or autograd's batched gradients."""
    functorch = torch._C._functorch
    return not (functorch.is_functorch_wrapped_tensor(t) or functorch.is_legacy_batchedtensor(t))


def _physical(dim: int, bdim: int | None) -> int:
    """A tensor's dim ``dim`` (non-negative) as stored under a vmap dim at ``bdim``."""
    return dim if bdim is None or bdim > dim else dim + 1


class FusedCellOps(FusedEdges):
    """All edges of a search cell: the edges from the two cell inputs as one group, then
    each node's outgoing edges as one. Keys are the reference cell's ``_ops.<edge>.…``.

    ``forward(states, weights)``: the two preprocessed inputs, weights (edges, 8) → the
    concatenated last ``multiplier`` nodes.
    """

    def __init__(self, C: int, steps: int, multiplier: int, reduction: bool):
        C = _check_channels("FusedCellOps", C)
        if steps < 1:
            raise ValueError(f"FusedCellOps: steps must be positive, got {steps}")
        if reduction and C % 2:
            raise ValueError(f"FusedCellOps: a reduction cell needs an even channel count, got {C}")
        offsets = [sum(2 + j for j in range(node)) for node in range(steps)]
        first = [(f"{offsets[n] + i}.", i, n, offsets[n] + i) for i in (0, 1) for n in range(steps)]
        groups = [_Group(C, 2 if reduction else 1, 2, steps, first)]
        for g in range(1, steps):
            edges = [
                (f"{offsets[n] + g + 1}.", 0, n - g, offsets[n] + g + 1) for n in range(g, steps)
            ]
            groups.append(_Group(C, 1, 1, steps - g, edges))
        super().__init__(C, groups)
        self.steps, self.multiplier = steps, multiplier
        self.reduction = reduction
        self.n_edges = sum(grp.E for grp in groups)

    def extra_repr(self) -> str:
        return (
            f"C={self.C}, steps={self.steps}, multiplier={self.multiplier}, "
            f"reduction={self.reduction}"
        )

    def forward(self, states: list[Tensor], weights: Tensor) -> Tensor:
        states, C, param = list(states), self.C, self._parameters["pw1_g0"]
        if len(states) != 2:
            raise ValueError(
                f"FusedCellOps: states must be the cell's 2 preprocessed inputs, got {len(states)}"
            )
        for i, s in enumerate(states):
            stride = self._groups[0].stride
            _check_tensor("FusedCellOps", f"states[{i}]", s, C, stride, self.training)
            _check_like_module("FusedCellOps", f"states[{i}]", s, param)
        if states[1].shape != states[0].shape:
            raise ValueError(
                f"FusedCellOps: states[0] and states[1] must have one shape, got "
                f"{tuple(states[0].shape)} and {tuple(states[1].shape)}"
            )
        _check_weights("FusedCellOps", weights, (self.n_edges, K), param)
        alphas, acc = self.route_alphas(weights), None
        for g in range(self.steps):
            out = self.run_group(g, states[:2] if g == 0 else states[-1:], alphas[g], acc)
            if g == self.steps - 1:
                states.append(out)
                break
            # Channel blocks of out, read in place (the next group's ReLU writes a new tensor,
            # the pools and the mixture's acc take a batch stride, the concatenations copy).
            node, acc = _SplitNode.apply(out, C, 1)
            states.append(node)
        return torch.cat(states[-self.multiplier :], dim=1)


def fused_cell_ops(cell: nn.Module) -> nn.Module:
    """``cell._ops`` as a :class:`FusedCellOps` with the same state (weights, statistics)."""
    if isinstance(cell._ops, FusedCellOps):
        return cell._ops
    ref = cell._ops[0]._ops[4].op[1].weight  # sep_conv_3x3's depthwise weight (C, 1, 3, 3)
    fused = FusedCellOps(ref.shape[0], cell._steps, cell._multiplier, cell.reduction)
    fused = fused.to(ref.device, ref.dtype)
    fused.load_state_dict(cell._ops.state_dict())
    fused.train(cell.training)
    return fused


def reference_cell_ops(cell: nn.Module) -> nn.Module:
    """``cell._ops`` as the reference ModuleList of MixedOps, with the same state."""
    if not isinstance(cell._ops, FusedCellOps):
        return cell._ops
    from fastdarts.spaces.cnn import MixedOp as ReferenceMixedOp

    fused, steps = cell._ops, cell._steps
    ref = next(iter(fused.parameters()))
    ops = nn.ModuleList(
        ReferenceMixedOp(fused.C, 2 if cell.reduction and j < 2 else 1)
        for i in range(steps)
        for j in range(2 + i)
    ).to(ref.device, ref.dtype)
    ops.load_state_dict(fused.state_dict())
    ops.train(cell.training)
    return ops


# -- FLOP counts (FlopCounterMode; see fastdarts.ops.flops) -----------------------------------
# The kernels' convolutions, each group a convolution of its own: the forward as torch counts
# the reference's convolutions; the backward twice that where both gradients are made (torch's
# formula for a grouped convolution's weight gradient leaves the groups out: it counts a
# depthwise one C times over). The mixture, the pools and the BatchNorms, elementwise, count
# nothing, as the reference's elementwise ops do not.


def _group_convs(x, w, out, groups: int) -> tuple[list[int], list[int], list[int]]:
    """(input, weight, output) shapes of one group of a grouped convolution."""
    return [x[0], x[1] // groups, *x[2:]], list(w), [out[0], out[1] // groups, *out[2:]]


def _conv_backward_flops(grad, x, w, groups: int, grad_weight: bool) -> int:
    """A grouped convolution's backward, group by group: the input's gradient a transposed
    convolution, the weight's a convolution of the input by the output's gradient."""
    from torch.utils.flop_counter import conv_flop_count

    x, w, grad = _group_convs(x, w, grad, groups)
    flops = conv_flop_count(grad, [w[0] // groups, *w[1:]], x, transposed=True)
    if grad_weight:
        swap = lambda s: [s[1], s[0], *s[2:]]  # noqa: E731
        flops += conv_flop_count(swap(x), swap(grad), swap([w[0] // groups, *w[1:]]))
    return groups * flops


def _dw_convs(x, weights: list, out):
    """(input, weight, output) shapes of the depthwise convolution each weight shape is."""
    for w in weights:
        ch, k = w[-4], w[-1]  # (Ch, 1, K, K), or weight samples (S, Ch, 1, K, K)
        yield (x[0], ch, *x[2:]), (ch, 1, k, k), (out[0], ch, *out[2:])


@flop_formula("depthwise")
def _dw_flops(x, weights, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    convs = _dw_convs(x, weights, out_shape)
    return sum(conv_flop_count(list(i), list(w), list(o)) for i, w, o in convs)


@flop_formula("depthwise_backward")
def _dw_backward_flops(grad, x, weights, *args, out_shape=None, **kwargs) -> int:
    grad_weights = args[4]  # after stride, pads, dils, in_offsets
    convs = _dw_convs(x, weights, grad)
    return sum(_conv_backward_flops(o, i, w, i[1], grad_weights) for i, w, o in convs)


@flop_formula("pointwise")
def _pw_flops(x, weight, groups, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count(list(x), list(weight), list(out_shape))


@flop_formula("pointwise_backward")
def _pw_backward_flops(grad, x, weight, groups, grad_weight, *args, **kwargs) -> int:
    return _conv_backward_flops(grad, x, weight, groups, grad_weight)
