"""The fused recurrent MixedOp against the reference, on fresh random inputs.

Tolerances: float64 with the C++ kernel, rtol 1e-12 (atol 1e-13 for values that cancel to
~0); float32, atol = rtol = 1e-5 for the forward, dS and dCH (a handful of O(1) terms per
element) and atol 1e-4 for dP, a sum over B·D products (float32 rounding of ~100 terms).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_triton_interpreted

from fastdarts import RecurrentMixedOp, recurrent_mixed
from fastdarts.data.ptb import Corpus
from fastdarts.errors import ConfigError
from fastdarts.ops import backends, extension
from fastdarts.ops.recurrent_cell import recurrent_cell
from fastdarts.ops.recurrent_mixed import backward_reference, kernel_name
from fastdarts.search.config import SearchConfig
from fastdarts.search.tasks import RNNTask
from fastdarts.spaces.rnn import RNNSearchModel, recurrent_mixed_reference

EXT = extension.extension()
needs_ext = pytest.mark.skipif(EXT is None, reason=str(extension.unavailable_reason()))


def test_extension_is_built_in_ci():
    """CI builds the extension (.ci/run), so the C++ tests below must not be skipped there."""
    if os.environ.get("CI") and EXT is None:
        pytest.fail(f"CI without the C++ extension: {extension.unavailable_reason()}")


TOL = {torch.float64: (1e-12, 1e-13), torch.float32: (1e-5, 1e-5)}
DP_ATOL32 = 1e-4


def make_inputs(gen, n, B=3, D=37, dtype=torch.float64, scale=2.0, zeros=True):
    states = torch.randn(n, B, D, generator=gen, dtype=dtype)
    ch = torch.randn(n, B, 2 * D, generator=gen, dtype=dtype) * scale
    probs = torch.softmax(torch.randn(n, 5, generator=gen, dtype=dtype), -1)
    if zeros:  # exact zeros: one op dropped everywhere, and a predecessor with only `none`
        probs[:, 2] = 0
        probs[0] = torch.tensor([1.0, 0, 0, 0, 0], dtype=dtype)
    return states, ch, probs


def value_and_grads(fn, states, ch, probs, grad):
    inputs = [t.detach().clone().requires_grad_() for t in (states, ch, probs)]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, grad))


def assert_matches(got, want, dtype):
    rtol, atol = TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert not g.isnan().any()
        a = DP_ATOL32 if dtype == torch.float32 and i == 3 else atol
        torch.testing.assert_close(g, w, rtol=rtol, atol=a)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", range(1, 9))
def test_cpp_forward_and_grads_match_reference(n, dtype):
    assert kernel_name(torch.device("cpu")) == "cpp"
    gen = torch.Generator().manual_seed(100 + n)
    states, ch, probs = make_inputs(gen, n, dtype=dtype)
    grad = torch.randn(3, 37, generator=gen, dtype=dtype)
    got = value_and_grads(recurrent_mixed, states, ch, probs, grad)
    # float32 is compared with the float64 reference on the same (float32) inputs.
    want = value_and_grads(
        recurrent_mixed_reference, *(t.double() for t in (states, ch, probs)), grad.double()
    )
    assert_matches(got, [w.to(dtype) for w in want], dtype)
    assert (got[3][:, 0] == 0).all()  # `none` has no gradient


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_saturated_and_large_sizes(dtype):
    gen = torch.Generator().manual_seed(7)
    # Several parallel chunks (B·D > 4096, not a multiple of it or of the vector width).
    states, ch, probs = make_inputs(gen, 4, B=13, D=701, dtype=dtype, zeros=False)
    ch = torch.where(torch.rand(ch.shape, generator=gen) < 0.5, 40.0, -40.0).to(dtype) * ch.sign()
    ch[..., :5] = torch.tensor([-1000.0, 1000.0, -88.0, 89.0, 0.0], dtype=dtype)
    grad = torch.randn(13, 701, generator=gen, dtype=dtype)
    got = value_and_grads(recurrent_mixed, states, ch, probs, grad)
    want = value_and_grads(
        recurrent_mixed_reference, *(t.double() for t in (states, ch, probs)), grad.double()
    )
    rtol, atol = TOL[dtype]
    dp_atol = 1e-11 if dtype == torch.float64 else 1e-2  # dP sums 9113 terms here
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.isfinite().all()
        torch.testing.assert_close(g, w.to(dtype), rtol=rtol, atol=dp_atol if i == 3 else atol)


@needs_ext
def test_cpp_relu_kink_gradient_is_zero_like_torch():
    states, ch, probs = make_inputs(torch.Generator().manual_seed(3), 2, B=2, D=4)
    ch[..., 4:] = 0  # H = 0 everywhere: relu'(0) = 0
    grad = torch.ones(2, 4, dtype=torch.float64)
    got = value_and_grads(recurrent_mixed, states, ch, probs, grad)
    want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)
    assert_matches(got, want, torch.float64)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpp_kernel_writes_every_element(dtype):
    """Into NaN-filled outputs (each dtype has its own vector width and tail)."""
    gen = torch.Generator().manual_seed(11)
    for n, B, D in [(1, 1, 1), (3, 3, 37), (5, 7, 1031)]:
        states, ch, probs = make_inputs(gen, n, B, D, dtype=dtype)
        grad = torch.randn(B, D, generator=gen, dtype=dtype)
        out = torch.full((B, D), math.nan, dtype=dtype)
        EXT.recurrent_mixed_forward(states, ch, probs, out)
        grads = [torch.full_like(t, math.nan) for t in (states, ch, probs)]
        EXT.recurrent_mixed_backward(grad, states, ch, probs, *grads)
        want = value_and_grads(
            recurrent_mixed_reference, *(t.double() for t in (states, ch, probs)), grad.double()
        )
        assert_matches([out, *grads], [w.to(dtype) for w in want], dtype)


@needs_ext
def test_gradcheck_and_gradgradcheck():
    gen = torch.Generator().manual_seed(5)
    inputs = [t.requires_grad_() for t in make_inputs(gen, 3, B=2, D=3, zeros=False)]
    assert torch.autograd.gradcheck(recurrent_mixed, inputs)
    assert torch.autograd.gradgradcheck(recurrent_mixed, inputs)


def test_differentiable_backward_matches_reference_double_backward():
    gen = torch.Generator().manual_seed(6)
    states, ch, probs = make_inputs(gen, 4)
    grad = torch.randn(3, 37, generator=gen, dtype=torch.float64)
    vs = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (states, ch, probs)]

    def hvp(fn):
        inputs = [t.clone().requires_grad_() for t in (states, ch, probs)]
        grads = torch.autograd.grad(fn(*inputs), inputs, grad, create_graph=True)
        dot = sum((g * v).sum() for g, v in zip(grads, vs))
        return [*grads, *torch.autograd.grad(dot, inputs)]

    assert_matches(hvp(recurrent_mixed), hvp(recurrent_mixed_reference), torch.float64)
    # The torch-op backward used under create_graph and under vmap, checked on its own.
    want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)[1:]
    assert_matches(backward_reference(grad, states, ch, probs), want, torch.float64)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(8)
    states, ch, probs = make_inputs(gen, 3, B=4, D=9)
    s_nc = states.transpose(0, 1).contiguous().transpose(0, 1)
    c_nc = torch.cat([ch, ch], -1)[..., ::2]
    c_nc.copy_(ch)
    p_nc = probs.t().contiguous().t()
    assert not (s_nc.is_contiguous() or c_nc.is_contiguous() or p_nc.is_contiguous())
    grad = torch.randn(4, 9, generator=gen, dtype=torch.float64).t().contiguous().t()
    got = value_and_grads(recurrent_mixed, s_nc, c_nc, p_nc, grad)
    want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)
    assert_matches(got, want, torch.float64)


def test_module_form():
    states, ch, probs = make_inputs(torch.Generator().manual_seed(9), 2)
    torch.testing.assert_close(
        RecurrentMixedOp()(states, ch, probs), recurrent_mixed_reference(states, ch, probs)
    )


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda s, c, p: (s[0], c[0], p), ValueError, "states must be (n, B, D)"),
        (lambda s, c, p: (s[:0], c[:0], p[:0]), ValueError, "n >= 1"),
        (lambda s, c, p: (s, c[..., :-1], p), ValueError, "ch must be (n, B, 2D)"),
        (lambda s, c, p: (s, c, p[:, :4]), ValueError, "probs must be (n, 5)"),
        (lambda s, c, p: (s, c, p[:1]), ValueError, "probs must be (n, 5)"),
        (lambda s, c, p: (s.half(), c.half(), p.half()), TypeError, "float32 or all float64"),
        (lambda s, c, p: (s, c.float(), p), TypeError, "float32 or all float64"),
        (lambda s, c, p: (s, c, p.to("meta")), ValueError, "on one device"),
        (lambda s, c, p: (s, c, p.tolist()), TypeError, "probs must be a Tensor"),
    ],
)
def test_bad_inputs_give_clear_errors(change, error, message):
    inputs = change(*make_inputs(torch.Generator().manual_seed(10), 2, B=2, D=3))
    with pytest.raises(error, match=re.escape(message)):
        recurrent_mixed(*inputs)


@needs_ext
def test_kernel_checks_its_inputs():
    states, ch, probs = make_inputs(torch.Generator().manual_seed(10), 2, B=2, D=3)
    out = torch.empty(2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"ch must be \(n, B, 2D\)"):
        EXT.recurrent_mixed_forward(states, ch[..., :5], probs, out)
    with pytest.raises(RuntimeError, match="must share a dtype"):
        EXT.recurrent_mixed_forward(states, ch.float(), probs, out)
    with pytest.raises(RuntimeError, match="out must be a contiguous tensor on cpu"):
        EXT.recurrent_mixed_forward(states, ch, probs, out.float())


def test_vmap_folds_batch_and_handles_batched_probs():
    gen = torch.Generator().manual_seed(12)
    V, n = 4, 3
    states = torch.randn(V, n, 3, 5, generator=gen, dtype=torch.float64)
    ch = torch.randn(n, V, 3, 10, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(V, n, 5, generator=gen, dtype=torch.float64), -1)
    ref = [recurrent_mixed_reference(states[v], ch[:, v], probs[0]) for v in range(V)]
    got = torch.vmap(recurrent_mixed, in_dims=(0, 1, None))(states, ch, probs[0])
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-12, atol=1e-13)
    ref = [recurrent_mixed_reference(states[v], ch[:, v], probs[v]) for v in range(V)]
    got = torch.vmap(recurrent_mixed, in_dims=(0, 1, 0))(states, ch, probs)
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-12, atol=1e-13)
    # Only states batched: ch and probs are shared.
    got = torch.vmap(recurrent_mixed, in_dims=(0, None, None))(states, ch[:, 0], probs[0])
    ref = [recurrent_mixed_reference(states[v], ch[:, 0], probs[0]) for v in range(V)]
    torch.testing.assert_close(got, torch.stack(ref), rtol=1e-12, atol=1e-13)


def test_vmap_of_grad_gives_per_sample_gradients():
    gen = torch.Generator().manual_seed(13)
    V, n = 3, 2
    states = torch.randn(V, n, 2, 4, generator=gen, dtype=torch.float64)
    ch = torch.randn(V, n, 2, 8, generator=gen, dtype=torch.float64)
    probs = torch.softmax(torch.randn(n, 5, generator=gen, dtype=torch.float64), -1)

    def loss(fn):
        return lambda s, c, p: (fn(s, c, p) ** 2).sum()

    # probs shared by the samples, then probs of each sample.
    per_probs = torch.softmax(torch.randn(V, n, 5, generator=gen, dtype=torch.float64), -1)
    for p_dim, p_in in ((None, probs), (0, per_probs)):
        per_sample = torch.func.vmap(
            torch.func.grad(loss(recurrent_mixed), argnums=(0, 1, 2)), in_dims=(0, 0, p_dim)
        )(states, ch, p_in)
        for v in range(V):
            want = torch.func.grad(loss(recurrent_mixed_reference), argnums=(0, 1, 2))(
                states[v], ch[v], probs if p_dim is None else per_probs[v]
            )
            for g, w in zip(per_sample, want):
                torch.testing.assert_close(g[v], w, rtol=1e-12, atol=1e-13)


def test_custom_op_registration_passes_opcheck():
    states, ch, probs = make_inputs(torch.Generator().manual_seed(14), 2, B=2, D=3)
    inputs = [t.requires_grad_() for t in (states, ch, probs)]
    torch.library.opcheck(torch.ops.fastdarts.recurrent_mixed.default, inputs)
    grad = torch.randn(2, 3, dtype=torch.float64)
    torch.library.opcheck(
        torch.ops.fastdarts.recurrent_mixed_backward.default,
        [grad, states.detach(), ch.detach(), probs.detach()],
    )


def test_backends_resolve_and_apply():
    if EXT is None:
        with pytest.raises(ConfigError, match=r"fastdarts\._C"):
            backends.resolve("fused", "rnn", "cpu")
        assert backends.resolve("auto", "rnn", "cpu").name == "reference"
    else:
        assert backends.resolve("auto", "rnn", "cpu").name == "fused"
    want_cnn = "reference" if EXT is None else "fused"
    assert backends.resolve("auto", "cnn", "cpu").name == want_cnn
    only_rnn = backends.Backend("rnn_only", frozenset({"rnn"}), frozenset({"cpu"}))
    assert only_rnn.why_not("cnn", "cpu") == "does not implement the cnn space"
    with pytest.raises(ConfigError, match="unknown backend"):
        backends.resolve("magic", "rnn", "cpu")
    model = RNNSearchModel(11, 4, 4)
    backends.BACKENDS["fused"].apply(model)
    assert model.rnns[0].node_op is recurrent_mixed
    assert model.rnns[0].cell_op is recurrent_cell
    backends.BACKENDS["reference"].apply(model)
    assert model.rnns[0].node_op is recurrent_mixed_reference
    assert model.rnns[0].cell_op is None


def test_fused_on_cuda_without_triton_only_for_the_rnn_with_the_cuda_extension(monkeypatch):
    """Without Triton the CNN's fused ops would run their torch-op formulas on CUDA (slower
    than the reference), so 'auto' must not pick them; the RNN has the extension's kernels."""
    monkeypatch.setattr(backends, "has_triton", lambda: False)
    with_cuda = type("Ext", (), {"recurrent_mixed_forward_cuda": None})()
    monkeypatch.setattr(backends, "extension", lambda: with_cuda)
    fused = backends.BACKENDS["fused"]
    assert fused.why_not("rnn", "cuda") is None
    assert fused.why_not("cnn", "cuda") == "needs Triton on cuda (triton does not import)"
    assert backends.resolve("auto", "cnn", "cuda").name == "reference"
    monkeypatch.setattr(backends, "extension", lambda: None)
    assert "Triton or the extension built with CUDA" in fused.why_not("rnn", "cuda")
    monkeypatch.setattr(backends, "has_triton", lambda: True)
    assert fused.why_not("cnn", "cuda") is None


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    # None in sys.modules makes importing the extension raise ModuleNotFoundError (patching
    # importlib.import_module instead also broke torch's own lazy imports).
    monkeypatch.setitem(sys.modules, "fastdarts._C", None)
    extension._load.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert extension.extension() is None
            assert extension.extension() is None
            assert "fastdarts._C" in extension.unavailable_reason()
            assert kernel_name(torch.device("cpu")) == "reference"
            states, ch, probs = make_inputs(torch.Generator().manual_seed(15), 2)
            grad = torch.randn(3, 37, dtype=torch.float64)
            got = value_and_grads(recurrent_mixed, states, ch, probs, grad)
            want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)
            assert_matches(got, want, torch.float64)
        (warned,) = [str(w.message) for w in caught if "fastdarts._C" in str(w.message)]
        assert warned.endswith("without it the fused ops run the reference's on the CPU")
        with pytest.raises(ConfigError) as info:
            backends.resolve("fused", "rnn", "cpu")
        assert str(info.value).startswith(
            "backend 'fused' needs the C++ kernels on the CPU: the C++ extension fastdarts._C "
            "is not available ("
        )
    finally:
        monkeypatch.undo()
        extension._load.cache_clear()


def _synthetic_corpus(vocab=50, seed=0):
    gen = torch.Generator().manual_seed(seed)
    splits = [torch.randint(0, vocab, (size,), generator=gen) for size in (400, 200, 100)]
    return Corpus(*splits, [f"w{i}" for i in range(vocab)])


def _run_search(backend, order, steps=5, hvp="fd"):
    cfg = SearchConfig(
        space="rnn",
        order=order,
        backend=backend,
        hvp=hvp,
        dtype="float64",
        emsize=8,
        nhid=8,
        batch_size=4,
        bptt=5,
        eval_batch_size=2,
        seed=3,
    ).resolved()
    task = RNNTask(cfg, torch.device("cpu"), torch.float64, corpus=_synthetic_corpus())
    task.begin_epoch(0)
    losses = [task.step()["loss"] for _ in range(steps)]
    return task.model, losses


@needs_ext
@pytest.mark.parametrize(("order", "hvp"), [(1, "fd"), (2, "fd"), (2, "exact")])
def test_search_steps_fused_equal_reference(order, hvp, one_thread):
    ref_model, ref_losses = _run_search("reference", order, hvp=hvp)
    fused_model, fused_losses = _run_search("fused", order, hvp=hvp)
    assert fused_model.rnns[0].cell_op is recurrent_cell
    assert ref_model.rnns[0].node_op is recurrent_mixed_reference
    np.testing.assert_allclose(fused_losses, ref_losses, rtol=1e-12)
    a_ref, a_fused = ref_model.alphas_recurrent.detach(), fused_model.alphas_recurrent.detach()
    assert (a_ref - a_fused).abs().max() < 1e-10
    # ... and α moved, so the comparison means something.
    assert (a_ref - RNNSearchModel(50, 8, 8).alphas_recurrent).abs().max() > 1e-4
    for (name, w_ref), w_fused in zip(ref_model.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(w_fused, w_ref, rtol=1e-10, atol=1e-12, msg=name)


TRITON_SCRIPT = textwrap.dedent(
    """
    from kernels import recurrent_mixed as k
    from fastdarts.spaces.rnn import recurrent_mixed_reference as ref
    gen = torch.Generator().manual_seed(21)
    for dtype, rtol, atol, dp_atol in [(torch.float64, 1e-12, 1e-13, 1e-11),
                                       (torch.float32, 1e-5, 1e-5, 1e-3)]:
        for n, B, D in [(1, 3, 37), (3, 3, 37), (8, 3, 37), (2, 5, 211)]:
            s = torch.randn(n, B, D, generator=gen, dtype=torch.float64)
            ch = torch.randn(n, B, 2 * D, generator=gen, dtype=torch.float64) * 3
            ch[0, 0, :4] = torch.tensor([40.0, -40.0, 0.0, 1e-9])
            ch[-1, -1, -4:] = torch.tensor([40.0, -40.0, -1000.0, 1e-9])
            p = torch.softmax(torch.randn(n, 5, generator=gen, dtype=torch.float64), -1)
            p[:, 3] = 0
            g = torch.randn(B, D, generator=gen, dtype=torch.float64)
            x = [t.clone().requires_grad_() for t in (s, ch, p)]
            want_out = ref(*x)
            want = [want_out, *torch.autograd.grad(want_out, x, g)]
            lo = [t.to(dtype) for t in (s, ch, p, g)]
            out = torch.full((B, D), math.nan, dtype=dtype)
            k.forward(*lo[:3], out=out)
            dsc = (torch.full_like(lo[0], math.nan), torch.full_like(lo[1], math.nan))
            got = [out, *k.backward(lo[3], *lo[:3], out=dsc)]
            for i, (a, b) in enumerate(zip(got, want)):
                torch.testing.assert_close(a, b.detach().to(dtype), rtol=rtol,
                                           atol=dp_atol if i == 3 else atol)
    """
)


def test_triton_kernels_under_interpreter():
    run_triton_interpreted(TRITON_SCRIPT)


# The launch glue the CUDA path takes (fastdarts.ops.recurrent_mixed's 'triton' branch), run
# on the CPU by the interpreter: the public op, and the whole-cell op's torch implementation
# (the C++ cell kernel is CPU-only) around the node kernels, forward and every gradient.
TRITON_DISPATCH_SCRIPT = textwrap.dedent(
    """
    import fastdarts.ops.recurrent_mixed as rm
    import fastdarts.ops.recurrent_cell as rc
    from fastdarts import recurrent_mixed, recurrent_mixed_reference
    from fastdarts.ops.backends import BACKENDS
    from fastdarts.spaces import Batch, RNNSearchModel
    rm.kernel_name = lambda device: "triton"
    rc.cell_kernel_ready = lambda device: False
    gen = torch.Generator().manual_seed(26)
    s = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    ch = torch.randn(3, 4, 14, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(3, 5, generator=gen, dtype=torch.float64), -1)
    g = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    results = []
    for fn in (recurrent_mixed, recurrent_mixed_reference):
        x = [t.clone().requires_grad_() for t in (s, ch, p)]
        out = fn(*x)
        results.append([out, *torch.autograd.grad(out, x, g)])
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    results = []
    tokens = torch.randint(0, 20, (6, 3), generator=gen)
    state = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    for backend in ("fused", "reference"):
        torch.manual_seed(3)
        model = BACKENDS[backend].apply(RNNSearchModel(20, 6, 6).double())
        batch = Batch(tokens[:-1], tokens[1:], state)
        loss = model(batch).loss
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    for u, v in zip(*results):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)
    """
)


def test_triton_dispatch_under_interpreter():
    run_triton_interpreted(TRITON_DISPATCH_SCRIPT)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_triton_matches_reference(dtype):
    device = torch.device("cuda")
    assert kernel_name(device) == "triton"
    gen = torch.Generator().manual_seed(22)
    for n in range(1, 9):
        states, ch, probs = make_inputs(gen, n, B=33, D=301, dtype=torch.float64)
        grad = torch.randn(33, 301, generator=gen, dtype=torch.float64)
        want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)
        got = value_and_grads(
            recurrent_mixed, *(t.to(device, dtype) for t in (states, ch, probs, grad))
        )
        rtol, atol = TOL[dtype]
        for i, (g, w) in enumerate(zip(got, want)):
            dp_atol = 1e-11 if dtype == torch.float64 else 1e-2
            torch.testing.assert_close(
                g.cpu(), w.to(dtype), rtol=rtol, atol=dp_atol if i == 3 else atol
            )


@pytest.mark.cuda
def test_cuda_triton_launches_on_the_inputs_device():
    """Triton launches on the current device; the launchers switch to the inputs' one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    device = torch.device("cuda", 1)
    assert torch.cuda.current_device() == 0 and kernel_name(device) == "triton"
    gen = torch.Generator().manual_seed(23)
    states, ch, probs = make_inputs(gen, 4, B=5, D=67, dtype=torch.float64)
    grad = torch.randn(5, 67, generator=gen, dtype=torch.float64)
    want = value_and_grads(recurrent_mixed_reference, states, ch, probs, grad)
    got = value_and_grads(recurrent_mixed, *(t.to(device) for t in (states, ch, probs, grad)))
    for g, w in zip(got, want):
        assert g.device == device
        torch.testing.assert_close(g.cpu(), w, rtol=1e-10, atol=1e-11)


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    # For Hopper (the GPU machines' H100/H200), as the GPU suite builds it.
    cmd = [nvcc, "-c", "-O3", "-std=c++17", "-arch=sm_90", "csrc/recurrent_mixed_cuda.cu", "-o"]
    result = subprocess.run(
        [*cmd, str(tmp_path / "k.o")], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 0


@pytest.mark.slow
def test_cuda_extension_builds_links_and_loads_without_a_gpu(tmp_path):
    """The whole extension built for CUDA (FORCE_CUDA=1, sm_90) on a machine without a GPU
    links against torch's CUDA libraries and imports; its CUDA entry points exist and refuse
    CPU tensors with their one-line error. (About 2 minutes on 2 cores: marked slow.)"""
    from torch.utils.cpp_extension import CUDA_HOME

    # A toolkit with its headers (torch guesses /usr/local from a /usr/local/bin/nvcc).
    homes = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"]
    homes = [h for h in homes if h and (Path(h) / "include" / "cuda_runtime.h").exists()]
    if not homes or torch.version.cuda is None:
        pytest.skip("needs the CUDA toolkit and a CUDA build of torch")
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns("build", "*.so", ".git"))
    env = {**os.environ, "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": "2"}
    env["CUDA_HOME"] = homes[0]
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        capture_output=True,
        text=True,
        cwd=checkout,
        env=env,
        timeout=1500,
    )
    assert "could not build" not in build.stderr, build.stderr[-3000:]
    script = textwrap.dedent(
        """
        import torch, fastdarts._C as C
        assert C.__file__.startswith(sys.argv[1]), C.__file__
        s, ch, p = torch.randn(2, 3, 4), torch.randn(2, 3, 8), torch.randn(2, 5)
        try:
            C.recurrent_mixed_forward_cuda(s, ch, p, torch.empty(3, 4))
        except RuntimeError as e:
            assert "must be on one cuda device" in str(e), e
        else:
            raise AssertionError("the CUDA kernel accepted CPU tensors")
        print("loaded", hasattr(C, "recurrent_mixed_backward_cuda"))
        """
    )
    load = subprocess.run(
        [sys.executable, "-c", "import sys\n" + script, str(checkout)],
        capture_output=True,
        text=True,
        cwd=checkout,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        timeout=300,
    )
    assert load.returncode == 0, load.stderr[-3000:]
    assert load.stdout.strip() == "loaded True"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_extension_kernel_matches_reference(dtype):
    if not hasattr(EXT, "recurrent_mixed_forward_cuda"):
        pytest.skip("fastdarts._C was built without CUDA")
    gen = torch.Generator().manual_seed(23)
    for n, B, D in [(1, 3, 37), (8, 33, 301), (3, 64, 1031)]:
        states, ch, probs = make_inputs(gen, n, B, D, dtype=dtype)
        grad = torch.randn(B, D, generator=gen, dtype=dtype)
        want = value_and_grads(
            recurrent_mixed_reference, *(t.double() for t in (states, ch, probs)), grad.double()
        )
        s, c, p, g = (t.cuda() for t in (states, ch, probs, grad))
        out = torch.full((B, D), math.nan, dtype=dtype, device="cuda")
        EXT.recurrent_mixed_forward_cuda(s, c, p, out)
        grads = [torch.full_like(t, math.nan) for t in (s, c, p)]
        EXT.recurrent_mixed_backward_cuda(g, s, c, p, *grads)
        got = [t.cpu() for t in (out, *grads)]
        rtol, atol = TOL[dtype]
        for i, (u, w) in enumerate(zip(got, want)):
            # dP sums B·D products: float32 rounding grows with the count.
            a = 1e-6 * B * D if dtype == torch.float32 and i == 3 else atol
            assert not u.isnan().any()
            torch.testing.assert_close(u, w.to(dtype), rtol=rtol, atol=a)
