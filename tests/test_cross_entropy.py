"""The fused cross-entropy (fastdarts.ops.cross_entropy) against F.cross_entropy: the
Triton kernels under the interpreter, the op's dispatch as on CUDA, and the Function's
gradients, double backward and vmap rule on the CPU (where its ops take torch's formulas)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import run_triton_interpreted

from fastdarts.ops import backends, cross_entropy
from fastdarts.ops.cross_entropy import CrossEntropyFunction
from fastdarts.spaces.rnn import RNNSearchModel

F64 = torch.float64

TRITON_SCRIPT = textwrap.dedent(
    """
    import torch.nn.functional as F
    from fastdarts.ops.extension import triton_kernels
    ce = triton_kernels("cross_entropy")
    # Every output the kernels write starts as NaN: an element left unwritten shows.
    empty, empty_like = torch.empty, torch.empty_like
    torch.empty = lambda *a, **k: empty(*a, **k).fill_(math.nan)
    torch.empty_like = lambda *a, **k: empty_like(*a, **k).fill_(math.nan)
    gen = torch.Generator().manual_seed(40)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}
    # (rows, classes, samples, targets shared by the samples): one block, one past it
    # (the loop over blocks), a single class, per-sample gradients, shared targets.
    cases = [(5, 7, 1, False), (4, ce.BLOCK + 3, 1, False), (3, 1, 1, False),
             (6, 2 * ce.BLOCK + 1, 2, False), (6, 50, 3, True)]
    for dtype in tol:
        for n, v, s, shared in cases:
            x = 4 * torch.randn(n, v, generator=gen, dtype=torch.float64)
            x[0, 0] = 30.0  # a row dominated by one class: the running maximum's rescale
            t = torch.randint(0, v, (n // s if shared else n,), generator=gen)
            t[-1] = v - 1
            rows_t = t.repeat(s) if shared else t
            loss, lse = ce.forward(x.to(dtype), t)
            want = F.cross_entropy(x, rows_t, reduction="none")
            torch.testing.assert_close(loss, want.to(dtype), rtol=tol[dtype], atol=tol[dtype])
            want_lse = torch.logsumexp(x, 1).to(dtype)
            torch.testing.assert_close(lse, want_lse, rtol=tol[dtype], atol=tol[dtype])
            g = torch.randn(s, generator=gen, dtype=torch.float64)
            xr = x.clone().requires_grad_()
            per_sample = F.cross_entropy(xr, rows_t, reduction="none").view(s, -1).mean(1)
            (per_sample * g).sum().backward()
            d = ce.backward(x.to(dtype), t, lse, g.to(dtype))
            torch.testing.assert_close(d, xr.grad.to(dtype), rtol=tol[dtype], atol=tol[dtype])
    # A row whose first block of logits is all −inf (exp(−inf − −inf) would be NaN).
    for dtype in tol:
        x = torch.randn(2, ce.BLOCK + 10, generator=gen, dtype=torch.float64)
        x[0, : ce.BLOCK] = -math.inf
        t = torch.tensor([ce.BLOCK + 1, 3])
        loss, lse = ce.forward(x.to(dtype), t)
        want = F.cross_entropy(x, t, reduction="none").to(dtype)
        torch.testing.assert_close(loss, want, rtol=tol[dtype], atol=tol[dtype])
        d = ce.backward(x.to(dtype), t, lse, torch.ones(1, dtype=dtype))
        xr = x.clone().requires_grad_()
        (F.cross_entropy(xr, t) * 2).backward()  # the mean over the rows' sample, g = 1
        torch.testing.assert_close(d, (xr.grad / 2).to(dtype), rtol=tol[dtype], atol=tol[dtype])
    # A target out of range reads nothing: that row's loss is NaN, the others are kept.
    x = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    loss, _ = ce.forward(x, torch.tensor([2, 9, -1]))
    assert not loss[0].isnan() and loss[1:].isnan().all()
    """
)


def test_triton_kernels_under_interpreter():
    """Each row's loss and log-sum-exp and the logits' gradient (per-sample upstream
    gradients, targets shared by samples) against F.cross_entropy; float64 and float32."""
    run_triton_interpreted(TRITON_SCRIPT)


# cross_entropy as on CUDA (the kernels interpreted): plain, from bfloat16 logits, under
# vmap over two weight samples (the batched w± passes), and under create_graph.
TRITON_DISPATCH_SCRIPT = textwrap.dedent(
    """
    import torch.nn.functional as F
    import fastdarts.ops.cross_entropy as fce
    fce.triton_ready = lambda device: True
    calls = []
    apply = fce.CrossEntropyFunction.apply
    fce.CrossEntropyFunction.apply = lambda *a: calls.append(a[2]) or apply(*a)
    gen = torch.Generator().manual_seed(41)
    x = torch.randn(2, 12, 37, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 37, (12,), generator=gen)

    def both(fn, x, *args):
        x = x.clone().requires_grad_()
        loss = fn(x, *args)
        return [loss, *torch.autograd.grad(loss.sum(), x)]

    for u, v in zip(both(fce.cross_entropy, x[0], t), both(F.cross_entropy, x[0], t)):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    got = both(fce.cross_entropy, x[0].bfloat16(), t)
    want = both(F.cross_entropy, x[0].bfloat16().float(), t)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1].float(), want[1], rtol=1e-2, atol=1e-3)
    # Two weight samples, the targets shared (the batched w± passes) or each sample's own.
    for tt, t_dim in ((t, None), (torch.stack([t, t.flip(0)]), 0)):
        got = both(torch.vmap(fce.cross_entropy, in_dims=(0, t_dim)), x, tt)
        want = both(torch.vmap(F.cross_entropy, in_dims=(0, t_dim)), x, tt)
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    # Each vmapped call (one sample) went through the vmap rule: one call for both samples.
    assert calls[-4:] == [1, 2, 1, 2]
    # Per-sample gradients with each sample's own targets (torch.func.grad under vmap: the
    # backward's torch-op formula batched).
    tt = torch.stack([t, t.flip(0)])
    got = torch.vmap(torch.func.grad(fce.cross_entropy), in_dims=(0, 0))(x, tt)
    want = torch.vmap(torch.func.grad(F.cross_entropy), in_dims=(0, 0))(x, tt)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # Double backward (the exact HVP): the gradient's own gradient along v.
    v = torch.randn(12, 37, generator=gen, dtype=torch.float64)
    hvps = []
    for fn in (fce.cross_entropy, F.cross_entropy):
        xr = x[0].clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xr, t), xr, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), xr)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-12, atol=1e-12)
    assert hvps[0].abs().max() > 1e-3
    """
)


def test_dispatch_under_interpreter():
    run_triton_interpreted(TRITON_DISPATCH_SCRIPT)


def test_function_gradients_on_the_cpu():
    """The Function through its ops' torch formulas (as off CUDA): every gradient and the
    double backward against finite differences, per-sample losses with shared targets."""
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(6, 5, generator=gen, dtype=F64, requires_grad=True)
    t = torch.randint(0, 5, (3,), generator=gen)
    assert torch.autograd.gradcheck(lambda x: CrossEntropyFunction.apply(x, t, 2)[0], x)
    assert torch.autograd.gradgradcheck(lambda x: CrossEntropyFunction.apply(x, t, 2)[0], x)
    loss, lse = CrossEntropyFunction.apply(x, t, 2)
    want = F.cross_entropy(x, t.repeat(2), reduction="none").view(2, 3).mean(1)
    torch.testing.assert_close(loss, want, rtol=1e-14, atol=1e-14)
    assert not lse.requires_grad


def test_forward_mode_matches_torch():
    """jvp (torch.func and forward-mode duals), forward-over-reverse (an HVP as
    torch.func.jvp of torch.func.grad) and gradcheck's forward-mode check, against
    F.cross_entropy in float64."""
    import torch.autograd.forward_ad as fwad

    gen = torch.Generator().manual_seed(43)
    x = torch.randn(6, 7, generator=gen, dtype=F64)
    v = torch.randn(6, 7, generator=gen, dtype=F64)
    t = torch.randint(0, 7, (3,), generator=gen)

    def fused(x):
        return CrossEntropyFunction.apply(x, t, 2)[0]

    def torchs(x):
        return F.cross_entropy(x, t.repeat(2), reduction="none").view(2, 3).mean(1)

    (got, d_got), (want, d_want) = (torch.func.jvp(f, (x,), (v,)) for f in (fused, torchs))
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(d_got, d_want, rtol=1e-12, atol=1e-14)
    with fwad.dual_level():
        tangent = fwad.unpack_dual(fused(fwad.make_dual(x, v))).tangent
    torch.testing.assert_close(tangent, d_want, rtol=1e-12, atol=1e-14)

    def hvp(f):
        return torch.func.jvp(torch.func.grad(lambda y: f(y).sum()), (x,), (v,))[1]

    torch.testing.assert_close(hvp(fused), hvp(torchs), rtol=1e-12, atol=1e-14)
    leaf = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(fused, leaf, check_forward_ad=True, check_backward_ad=False)


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(43)
    x = torch.randn(4, 6, generator=gen, dtype=F64)
    t = torch.randint(0, 6, (4,), generator=gen)
    torch.library.opcheck(torch.ops.fastdarts.cross_entropy_rows.default, (x, t))
    lse = torch.logsumexp(x, 1)
    grad = torch.randn(2, generator=gen, dtype=F64)
    torch.library.opcheck(torch.ops.fastdarts.cross_entropy_backward.default, (x, t, lse, grad))
    # Transposed logits: the gradient comes contiguous, as the fake says.
    xt = torch.randn(6, 4, generator=gen, dtype=F64).t()
    torch.library.opcheck(torch.ops.fastdarts.cross_entropy_rows.default, (xt, t))
    lse = torch.logsumexp(xt, 1)
    torch.library.opcheck(torch.ops.fastdarts.cross_entropy_backward.default, (xt, t, lse, grad))


def test_elsewhere_it_is_torchs_and_the_backends_choose_it():
    """Off CUDA, and for forms the kernels do not take (class probabilities, a batch of
    sequences), F.cross_entropy itself; the fused backend puts the op in the RNN model,
    the reference backend puts torch's back."""
    gen = torch.Generator().manual_seed(44)
    x = torch.randn(4, 6, generator=gen)
    probs = torch.softmax(torch.randn(4, 6, generator=gen), 1)
    t = torch.randint(0, 6, (4,), generator=gen)
    assert torch.equal(cross_entropy.cross_entropy(x, t), F.cross_entropy(x, t))
    assert torch.equal(cross_entropy.cross_entropy(x, probs), F.cross_entropy(x, probs))
    model = RNNSearchModel(10, 4, 4, steps=2)
    assert model.cross_entropy is F.cross_entropy
    backends.BACKENDS["fused"].apply(model)
    assert model.cross_entropy is cross_entropy.cross_entropy
    backends.BACKENDS["reference"].apply(model)
    assert model.cross_entropy is F.cross_entropy


@pytest.mark.cuda
def test_cuda_kernels_match_torch():
    """On a GPU: forward and gradient against F.cross_entropy at the paper's vocabulary."""
    gen = torch.Generator(device="cuda").manual_seed(45)
    for dtype, tol in ((F64, 1e-12), (torch.float32, 1e-5)):
        x = torch.randn(700, 10000, generator=gen, device="cuda", dtype=dtype)
        t = torch.randint(0, 10000, (700,), generator=gen, device="cuda")
        got = [x.clone().requires_grad_() for _ in range(2)]
        losses = [cross_entropy.cross_entropy(got[0], t), F.cross_entropy(got[1], t)]
        for loss in losses:
            loss.backward()
        torch.testing.assert_close(losses[0], losses[1], rtol=tol, atol=tol)
        torch.testing.assert_close(got[0].grad, got[1].grad, rtol=tol, atol=tol)
