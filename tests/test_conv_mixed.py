"""The fused convolutional MixedOp and cell against the reference, on fresh random inputs.

Tolerances: float64, rtol 1e-10 (atol 1e-12 for values that cancel to ~0); float32 is
compared with the float64 reference on the same inputs at rtol 1e-4, atol 1e-4 (BatchNorm
divides by per-channel std of a handful of pixels, and the α-gradients sum B·H·W terms).
Outputs of the kernels are filled with NaN before a call, so an element left unwritten
fails the comparison; the route tables of the tests include a source channel that no route
reads and an output channel that none writes.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from conftest import REPO, run_triton_interpreted

import fastdarts
from fastdarts.data.cifar import CIFAR10Split
from fastdarts.ops import backends, extension
from fastdarts.ops.conv_mixed import (
    FusedCellOps,
    FusedEdges,
    MixedOp,
    Routes,
    batch_norm,
    batch_norm_backward_reference,
    conv_mix,
    depthwise,
    depthwise_backward_reference,
    depthwise_reference,
    fused_cell_ops,
    kernel_name,
    mix_backward_reference,
    mix_reference,
    pointwise,
    pointwise_backward_reference,
    pools,
    pools_backward_reference,
    pools_reference,
    reference_cell_ops,
)
from fastdarts.search.config import SearchConfig
from fastdarts.search.tasks import CNNTask
from fastdarts.spaces.cnn import ConvSearchModel, SearchCell
from fastdarts.spaces.cnn import MixedOp as ReferenceMixedOp

CPP = kernel_name(torch.device("cpu")) == "cpp"
needs_cpp = pytest.mark.skipif(not CPP, reason="fastdarts._C without the conv_mix kernels")
_C = extension.extension  # the compiled module (its kernels take NaN-filled out= tensors)
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 1e-4)}
F64 = torch.float64


def test_extension_has_the_conv_kernels_in_ci():
    if os.environ.get("CI") and not CPP:
        pytest.fail(f"CI without the conv_mix C++ kernels: {extension.unavailable_reason()}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _probs(gen, *shape, dtype=F64):
    return torch.softmax(torch.randn(*shape, K_OPS, generator=gen, dtype=dtype), -1)


K_OPS = len(fastdarts.CNN_PRIMITIVES)


def fused_grads(module) -> dict[str, torch.Tensor]:
    """Gradients of a module's parameters under the reference state_dict keys (those of
    its fused edge modules mapped through their state_dict layout)."""
    fused = {n: m for n, m in module.named_modules() if isinstance(m, FusedEdges)}
    grads = {}
    for name, m in fused.items():
        prefix = f"{name}." if name else ""
        for _, g, key, store, index in m._entries:
            p = m._get(store, g)
            if isinstance(p, torch.nn.Parameter):
                grads[prefix + key] = p.grad[index]
    for name, p in module.named_parameters():
        if not any(f == "" or name.startswith(f + ".") for f in fused):
            grads[name] = p.grad
    return grads


def reference_grads(module) -> dict[str, torch.Tensor]:
    return {k: p.grad for k, p in module.named_parameters()}


def assert_close(got, want, dtype, msg=""):
    rtol, atol = TOL[dtype]
    assert got.isfinite().all(), msg
    torch.testing.assert_close(got, want.to(got.dtype), rtol=rtol, atol=atol, msg=msg)


def compare_modules(ref, fused, inputs, dtype, loss_weights, device="cpu"):
    """Forward, every gradient and the state (running statistics) of ref (float64, on the
    CPU) and fused (``dtype``, on ``device``) on the same inputs; inputs[-1] are the op
    weights."""
    ref_in = [t.detach().to(F64).requires_grad_() for t in inputs]
    fused_in = [t.detach().to(device, dtype).requires_grad_() for t in inputs]
    want = ref(*ref_in)
    got = fused(*fused_in)
    assert_close(got.cpu(), want, dtype, "forward")
    want_grads = torch.autograd.grad((want * loss_weights).sum(), ref_in, retain_graph=True)
    (got * loss_weights.to(device, dtype)).sum().backward()
    for i, (g, w) in enumerate(zip(fused_in, want_grads)):
        assert_close(g.grad.cpu(), w, dtype, f"grad of input {i}")
    (want * loss_weights).sum().backward()
    ref_g, fused_g = reference_grads(ref), fused_grads(fused)
    assert sorted(ref_g) == sorted(fused_g)
    for key, w in ref_g.items():
        assert_close(fused_g[key].cpu(), w, dtype, key)
    ref_sd, fused_sd = ref.state_dict(), fused.state_dict()
    assert list(ref_sd) == list(fused_sd)
    for key, w in ref_sd.items():
        if w.is_floating_point():
            assert_close(fused_sd[key].cpu(), w, dtype, key)
        else:
            assert torch.equal(fused_sd[key].cpu(), w), key


def make_edge(C, stride, dtype, seed, train):
    torch.manual_seed(seed)
    ref = ReferenceMixedOp(C, stride).to(F64)
    # Non-trivial running statistics, so that eval mode tests them.
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    fused = MixedOp(C, stride).to(dtype)
    fused.load_state_dict(ref.state_dict())
    ref.train(train)
    fused.train(train)
    return ref, fused


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("stride, size", [(1, (7, 9)), (2, (10, 6)), (1, (1, 1)), (1, (33, 32))])
def test_edge_forward_grads_and_stats_match_reference(stride, size, train, dtype):
    # 33×32: rows of several vectors (two column segments in float64) and 33 rows.
    C = 6 if size[0] < 32 else 3  # not a power of two
    gen = _gen(100 + stride + size[0])
    ref, fused = make_edge(C, stride, dtype, seed=stride, train=train)
    batch = 1 if size == (1, 1) and not train else 3  # BN needs >1 value per channel to train
    x = torch.randn(batch, C, *size, generator=gen, dtype=F64)
    w = _probs(gen)
    out_size = [(s - 1) // stride + 1 for s in size]
    loss_w = torch.randn(batch, C, *out_size, generator=gen, dtype=F64)
    compare_modules(ref, fused, [x, w], dtype, loss_w)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_edge_weights_with_exact_zeros_and_single_ops(dtype):
    """One op at a time (the others' weights exactly 0): forward, every gradient, state."""
    gen = _gen(3)
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    loss_w = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    for k in range(K_OPS):
        ref, fused = make_edge(4, 1, dtype, seed=3, train=True)
        w = torch.zeros(K_OPS, dtype=F64)
        w[k] = 1.0
        compare_modules(ref, fused, [x, w], dtype, loss_w)


def make_cell(C, reduction, reduction_prev, dtype, seed, train, steps=4):
    torch.manual_seed(seed)
    c_pp = 2 * C if reduction_prev else C
    ref = SearchCell(steps, steps, c_pp, C, C, reduction, reduction_prev).to(F64)
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if "running" in name:
                buf.uniform_(0.5, 1.5)
    fused = copy.deepcopy(ref).to(dtype)
    fused._ops = fused_cell_ops(fused)
    assert isinstance(fused._ops, FusedCellOps)
    ref.train(train)
    fused.train(train)
    return ref, fused, c_pp


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "reduction, reduction_prev", [(False, False), (True, False), (False, True)]
)
def test_cell_forward_grads_and_stats_match_reference(reduction, reduction_prev, train, dtype):
    C, H = 6, 6 if (reduction or reduction_prev) else 5
    gen = _gen(200 + 2 * reduction + reduction_prev)
    ref, fused, c_pp = make_cell(C, reduction, reduction_prev, dtype, seed=7, train=train)
    h_pp = 2 * H if reduction_prev else H
    s0 = torch.randn(2, c_pp, h_pp, h_pp, generator=gen, dtype=F64)
    s1 = torch.randn(2, C, H, H, generator=gen, dtype=F64)
    w = _probs(gen, 14)
    h_out = H // 2 if reduction else H
    loss_w = torch.randn(2, 4 * C, h_out, h_out, generator=gen, dtype=F64)
    compare_modules(ref, fused, [s0, s1, w], dtype, loss_w)


def test_state_dict_round_trips_both_ways():
    gen = _gen(5)
    for stride in (1, 2):
        torch.manual_seed(stride)
        ref, fused = ReferenceMixedOp(6, stride).double(), MixedOp(6, stride).double()
        ref_sd = ref.state_dict()
        assert [(k, v.shape) for k, v in ref_sd.items()] == [
            (k, v.shape) for k, v in fused.state_dict().items()
        ]
        x = torch.randn(2, 6, 8, 8, generator=gen, dtype=F64)
        w = _probs(gen)
        # reference → fused: same output; fused → a fresh reference: same state. Eval mode,
        # so that the forward passes leave the statistics alone.
        fused.load_state_dict(ref_sd)
        ref.eval(), fused.eval()
        assert_close(fused(x, w), ref(x, w), F64)
        other = ReferenceMixedOp(6, stride).double()
        other.load_state_dict(fused.state_dict())
        for k, v in other.state_dict().items():
            assert torch.equal(v, ref.state_dict()[k]), k
        # The fused module's own (fresh) weights survive a trip through the reference.
        torch.manual_seed(9)
        fresh = MixedOp(6, stride).double()
        sd = fresh.state_dict()
        via_ref = ReferenceMixedOp(6, stride).double()
        via_ref.load_state_dict(sd)
        back = MixedOp(6, stride).double()
        back.load_state_dict(via_ref.state_dict())
        for (n, a), b in zip(fresh.named_parameters(), back.parameters()):
            assert torch.equal(a, b), n
        fresh.eval(), via_ref.eval()
        assert_close(fresh(x, w), via_ref(x, w), F64)


def test_load_state_dict_reports_missing_unexpected_and_bad_shapes():
    fused = MixedOp(4, 1)
    sd = ReferenceMixedOp(4, 1).state_dict()
    del sd["_ops.4.op.1.weight"]
    sd["_ops.9.weight"] = torch.zeros(1)
    result = fused.load_state_dict(sd, strict=False)
    assert result == ReferenceMixedOp(4, 1).load_state_dict(sd, strict=False)
    assert result.missing_keys == ["_ops.4.op.1.weight"]
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"_ops.9.weight\""):
        fused.load_state_dict(sd)
    sd = ReferenceMixedOp(6, 1).state_dict()
    with pytest.raises(RuntimeError, match=r"size mismatch for _ops.4.op.1.weight"):
        fused.load_state_dict(sd)


def _construct_model_from_theta(model, theta, make):
    """The original DARTS second-order step (cnn/architect.py), verbatim in its logic: a new
    model from a flat vector theta over ``named_parameters()``, through ``state_dict()``."""
    model_new = make()
    model_dict = model.state_dict()
    params, offset = {}, 0
    for k, v in model.named_parameters():
        v_length = np.prod(v.size())
        params[k] = theta[offset : offset + v_length].view(v.size())
        offset += v_length
    assert offset == len(theta)
    model_dict.update(params)
    model_new.load_state_dict(model_dict)
    return model_new, params


def _small_supernet(fused: bool, seed: int = 0) -> torch.nn.Module:
    """An edge of each stride, a reduction cell's ops (2 steps) and a plain layer, with
    non-trivial running statistics; the same state for ``fused`` False and True."""
    torch.manual_seed(seed)
    cell = torch.nn.ModuleList(
        ReferenceMixedOp(4, 2 if j < 2 else 1) for i in range(2) for j in range(2 + i)
    )
    ref = torch.nn.ModuleDict(
        dict(e1=ReferenceMixedOp(4, 1), e2=ReferenceMixedOp(4, 2), cell=cell)
    ).double()
    ref["head"] = torch.nn.Conv2d(4, 3, 1).double()
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            buf.copy_(torch.rand_like(buf, dtype=F64) + 0.5 if "running" in name else 7)
    if not fused:
        return ref
    model = torch.nn.ModuleDict(
        dict(e1=MixedOp(4, 1), e2=MixedOp(4, 2), cell=FusedCellOps(4, 2, 2, True))
    ).double()
    model["head"] = torch.nn.Conv2d(4, 3, 1).double()
    model.load_state_dict(ref.state_dict())
    return model


def test_second_order_darts_step_loads_parameter_names():
    """DARTS' architect writes named_parameters() (the batched names here) into a copy of
    state_dict() and loads it into a new model: the new model has theta's values, and the
    state the reference model gets from the same step."""
    models = {}
    for fused in (False, True):
        model = _small_supernet(fused)
        theta = torch.cat([p.detach().view(-1) for p in model.parameters()]) * 0.5 + 0.25
        new, params = _construct_model_from_theta(
            model, theta, lambda fused=fused: _small_supernet(fused, seed=1)
        )
        for name, p in new.named_parameters():
            assert torch.equal(p, params[name]), name
        old = model.state_dict()
        for name, b in new.named_buffers():  # the statistics are the old model's
            assert torch.equal(b, dict(model.named_buffers())[name]), name
        assert list(new.state_dict()) == list(old)
        models[fused] = new
    want = models[False].state_dict()
    assert list(models[True].state_dict()) == list(want)
    for key, v in models[True].state_dict().items():
        assert torch.equal(v, want[key]), key


def test_load_state_dict_prefers_own_names_and_still_reports_bad_keys():
    fused = MixedOp(4, 2).double()
    sd = {k: v.clone() for k, v in fused.state_dict().items()}
    mine, stats = torch.randn(4, 1, 3, 3, dtype=F64), torch.rand(16, dtype=F64)
    sd["dw1_4_g0"], sd["run1_mean_g0"] = mine, stats
    sd["_ops.4.op.1.weight"] = sd["_ops.4.op.1.weight"] + 1  # the same tensors, other values
    sd["_ops.4.op.3.running_mean"] = sd["_ops.4.op.3.running_mean"] + 1
    result = fused.load_state_dict(sd)
    assert result.missing_keys == result.unexpected_keys == []
    assert torch.equal(fused.dw1_4_g0, mine) and torch.equal(fused.run1_mean_g0, stats)
    assert torch.equal(fused.state_dict()["_ops.4.op.3.running_mean"], stats[:4])
    # Own names alone, or mixed with reference keys, load; what is neither is reported.
    own = fused.state_dict()  # with its metadata: BatchNorm's current version
    for k, v in own.items():
        own[k] = v + 1
    own.update((k, v.clone()) for k, v in fused.named_parameters())
    del own["_ops.5.op.1.weight"], own["dw1_5_g0"], own["_ops.1.1.num_batches_tracked"]
    own["dw1_9_g0"] = torch.zeros(1)
    own["w_idx"] = fused.w_idx  # a non-persistent buffer, as nn.Module says
    result = fused.load_state_dict(own, strict=False)
    assert result.missing_keys == ["_ops.1.1.num_batches_tracked", "_ops.5.op.1.weight"]
    assert result.unexpected_keys == ["dw1_9_g0", "w_idx"]
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"dw1_9_g0\""):
        fused.load_state_dict(own)
    with pytest.raises(RuntimeError, match=r"size mismatch for pw1_g0: copying a param"):
        fused.load_state_dict({**fused.state_dict(), "pw1_g0": torch.zeros(3)})
    with pytest.raises(RuntimeError, match=r"expected torch.Tensor .* received <class 'int'>"):
        fused.load_state_dict({**fused.state_dict(), "_ops.4.op.1.weight": 0})


def _without_num_batches_tracked(sd, bn_version):
    """sd as saved by a PyTorch before BatchNorm's num_batches_tracked: BatchNorm metadata
    version 1 (0.4.0), or (bn_version None) no BatchNorm metadata."""
    old = type(sd)((k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked"))
    old._metadata = type(sd._metadata)()
    for k, v in sd._metadata.items():
        if v.get("version") != 2:
            old._metadata[k] = v
        elif bn_version is not None:
            old._metadata[k] = dict(v, version=bn_version)
    return old


@pytest.mark.parametrize("bn_version", [1, None])
@pytest.mark.parametrize("nested", [False, True])
def test_checkpoints_without_num_batches_tracked_load_as_batchnorm_does(nested, bn_version):
    def make(fused):
        model = _small_supernet(fused)
        return model if nested else model["e2"]

    src = make(False).state_dict()
    old = _without_num_batches_tracked(src, bn_version)
    got = {}
    for fused in (False, True):
        fresh = make(fused)
        with torch.no_grad():
            for k, v in fresh.state_dict().items():
                if k.endswith("num_batches_tracked"):
                    v.zero_()
        fresh.load_state_dict(old)  # strict
        got[fused] = fresh.state_dict()
    assert list(got[True]) == list(src)
    for key, v in got[True].items():
        want = torch.zeros((), dtype=torch.long) if key.endswith("tracked") else src[key]
        assert torch.equal(v, want) and torch.equal(got[False][key], want), key
    # Without metadata at all (version None: a hand-made dict), too.
    make(True).load_state_dict({k: v for k, v in old.items()})


@pytest.mark.parametrize("nested", [False, True])
def test_a_current_checkpoint_missing_num_batches_tracked_fails(nested):
    for source in (False, True):  # saved by the reference or by the drop-in
        model = _small_supernet(source)
        sd = model.state_dict() if nested else model["e2"].state_dict()
        key = ("e2." if nested else "") + "_ops.4.op.3.num_batches_tracked"
        del sd[key]
        for fused in (False, True):
            target = _small_supernet(fused)
            target = target if nested else target["e2"]
            with pytest.raises(RuntimeError, match=f'Missing key.*"{re.escape(key)}"'):
                target.load_state_dict(sd)


def _edit_like_ema(module: torch.nn.Module) -> None:
    """timm's ModelEmaV2 updates through state_dict().values() in place: a different edit
    of every entry (running variances stay positive)."""
    gen = _gen(41)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                v.mul_(0.5).add_(torch.rand(v.shape, generator=gen, dtype=F64).to(v.dtype))
            else:
                v.add_(int(torch.randint(1, 9, (), generator=gen)))


@pytest.mark.parametrize("what", ["edge1", "edge2", "normal cell", "reduction cell"])
def test_in_place_edits_through_state_dict_reach_the_module(what):
    gen = _gen(42)
    if what.startswith("edge"):
        stride = int(what[-1])
        ref, fused = make_edge(4, stride, F64, seed=12, train=False)
        inputs = [torch.randn(2, 4, 6, 6, generator=gen, dtype=F64), _probs(gen)]
    else:
        ref, fused, _ = make_cell(4, what == "reduction cell", False, F64, seed=13, train=False)
        states = [torch.randn(2, 4, 6, 6, generator=gen, dtype=F64) for _ in range(2)]
        inputs = [*states, _probs(gen, 14)]
    before = fused(*inputs)
    for module in (ref, fused):
        _edit_like_ema(module)
    want, got = ref.state_dict(), fused.state_dict()
    assert list(got) == list(want)
    for key, v in want.items():
        assert torch.equal(got[key], v), key
    assert (fused(*inputs) - before).abs().max() > 1e-3
    assert_close(fused(*inputs), ref(*inputs), F64)


def test_state_dict_keep_vars_gives_views_that_require_grad():
    ref, fused = ReferenceMixedOp(4, 2).double(), MixedOp(4, 2).double()
    with torch.no_grad():  # as the reference's Parameters, even under no_grad
        want, got = ref.state_dict(keep_vars=True), fused.state_dict(keep_vars=True)
    assert [(k, v.shape, v.requires_grad) for k, v in want.items()] == [
        (k, v.shape, v.requires_grad) for k, v in got.items()
    ]
    weight = got["_ops.4.op.1.weight"]
    assert not isinstance(weight, torch.nn.Parameter) and not weight.is_leaf
    with torch.no_grad():
        weight.zero_()
    assert not fused.dw1_4_g0.any()
    assert all(not v.requires_grad for v in fused.state_dict().values())


def test_drop_in_export():
    assert fastdarts.MixedOp is MixedOp
    assert fastdarts.spaces.cnn.MixedOp is ReferenceMixedOp


# -- the mixture kernel ------------------------------------------------------------------


def make_mix(gen, dtype=F64, B=2, H=3, W=5):
    # Source channel 5 is read by no route, output channel 3 written by none; channel 4 is
    # read by two routes (the backward sums them).
    routes = Routes([0, 3, 2, 2, 4, 1, 4], [1, 0, 0, 2, 2, 1, 0], 6, 4)
    src = torch.randn(B, 6, H, W, generator=gen, dtype=dtype)
    alpha = torch.randn(7, generator=gen, dtype=dtype)
    shift = torch.randn(7, generator=gen, dtype=dtype)
    acc = torch.randn(B, 4, H, W, generator=gen, dtype=dtype)
    return routes, src, alpha, shift, acc


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cpp_kernels_write_every_element(dtype):
    gen = _gen(11)
    for B, H, W in [(1, 1, 1), (2, 3, 5), (3, 17, 19)]:
        routes, src, alpha, shift, acc = make_mix(gen, dtype, B, H, W)
        rs, ro, optr, perm, sptr, n = routes.tables()
        g = torch.randn(B, 4, H, W, generator=gen, dtype=dtype)
        for a in (acc, None):
            out = torch.full((B, 4, H, W), math.nan, dtype=dtype)
            _C().conv_mix_forward(src, alpha, shift, a, rs, optr, out=out)
            want = mix_reference(*(t.double() for t in (src, alpha, shift)), a, rs, ro, n)
            assert_close(out, want, dtype)
        grads = [torch.full_like(t, math.nan) for t in (src, alpha, shift)]
        _C().conv_mix_backward(g, src, alpha, shift, rs, ro, perm, sptr, out=grads)
        want = mix_backward_reference(*(t.double() for t in (g, src, alpha, shift)), rs, ro)
        for got, w in zip(grads, want):
            assert_close(got, w, dtype)
        assert (grads[0][:, 5] == 0).all()


@needs_cpp
def test_cpp_kernel_checks_its_inputs():
    routes, src, alpha, shift, acc = make_mix(_gen(12))
    rs, _, optr, _, _, _ = routes.tables()
    out = torch.empty_like(acc)
    forward = _C().conv_mix_forward
    with pytest.raises(RuntimeError, match=r"outside \[0, 6\)"):
        forward(src, alpha, shift, acc, rs + 3, optr, out=out)
    with pytest.raises(RuntimeError, match="alpha must be Double"):
        forward(src, alpha.float(), shift, acc, rs, optr, out=out)
    with pytest.raises(RuntimeError, match="out must be a contiguous tensor on cpu"):
        forward(src, alpha, shift, acc, rs, optr, out.float())
    with pytest.raises(RuntimeError, match="route_src must be a contiguous int64"):
        forward(src, alpha, shift, acc, rs.int(), optr, out)


def test_conv_mix_matches_reference_forward_and_backward():
    gen = _gen(13)
    routes, src, alpha, shift, acc = make_mix(gen, B=3, H=4, W=7)
    rs, ro, _, _, _, n = routes.tables()
    g = torch.randn_like(acc)
    for a in (acc, None):
        inputs = [t.clone().requires_grad_() for t in (src, alpha, shift)]
        a_in = None if a is None else a.clone().requires_grad_()
        out = conv_mix(*inputs, routes, a_in)
        want = mix_reference(src, alpha, shift, a, rs, ro, n)
        assert_close(out, want, F64)
        leaves = inputs + ([a_in] if a is not None else [])
        got = torch.autograd.grad(out, leaves, g)
        ref_leaves = [t.clone().requires_grad_() for t in (src, alpha, shift)]
        ref_acc = None if a is None else a.clone().requires_grad_()
        ref_out = mix_reference(*ref_leaves, ref_acc, rs, ro, n)
        want = torch.autograd.grad(ref_out, ref_leaves + ([ref_acc] if a is not None else []), g)
        for x, y in zip(got, want):
            assert_close(x, y, F64)


def test_the_function_has_a_slot_for_each_source_the_kernels_read():
    """ConvMixFunction's source slots mirror the Triton kernels' MAX_SOURCES (kept apart so
    that fastdarts imports without triton)."""
    import inspect

    from fastdarts.ops import conv_mixed as cm
    from fastdarts.ops.extension import triton_kernels

    slots = [p for p in inspect.signature(cm.ConvMixFunction.forward).parameters if p[1:].isdigit()]
    assert cm._MAX_SOURCES == triton_kernels("conv_mixed").MAX_SOURCES == len(slots)


def test_conv_mix_reads_several_sources_as_one():
    """src given as sources whose channels in order are src's: forward, each source's
    gradient, double backward, and under vmap with the sources batched on different dims,
    or some not at all; bad sources are one-line errors."""
    gen = _gen(19)
    routes, src, alpha, shift, acc = make_mix(gen, B=3, H=4, W=5)
    rs, ro, _, _, _, n = routes.tables()
    g = torch.randn_like(acc)
    sizes = ([2, 3, 1], [1] * 6)  # three sources, and six (past the Function's four slots)
    for split in sizes:
        parts = [t.clone().requires_grad_() for t in src.split(split, 1)]
        out = conv_mix(parts, alpha, shift, routes, acc)
        assert_close(out, mix_reference(src, alpha, shift, acc, rs, ro, n), F64)
        whole = src.clone().requires_grad_()
        (want,) = torch.autograd.grad(mix_reference(whole, alpha, shift, acc, rs, ro, n), whole, g)
        got = torch.autograd.grad(out, parts, g)
        assert_close(torch.cat(got, 1), want, F64)
    parts = [t.clone().requires_grad_() for t in src.split([2, 3, 1], 1)]
    a = alpha.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda *p: conv_mix(p[:3], p[3], shift, routes), (*parts, a)
    )
    # vmap: source 0 batched on dim 0, source 1 on dim 1, source 2 shared.
    V = 2
    batch = torch.randn(V, *src.shape, generator=gen, dtype=F64)
    b0, b1 = batch[:, :, :2], batch[:, :, 2:5].movedim(0, 1).contiguous()
    fn = torch.vmap(lambda x, y: conv_mix([x, y, src[:, 5:]], alpha, shift, routes, acc), (0, 1))
    got = fn(b0, b1)
    batch[:, :, 5:] = src[:, 5:]
    want = torch.stack([mix_reference(s, alpha, shift, acc, rs, ro, n) for s in batch])
    assert_close(got, want, F64)
    with pytest.raises(ValueError, match=r"the sources' channels must be \(B, 6, H, W\)"):
        conv_mix([src[:, :2], src[:, 2:5]], alpha, shift, routes, acc)
    with pytest.raises(ValueError, match="the sources must be"):
        conv_mix([src[:, :2], src[:1, 2:]], alpha, shift, routes, acc)
    with pytest.raises(ValueError, match="no source"):
        conv_mix([], alpha, shift, routes, acc)


def test_gradcheck_and_gradgradcheck():
    routes, src, alpha, shift, acc = make_mix(_gen(14), B=2, H=2, W=3)
    inputs = [t.requires_grad_() for t in (src, alpha, shift, acc)]

    def fn(s, a, h, c):
        return conv_mix(s, a, h, routes, c)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_edge_double_backward_matches_reference():
    gen = _gen(15)
    ref, fused = make_edge(4, 1, F64, seed=4, train=True)
    x = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)
    w = _probs(gen)
    v = torch.randn(2, 4, 5, 5, generator=gen, dtype=F64)

    def hvp(module):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        (gx,) = torch.autograd.grad((module(xs, ws) ** 2).sum(), [xs], create_graph=True)
        return torch.autograd.grad((gx * v).sum(), [xs, ws])

    for got, want in zip(hvp(fused), hvp(ref)):
        assert_close(got, want, F64)


def test_vmap_folds_batch_and_handles_batched_coefficients():
    gen = _gen(16)
    routes, src, alpha, shift, acc = make_mix(gen)
    rs, ro, _, _, _, n = routes.tables()
    V = 3
    srcs = torch.randn(V, *src.shape, generator=gen, dtype=F64)
    alphas = torch.randn(V, *alpha.shape, generator=gen, dtype=F64)

    def fn(s, a, h, c):
        return conv_mix(s, a, h, routes, c)

    got = torch.vmap(fn, in_dims=(0, None, None, None))(srcs, alpha, shift, acc)
    want = torch.stack([mix_reference(s, alpha, shift, acc, rs, ro, n) for s in srcs])
    assert_close(got, want, F64)
    got = torch.vmap(fn, in_dims=(0, 0, None, None))(srcs, alphas, shift, acc)
    want = torch.stack([mix_reference(s, a, shift, acc, rs, ro, n) for s, a in zip(srcs, alphas)])
    assert_close(got, want, F64)

    def loss(s, a):
        return (conv_mix(s, a, shift, routes, acc) ** 2).sum()

    # α shared by the samples, then α of each sample.
    for a_dim, a_in in ((None, alpha), (0, alphas)):
        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, a_dim))(
            srcs, a_in
        )
        for v in range(V):
            a_v = alpha if a_dim is None else alphas[v]
            s, a = srcs[v].clone().requires_grad_(), a_v.clone().requires_grad_()
            out = mix_reference(s, a, shift, acc, rs, ro, n)
            want = torch.autograd.grad((out**2).sum(), [s, a])
            for g, w in zip(per_sample, want):
                assert_close(g[v], w, F64)


def test_edge_under_vmap_in_eval_mode():
    gen = _gen(17)
    ref, fused = make_edge(4, 1, F64, seed=5, train=False)
    xs = torch.randn(3, 2, 4, 5, 5, generator=gen, dtype=F64)
    w = _probs(gen)
    got = torch.vmap(lambda x: fused(x, w))(xs)
    assert_close(got, torch.stack([ref(x, w) for x in xs]), F64)


def check_cell_under_vmap(
    reduction: bool,
    reduction_prev: bool,
    C: int = 4,
    H: int = 6,
    weight_grads: bool = True,
    steps: int = 4,
) -> None:
    """A search cell under vmap over two weight samples (w + δ and w − δ), as the batched w±
    pass runs it (batch statistics, none updated): the output, and the gradients of the
    cell's inputs, α and (``weight_grads``) the stacked weights, against each sample run
    alone."""
    gen = _gen(25 + 2 * reduction + reduction_prev)
    _, cell, c_pp = make_cell(C, reduction, reduction_prev, F64, seed=8, train=True, steps=steps)
    s0 = torch.randn(2, c_pp, 2 * H if reduction_prev else H, 2 * H if reduction_prev else H,
                     generator=gen, dtype=F64)  # fmt: skip
    s1 = torch.randn(2, C, H, H, generator=gen, dtype=F64)
    w = _probs(gen, sum(2 + i for i in range(steps)))
    names, params = zip(*cell.named_parameters())
    deltas = [0.1 * torch.randn(p.shape, generator=gen, dtype=F64) for p in params]
    stacked = [
        torch.stack([p + d, p - d]).detach().requires_grad_(weight_grads)
        for p, d in zip(params, deltas)
    ]
    for m in cell.modules():
        if hasattr(m, "track_running_stats"):
            m.track_running_stats = False

    def run(weights, *inputs):
        return torch.func.functional_call(cell, dict(zip(names, weights)), inputs)

    inputs = [
        t.clone().requires_grad_(t.requires_grad or i < 3)
        for i, t in enumerate((s0, s1, w, *stacked))
    ]
    got = torch.func.vmap(lambda *ws: run(ws, *inputs[:3]))(*inputs[3:])
    g = torch.randn(got.shape, generator=gen, dtype=F64)
    wanted = inputs if weight_grads else inputs[:3]
    got_grads = torch.autograd.grad(got, wanted, g)
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    want = torch.stack([run([t[i] for t in ref[3:]], *ref[:3]) for i in range(2)])
    assert_close(got, want, F64)
    want_grads = torch.autograd.grad(want, ref[: len(wanted)], g)
    for name, a, b in zip(["s0", "s1", "alpha", *names], got_grads, want_grads):
        assert_close(a, b, F64, name)


@pytest.mark.parametrize(
    "reduction, reduction_prev", [(False, False), (True, False), (False, True)]
)
def test_cell_under_vmap_over_stacked_weights(reduction, reduction_prev):
    check_cell_under_vmap(reduction, reduction_prev)


def test_cell_ops_under_autocast_run_in_the_weights_dtype():
    gen = _gen(26)
    _, fused, _ = make_cell(4, False, False, torch.float32, seed=9, train=False)
    states = [torch.randn(2, 4, 5, 5, generator=gen) for _ in range(2)]
    w = _probs(gen, 14, dtype=torch.float32)
    want = fused._ops(states, w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused._ops([t.bfloat16() for t in states], w)
    assert got.dtype == torch.float32
    bf16 = fused._ops([t.bfloat16().float() for t in states], w)
    torch.testing.assert_close(got, bf16, rtol=0, atol=0)
    assert (got - want).abs().max() < 0.1  # only the inputs were rounded


@pytest.mark.parametrize("train", [True, False])
def test_torch_compile_fullgraph_matches_eager(train):
    """One graph (no break) for an edge of each stride and a reduction cell's ops, under
    grad and no_grad: forward, every gradient (and α's alone, the architecture step) and
    the running statistics equal eager mode's. aot_eager: Dynamo and AOTAutograd trace the
    module as inductor's do, without a C++ compile per graph."""
    gen = _gen(43)
    cases = []
    for stride in (1, 2):
        x = torch.randn(2, 4, 6, 6, generator=gen, dtype=F64, requires_grad=True)
        cases.append((make_edge(4, stride, F64, seed=14, train=train)[1], [x], _probs(gen)))
    _, cell, _ = make_cell(4, True, False, F64, seed=15, train=train)
    states = [torch.randn(2, 4, 6, 6, generator=gen, dtype=F64).requires_grad_() for _ in range(2)]
    cases.append((cell._ops, [states], _probs(gen, 14)))
    for eager, inputs, w in cases:
        torch._dynamo.reset()
        w.requires_grad_()
        compiled_module = copy.deepcopy(eager)
        compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
        leaves = [*(inputs[0] if isinstance(inputs[0], list) else inputs), w]
        results = []
        for module, fn in ((eager, eager), (compiled_module, compiled)):
            out = fn(*inputs, w)
            g = torch.randn(out.shape, generator=_gen(44), dtype=F64)
            grads = torch.autograd.grad(out, [*leaves, *module.parameters()], g)
            (d_w,) = torch.autograd.grad(fn(*inputs, w), w, g)
            with torch.no_grad():
                results.append([out, *grads, d_w, fn(*inputs, w), *module.state_dict().values()])
        for got, want in zip(*results):
            assert_close(got, want, F64)


def test_torch_compile_does_not_recompile_per_batch_size():
    """The batch size goes dynamic after the first graph, as the reference's does: a cell's
    ops (several sources, whose shapes are checked alike) compile twice for 5 batch sizes,
    not once each (the 9th size then failed under fullgraph=True)."""
    _, cell, _ = make_cell(4, True, False, F64, seed=15, train=False)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(cell._ops, fullgraph=True, backend=counting)
    w = _probs(_gen(45), 14)
    for b in range(2, 7):
        states = [torch.randn(b, 4, 6, 6, dtype=F64) for _ in range(2)]
        with torch.no_grad():
            assert_close(compiled(states, w), cell._ops(states, w), F64)
    assert len(graphs) == 2


def test_custom_op_registration_passes_opcheck():
    routes, src, alpha, shift, acc = make_mix(_gen(18))
    rs, ro, optr, perm, sptr, n = routes.tables()
    for srcs in ([src], list(src.split([2, 3, 1], 1))):  # one source, and three
        srcs = [t.contiguous().requires_grad_() for t in srcs]
        inputs = [t.requires_grad_() for t in (alpha, shift, acc)]
        torch.library.opcheck(
            torch.ops.fastdarts.conv_mix.default, [srcs, *inputs, rs, ro, optr, n]
        )
        g = torch.randn_like(acc)
        srcs = [t.detach() for t in srcs]
        args = [g, srcs, alpha.detach(), shift.detach(), rs, ro, perm, sptr]
        torch.library.opcheck(torch.ops.fastdarts.conv_mix_backward.default, args)


# -- depthwise convolutions of several shapes --------------------------------------------

DW_SHAPES = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2)]  # (kernel, padding, dilation)


def make_depthwise(gen, C, shapes, shared, B=2, H=7, W=9, dtype=F64):
    weights = [torch.randn(C, 1, k, k, generator=gen, dtype=dtype) for k, _, _ in shapes]
    offsets = [0] * len(shapes) if shared else [t * C for t in range(len(shapes))]
    x = torch.randn(B, C if shared else C * len(shapes), H, W, generator=gen, dtype=dtype)
    pads, dils = [p for _, p, _ in shapes], [d for _, _, d in shapes]
    return x, weights, pads, dils, offsets


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "stride, size",
    [(1, (7, 9)), (2, (10, 6)), (1, (1, 1)), (2, (2, 2)), (1, (9, 35)), (2, (9, 35)), (2, (1, 3))],
)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("relu", [False, True])
def test_cpp_depthwise_matches_torch_and_writes_every_element(relu, shared, stride, size, dtype):
    gen = _gen(30 + stride)
    shapes = DW_SHAPES if shared else DW_SHAPES[:2]
    x, ws, pads, dils, offs = make_depthwise(gen, 5, shapes, shared, 3, *size, dtype)
    x64, ws64 = x.double().requires_grad_(), [w.double().requires_grad_() for w in ws]
    # With relu the kernels read relu(x): torch's ReLU, then its convolutions.
    want = depthwise_reference(torch.relu(x64) if relu else x64, ws64, stride, pads, dils, offs)
    g = torch.randn(want.shape, generator=gen, dtype=F64)
    want_grads = torch.autograd.grad(want, [x64, *ws64], g)
    out = torch.full(want.shape, math.nan, dtype=dtype)
    _C().depthwise_forward(x, ws, stride, pads, dils, offs, relu=relu, out=out)
    assert_close(out, want, dtype)
    d_x, d_ws = torch.full_like(x, math.nan), [torch.full_like(w, math.nan) for w in ws]
    args = (g.to(dtype), x, ws, stride, pads, dils, offs)
    _C().depthwise_backward(*args, True, relu, out=[d_x, *d_ws])
    for got, w in zip([d_x, *d_ws], want_grads):
        assert_close(got, w, dtype)
    # Without the weights' gradient (an α-only pass): d_x alone, the same.
    d_x2 = torch.full_like(x, math.nan)
    _C().depthwise_backward(*args, False, relu, out=[d_x2])
    assert torch.equal(d_x2, d_x)
    # ... and the torch-op backward used under create_graph agrees.
    ref = depthwise_backward_reference(
        g, x64.detach(), [w.detach() for w in ws64], stride, pads, dils, offs, True, relu
    )
    for got, w in zip(ref, want_grads):
        assert_close(got, w, F64)


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "shapes", [[(1, 1, 1), (3, 2, 1)], [(2, 0, 1), (4, 1, 1), (2, 1, 3)], [(7, 3, 1), (3, 3, 3)]]
)
def test_cpp_depthwise_other_kernels(shapes, stride, dtype):
    # Shapes the search does not use: padding beyond the kernel's reach (p > (k−1)·d: the
    # input gradient's correlation starts inside the output gradient), even kernels, odd
    # dilation 3, a kernel wider than the dot-product unrolls (7 taps); through the ReLU.
    gen = _gen(33)
    x, ws, pads, dils, offs = make_depthwise(gen, 3, shapes, False, 2, 10, 11, dtype)
    x64, ws64 = x.double().requires_grad_(), [w.double().requires_grad_() for w in ws]
    want = depthwise_reference(torch.relu(x64), ws64, stride, pads, dils, offs)
    g = torch.randn(want.shape, generator=gen, dtype=F64)
    want_grads = torch.autograd.grad(want, [x64, *ws64], g)
    out = torch.full(want.shape, math.nan, dtype=dtype)
    _C().depthwise_forward(x, ws, stride, pads, dils, offs, relu=True, out=out)
    assert_close(out, want, dtype)
    d_x, d_ws = torch.full_like(x, math.nan), [torch.full_like(w, math.nan) for w in ws]
    args = (g.to(dtype), x, ws, stride, pads, dils, offs)
    _C().depthwise_backward(*args, True, True, out=[d_x, *d_ws])
    for got, w in zip([d_x, *d_ws], want_grads):
        assert_close(got, w, dtype)


def test_depthwise_weight_gradient_only_when_the_pass_uses_it(monkeypatch):
    import fastdarts.ops.conv_mixed as conv_mixed

    gen = _gen(34)
    x, ws, pads, dils, offs = make_depthwise(gen, 3, DW_SHAPES, True, 2, 6, 7)
    x, ws = x.requires_grad_(), [w.requires_grad_() for w in ws]
    want = torch.autograd.grad(depthwise_reference(x, ws, 1, pads, dils, offs).sum(), [x, *ws])
    flags, kernel = [], conv_mixed._dw_backward_op

    def spy(*args):
        flags.append(args[-3])  # grad_weights
        return kernel(*args)

    monkeypatch.setattr(conv_mixed, "_dw_backward_op", spy)

    def run(*inputs):
        # One more op after the depthwise, so that x is not the graph's input edge alone.
        out = depthwise(x * 1.0, ws, 1, pads, dils, offs).sum()
        return torch.autograd.grad(out, inputs)

    # autograd.grad for x alone (as the α step asks for α alone): no weights' gradient.
    assert_close(run(x)[0], want[0], F64)
    for t, w in enumerate(ws):  # ... for one weight: all of them, that one right
        assert_close(run(w)[0], want[1 + t], F64)
    got = run(x, *ws)
    for a, b in zip(got, want):
        assert_close(a, b, F64)
    x.grad = None
    depthwise(x, ws, 1, pads, dils, offs).sum().backward(inputs=[x])
    assert_close(x.grad, want[0], F64)
    assert flags == [False, True, True, True, True, True, False]
    # torch.func.grad differentiates with create_graph (the torch-op backward), same values.
    got = torch.func.grad(lambda a: depthwise(a, ws, 1, pads, dils, offs).sum())(x.detach())
    assert_close(got, want[0], F64)
    # A torch without the engine's (private) query: the weights' gradient always, same x's.
    monkeypatch.setattr(conv_mixed, "_will_execute", None)
    flags.clear()
    assert_close(run(x)[0], want[0], F64)
    assert flags == [True]


@needs_cpp
def test_cpp_depthwise_checks_its_inputs():
    x, ws, pads, dils, offs = make_depthwise(_gen(31), 4, DW_SHAPES[:2], shared=True)
    out = torch.empty(2, 8, 7, 9, dtype=F64)
    forward = _C().depthwise_forward
    with pytest.raises(RuntimeError, match=r"reads channels \[2, 6\) of an input with 4"):
        forward(x, ws, 1, pads, dils, [0, 2], out=out)
    with pytest.raises(RuntimeError, match="same output size"):
        forward(x, ws, 1, [1, 1], dils, offs, out=out)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        forward(x, ws, 3, pads, dils, offs)
    with pytest.raises(RuntimeError, match=r"^depthwise: out must be a contiguous tensor"):
        forward(x, ws, 1, pads, dils, offs, out=out[:, :7])
    empty = [w[:, :, :0, :0].contiguous() for w in ws]
    with pytest.raises(RuntimeError, match=r"\(Ch, 1, k, k\) tensor, k >= 1"):
        forward(x, empty, 1, pads, dils, offs)


@pytest.mark.parametrize("relu", [False, True])
def test_depthwise_gradcheck_gradgradcheck_and_vmap(relu):
    gen = _gen(32)
    x, ws, pads, dils, offs = make_depthwise(gen, 2, DW_SHAPES[1:3], shared=False, H=4, W=5)
    inputs = [t.requires_grad_() for t in (x, *ws)]

    def fn(a, *b):
        return depthwise(a, list(b), 1, pads, dils, offs, relu=relu)

    def want_fn(a, b):
        return depthwise_reference(torch.relu(a) if relu else a, b, 1, pads, dils, offs)

    # gradcheck's finite differences step x by 1e-6: none of these x lies that near 0.
    assert x.abs().min() > 1e-3
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    xs = torch.randn(3, *x.shape, generator=gen, dtype=F64)
    got = torch.vmap(fn, in_dims=(0, None, None))(xs, *ws)
    want = torch.stack([want_fn(a, ws) for a in xs])
    assert_close(got, want, F64)
    wb = torch.randn(3, *ws[0].shape, generator=gen, dtype=F64)
    got = torch.vmap(fn, in_dims=(0, 0, None))(xs, wb, ws[1])
    want = torch.stack([want_fn(a, [w, ws[1]]) for a, w in zip(xs, wb)])
    assert_close(got, want, F64)
    # ... and the input gradient under vmap with shared weights: the batch folded into B,
    # through the kernels' backward (the ReLU's mask included).
    xs.requires_grad_()
    got = torch.vmap(fn, in_dims=(0, None, None))(xs, *ws)
    (g_got,) = torch.autograd.grad(got.square().sum(), [xs])
    want = torch.stack([want_fn(a, ws) for a in xs])
    (g_want,) = torch.autograd.grad(want.square().sum(), [xs])
    assert_close(g_got, g_want, F64)
    args = [x, ws, 1, pads, dils, offs, relu, False]
    torch.library.opcheck(torch.ops.fastdarts.depthwise.default, args)
    grad = torch.randn(want.shape[1:], generator=gen, dtype=F64)
    detached = [x.detach(), [w.detach() for w in ws], 1, pads, dils, offs, True, relu, False]
    torch.library.opcheck(torch.ops.fastdarts.depthwise_backward.default, [grad, *detached])


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("x_dim", [0, 1, None])
@pytest.mark.parametrize("second_batched", [True, False])
def test_depthwise_per_sample_weights_under_vmap(relu, x_dim, second_batched):
    """The batched w± passes' case: weights batched (each vmap sample its own; or one shared),
    x batched on its first or second dim (sample-major or interleaved rows, the second as
    torch's batched convolutions leave it) or shared: the output and the gradients of x and
    of every weight against the reference, sample by sample."""
    gen, S = _gen(35), 3
    x, ws, pads, dils, offs = make_depthwise(gen, 2, DW_SHAPES[1:3], shared=False, H=5, W=6)
    xs = torch.randn(S, *x.shape, generator=gen, dtype=F64)
    samples = [torch.randn(S, *w.shape, generator=gen, dtype=F64) for w in ws]
    wbs = samples if second_batched else [samples[0], samples[1][0]]
    x_in = {None: xs[0], 0: xs, 1: xs.movedim(0, 1).contiguous()}[x_dim]
    inputs = [t.clone().requires_grad_() for t in (x_in, *wbs)]

    def fn(a, *b):
        return depthwise(a, list(b), 1, pads, dils, offs, relu=relu)

    got = torch.vmap(fn, in_dims=(x_dim, 0, 0 if second_batched else None))(*inputs)
    g = torch.randn(got.shape, generator=gen, dtype=F64)
    got_grads = torch.autograd.grad(got, inputs, g)
    ref = [t.clone().requires_grad_() for t in (x_in, *wbs)]
    rx = ref[0] if x_dim is None else ref[0].movedim(x_dim, 0)
    want = torch.stack(
        [
            depthwise_reference(
                torch.relu(rx if x_dim is None else rx[v])
                if relu
                else (rx if x_dim is None else rx[v]),
                [ref[1][v], ref[2][v] if second_batched else ref[2]],
                1,
                pads,
                dils,
                offs,
            )
            for v in range(S)
        ]
    )
    assert_close(got, want, F64)
    for a, b in zip(got_grads, torch.autograd.grad(want, ref, g)):
        assert_close(a, b, F64)
    # The op itself with weight samples, both row orders.
    rows = xs.flatten(0, 1)
    for interleaved in (False, True):
        args = [rows, samples, 1, pads, dils, offs, relu, interleaved]
        torch.library.opcheck(torch.ops.fastdarts.depthwise.default, args)


def test_depthwise_weight_samples_must_split_the_rows():
    x, ws, pads, dils, offs = make_depthwise(_gen(36), 2, DW_SHAPES[:1], shared=True, B=5)
    pytest.importorskip("triton")
    dw = extension.triton_kernels("depthwise")
    out = torch.empty(5, 2, 7, 9, dtype=F64)
    with pytest.raises(ValueError, match="5 rows for weight samples"):
        dw.forward(x, [ws[0].expand(2, -1, -1, -1, -1)], 1, pads, dils, offs, False, out)


# -- grouped pointwise convolutions ------------------------------------------------------


def make_pointwise(gen, B, G, Ci, Co, H, W, dtype=F64):
    x = torch.randn(B, G * Ci, H, W, generator=gen, dtype=dtype)
    return x, torch.randn(G * Co, Ci, 1, 1, generator=gen, dtype=dtype)


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "B, G, Ci, Co, H, W",
    # odd sizes and channel counts (rows and columns left after the 4-row / 2-vector
    # blocks), one pixel, the search's shapes (columns in whole vectors), and larger planes
    # (P of 323, a partial last vector, and 1,024).
    [
        (3, 3, 5, 7, 7, 9),
        (2, 1, 6, 6, 1, 1),
        (2, 4, 16, 16, 8, 8),
        (1, 2, 3, 9, 5, 33),
        (2, 2, 5, 3, 17, 19),
        (1, 1, 4, 4, 32, 32),
    ],
)
def test_cpp_pointwise_matches_torch_and_writes_every_element(B, G, Ci, Co, H, W, dtype):
    gen = _gen(40 + Ci)
    x, w = make_pointwise(gen, B, G, Ci, Co, H, W, dtype)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    want = torch.nn.functional.conv2d(x64, w64, groups=G)
    g = torch.randn(want.shape, generator=gen, dtype=F64)
    want_grads = torch.autograd.grad(want, [x64, w64], g)
    out = torch.full(want.shape, math.nan, dtype=dtype)
    _C().pointwise_forward(x, w, G, out=out)
    assert_close(out, want, dtype)
    d_x, d_w = torch.full_like(x, math.nan), torch.full_like(w, math.nan)
    _C().pointwise_backward(g.to(dtype), x, w, G, True, out=[d_x, d_w])
    assert_close(d_x, want_grads[0], dtype)
    assert_close(d_w, want_grads[1], dtype)
    d_x2 = torch.full_like(x, math.nan)
    _C().pointwise_backward(g.to(dtype), x, w, G, False, out=[d_x2])
    assert torch.equal(d_x2, d_x)
    ref = pointwise_backward_reference(g, x64.detach(), w64.detach(), G)
    for got, want_g in zip(ref, want_grads):
        assert_close(got, want_g, F64)


@needs_cpp
def test_cpp_pointwise_checks_its_inputs():
    x, w = make_pointwise(_gen(41), 2, 2, 3, 4, 5, 5)
    out = torch.empty(2, 8, 5, 5, dtype=F64)
    with pytest.raises(RuntimeError, match="for 3 groups of an input with 6 channels"):
        _C().pointwise_forward(x, w, 3, out=out)
    with pytest.raises(RuntimeError, match=r"^pointwise: out must be"):
        _C().pointwise_forward(x, w, 2, out=out[:, :7])


def test_pointwise_gradcheck_gradgradcheck_vmap_and_weight_gradient_skip():
    gen = _gen(42)
    x, w = make_pointwise(gen, 2, 3, 2, 3, 3, 4)
    inputs = [x.requires_grad_(), w.requires_grad_()]

    def fn(a, b):
        return pointwise(a, b, 3)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    want = torch.autograd.grad(torch.nn.functional.conv2d(x, w, groups=3).sum(), [x])
    assert_close(torch.autograd.grad(fn(x * 1.0, w).sum(), [x])[0], want[0], F64)
    xs = torch.randn(4, *x.shape, generator=gen, dtype=F64)
    got = torch.vmap(fn, in_dims=(0, None))(xs, w)
    want = torch.stack([torch.nn.functional.conv2d(a, w, groups=3) for a in xs])
    assert_close(got, want, F64)
    wb = torch.randn(4, *w.shape, generator=gen, dtype=F64)
    got = torch.vmap(fn)(xs, wb)
    want = torch.stack([torch.nn.functional.conv2d(a, b, groups=3) for a, b in zip(xs, wb)])
    assert_close(got, want, F64)
    torch.library.opcheck(torch.ops.fastdarts.pointwise.default, [x, w, 3])
    g = torch.randn(2, 9, 3, 4, generator=gen, dtype=F64)
    for grad_weight in (True, False):
        args = [g, x.detach(), w.detach(), 3, grad_weight]
        torch.library.opcheck(torch.ops.fastdarts.pointwise_backward.default, args)


# -- max and avg pools in one kernel ------------------------------------------------------


def _torch_pools_and_grad(x, stride, g):
    """torch's two pools of x (float64) and their input gradient for the output gradient g."""
    x64 = x.double().requires_grad_()
    maxp = torch.nn.functional.max_pool2d(x64, 3, stride, 1)
    avgp = torch.nn.functional.avg_pool2d(x64, 3, stride, 1, count_include_pad=False)
    want = torch.cat([maxp, avgp], 1)
    return want, torch.autograd.grad(want, x64, g.double())[0]


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize(
    "stride, size",
    [
        (1, (7, 9)),
        (2, (10, 6)),
        (1, (1, 1)),
        (2, (2, 2)),
        (1, (3, 2)),
        (1, (17, 19)),
        (2, (13, 16)),
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_cpp_pools_match_torch_and_write_every_element(ties, stride, size, dtype):
    gen = _gen(50 + stride)
    shape = (3, 5, *size)
    if ties:  # small integers: most windows hold their maximum twice or more
        x = torch.randint(0, 3, shape, generator=gen).to(dtype)
    else:
        x = torch.randn(shape, generator=gen, dtype=dtype)
    n_out = [(n - 1) // stride + 1 for n in size]
    g = torch.randn(3, 10, *n_out, generator=gen, dtype=F64)
    want, want_dx = _torch_pools_and_grad(x, stride, g)
    out = torch.full(want.shape, math.nan, dtype=dtype)
    _C().pools_forward(x, stride, out=out)
    assert_close(out, want, dtype)
    d_x = torch.full_like(x, math.nan)
    _C().pools_backward(g.to(dtype), x, stride, out=d_x)
    assert_close(d_x, want_dx, dtype)  # ties: the same window element as torch's
    ref = pools_backward_reference(g, x.double(), stride)
    assert_close(ref, want_dx, F64)
    assert_close(pools_reference(x.double(), stride), want, F64)


@needs_cpp
@pytest.mark.parametrize("stride", [1, 2])
def test_cpp_pools_take_nans_as_torch_does(stride):
    # A NaN is every window's maximum holding it, and torch's backward sends the gradient to
    # the last NaN in row-major order: some windows here hold two or three.
    gen = _gen(60 + stride)
    x = torch.randn(2, 3, 11, 12, generator=gen, dtype=F64)
    nan_at = torch.rand(x.shape, generator=gen) < 0.15
    x[nan_at] = math.nan
    n_out = [(n - 1) // stride + 1 for n in x.shape[2:]]
    g = torch.randn(2, 6, *n_out, generator=gen, dtype=F64)
    want, want_dx = _torch_pools_and_grad(x, stride, g)
    got = _C().pools_forward(x, stride)
    assert torch.equal(got.isnan(), want.isnan()) and want[:, :3].isnan().any()
    assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), F64)
    assert_close(_C().pools_backward(g, x, stride), want_dx, F64)


@needs_cpp
def test_cpp_pools_check_their_inputs():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="stride must be 1 or 2"):
        _C().pools_forward(x, 3)
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        _C().pools_forward(x.int(), 1)
    with pytest.raises(RuntimeError, match=r"^pools: out must be"):
        _C().pools_forward(x, 1, out=torch.empty(2, 6, 4, 3, dtype=F64))
    with pytest.raises(RuntimeError, match=r"^pools: grad must be"):
        _C().pools_backward(torch.empty(2, 3, 4, 4, dtype=F64), x, 1)


@needs_cpp
def test_cpp_kernels_read_channel_blocks():
    # Autograd hands pools and pointwise a channel block of the concatenation's gradient, and
    # the fused cell passes a node's channels of the mixture's output to the next group's
    # pools and the rest as the mixture's acc: read in place (any other layout is copied
    # first), the same values either way.
    gen = _gen(53)
    routes, src, alpha, shift, _ = make_mix(gen, F64, 3, 6, 5)
    rs, _, optr, _, _, _ = routes.tables()
    x = torch.randn(3, 4, 6, 5, generator=gen, dtype=F64)
    w = torch.randn(6, 2, 1, 1, generator=gen, dtype=F64)
    g_pool = torch.randn(3, 8, 3, 3, generator=gen, dtype=F64)
    cases = [  # (channels of the argument given as a block, the kernels run on it)
        (8, lambda g: [_C().pools_backward(g, x, 1)]),
        (6, lambda g: _C().pointwise_backward(g, x, w, 2, True)),
        (4, lambda t: [_C().pools_forward(t, 2), _C().pools_backward(g_pool, t, 2)]),
        (4, lambda a: [_C().conv_mix_forward(src, alpha, shift, a, rs, optr)]),
        (4, lambda g: [_C().batch_norm_backward(g, x, *_C().batch_norm_forward(x, 1e-5)[1:])]),
    ]
    for n, run in cases:
        block = torch.randn(3, n + 5, 6, 5, generator=gen, dtype=F64)[:, 2 : 2 + n]
        want = run(block.contiguous())
        for t in (block, block.transpose(2, 3).contiguous().transpose(2, 3)):
            for got, w_ in zip(run(t), want):
                assert torch.equal(got, w_)


def test_pools_gradcheck_gradgradcheck_vmap_and_opcheck():
    gen = _gen(52)
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=F64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(lambda a, s=stride: pools(a, s), [x])
        assert torch.autograd.gradgradcheck(lambda a, s=stride: pools(a, s), [x])
        xs = torch.randn(4, 2, 3, 5, 4, generator=gen, dtype=F64)
        got = torch.vmap(lambda a, s=stride: pools(a, s))(xs)
        assert_close(got, torch.stack([pools_reference(a, stride) for a in xs]), F64)
        torch.library.opcheck(torch.ops.fastdarts.pools.default, [x, stride])
        g = torch.randn(2, 6, *((n - 1) // stride + 1 for n in (5, 4)), generator=gen, dtype=F64)
        args = [g, x.detach(), stride]
        torch.library.opcheck(torch.ops.fastdarts.pools_backward.default, args)


# -- BatchNorm's training forward -----------------------------------------------------------


def _torch_bn(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5)


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("shape", [(1, 3, 1, 2), (3, 5, 7, 9), (2, 17, 4, 4), (4, 2, 33, 1)])
def test_batch_norm_matches_torch(shape, dtype):
    # Far from zero mean, so a one-pass variance would cancel; channels of different scales.
    gen = _gen(60)
    scale = torch.rand(shape[1], 1, 1, generator=gen, dtype=F64) * 10
    x = torch.randn(shape, generator=gen, dtype=F64) * scale + 50
    x = x.to(dtype).to(F64)  # the float32 kernel against float64 on the same input
    got = _C().batch_norm_forward(x.to(dtype), 1e-5)
    want = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    tol = {F64: 1e-12, torch.float32: 2e-5}[dtype]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.to(dtype), rtol=tol, atol=tol)
    # Every gradient through the op, and the gradient of a gradient (exact HVP).
    xs = [x.to(dtype).clone().requires_grad_() for _ in range(2)]
    g = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    outs = [batch_norm(xs[0])[0], _torch_bn(xs[1])]
    grads = [torch.autograd.grad(o, t, g, create_graph=True)[0] for o, t in zip(outs, xs)]
    torch.testing.assert_close(grads[0], grads[1], rtol=100 * tol, atol=100 * tol)
    v = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    hvps = [torch.autograd.grad((d * v).sum(), t)[0] for d, t in zip(grads, xs)]
    torch.testing.assert_close(hvps[0], hvps[1], rtol=100 * tol, atol=100 * tol)
    # The backward kernel (no create_graph) against torch's in float64 on the same input.
    (d_x,) = torch.autograd.grad(batch_norm(xs[0])[0], xs[0], g)
    _, mean, invstd = want
    want_dx = batch_norm_backward_reference(g.to(F64), x, mean, invstd, 1e-5)
    torch.testing.assert_close(d_x, want_dx.to(dtype), rtol=100 * tol, atol=100 * tol)
    assert torch.equal(d_x, _C().batch_norm_backward(g, xs[0].detach(), *got[1:]))


@needs_cpp
def test_cpp_batch_norm_backward_keeps_float32_accuracy_far_from_zero_mean():
    """x = 1000 + 0.01·noise in float32: the mean the kernel centres on is float32's, off the
    exact one by about an ulp of 1000 (≈ 6e-5, a large fraction of the spread); the
    backward corrects for that offset (the k·δ term). Measured: 4e-8 relative to float64,
    torch's own float32 backward 3e-4, without the correction 1e-4."""
    gen = _gen(62)
    x = (1000 + 0.01 * torch.randn(4, 3, 5, 5, generator=gen, dtype=F64)).float()
    g = torch.randn(4, 3, 5, 5, generator=gen, dtype=F64).float()
    _, mean, invstd = _C().batch_norm_forward(x, 1e-5)
    got = _C().batch_norm_backward(g, x, mean, invstd).double()
    x64 = x.double()
    _, mean64, invstd64 = torch.native_batch_norm(x64, None, None, None, None, True, 0.0, 1e-5)
    want = batch_norm_backward_reference(g.double(), x64, mean64, invstd64, 1e-5)
    assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_batch_norm_gradcheck_vmap_and_opcheck():
    gen = _gen(61)
    x = torch.randn(3, 2, 4, 3, generator=gen, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: batch_norm(a)[0], [x])
    assert torch.autograd.gradgradcheck(lambda a: batch_norm(a)[0], [x])
    # Under vmap (the batched w± passes) each sample keeps its own statistics.
    xs = torch.randn(2, 3, 4, 5, 2, generator=gen, dtype=F64) * 3 + 1
    got = torch.vmap(batch_norm)(xs)
    for i, a in enumerate(xs):
        want = torch.native_batch_norm(a, None, None, None, None, True, 0.0, 1e-5)
        for u, w in zip(got, want):
            assert_close(u[i], w, F64)
    vx = xs.clone().requires_grad_()
    g = torch.randn_like(xs)
    (d_vmap,) = torch.autograd.grad(torch.vmap(lambda a: batch_norm(a)[0])(vx), vx, g)
    d_loop = torch.stack(
        [torch.autograd.grad(_torch_bn(a.requires_grad_()), a, b)[0] for a, b in zip(xs.clone(), g)]
    )
    assert_close(d_vmap, d_loop, F64)
    op = torch.ops.fastdarts.batch_norm.default
    torch.library.opcheck(op, [x.detach(), 1e-5, None, None, 0.1])
    running = [torch.rand(2, generator=gen, dtype=F64) for _ in range(2)]
    torch.library.opcheck(op, [x.detach(), 1e-5, *running, 0.1])
    _, mean, invstd = batch_norm(x.detach())
    args = [torch.randn_like(x), x.detach(), mean, invstd, 1e-5]
    torch.library.opcheck(torch.ops.fastdarts.batch_norm_backward.default, args)


@needs_cpp
def test_batch_norm_dispatches_one_op_each_way():
    # One kernel each way; the statistics' gradients are not materialised as zero tensors.
    sys.path.insert(0, str(REPO))
    from benchmarks.harness import count_ops

    # As in the fused cells, y goes into a concatenation, so its gradient is a channel block
    # of the concatenation's: the backward kernel reads it in place (no copy op).
    x = torch.randn(2, 3, 4, 4, dtype=F64, requires_grad=True)
    rest = torch.randn(2, 2, 4, 4, dtype=F64)
    loss = lambda: (torch.cat([rest, batch_norm(x)[0]], 1) * 2).sum()  # noqa: E731
    counts = count_ops(lambda: torch.autograd.grad(loss(), x))
    norms = {name: n for name, n in counts.items() if "batch_norm" in name}
    assert norms == {"fastdarts.batch_norm.default": 1, "fastdarts.batch_norm_backward.default": 1}
    assert "aten.zeros.default" not in counts and "aten.clone.default" not in counts


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_batch_norm_updates_running_statistics_as_torch(dtype):
    gen = _gen(62)
    x = (torch.randn(3, 4, 5, 2, generator=gen, dtype=F64) * 2 + 3).to(dtype)
    ours = [torch.rand(4, generator=gen, dtype=F64).to(dtype) for _ in range(2)]
    theirs, before = [t.clone() for t in ours], [t.clone() for t in ours]
    for momentum in (0.1, 0.5):
        got = batch_norm(x, *ours, momentum=momentum)
        want = torch.native_batch_norm(x, None, None, *theirs, True, momentum, 1e-5)
        for a, b in zip([*got, *ours], [*want, *theirs]):
            assert_close(a, b, dtype)
    assert all((a - b).abs().min() > 1e-3 for a, b in zip(ours, before))  # they moved


@needs_cpp
def test_cpp_batch_norm_checks_its_inputs():
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        _C().batch_norm_forward(x.int(), 1e-5)
    with pytest.raises(RuntimeError, match="contiguous non-empty"):
        _C().batch_norm_forward(x.transpose(2, 3), 1e-5)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        _C().batch_norm_forward(x[:1, :, :1, :1].contiguous(), 1e-5)
    with pytest.raises(RuntimeError, match="must be on the cpu"):
        _C().batch_norm_forward(x.to("meta"), 1e-5)
    stats = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    for momentum in (math.nan, -0.1, 1.5):
        with pytest.raises(RuntimeError, match=r"momentum must lie in \[0, 1\]"):
            _C().batch_norm_forward(x, 1e-5, *stats, momentum=momentum)
    with pytest.raises(RuntimeError, match="grad must be a tensor like x"):
        _C().batch_norm_backward(x[:1], x, torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64))
    with pytest.raises(RuntimeError, match=r"invstd must be a contiguous \(3,\)"):
        _C().batch_norm_backward(x, x, torch.zeros(3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(RuntimeError, match="running_mean and running_var, or neither"):
        _C().batch_norm_forward(x, 1e-5, torch.zeros(3, dtype=F64))
    with pytest.raises(RuntimeError, match=r"running_var must be a contiguous \(3,\)"):
        _C().batch_norm_forward(x, 1e-5, torch.zeros(3, dtype=F64), torch.zeros(4, dtype=F64))


# -- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda x, w: (x[0], w), ValueError, "x must be (B, 4, H, W)"),
        (lambda x, w: (x[:, :3], w), ValueError, "x must be (B, 4, H, W)"),
        (lambda x, w: (x, w[:7]), ValueError, "weights must be (8,)"),
        (lambda x, w: (x, w[None]), ValueError, "weights must be (8,)"),
        (lambda x, w: (x.half(), w.half()), TypeError, "x (torch.float16) must have the dtype"),
        (lambda x, w: (x.float(), w.float()), TypeError, "x (torch.float32) must have the"),
        (lambda x, w: (x, w.float()), TypeError, "weights (torch.float32) must have the"),
        (lambda x, w: (x, w.long()), TypeError, "weights (torch.int64) must have the"),
        (lambda x, w: (x, w.to("meta")), ValueError, "weights (meta) must be on the device"),
        (lambda x, w: (x.to("meta"), w), ValueError, "x (meta) must be on the device"),
        (lambda x, w: (x, w.tolist()), TypeError, "weights must be a Tensor"),
        (lambda x, w: (x.numpy(), w), TypeError, "x must be a Tensor"),
        (lambda x, w: (x[:0], w), ValueError, "x must not be empty, got (0, 4, 5, 5)"),
        (lambda x, w: (x[:, :, :0], w), ValueError, "x must not be empty, got (2, 4, 0, 5)"),
        (lambda x, w: (x[..., :0], w), ValueError, "x must not be empty, got (2, 4, 5, 0)"),
    ],
)
def test_bad_edge_inputs_give_clear_errors(change, error, message):
    module = MixedOp(4, 1).double()
    x, w = torch.randn(2, 4, 5, 5, dtype=F64), _probs(_gen(19))
    with pytest.raises(error, match=re.escape(message)):
        module(*change(x, w))


def test_bad_construction_and_stride_two_shapes():
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        MixedOp(4, 3)
    with pytest.raises(ValueError, match="even channel count"):
        MixedOp(5, 2)
    with pytest.raises(ValueError, match="MixedOp: C must be positive, got 0"):
        MixedOp(0, 1)
    with pytest.raises(TypeError, match="MixedOp: C must be an int, got float"):
        MixedOp(4.0, 1)
    for stride, kind in ((2.0, "float"), (True, "bool")):
        with pytest.raises(TypeError, match=f"MixedOp: stride must be an int, got {kind}"):
            MixedOp(4, stride)
    # numpy's integers, as the reference takes them: the module holds Python ints.
    op = MixedOp(np.int64(6), np.int64(2))
    assert (type(op.C), type(op.stride), op.C, op.stride) == (int, int, 6, 2)
    assert "C=6, stride=2" in repr(op)
    assert "C=4, steps=4, multiplier=4, reduction=True" in repr(FusedCellOps(4, 4, 4, True))
    with pytest.raises(ValueError, match="FusedCellOps: C must be positive, got -2"):
        FusedCellOps(-2, 4, 4, False)
    with pytest.raises(ValueError, match="FusedCellOps: steps must be positive, got 0"):
        FusedCellOps(4, 0, 4, False)
    with pytest.raises(ValueError, match="a reduction cell needs an even channel count"):
        FusedCellOps(5, 4, 4, True)
    with pytest.raises(ValueError, match="stride 2 needs an even H and W"):
        MixedOp(4, 2).double()(torch.randn(2, 4, 5, 6, dtype=F64), _probs(_gen(20)))
    # One value per channel for a BatchNorm in training: said in the caller's shape, as the
    # reference's nn.BatchNorm2d says it (a ValueError), with the module left as it was.
    for stride, shape in ((1, (1, 4, 1, 1)), (2, (1, 4, 2, 2))):
        op = MixedOp(4, stride).double()
        before = copy.deepcopy(op.state_dict())
        x = torch.randn(shape, dtype=F64)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            ReferenceMixedOp(4, stride).double()(x, _probs(_gen(20)))
        with pytest.raises(ValueError, match=re.escape(f"x {shape} at stride {stride} gives 1")):
            op(x, _probs(_gen(20)))
        for name, value in op.state_dict().items():
            assert torch.equal(value, before[name]), name
        op.eval()(x, _probs(_gen(20)))  # running statistics: any batch
    cell = FusedCellOps(4, 4, 4, True).double()
    with pytest.raises(ValueError, match=re.escape("states[0] (1, 4, 2, 2) at stride 2")):
        cell([torch.randn(1, 4, 2, 2, dtype=F64)] * 2, _probs(_gen(21), 14))


def _cell_inputs(reduction=False):
    cell = FusedCellOps(4, 4, 4, reduction).double()
    states = [torch.randn(2, 4, 6, 6, generator=_gen(30 + i), dtype=F64) for i in range(2)]
    return cell, states, _probs(_gen(32), 14)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda s, w: (s, w[:, :7]), ValueError, "weights must be (14, 8)"),
        (lambda s, w: (s, w[:13]), ValueError, "weights must be (14, 8)"),
        (lambda s, w: (s, torch.cat([w, w[:1]])), ValueError, "weights must be (14, 8)"),
        (lambda s, w: (s, w.reshape(-1)), ValueError, "weights must be (14, 8)"),
        (lambda s, w: (s, w.float()), TypeError, "weights (torch.float32) must have the dtype"),
        (lambda s, w: (s, w.to("meta")), ValueError, "weights (meta) must be on the device"),
        (lambda s, w: (s, w.tolist()), TypeError, "weights must be a Tensor"),
        (lambda s, w: (s[:1], w), ValueError, "states must be the cell's 2 preprocessed inputs"),
        (lambda s, w: (s + s[:1], w), ValueError, "the cell's 2 preprocessed inputs, got 3"),
        (lambda s, w: ([s[0], s[1][:, :3]], w), ValueError, "states[1] must be (B, 4, H, W)"),
        (lambda s, w: ([s[0].repeat(1, 2, 1, 1), s[1]], w), ValueError, "states[0] must be (B, 4"),
        (lambda s, w: ([s[0][0], s[1][0]], w), ValueError, "states[0] must be (B, 4, H, W)"),
        (lambda s, w: ([s[0], s[1][:, :, :4, :4]], w), ValueError, "must have one shape"),
        (lambda s, w: ([s[0], s[1][:1]], w), ValueError, "must have one shape"),
        (lambda s, w: ([s[0][:0], s[1][:0]], w), ValueError, "states[0] must not be empty"),
        (lambda s, w: ([s[0], s[1].float()], w), TypeError, "states[1] (torch.float32) must"),
        (lambda s, w: ([t.half() for t in s], w.half()), TypeError, "states[0] (torch.float16)"),
        (lambda s, w: ([t.to("meta") for t in s], w), ValueError, "states[0] (meta) must be on"),
        (lambda s, w: ([s[0], s[1].tolist()], w), TypeError, "states[1] must be a Tensor"),
    ],
)
def test_bad_cell_inputs_give_clear_errors(change, error, message):
    cell, states, w = _cell_inputs()
    with pytest.raises(error, match=re.escape(message)):
        cell(*change(states, w))


def test_reduction_cell_needs_even_sizes():
    cell, states, w = _cell_inputs(reduction=True)
    assert cell(states, w).shape == (2, 16, 3, 3)
    odd = [t[:, :, :5] for t in states]
    with pytest.raises(ValueError, match=re.escape("stride 2 needs an even H and W, got states")):
        cell(odd, w)


def test_modules_on_meta_give_shapes():
    """On the meta device (shapes only), as the reference modules do."""
    for train in (True, False):
        edge = MixedOp(4, 2).to("meta").train(train)
        x, w = torch.empty(2, 4, 6, 6, device="meta"), torch.empty(8, device="meta")
        assert edge(x, w).shape == ReferenceMixedOp(4, 2).to("meta")(x, w).shape == (2, 4, 3, 3)
        cell = FusedCellOps(4, 4, 4, True).to("meta").train(train)
        out = cell([x, x], torch.empty(14, 8, device="meta"))
        assert out.shape == (2, 16, 3, 3) and out.is_meta


@pytest.mark.parametrize("stride", [1, 2])
def test_meta_init_then_materialise(stride):
    """The usual ways to build a module without memory and fill it: built under
    ``torch.device("meta")`` and loaded with ``assign=True``, or moved by ``to_empty`` and
    loaded; the index tables (constants, not in the state_dict) are rebuilt on the
    parameters' device, and the result computes as the module the state_dict came from.
    Also a cell, and ``double()`` (the zero shifts follow the dtype)."""
    gen = _gen(34)
    x, w = torch.randn(2, 4, 6, 6, generator=gen), _probs(gen, dtype=torch.float32)
    source = MixedOp(4, stride)
    state, want = source.state_dict(), source(x, w)
    with torch.device("meta"):
        built = MixedOp(4, stride)
    assert built.routes_g0.src.is_meta and built.w_idx.is_meta
    assert built(x.to("meta"), w.to("meta")).shape == want.shape
    built.load_state_dict(state, assign=True)
    emptied = MixedOp(4, stride).to("meta").to_empty(device="cpu")
    emptied.load_state_dict(state)
    for edge in (built, emptied):
        assert {t.device.type for t in [*edge.parameters(), *edge.buffers()]} == {"cpu"}
        torch.testing.assert_close(edge(x, w), want, rtol=0, atol=0)
    doubled = copy.deepcopy(source).double()
    assert doubled.zeros_g0.dtype == F64
    torch.testing.assert_close(doubled(x.double(), w.double()), want.double(), rtol=1e-6, atol=1e-6)
    with torch.device("meta"):
        cell = FusedCellOps(4, 4, 4, stride == 2)
    reference = FusedCellOps(4, 4, 4, stride == 2)
    cell.load_state_dict(reference.state_dict(), assign=True)
    states, weights = [x, x.clone()], _probs(gen, 14, dtype=torch.float32)
    torch.testing.assert_close(cell(states, weights), reference(states, weights), rtol=0, atol=0)


@pytest.mark.parametrize("stride", [1, 2])
def test_flop_counter_counts_the_kernels_convolutions(stride):
    """FlopCounterMode counts the fused edge's forward as the reference's (its convolutions,
    now in the depthwise and pointwise ops), and the kernels' backward as twice their
    forward (both gradients), group by group (it counted nothing: ops of their own)."""
    from torch.utils.flop_counter import FlopCounterMode

    gen = _gen(36)
    x = torch.randn(2, 4, 8, 8, generator=gen, requires_grad=True)
    w = _probs(gen, dtype=torch.float32)
    counts = {}
    for name, edge in (("fused", MixedOp(4, stride)), ("reference", ReferenceMixedOp(4, stride))):
        with FlopCounterMode(display=False) as forward:
            out = edge(x, w).sum()
        with FlopCounterMode(display=False) as backward:
            out.backward()
        counts[name] = (forward.get_flop_counts()["Global"], backward.get_flop_counts()["Global"])
    ops = torch.ops.fastdarts
    (fwd, bwd), (ref_fwd, _) = counts["fused"], counts["reference"]
    assert sum(fwd.values()) == sum(ref_fwd.values()) > 0
    assert fwd[ops.depthwise] > 0 and fwd[ops.pointwise] > 0
    for op in ("depthwise", "pointwise"):
        assert bwd[getattr(ops, op + "_backward")] == 2 * fwd[getattr(ops, op)]


def test_edge_under_autocast_runs_in_the_weights_dtype():
    gen = _gen(33)
    _, edge = make_edge(4, 1, torch.float32, seed=10, train=False)
    x, w = torch.randn(2, 4, 5, 5, generator=gen), _probs(gen, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = edge(x.bfloat16(), w)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, edge(x.bfloat16().float(), w), rtol=0, atol=0)


def test_bad_mix_inputs_give_clear_errors():
    routes, src, alpha, shift, acc = make_mix(_gen(21))
    with pytest.raises(ValueError, match=re.escape("src must be (B, 6, H, W)")):
        conv_mix(src[:, :5], alpha, shift, routes, acc)
    with pytest.raises(ValueError, match=re.escape("alpha and shift must be (7,)")):
        conv_mix(src, alpha[:6], shift, routes, acc)
    with pytest.raises(ValueError, match="acc must be"):
        conv_mix(src, alpha, shift, routes, acc[:, :3])
    with pytest.raises(TypeError, match="float32 or all float64"):
        conv_mix(src, alpha.float(), shift, routes, acc)
    with pytest.raises(ValueError, match="on one device"):
        conv_mix(src, alpha, shift.to("meta"), routes, acc)


# -- backends and the search -------------------------------------------------------------


def test_backends_resolve_and_apply_keep_the_state():
    if CPP:
        assert backends.resolve("auto", "cnn", "cpu").name == "fused"
    torch.manual_seed(0)
    model = ConvSearchModel(C=4, layers=3).double()
    before = model.state_dict()
    backends.BACKENDS["fused"].apply(model)
    assert all(isinstance(cell._ops, FusedCellOps) for cell in model.cells)
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    backends.BACKENDS["reference"].apply(model)
    assert all(isinstance(cell._ops, torch.nn.ModuleList) for cell in model.cells)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert reference_cell_ops(model.cells[0]) is model.cells[0]._ops


def test_frozen_bn_stats_freezes_the_fused_cells():
    torch.manual_seed(0)
    model = backends.BACKENDS["fused"].apply(ConvSearchModel(C=4, layers=3).double())
    images = torch.randn(2, 3, 8, 8, dtype=F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with model.frozen_bn_stats():
        model.logits(images)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(cell._ops.track_running_stats for cell in model.cells)
    model.logits(images)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert "cells.0._ops.13._ops.7.op.3.running_mean" in changed
    assert "cells.1._ops.0._ops.3.bn.num_batches_tracked" in changed


def _images(n=24, size=16, seed=0):
    gen = _gen(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    return CIFAR10Split(images, torch.randint(0, 10, (n,), generator=gen))


def _run_search(backend, order, hvp="fd", steps=3):
    cfg = SearchConfig(
        space="cnn",
        order=order,
        backend=backend,
        hvp=hvp,
        dtype="float64",
        init_channels=4,
        layers=3,
        batch_size=2,
        seed=3,
    ).resolved()
    task = CNNTask(cfg, torch.device("cpu"), F64, images=_images())
    task.begin_epoch(0)
    losses = [task.step()["loss"] for _ in range(steps)]
    return task.model, losses


# The exact HVP differentiates the fused cells' weight gradient (double backward): 10 s.
@pytest.mark.parametrize("order, hvp", [(1, "fd"), (2, "fd"), (2, "exact")])
def test_search_steps_fused_equal_reference(order, hvp, one_thread):
    ref_model, ref_losses = _run_search("reference", order, hvp)
    fused_model, fused_losses = _run_search("fused", order, hvp)
    assert all(isinstance(c._ops, FusedCellOps) for c in fused_model.cells)
    assert all(isinstance(c._ops, torch.nn.ModuleList) for c in ref_model.cells)
    np.testing.assert_allclose(fused_losses, ref_losses, rtol=1e-12)
    start = _run_search("reference", order, hvp, steps=0)[0].arch_parameters()
    for (name, a_ref), a_fused, a0 in zip(
        ref_model.named_arch_parameters(), fused_model.arch_parameters(), start
    ):
        assert (a_ref - a_fused).abs().max() < 1e-9, name
        # ... and α moved, so the comparison means something.
        assert (a_ref - a0).abs().max() > 1e-5, name
    ref_sd, fused_sd = ref_model.state_dict(), fused_model.state_dict()
    assert list(ref_sd) == list(fused_sd)
    for key, w in ref_sd.items():
        torch.testing.assert_close(fused_sd[key], w, rtol=1e-9, atol=1e-12, msg=key)


@pytest.mark.parametrize("stride", [1, 2])  # the ReLU inside depthwise at 1, before it at 2
def test_missing_extension_falls_back_to_torch_ops(monkeypatch, stride):
    # None in sys.modules makes importing the extension raise ModuleNotFoundError (patching
    # importlib.import_module instead also broke torch's own lazy imports).
    monkeypatch.setitem(sys.modules, "fastdarts._C", None)
    extension._load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert kernel_name(torch.device("cpu")) == "reference"
            gen = _gen(22)
            ref, fused = make_edge(4, stride, F64, seed=6, train=True)
            x = torch.randn(2, 4, 6, 6, generator=gen, dtype=F64)
            loss_w = torch.randn(2, 4, 6 // stride, 6 // stride, generator=gen, dtype=F64)
            compare_modules(ref, fused, [x, _probs(gen)], F64, loss_w)
    finally:
        monkeypatch.undo()
        extension._load.cache_clear()


TRITON_SCRIPT = textwrap.dedent(
    """
    from kernels import conv_mixed as k
    from fastdarts.ops.conv_mixed import Routes, mix_backward_reference, mix_reference
    gen = torch.Generator().manual_seed(23)
    routes = Routes([0, 3, 2, 2, 4, 1, 4], [1, 0, 0, 2, 2, 1, 0], 6, 4)
    rs, ro, optr, perm, sptr, n = routes.tables()
    for dtype, tol in [(torch.float64, 1e-12), (torch.float32, 1e-5)]:
        for B, H, W in [(1, 1, 1), (2, 3, 5), (2, 17, 19)]:
            src = torch.randn(B, 6, H, W, generator=gen, dtype=torch.float64)
            alpha = torch.randn(7, generator=gen, dtype=torch.float64)
            shift = torch.randn(7, generator=gen, dtype=torch.float64)
            acc = torch.randn(B, 4, H, W, generator=gen, dtype=torch.float64)
            g = torch.randn(B, 4, H, W, generator=gen, dtype=torch.float64)
            lo = [t.to(dtype) for t in (src, alpha, shift, acc, g)]
            # acc whole, as a channel block of a larger tensor (read in place), and none
            wide = torch.randn(B, 7, H, W, generator=gen, dtype=torch.float64)
            wide[:, 2:6] = acc
            blocks = ((acc, lo[3]), (acc, wide.to(dtype)[:, 2:6]), (None, None))
            # src as one tensor; as three sources (one a channel block of a larger tensor,
            # read in place; one whose planes are not dense); as six (more than the kernels'
            # four: the last ones joined).
            lo_src = lo[0]
            wider = torch.randn(B, 9, H, W, generator=gen, dtype=dtype)
            wider[:, 4:7] = lo_src[:, 2:5]
            odd = lo_src[:, 5:].transpose(2, 3).contiguous().transpose(2, 3)
            splits = [[lo_src], [lo_src[:, :2].clone(), wider[:, 4:7], odd]]
            splits.append([lo_src[:, i : i + 1].clone() for i in range(6)])
            for srcs in splits:
                for a, a_lo in blocks:
                    out = torch.full((B, 4, H, W), math.nan, dtype=dtype)
                    k.forward(srcs, lo[1], lo[2], a_lo, rs, optr, out)
                    want = mix_reference(src, alpha, shift, a, rs, ro, n)
                    torch.testing.assert_close(out, want.to(dtype), rtol=tol, atol=tol)
                outs = [torch.full_like(t, math.nan) for t in lo[:3]]
                got = k.backward(lo[4], srcs, *lo[1:3], rs, ro, perm, sptr, out=outs)
                want = mix_backward_reference(g, src, alpha, shift, rs, ro)
                for x, y in zip(got, want):
                    torch.testing.assert_close(x, y.to(dtype), rtol=tol, atol=10 * tol)
    """
)


def test_triton_kernels_under_interpreter():
    run_triton_interpreted(TRITON_SCRIPT)


# The launch glue the CUDA path takes (fastdarts.ops.conv_mixed's 'triton' branch: output
# allocation, argument order, the backward's out= tensors), run on the CPU by the interpreter:
# conv_mix and a whole fused edge, forward and every gradient, against the reference.
TRITON_DISPATCH_SCRIPT = textwrap.dedent(
    """
    sys.path.insert(0, "tests")
    import fastdarts.ops.conv_mixed as cm
    from test_conv_mixed import _gen, _probs, check_cell_under_vmap, compare_modules, make_edge
    cm.kernel_name = lambda device: "triton"
    gen = torch.Generator().manual_seed(25)
    routes = cm.Routes([0, 3, 2, 2, 4, 1, 4], [1, 0, 0, 2, 2, 1, 0], 6, 4)
    src = torch.randn(2, 6, 3, 5, generator=gen, dtype=torch.float64)
    alpha, shift = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    acc = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64)
    for a, split in ((acc, False), (None, False), (acc, True)):
        x = [t.clone().requires_grad_() for t in (src, alpha, shift)]
        # src whole, or as three sources (channel blocks of it: their gradients join in it)
        parts = x[0].split([2, 3, 1], 1) if split else x[0]
        out = cm.conv_mix(parts, *x[1:], routes, a)
        got = [out, *torch.autograd.grad(out, x, g)]
        x = [t.clone().requires_grad_() for t in (src, alpha, shift)]
        want = cm.mix_reference(*x, a, routes.src, routes.out, routes.n_out)
        want = [want, *torch.autograd.grad(want, x, g)]
        for u, v in zip(got, want):
            torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    for stride in (1, 2):
        ref, fused = make_edge(4, stride, torch.float64, seed=stride, train=True)
        x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
        loss_w = torch.randn(2, 4, 6 // stride, 6 // stride, generator=gen, dtype=torch.float64)
        compare_modules(ref, fused, [x, _probs(gen)], torch.float64, loss_w)
    # The batched w± pass: cells under vmap over two weight samples, the depthwise kernels
    # reading each sample's weights; the C++ kernels off, as on CUDA (torch's convolutions
    # and BatchNorm, the latter under vmap through the fused op's rule).
    cm._cpp = lambda x, name="": False
    calls = []
    forward = cm.triton_kernels("depthwise").forward
    cm.triton_kernels("depthwise").forward = lambda *a: calls.append(a[1][0].dim()) or forward(*a)
    check_cell_under_vmap(True, False, C=2, H=4, weight_grads=False, steps=2)
    assert 5 in calls, f"the depthwise kernels ran on no weight samples: {calls}"
    """
)


@pytest.mark.cuda
def test_cuda_edge_and_cell_on_a_second_device(monkeypatch):
    """Triton launches on the current device; the launchers switch to the inputs' one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    assert torch.cuda.current_device() == 0
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_edges_and_cells(F64, "cuda:1")


def test_triton_dispatch_under_interpreter():
    run_triton_interpreted(TRITON_DISPATCH_SCRIPT)


TRITON_DEPTHWISE_PRELUDE = textwrap.dedent(
    """
    import fastdarts.ops.conv_mixed as cm
    from fastdarts.ops.extension import triton_kernels
    dw = triton_kernels("depthwise")
    # Every output the kernels write starts as NaN: an element left unwritten shows.
    torch.empty_like = lambda t: torch.full_like(t, math.nan)
    gen = torch.Generator().manual_seed(26)
    STAGE1 = [(3, 1, 1), (5, 2, 1), (3, 2, 2), (5, 4, 2)]  # (k, pad, dilation), offset 0
    cases = [
        # (B, Cin, H, W, [(channels, k, pad, dilation, first input channel)], stride, relu)
        *[(2, 6, 7, 9, [(6, *s, 0) for s in STAGE1], st, r) for st in (1, 2) for r in (0, 1)],
        (3, 4, 20, 13, [(4, *s, 0) for s in STAGE1], 2, True),  # planes of several blocks
        (3, 10, 5, 5, [(5, 3, 1, 1, 0), (5, 5, 2, 1, 5)], 1, True),  # the second stage
        (2, 10, 12, 11, [(3, 3, 1, 1, 2)], 1, False),  # channels no shape reads: d_x = 0
        (2, 6, 9, 9, [(6, 5, 2, 1, 0), (6, 3, 1, 1, 0)], 2, False),
    ]
    tol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-4)}
    # float32 runs the same index arithmetic as float64: a case of each stride and stage
    # checks its loads, stores and tolerance (each case costs 2-16 s interpreted).
    dtype_cases = {torch.float64: cases, torch.float32: [cases[3], cases[5], cases[7]]}
    """
)
TRITON_DEPTHWISE_SCRIPT = TRITON_DEPTHWISE_PRELUDE + textwrap.dedent(
    """
    for dtype, (rtol, atol) in tol.items():
        for b, cin, h, w, shapes, stride, relu in dtype_cases[dtype]:
            x = torch.randn(b, cin, h, w, generator=gen, dtype=torch.float64)
            ws = [torch.randn(c, 1, k, k, generator=gen, dtype=torch.float64)
                  for c, k, _, _, _ in shapes]
            geo = ([s[2] for s in shapes], [s[3] for s in shapes], [s[4] for s in shapes])
            want = cm.depthwise_reference(x, ws, stride, *geo, bool(relu))
            g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
            want = [want, *cm.depthwise_backward_reference(g, x, ws, stride, *geo, True, relu)]
            x, g, ws = x.to(dtype), g.to(dtype), [t.to(dtype) for t in ws]
            out = torch.full(want[0].shape, math.nan, dtype=dtype)
            got = [dw.forward(x, ws, stride, *geo, bool(relu), out)]
            got += dw.backward(g, x, ws, stride, *geo, True, bool(relu))
            assert len(dw.backward(g, x, ws, stride, *geo, False, bool(relu))) == 1
            for name, u, v in zip(["out", "d_x", *["d_w"] * len(ws)], got, want):
                torch.testing.assert_close(u, v.to(dtype), rtol=rtol, atol=atol, msg=name)
    """
)
# Weight samples (S, Ch, 1, K, K): each sample's rows (sample-major or interleaved) read its
# own weights, against the reference on those rows alone.
TRITON_DEPTHWISE_SAMPLES_SCRIPT = TRITON_DEPTHWISE_PRELUDE + textwrap.dedent(
    """
    def rows(t, s, interleaved):  # each sample's rows of t (N, ...), as (s, N / s, ...)
        return t.unflatten(0, (-1, s)).movedim(1, 0) if interleaved else t.unflatten(0, (s, -1))

    sample_cases = [(cases[3], 2), (cases[5], 2), (cases[7], 3)]
    sample_cases = {torch.float64: sample_cases, torch.float32: sample_cases[1:]}
    for dtype, (rtol, atol) in tol.items():
        for (b, cin, h, w, shapes, stride, relu), s in sample_cases[dtype]:
            for interleaved in (False, True):
                x = torch.randn(b * s, cin, h, w, generator=gen, dtype=torch.float64)
                ws = [torch.randn(s, c, 1, k, k, generator=gen, dtype=torch.float64)
                      for c, k, _, _, _ in shapes]
                geo = ([t[2] for t in shapes], [t[3] for t in shapes], [t[4] for t in shapes])
                xv = rows(x, s, interleaved)
                outs = [cm.depthwise_reference(xv[v], [t[v] for t in ws], stride, *geo, relu)
                        for v in range(s)]
                g = torch.randn(s, *outs[0].shape, generator=gen, dtype=torch.float64)
                grads = [cm.depthwise_backward_reference(g[v], xv[v], [t[v] for t in ws],
                                                         stride, *geo, True, relu)
                         for v in range(s)]
                join = lambda parts: torch.stack(parts, int(interleaved)).flatten(0, 1)
                want = [join(outs), join([d[0] for d in grads])]
                want += [torch.stack([d[1 + t] for d in grads]) for t in range(len(ws))]
                g = join(list(g))
                x, g, ws = x.to(dtype), g.to(dtype), [t.to(dtype) for t in ws]
                out = torch.full(want[0].shape, math.nan, dtype=dtype)
                got = [dw.forward(x, ws, stride, *geo, bool(relu), out, interleaved)]
                got += dw.backward(g, x, ws, stride, *geo, True, bool(relu), interleaved)
                for name, u, v in zip(["out", "d_x", *["d_w"] * len(ws)], got, want):
                    msg = f"{name} samples {s} interleaved {interleaved}"
                    torch.testing.assert_close(u, v.to(dtype), rtol=rtol, atol=atol, msg=msg)
    """
)


TRITON_POOLS_SCRIPT = textwrap.dedent(
    """
    import fastdarts.ops.conv_mixed as cm
    from fastdarts.ops.extension import triton_kernels
    pools = triton_kernels("pools")
    # Every output the kernels write starts as NaN: an element left unwritten shows.
    empty = torch.empty
    torch.empty = lambda *a, **k: empty(*a, **k).fill_(math.nan)
    torch.Tensor.new_empty = lambda self, *size, **k: torch.full(
        size, math.nan, dtype=self.dtype, device=self.device)
    gen = torch.Generator().manual_seed(28)
    tol = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-5, 1e-5)}
    shapes = [(2, 3, 7, 9), (1, 2, 12, 11), (2, 2, 1, 1), (1, 1, 2, 3), (2, 1, 20, 13)]
    for dtype, (rtol, atol) in tol.items():
        for b, c, h, w in shapes:
            for stride in (1, 2):
                for ties in (False, True):
                    big = torch.randn(b, 2 * c + 1, h, w, generator=gen, dtype=torch.float64)
                    if ties:  # many equal values, and a NaN: the max's rules show
                        big = big.round()
                        big[0, 1, 0, 0] = math.nan
                    x = big[:, 1 : c + 1]  # a channel block of a larger tensor, read in place
                    want = cm.pools_reference(x, stride)
                    n = want.shape[1]  # the gradient, a channel block of a larger tensor too
                    g = torch.randn(b, n + 3, *want.shape[2:], generator=gen, dtype=torch.float64)
                    g = g[:, 2 : 2 + n]
                    want_dx = cm.pools_backward_reference(g, x, stride)
                    got = pools.forward(x.to(dtype), stride)
                    got_dx = pools.backward(g.to(dtype), x.to(dtype), stride)
                    for name, u, v in (("out", got, want), ("d_x", got_dx, want_dx)):
                        torch.testing.assert_close(
                            u, v.to(dtype), rtol=rtol, atol=atol, equal_nan=ties, msg=name)
    """
)


TRITON_RUNNING_STATS_SCRIPT = textwrap.dedent(
    """
    import copy
    import fastdarts.ops.conv_mixed as cm
    from fastdarts.ops.extension import triton_kernels
    rs = triton_kernels("running_stats")
    gen = torch.Generator().manual_seed(29)
    # An edge's group: the kernel against FusedEdges' torch ops, from the same state.
    for dtype in (torch.float64, torch.float32):
        for C, stride in ((3, 1), (6, 2)):
            edge = cm.MixedOp(C, stride).to(dtype)
            for name, buf in edge.named_buffers():
                if name.startswith("run2"):
                    buf.uniform_(0.5, 1.5, generator=gen)
            channels = int(edge.runstat_g0.max()) + 3
            mean = torch.randn(channels, generator=gen, dtype=dtype)
            invstd = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
            normed = torch.empty(2, channels, 5, 3, dtype=dtype)
            fused = copy.deepcopy(edge)
            cm.kernel_name = lambda device: "triton"
            fused._update_running(0, mean, invstd, normed)
            cm.kernel_name = lambda device: "reference"
            edge._update_running(0, mean, invstd, normed)
            tol = 1e-15 if dtype == torch.float64 else 1e-7
            for (name, got), want in zip(fused.named_buffers(), edge.buffers()):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=name)
            assert int(fused.nbt_g0.min()) == 1
    # Past one block, repeated channels, n = 1 (unbias n / max(n − 1, 1) = 1).
    for dtype in (torch.float64, torch.float32):
        for r, n in ((rs.BLOCK + 477, 30), (5, 1)):
            stat = torch.randint(0, 40, (r,), generator=gen)
            mean = torch.randn(40, generator=gen, dtype=dtype)
            invstd = torch.rand(40, generator=gen, dtype=dtype) + 0.5
            rm, rv = torch.randn(r, generator=gen, dtype=dtype), torch.rand(r, dtype=dtype)
            nbt = torch.arange(7).view(1, 7)
            want_m = rm * 0.9 + mean[stat] * 0.1
            want_v = rv * 0.9 + (invstd[stat].pow(-2) - 1e-5) * (n / max(n - 1, 1)) * 0.1
            rs.update(mean, invstd, stat, rm, rv, nbt, torch.tensor([0.1, 1e-5], dtype=dtype), n)
            tol = 1e-15 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(rm, want_m, rtol=tol, atol=tol)
            torch.testing.assert_close(rv, want_v, rtol=tol, atol=tol)
            assert nbt.tolist() == [list(range(1, 8))]
    """
)


def test_triton_running_statistics_match_the_torch_ops_under_interpreter():
    """The Triton kernel updating a group's running BatchNorm statistics (CUDA's) against
    FusedEdges' torch ops on an edge of each stride, and against the formula past one block
    with repeated channels and at n = 1; float64 and float32."""
    run_triton_interpreted(TRITON_RUNNING_STATS_SCRIPT)


def test_running_statistics_launcher_refuses_what_the_kernel_cannot_update():
    """It updates the running buffers in place through flat offsets, in the statistics'
    dtype: a strided buffer or a mixed dtype raises instead of writing the wrong elements."""
    pytest.importorskip("triton")
    update = extension.triton_kernels("running_stats").update
    mean, invstd, rm, rv = torch.zeros(4), torch.ones(4), torch.zeros(3), torch.ones(3)
    stat, nbt, consts = torch.arange(3), torch.zeros(2, dtype=torch.long), torch.tensor([0.1, 1e-5])
    with pytest.raises(ValueError, match="contiguous"):
        update(mean, invstd, stat, torch.zeros(6)[::2], rv, nbt, consts, 5)
    with pytest.raises(ValueError, match="contiguous"):
        update(mean, invstd, stat, rm, torch.ones(2), nbt, consts, 5)
    with pytest.raises(TypeError, match="one dtype"):
        update(mean, invstd, stat, rm.double(), rv, nbt, consts, 5)
    with pytest.raises(TypeError, match="one dtype"):
        update(*(t.bfloat16() for t in (mean, invstd)), stat, rm, rv, nbt, consts, 5)


def test_triton_pools_match_reference_under_interpreter():
    """The Triton pools kernels (CUDA's) against torch's pooling: both pools forward and d_x,
    both strides, odd and 1×1 planes, input and gradient as channel blocks read in place,
    ties and a NaN (the first maximum wins, a NaN over any number); float64 and float32
    against float64."""
    run_triton_interpreted(TRITON_POOLS_SCRIPT)


def test_triton_depthwise_matches_reference_under_interpreter():
    """The Triton depthwise kernels (CUDA's) against torch's convolutions: forward, d_x and
    every d_w; both strides, with and without the ReLU, first- and second-stage shapes, an
    offset shape leaving channels unread; float64 (every case) and float32 (a case of each
    stride and stage) against float64."""
    run_triton_interpreted(TRITON_DEPTHWISE_SCRIPT)


def test_triton_depthwise_weight_samples_under_interpreter():
    """The same kernels with weight samples (2 and 3; rows sample-major and interleaved), as
    the batched w± passes run them: forward, d_x and each sample's d_w against the reference
    on the sample's rows."""
    run_triton_interpreted(TRITON_DEPTHWISE_SAMPLES_SCRIPT)


def check_edges_and_cells(dtype: torch.dtype, device: str) -> None:
    """compare_modules on ``device`` for an edge of each stride and each kind of cell."""
    gen = _gen(24)
    for stride in (1, 2):
        ref, fused = make_edge(16, stride, dtype, seed=stride, train=True)
        x = torch.randn(8, 16, 16, 16, generator=gen, dtype=F64)
        loss_w = torch.randn(8, 16, 16 // stride, 16 // stride, generator=gen, dtype=F64)
        compare_modules(ref, fused.to(device), [x, _probs(gen)], dtype, loss_w, device)
    C, H = 8, 8
    for reduction, reduction_prev in ((False, False), (True, False), (False, True)):
        ref, fused, c_pp = make_cell(C, reduction, reduction_prev, dtype, seed=7, train=True)
        h_pp = 2 * H if reduction_prev else H
        s0 = torch.randn(4, c_pp, h_pp, h_pp, generator=gen, dtype=F64)
        s1 = torch.randn(4, C, H, H, generator=gen, dtype=F64)
        h_out = H // 2 if reduction else H
        loss_w = torch.randn(4, 4 * C, h_out, h_out, generator=gen, dtype=F64)
        compare_modules(ref, fused.to(device), [s0, s1, _probs(gen, 14)], dtype, loss_w, device)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_cuda_edge_and_cell_match_reference(dtype, monkeypatch):
    """The Triton path on the GPU: forward, every gradient and the running statistics."""
    assert kernel_name(torch.device("cuda")) == "triton"
    # cuDNN's float32 convolutions default to TF32 (10-bit mantissa) on Ampere and later.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    check_edges_and_cells(dtype, "cuda")


def test_block_share_gradients_equal_slicing():
    """run_group hands the stage-1 block whole to the depthwise kernel (which reads only
    channels below c) and its channels from c on to the mixture, through one Function whose
    backward writes the block's gradient into the whole's: gradients (with either output
    unused, second order, under vmap) equal plain slicing's, and the first-order backward
    is one copy (no add, no concatenation)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastdarts.ops.conv_mixed import _ShareBlock

    gen = _gen(28)
    y = torch.randn(3, 12, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    w_whole = torch.randn(3, 12, 4, 5, generator=gen, dtype=F64)
    w_whole[:, 5:] = 0  # the whole's consumer reads channels 0..4 only, as the kernel does
    w_block = torch.randn(3, 7, 4, 5, generator=gen, dtype=F64)

    def loss(share, t, use=("whole", "block")):
        whole, block = share(t)
        total = 0.0
        if "whole" in use:
            total = total + (whole.sin() * w_whole).sum()
        if "block" in use:
            total = total + (block.pow(2) * w_block).sum()
        return total

    def plain(t):
        return t, t[:, 5:]

    def shared(t):
        return _ShareBlock.apply(t, 5, 1)

    whole, block = shared(y)
    assert whole.data_ptr() == y.data_ptr() == block.data_ptr() - 5 * 20 * 8  # views
    for use in (("whole", "block"), ("whole",), ("block",)):
        grads = {}
        for name, share in (("plain", plain), ("shared", shared)):
            (g,) = torch.autograd.grad(loss(share, y, use), y, create_graph=True)
            grads[name] = (g, *torch.autograd.grad(g.sum(), y))
            grads[name + " first"] = torch.autograd.grad(loss(share, y, use), y)
        for got, want in zip(grads["shared"], grads["plain"]):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads["shared first"], grads["plain first"], rtol=0, atol=0)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    seen: list[str] = []
    whole, block = shared(y)
    # The whole's gradient is zero from c on, as the depthwise kernel's is (and, as there,
    # a tensor nothing else holds: the backward writes into it).
    g_whole = torch.zeros(3, 12, 4, 5, dtype=F64)
    g_whole[:, :5] = 1
    grads = (g_whole, torch.full((3, 7, 4, 5), 2.0, dtype=F64))
    with Ops():
        (g,) = torch.autograd.grad((whole, block), y, grads)
    assert seen == ["aten::slice.Tensor", "aten::copy_"], seen
    assert g[:, :5].eq(1).all() and g[:, 5:].eq(2).all()
    per_sample = torch.randn(2, 3, 12, 4, 5, generator=gen, dtype=F64)
    want = torch.func.vmap(torch.func.grad(lambda t: loss(plain, t)))(per_sample)
    got = torch.func.vmap(torch.func.grad(lambda t: loss(shared, t)))(per_sample)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_vmapped_then_backward_equal(shared, plain, loss, per_sample)
    # The backward vmapped over batched output gradients, grad mode off (a Jacobian's rows):
    # the whole's gradient unbatched, the block's batched, so no copy into the former.
    g_block = torch.randn(4, 3, 7, 4, 5, generator=gen, dtype=F64)
    for share in (plain, shared):
        whole, block = share(y)
        g_whole = torch.zeros_like(whole)
        g = torch.autograd.grad(
            (whole, block), y, (g_whole.expand(4, *g_whole.shape), g_block),
            is_grads_batched=True,
        )[0]  # fmt: skip
        assert g[:, :, :5].eq(0).all() and torch.equal(g[:, :, 5:], g_block)


def assert_vmapped_then_backward_equal(fused, plain, loss, per_sample) -> None:
    """A loss per sample by vmap (vmap dim 0 and 1), then one autograd pass over it (as
    the batched w± passes do): the gradient equals plain slicing's, and the pass meets the
    Function's backward (no slice_backward), not the ops of its vmap rule."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.name())
            return func(*args, **(kwargs or {}))

    for bdim in (0, 1):
        grads = []
        for split in (fused, plain):
            t = per_sample.movedim(0, bdim).clone().requires_grad_()
            losses = torch.func.vmap(lambda u, split=split: loss(split, u), in_dims=bdim)(t)
            seen: list[str] = []
            with Ops():
                grads.append(torch.autograd.grad(losses.sum(), t))
            if split is fused:
                assert "aten::slice_backward" not in seen, seen
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_node_split_gradients_equal_slicing():
    """FusedCellOps splits each group's output into its node and the rest with one Function
    whose backward concatenates: gradients (first and second order, and under vmap) equal
    those of plain slicing."""
    from fastdarts.ops.conv_mixed import _SplitNode

    gen = _gen(27)
    out = torch.randn(3, 12, 4, 5, generator=gen, dtype=F64, requires_grad=True)
    w_node = torch.randn(3, 4, 4, 5, generator=gen, dtype=F64)
    w_rest = torch.randn(3, 8, 4, 5, generator=gen, dtype=F64)

    def loss(split, t):
        node, rest = split(t)
        return (node.sin() * w_node).sum() + (rest.pow(2) * w_rest).sum()

    def plain(t):
        return t[:, :4], t[:, 4:]

    def fused(t):
        return _SplitNode.apply(t, 4, 1)

    node, rest = fused(out)
    assert node.data_ptr() == out.data_ptr() and tuple(rest.shape) == (3, 8, 4, 5)  # views
    # The gradient, and the gradient of its sum (second order through the backward's cat).
    grads = {}
    for name, split in (("plain", plain), ("fused", fused)):
        (g,) = torch.autograd.grad(loss(split, out), out, create_graph=True)
        grads[name] = (g, *torch.autograd.grad(g.sum(), out))
    for got, want in zip(grads["fused"], grads["plain"]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    per_sample = torch.randn(2, 3, 12, 4, 5, generator=gen, dtype=F64)
    want = torch.func.vmap(torch.func.grad(lambda t: loss(plain, t)))(per_sample)
    got = torch.func.vmap(torch.func.grad(lambda t: loss(fused, t)))(per_sample)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert_vmapped_then_backward_equal(fused, plain, loss, per_sample)
    assert torch.autograd.gradcheck(lambda t: fused(t)[1].sum() + fused(t)[0].prod(), (out,))
