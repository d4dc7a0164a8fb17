"""The whole-cell op against the reference cell, on fresh random inputs, in both of its
implementations: the C++ kernel (``cpp``, the CPU's) and the torch-op one (``torch``, CUDA's,
here on CPU tensors; the interpreter runs it with the Triton node kernels in
test_recurrent_mixed.py).

Tolerances: float64 rtol 1e-10 / atol 1e-12 (a sequence of 8 BatchNorms per step: ~1e-14
observed); float32 atol = rtol = 2e-4 (float32 rounding through the same chain: ~1e-6
observed). Either is far below what a wrong index, op or BatchNorm statistic gives (O(1)).
"""

from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch
from conftest import run_triton_interpreted

from benchmarks.harness import count_ops
from fastdarts.ops import extension
from fastdarts.ops import recurrent_cell as rc
from fastdarts.ops.recurrent_cell import RecurrentCellFunction, recurrent_cell
from fastdarts.spaces.rnn import RecurrentSearchCell

EXT = extension.extension()
needs_cell = pytest.mark.skipif(
    EXT is None or not hasattr(EXT, "recurrent_cell_forward"),
    reason=f"no whole-cell kernel ({extension.unavailable_reason()})",
)
IMPLS = [pytest.param("cpp", marks=needs_cell), "torch"]
# The C++ kernel's RuntimeError, the torch implementation's ValueError or TypeError.
INPUT_ERRORS = (RuntimeError, ValueError, TypeError)


@pytest.fixture(params=IMPLS)
def impl(request, monkeypatch) -> str:
    """Which implementation the op runs: the C++ kernel, or the torch ops off it."""
    if request.param == "torch":
        monkeypatch.setattr(rc, "cell_kernel_ready", lambda device: False)
    return request.param


def functions(impl: str):
    """The implementation's (forward, backward), called as the op calls them."""
    if impl == "cpp":
        return EXT.recurrent_cell_forward, EXT.recurrent_cell_backward
    return rc._forward_torch, rc._backward_torch


TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-4, 2e-4)}
# The torch implementation in float32 rounds in its own order (the C++ kernel sums in
# double), and an edge that is all `none` makes a node's input exactly 0: its BatchNorm
# then multiplies float32 rounding by 1/√eps = 316. Measured: 3.1e-4 of a d_probs entry,
# where the float32 reference cell is off by 1.0e-4.
TORCH_FLOAT32_TOL = (1e-3, 1e-3)


def make_cell(gen, ninp, nhid, steps, dtype):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ref = RecurrentSearchCell(ninp, nhid, steps).to(dtype)
    # Random running statistics, so evaluation mode is not a no-op normalisation.
    ref.bn.running_mean.uniform_(-0.5, 0.5)
    ref.bn.running_var.uniform_(0.5, 2.0)
    fused = copy.deepcopy(ref)
    fused.cell_op = recurrent_cell
    return ref, fused


def make_inputs(gen, T, B, ninp, nhid, steps, dtype, masks):
    x = torch.randn(T, B, ninp, generator=gen, dtype=dtype)
    h = torch.randn(B, nhid, generator=gen, dtype=dtype)
    n_edges = steps * (steps + 1) // 2
    probs = torch.softmax(torch.randn(n_edges, 5, generator=gen, dtype=dtype), -1)
    probs[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype)  # an edge that is all `none`
    probs[:, 2] = 0  # relu dropped everywhere: exact zeros

    def mask(shape):
        return torch.bernoulli(torch.full(shape, 0.7, dtype=dtype), generator=gen) / 0.7

    x_mask = mask((B, ninp)) if "x" in masks else None
    h_mask = mask((B, nhid)) if "h" in masks else None
    return x, h, probs, x_mask, h_mask


def run(cell, x, h, probs, x_mask, h_mask, grad):
    leaves = [t.clone().requires_grad_() for t in (x, h, probs)]
    out = cell(leaves[0], leaves[1], leaves[2], x_mask, h_mask)
    params = [cell._W0, *cell._Ws]
    grads = torch.autograd.grad(out, leaves + params, grad)
    bn = cell.bn
    return [out, *grads], [bn.running_mean, bn.running_var, bn.num_batches_tracked]


def assert_close(got, want, dtype, tol=None):
    rtol, atol = tol or TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert not g.isnan().any(), i
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, i=i: f"#{i}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("masks", ["xh", "h", ""])
@pytest.mark.parametrize("train", [True, False])
def test_forward_every_gradient_and_bn_statistics(impl, dtype, masks, train):
    gen = torch.Generator().manual_seed(7 + len(masks) + 10 * train)
    T, B, ninp, nhid, steps = 3, 5, 7, 11, 8
    ref, fused = make_cell(gen, ninp, nhid, steps, dtype)
    for cell in (ref, fused):
        cell.train(train)
    inputs = make_inputs(gen, T, B, ninp, nhid, steps, dtype, masks)
    grad = torch.randn(T, B, nhid, generator=gen, dtype=dtype)
    # Against the reference in float64 on the same inputs: in float32 the reference's own
    # error (measured: up to 2.4e-4 of a d_probs entry here, single-threaded) is ten times
    # the kernel's, and would decide the test.
    ref = ref.double()
    want, want_bn = run(ref, *(None if t is None else t.double() for t in inputs), grad.double())
    got, got_bn = run(fused, *inputs, grad)
    tol = TORCH_FLOAT32_TOL if (impl, dtype) == ("torch", torch.float32) else None
    assert_close(got, [w.to(dtype) for w in want], dtype, tol)
    assert_close(got_bn, [w.to(dtype) if w.is_floating_point() else w for w in want_bn], dtype)
    if train:
        assert int(got_bn[2]) == T * (steps + 1)  # one BatchNorm call per node and s0


@pytest.mark.parametrize("steps", [1, 3])
def test_small_cells_and_cumulative_momentum(impl, steps):
    gen = torch.Generator().manual_seed(steps)
    ref, fused = make_cell(gen, 4, 6, steps, torch.float64)
    for cell in (ref, fused):
        cell.bn.momentum = None  # cumulative average over num_batches_tracked
    inputs = make_inputs(gen, 4, 3, 4, 6, steps, torch.float64, "xh")
    grad = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    for _ in range(2):  # the second call continues from the first's statistics
        want, want_bn = run(ref, *inputs, grad)
        got, got_bn = run(fused, *inputs, grad)
        assert_close(got + got_bn, want + want_bn, torch.float64)


def test_frozen_statistics_are_not_updated(impl):
    gen = torch.Generator().manual_seed(3)
    ref, fused = make_cell(gen, 5, 6, 4, torch.float64)
    inputs = make_inputs(gen, 2, 4, 5, 6, 4, torch.float64, "h")
    before = [t.clone() for t in (fused.bn.running_mean, fused.bn.running_var)]
    for cell in (ref, fused):
        cell.bn.track_running_stats = False  # what SearchModel.frozen_bn_stats does
    grad = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    want, _ = run(ref, *inputs, grad)
    got, got_bn = run(fused, *inputs, grad)
    assert_close(got, want, torch.float64)
    assert torch.equal(got_bn[0], before[0]) and torch.equal(got_bn[1], before[1])
    assert int(got_bn[2]) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kernel_writes_every_output(impl, dtype):
    """Into NaN-filled outputs (each dtype has its own vector width in C++; nhid = 19 gives
    whole vectors and a tail in both)."""
    forward, backward = functions(impl)
    gen = torch.Generator().manual_seed(5)
    T, B, ninp, nhid, steps = 2, 3, 5, 19, 3
    _, cell = make_cell(gen, ninp, nhid, steps, dtype)
    x, h, probs, xm, hm = make_inputs(gen, T, B, ninp, nhid, steps, dtype, "xh")
    bn = cell.bn
    ws = [w.detach() for w in cell._Ws]
    outs = [torch.full(s, math.nan, dtype=dtype) for s in rc._shapes(x, h, steps)]
    forward(
        x, h, probs, xm, hm, cell._W0.detach(), ws, bn.running_mean, bn.running_var,
        bn.num_batches_tracked, True, False, 0.1, 1e-5, *outs,
    )  # fmt: skip
    assert all(not o.isnan().any() for o in outs)
    grads = [torch.full_like(t, math.nan) for t in (x, h, probs, cell._W0, *ws)]
    backward(
        torch.randn(T, B, nhid, dtype=dtype), x, h, probs, xm, hm, cell._W0.detach(),
        ws, *outs[:5], True, *grads[:4], grads[4:],
    )  # fmt: skip
    assert all(not g.isnan().any() for g in grads)


def _function(cell):
    bn = cell.bn
    bn_args = (bn.running_mean, bn.running_var, bn.num_batches_tracked, True, False, 0.1, 1e-5)

    def fn(x, h, probs, w0, *ws):
        return RecurrentCellFunction.apply(bn_args, x, h, probs, None, None, w0, *ws)[0]

    return fn


def test_gradcheck_and_gradgradcheck(impl):
    gen = torch.Generator().manual_seed(11)
    _, cell = make_cell(gen, 3, 4, 2, torch.float64)
    x, h, probs, _, _ = make_inputs(gen, 2, 3, 3, 4, 2, torch.float64, "")
    probs = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), -1)
    args = [t.detach().clone().requires_grad_() for t in (x, h, probs, cell._W0, *cell._Ws)]
    fn = _function(cell)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


def test_double_backward_matches_reference(impl):
    """The exact HVP differentiates the backward: same values as the reference cell's."""
    gen = torch.Generator().manual_seed(13)
    ref, fused = make_cell(gen, 5, 6, 4, torch.float64)
    x, h, probs, xm, hm = make_inputs(gen, 3, 4, 5, 6, 4, torch.float64, "xh")
    probs = probs.requires_grad_()
    grad = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    results = []
    for cell in (ref, fused):
        out = cell(x, h, probs, xm, hm)
        (gw,) = torch.autograd.grad((out * grad).sum(), [cell._W0], create_graph=True)
        results.append(torch.autograd.grad(gw.pow(2).sum(), [probs, cell._Ws[2]]))
    assert_close(results[1], results[0], torch.float64)
    assert results[1][0].abs().max() > 1e-3  # not silently zero


def test_non_contiguous_inputs(impl):
    gen = torch.Generator().manual_seed(17)
    ref, fused = make_cell(gen, 5, 6, 3, torch.float64)
    x, h, probs, xm, hm = make_inputs(gen, 3, 4, 5, 6, 3, torch.float64, "xh")
    x_nc = x.transpose(0, 1).contiguous().transpose(0, 1)
    h_nc = h.t().contiguous().t()
    assert not x_nc.is_contiguous() and not h_nc.is_contiguous()
    grad = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64)
    want, _ = run(ref, x, h, probs, xm, hm, grad)
    got, _ = run(fused, x_nc, h_nc, probs, xm, hm, grad)
    assert_close(got, want, torch.float64)


def test_autocast(impl):
    """Under autocast the whole-cell op still runs, in float32: the same outputs and
    gradients as without (the reference cell, node by node, casts its projections)."""
    gen = torch.Generator().manual_seed(19)
    _, fused = make_cell(gen, 5, 6, 3, torch.float32)
    inputs = make_inputs(gen, 2, 4, 5, 6, 3, torch.float32, "h")
    grad = torch.randn(2, 4, 6, generator=gen)
    plain, _ = run(fused, *inputs, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        counts = count_ops(lambda: fused(*inputs))
        got, _ = run(fused, *inputs, grad)
        nodes = fused.forward_nodes(*inputs)
    assert counts["fastdarts.recurrent_cell.default"] == 1
    for a, b in zip(got, plain):
        assert a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(plain[0], nodes)  # autocast changes the node-by-node cell


def test_bad_inputs_give_clear_errors(impl):
    gen = torch.Generator().manual_seed(23)
    _, cell = make_cell(gen, 5, 6, 3, torch.float64)
    x, h, probs, _, _ = make_inputs(gen, 2, 4, 5, 6, 3, torch.float64, "h")
    with pytest.raises(ValueError, match="batch of 2 or more"):
        cell(x[:, :1], h[:1], probs)
    with pytest.raises(INPUT_ERRORS, match="recurrent_cell: dtype must be float32 or float64"):
        cell.half()(x.half(), h.half(), probs.half())
    cell.double()
    with pytest.raises(INPUT_ERRORS, match=r"recurrent_cell: probs must be .*shape \[6, 5\]"):
        cell(x, h, probs[:5])
    with pytest.raises(INPUT_ERRORS, match=r"recurrent_cell: hidden must be \(4, D\)"):
        cell(x, h[:3], probs)
    with pytest.raises(INPUT_ERRORS, match=r"recurrent_cell: h_mask must be .*shape \[4, 6\]"):
        cell(x, h, probs, None, torch.ones(4, 5, dtype=torch.float64))
    if impl == "torch":  # the C++ kernel returns zero gradients for an empty sequence
        with pytest.raises(ValueError, match="at least one time step"):
            cell(x[:0], h, probs)


def _cell_step_ops(seed: int, T: int, steps: int):
    """The ops one forward and backward of a masked cell dispatch, by name."""
    gen = torch.Generator().manual_seed(seed)
    _, cell = make_cell(gen, 5, 6, steps, torch.float64)
    x, h, probs, xm, hm = make_inputs(gen, T, 4, 5, 6, steps, torch.float64, "xh")
    probs.requires_grad_()

    def step():
        out = cell(x, h, probs, xm, hm)
        torch.autograd.grad(out.sum(), [probs, cell._W0, *cell._Ws])

    return count_ops(step)


@needs_cell
def test_one_call_dispatches_only_the_matmuls():
    """Forward and backward over T steps: 9 matmuls per step forward, 18 backward, and the
    x-side projection (1 forward, 2 backward) for all steps at once."""
    T, steps = 6, 8
    counts = _cell_step_ops(29, T, steps)
    matmuls = counts["aten.mm.out"] + counts["aten.addmm_.default"]
    assert matmuls == 3 * T * (steps + 1) + 3
    assert sum(counts.values()) - matmuls < 40, counts


@needs_cell
def test_torch_implementation_launches_per_node(monkeypatch):
    """The torch-op implementation (CUDA's; here around the C++ node kernels, each one
    counted op): per node 3 launching ATen ops forward and 6 backward besides the node op's
    two kernels, and 26 per time step (s0, masks, mean), counted here 9·T·S + 26·T + 14.
    The bound allows one more per node and three more per step; the node-by-node cell took
    about 17 per node."""
    from benchmarks.cuda_path_ops import launches_kernel

    monkeypatch.setattr(rc, "cell_kernel_ready", lambda device: False)
    T, steps = 6, 8
    counts = _cell_step_ops(31, T, steps)
    launching = sum(n for op, n in counts.items() if launches_kernel(op))
    assert counts["fastdarts.recurrent_mixed.default"] == T * steps
    assert counts["fastdarts.recurrent_mixed_backward.default"] == T * steps
    assert launching <= 10 * T * steps + 30 * T + 20, counts


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_cell_matches_reference(dtype):
    """The op on CUDA (torch ops around the Triton node kernels) against the float64
    reference cell on the CPU: output, every gradient and the running statistics."""
    gen = torch.Generator().manual_seed(37)
    T, B, ninp, nhid, steps = 5, 33, 7, 37, 8
    ref, fused = make_cell(gen, ninp, nhid, steps, dtype)
    inputs = make_inputs(gen, T, B, ninp, nhid, steps, dtype, "xh")
    grad = torch.randn(T, B, nhid, generator=gen, dtype=dtype)
    want, want_bn = run(ref.double(), *(t.double() for t in inputs), grad.double())
    cuda = [t.cuda() for t in inputs]
    got, got_bn = run(fused.cuda(), *cuda, grad.cuda())
    tol = TORCH_FLOAT32_TOL if dtype == torch.float32 else None
    assert_close([g.cpu() for g in got], [w.to(dtype) for w in want], dtype, tol)
    got_bn = [t.cpu() for t in got_bn]
    assert_close(got_bn, [w.to(dtype) if w.is_floating_point() else w for w in want_bn], dtype)


def _stacked_run(cell, x, h, probs, x_mask, h_mask, grad, probs_dim=None):
    """The cell under vmap over two weight samples (w ± 0.01), as the batched w± passes run
    it: output and the gradients of the inputs, probs and both samples' weights."""
    stacked = {
        n: torch.stack([p.detach() + 0.01, p.detach() - 0.01]).requires_grad_()
        for n, p in cell.named_parameters()
    }
    x = x.clone().requires_grad_()
    probs = probs.clone().requires_grad_()

    def one(weights, x, probs):
        return torch.func.functional_call(cell, weights, (x, h, probs, x_mask, h_mask))

    out = torch.vmap(one, in_dims=(0, 0, probs_dim))(stacked, x, probs)
    return [out, *torch.autograd.grad(out, [x, probs, *stacked.values()], grad)]


@pytest.mark.parametrize("masks", ["xh", ""])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("probs_batched", [False, True])
def test_vmap_over_weight_samples(impl, masks, train, probs_batched):
    """The w± samples under vmap: off the C++ kernel with probs and masks shared, one batched
    call (each node's kernel once for both samples), else one call per sample; against the
    reference cell under vmap, with each sample's BatchNorm statistics its own."""
    gen = torch.Generator().manual_seed(41 + 2 * train + probs_batched)
    T, B, ninp, nhid, steps = 3, 5, 7, 11, 4
    ref, fused = make_cell(gen, ninp, nhid, steps, torch.float64)
    for cell in (ref, fused):
        cell.train(train)
        cell.bn.track_running_stats = not train  # frozen in training, as the w± passes
    x, h, probs, xm, hm = make_inputs(gen, T, B, ninp, nhid, steps, torch.float64, masks)
    x = torch.stack([x, x.flip(0)])
    if probs_batched:
        probs = torch.stack([probs, probs.roll(1, 0)])
    grad = torch.randn(2, T, B, nhid, generator=gen, dtype=torch.float64)
    dim = 0 if probs_batched else None
    want = _stacked_run(ref, x, h, probs, xm, hm, grad, dim)
    counts = count_ops(lambda: _stacked_run(fused, x, h, probs, xm, hm, grad, dim))
    got = _stacked_run(fused, x, h, probs, xm, hm, grad, dim)
    assert_close(got, want, torch.float64)
    if impl == "torch" and not probs_batched:  # one call: each node's kernels once
        assert counts["fastdarts.recurrent_mixed.default"] == T * steps
        assert counts["fastdarts.recurrent_mixed_backward.default"] == T * steps
        assert counts["fastdarts.recurrent_cell.default"] == 0
    else:  # the op once per sample
        assert counts["fastdarts.recurrent_cell.default"] == 2
        assert counts["fastdarts.recurrent_cell_backward.default"] == 2


def test_vmap_double_backward(impl):
    """The exact HVP through the batched samples: differentiating their backward gives the
    reference's values (and not zero)."""
    gen = torch.Generator().manual_seed(43)
    ref, fused = make_cell(gen, 5, 6, 3, torch.float64)
    x, h, probs, xm, hm = make_inputs(gen, 2, 4, 5, 6, 3, torch.float64, "xh")
    x = torch.stack([x, 2 * x])
    probs.requires_grad_()
    grad = torch.randn(2, 2, 4, 6, generator=gen, dtype=torch.float64)
    results = []
    for cell in (ref, fused):
        cell.bn.track_running_stats = False
        stacked = {n: torch.stack([p.detach(), -p.detach()]).requires_grad_()
                   for n, p in cell.named_parameters()}  # fmt: skip

        def one(weights, x, cell=cell):
            return torch.func.functional_call(cell, weights, (x, h, probs, xm, hm))

        out = torch.vmap(one)(stacked, x)
        (gw,) = torch.autograd.grad((out * grad).sum(), [stacked["_W0"]], create_graph=True)
        results.append(torch.autograd.grad(gw.pow(2).sum(), [probs, stacked["_Ws.1"]]))
    assert_close(results[1], results[0], torch.float64)
    assert results[1][0].abs().max() > 1e-3


# The fused state kernels (the CUDA path's: a state's input, BatchNorm and mask forward,
# their backward with dS added in place and dP's partial sums into a slice of a buffer
# shared by the whole cell) run by the interpreter into NaN-filled outputs, against autograd
# through the torch formulas; and the cell itself on that path. Shapes: one row chunk and
# one program; two row chunks (300 rows: 256 and a tail) and a tail of columns, two weight
# samples interleaved. Then the per-step kernels around the states.
TRITON_SCRIPT = textwrap.dedent(
    """
    from kernels import recurrent_cell as k
    from fastdarts.spaces.rnn import recurrent_mixed_reference
    gen = torch.Generator().manual_seed(47)

    def guarded(shape, dtype, fill=math.nan):
        # A contiguous view with 64 NaN elements either side: a write past it shows.
        n = math.prod(shape)
        buf = torch.full((n + 128,), math.nan, dtype=dtype)
        view = buf[64 : 64 + n].view(shape)
        if not isinstance(fill, float) or not math.isnan(fill):
            view.copy_(fill)
        return view, buf

    def untouched(*bufs):
        for buf in bufs:
            assert buf[:64].isnan().all() and buf[-64:].isnan().all()

    def batch_norm(x, train, mean, invstd, eps=1e-5):
        if train:
            mean, invstd = x.mean(0), (x.var(0, unbiased=False) + eps).rsqrt()
        return (x - mean) * invstd

    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-4)]:
        for B, N, D in [(3, 1, 37), (300, 2, 13)]:
            def rand(*shape, scale=1.0):
                return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
            n, nd = 3, N * D
            states, ch, probs = rand(n, B * N, D), rand(n, B * N, 2 * D, scale=3), rand(n, 5)
            probs = torch.softmax(probs, -1)
            c0h0, h = rand(B, N, 2 * D, scale=3), rand(B, N, D)
            c0h0[0, 0, :3] = torch.tensor([40.0, -40.0, 0.0])
            mask = torch.bernoulli(torch.full((B, D), 0.6, dtype=dtype), generator=gen)
            mask_flat = mask.repeat(1, N)
            # ∂L/∂y, and ∂L/∂(y ⊙ mask) which the masked backward adds times the mask
            g, gm = rand(B, nd), rand(B, nd)
            for train, update, masked in [(True, True, True), (True, False, False),
                                          (False, False, True)]:
                rm, rv = rand(nd), rand(nd).abs() + 0.5
                mean, istd = rm, (rv + 1e-5).rsqrt()
                for s0 in (True, False):
                    leaves = [t.clone().requires_grad_() for t in
                              ((c0h0, h) if s0 else (states, ch, probs))]
                    if s0:
                        c, h0 = leaves[0][..., :D], leaves[0][..., D:]
                        x = leaves[1] + torch.sigmoid(c) * (torch.tanh(h0) - leaves[1])
                    else:
                        x = recurrent_mixed_reference(*leaves)
                    x = x.reshape(B, nd)
                    want_y = batch_norm(x, train, mean, istd)
                    g_all = g + gm * mask_flat if masked else g
                    want_grads = torch.autograd.grad(want_y, leaves, g_all)
                    want_y = want_y.detach()
                    (y, y_buf), (inv, i_buf) = guarded((B, nd), dtype), guarded((nd,), dtype)
                    m_out, m_buf = guarded((B, nd), dtype)
                    if not train:
                        inv.copy_(istd)
                    stats = (rm.clone(), rv.clone())
                    kw = dict(training=train, mean=mean, running=stats if update else None,
                              factor=0.3, h_mask=mask_flat if masked else None,
                              masked=m_out if masked else None)
                    if s0:
                        k.s0_bn_forward(c0h0, h, y, inv, **kw)
                    else:
                        k.node_bn_forward(states, ch, probs, y, inv, **kw)
                    torch.testing.assert_close(y, want_y, rtol=tol, atol=tol)
                    torch.testing.assert_close(inv, istd if not train else
                                               (x.var(0, unbiased=False) + 1e-5).rsqrt())
                    if masked:
                        torch.testing.assert_close(m_out, want_y * mask_flat, rtol=tol, atol=tol)
                    else:
                        assert m_out.isnan().all()
                    if update:  # torch's update: the unbiased variance
                        want_rm = 0.7 * rm + 0.3 * x.detach().mean(0)
                        want_rv = 0.7 * rv + 0.3 * x.detach().var(0)
                        torch.testing.assert_close(stats[0], want_rm, rtol=tol, atol=tol)
                        torch.testing.assert_close(stats[1], want_rv, rtol=tol, atol=tol)
                    else:
                        assert stats[0].equal(rm) and stats[1].equal(rv)
                    untouched(y_buf, i_buf, m_buf)
                    # Backward, from the kernel's own y and invstd.
                    if s0:
                        carry, c_buf = guarded(h.shape, dtype)
                        gxp, g_buf = guarded(c0h0.shape, dtype)
                        k.s0_bn_backward(g, y, inv, c0h0, h, carry, gxp, training=train,
                                         **(dict(grad_masked=gm, h_mask=mask) if masked else {}))
                        torch.testing.assert_close(gxp, want_grads[0], rtol=tol, atol=tol)
                        torch.testing.assert_close(carry, want_grads[1], rtol=tol, atol=tol)
                        untouched(c_buf, g_buf)
                        continue
                    before = rand(*states.shape)
                    d_s, s_buf = guarded(states.shape, dtype, before)
                    d_ch, ch_buf = guarded(ch.shape, dtype)
                    # dP's partial sums into a slice of a wider buffer (tiles apart), as the cell's
                    buffer = torch.full((k.bn_blocks(B, nd), n + 2, 5), math.nan, dtype=dtype)
                    k.node_bn_backward(g, y, inv, states, ch, probs, d_s, d_ch,
                                       buffer[:, 1 : n + 1], training=train,
                                       **(dict(grad_masked=gm, h_mask=mask) if masked else {}))
                    torch.testing.assert_close(d_s, before + want_grads[0], rtol=tol, atol=tol)
                    torch.testing.assert_close(d_ch, want_grads[1], rtol=tol, atol=tol)
                    d_p = buffer[:, 1 : n + 1].sum(0)
                    torch.testing.assert_close(d_p, want_grads[2], rtol=tol, atol=10 * tol)
                    assert buffer[:, 0].isnan().all() and buffer[:, -1].isnan().all()
                    untouched(s_buf, ch_buf)

    # The per-step kernels: the hidden state (mean of the states after s0, masked for the
    # next projection) and a backward step's start (the states' gradients from ∂L/∂h_t
    # and the carried parts), over B·N·D = 1,155 elements (three programs, a tail).
    for dtype, tol in [(torch.float64, 1e-14), (torch.float32, 1e-6)]:
        B, N, D, S = 7, 3, 55, 4
        def rand(*shape):
            return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        mask = torch.bernoulli(torch.full((B, D), 0.6, dtype=dtype), generator=gen)
        states, grad, carry, carry_m = rand(S, B, N, D), rand(B, N, D), rand(B, N, D), rand(B, N, D)
        for masked in (True, False):
            (h, h_buf), (hm, hm_buf) = guarded((B, N, D), dtype), guarded((B, N, D), dtype)
            k.hidden_out(states, h, *((mask, hm) if masked else ()))
            torch.testing.assert_close(h, states.mean(0), rtol=tol, atol=tol)
            if masked:
                torch.testing.assert_close(hm, h * mask.unsqueeze(1), rtol=0, atol=0)
            else:
                assert hm.isnan().all()
            gs, gs_buf = guarded((S + 1, B, N, D), dtype)
            gm, gm_buf = guarded((S + 1, B, N, D), dtype)
            extra = dict(carry_masked=carry_m, h_mask=mask, gm=gm) if masked else {}
            k.step_grads(grad, carry, gs, **extra)
            g = grad + carry + (carry_m * mask.unsqueeze(1) if masked else 0)
            want = torch.cat([torch.zeros_like(g)[None], (g / S).expand(S, B, N, D)])
            torch.testing.assert_close(gs, want, rtol=tol, atol=tol)
            assert gm.eq(0).all() if masked else gm.isnan().all()
            untouched(h_buf, hm_buf, gs_buf, gm_buf)

    # The whole cell on this path (several programs per launch: B·D = 630), with and
    # without masks, in training and evaluation, one node and three, alone and as two
    # weight samples under vmap; against the float64 reference cell.
    import fastdarts.ops.recurrent_mixed as rm
    import fastdarts.ops.recurrent_cell as rc
    sys.path.insert(0, "tests")
    from test_recurrent_cell import _stacked_run, assert_close, make_cell, make_inputs, run
    rm.kernel_name = lambda device: "triton"
    rc.cell_kernel_ready = lambda device: False
    gen = torch.Generator().manual_seed(61)
    for steps, masks, train in [(3, "xh", True), (3, "", False), (1, "h", True)]:
        ref, fused = make_cell(gen, 5, 70, steps, torch.float64)
        for cell in (ref, fused):
            cell.train(train)
        inputs = make_inputs(gen, 2, 9, 5, 70, steps, torch.float64, masks)
        grad = torch.randn(2, 9, 70, generator=gen, dtype=torch.float64)
        got, got_bn = run(fused, *inputs, grad)
        want, want_bn = run(ref, *inputs, grad)
        assert_close(got + got_bn, want + want_bn, torch.float64)
        for cell in (ref, fused):
            cell.bn.track_running_stats = not train
        x, h, probs, xm, hm = inputs
        x = torch.stack([x, -x])
        grad = torch.stack([grad, grad.flip(0)])
        got = _stacked_run(fused, x, h, probs, xm, hm, grad)
        assert_close(got, _stacked_run(ref, x, h, probs, xm, hm, grad), torch.float64)
    """
)


def test_triton_kernels_under_interpreter():
    run_triton_interpreted(TRITON_SCRIPT)


def test_nested_vmap(impl):
    """vmap over vmap (the inner level batched, the outer looped over) gives the reference's
    values and gradients."""
    gen = torch.Generator().manual_seed(53)
    ref, fused = make_cell(gen, 5, 6, 3, torch.float64)
    x, h, probs, xm, hm = make_inputs(gen, 2, 4, 5, 6, 3, torch.float64, "xh")
    x = torch.stack([torch.stack([x, 2 * x]), torch.stack([-x, x.flip(0)])])
    results = []
    for cell in (ref, fused):
        cell.bn.track_running_stats = False
        stacked = {
            n: torch.stack([torch.stack([p.detach(), 2 * p.detach()]),
                            torch.stack([-p.detach(), 0.5 * p.detach()])]).requires_grad_()
            for n, p in cell.named_parameters()
        }  # fmt: skip

        def one(weights, x, cell=cell):
            return torch.func.functional_call(cell, weights, (x, h, probs, xm, hm))

        out = torch.vmap(torch.vmap(one))(stacked, x)
        results.append([out, *torch.autograd.grad(out.pow(2).sum(), list(stacked.values()))])
    assert_close(results[1], results[0], torch.float64)


@pytest.mark.cuda
def test_cuda_vmap_over_weight_samples():
    """The batched w± samples on CUDA (one call, the Triton kernels) against the float64
    reference under vmap on the CPU."""
    gen = torch.Generator().manual_seed(59)
    T, B, ninp, nhid, steps = 4, 33, 7, 37, 8
    ref, fused = make_cell(gen, ninp, nhid, steps, torch.float64)
    for cell in (ref, fused):
        cell.bn.track_running_stats = False
    x, h, probs, xm, hm = make_inputs(gen, T, B, ninp, nhid, steps, torch.float64, "xh")
    x = torch.stack([x, x.flip(0)])
    grad = torch.randn(2, T, B, nhid, generator=gen, dtype=torch.float64)
    want = _stacked_run(ref, x, h, probs, xm, hm, grad)
    cuda = [None if t is None else t.cuda() for t in (x, h, probs, xm, hm, grad)]
    got = _stacked_run(fused.cuda(), *cuda)
    assert_close([g.cpu() for g in got], want, torch.float64)


def test_flop_counter_counts_the_cell_as_the_reference():
    """FlopCounterMode counts the fused cell's products as it counts the reference's matrix
    multiplications, forward and backward (it counted nothing: the kernels are one op)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = torch.Generator().manual_seed(35)
    counts = []
    for op in (None, recurrent_cell):
        cell = RecurrentSearchCell(6, 5)
        cell.cell_op = op
        x = torch.randn(4, 3, 6, generator=gen, requires_grad=True)
        h = torch.randn(3, 5, generator=gen, requires_grad=True)
        probs = torch.softmax(torch.randn(36, 5, generator=gen), -1).requires_grad_()
        with FlopCounterMode(display=False) as counter:
            forward = cell(x, h, probs).sum()
        total = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            forward.backward()
        counts.append((total, counter.get_total_flops()))
    steps = 4 * (2 * 3 * 11 * 10 + sum(2 * (j + 1) * 3 * 5 * 10 for j in range(8)))
    assert counts[0] == counts[1] == (steps, 2 * steps)
