"""The reference search spaces: names, state, and numerics against independent versions."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdarts.spaces.base import Batch, MaskSpec, SearchOutput
from fastdarts.spaces.cnn import ConvSearchModel, FactorizedReduce, Identity, MixedOp
from fastdarts.spaces.rnn import RNNSearchModel, recurrent_mixed_reference

DT = torch.float64
TIGHT = {"rtol": 1e-12, "atol": 1e-14}
NTOKEN, NHID, T, B = 20, 7, 4, 3
RATES = {"dropout": 0.3, "dropouth": 0.25, "dropoutx": 0.4, "dropouti": 0.2, "dropoute": 0.15}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny ops: OpenMP threads only add overhead, and stall badly when the cores are busy
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# RNN helpers


def make_rnn(seed: int = 0, **kw) -> RNNSearchModel:
    """A tiny float64 RNN search model with O(1) random parameters (not the tiny init)."""
    torch.manual_seed(seed)
    model = RNNSearchModel(NTOKEN, emsize=NHID, nhid=NHID, **{**RATES, **kw}).to(DT)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = {"encoder.weight": 0.7, "decoder.bias": 0.3, "alphas_recurrent": 1.0}
            p.copy_(torch.randn(p.shape, generator=g, dtype=DT) * scale.get(name, 0.6))
    return model


def make_batch(seed: int = 0, batch_size: int = B, steps: int = T) -> Batch:
    g = torch.Generator().manual_seed(2000 + seed)
    inputs = torch.randint(0, NTOKEN, (steps, batch_size), generator=g)
    targets = torch.randint(0, NTOKEN, (steps, batch_size), generator=g)
    state = torch.randn(batch_size, NHID, generator=g, dtype=DT)
    return Batch(inputs, targets, state)


def make_masks(specs: dict[str, MaskSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + seed)
    out = {}
    for name, spec in specs.items():
        keep = (torch.rand(spec.shape, generator=g, dtype=DT) >= spec.rate).to(DT)
        out[name] = keep / (1 - spec.rate)
    return out


def bn_batch(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    mean = x.sum(0) / n
    var = ((x - mean) ** 2).sum(0) / n
    return (x - mean) / torch.sqrt(var + 1e-5)


def _sig(v):
    return 1.0 / (1.0 + torch.exp(-v))


ACTS = {1: torch.tanh, 2: lambda v: v.clamp(min=0), 3: _sig, 4: lambda v: v}


def independent_rnn(model, batch, masks, bn=bn_batch, steps=8):
    """Straightforward re-implementation of the DARTS search LM from the spec."""
    enc = model.encoder.weight
    w0 = model.rnns[0]._W0
    ws = list(model.rnns[0]._Ws)
    bias = model.decoder.bias
    alpha = model.alphas_recurrent
    e = torch.exp(alpha - alpha.max(1, keepdim=True).values)
    probs = e / e.sum(1, keepdim=True)
    masks = masks or {}
    d = enc.shape[1]
    ones = torch.ones(batch.inputs.shape[1], d, dtype=DT)
    m_e = masks.get("embedding", torch.ones(enc.shape[0], 1, dtype=DT))
    m_i, m_x = masks.get("input", ones), masks.get("x", ones)
    m_h, m_o = masks.get("h", ones), masks.get("output", ones)

    emb_w = enc * m_e
    h = batch.state
    hs = []
    for t in range(batch.inputs.shape[0]):
        x = emb_w[batch.inputs[t]] * m_i
        proj = torch.cat([x * m_x, h * m_h], 1) @ w0
        c0, h0 = proj[:, :d], proj[:, d:]
        s = [bn(h + _sig(c0) * (torch.tanh(h0) - h))]
        offset = 0
        for j in range(steps):
            acc = torch.zeros_like(h)
            for i in range(j + 1):
                ch = (s[i] * m_h) @ ws[j]
                c_i, h_i = ch[:, :d], ch[:, d:]
                for k in range(1, 5):
                    acc = acc + probs[offset + i, k] * (s[i] + _sig(c_i) * (ACTS[k](h_i) - s[i]))
            s.append(bn(acc))
            offset += j + 1
        h = sum(s[1:]) / steps
        hs.append(h)
    hs = torch.stack(hs)
    logits = (hs * m_o) @ enc.t() + bias
    flat = logits.reshape(-1, logits.shape[-1])
    tgt = batch.targets.reshape(-1)
    lse = flat.max(1).values + torch.log(torch.exp(flat - flat.max(1, keepdim=True).values).sum(1))
    loss = (lse - flat[torch.arange(flat.shape[0]), tgt]).mean()
    penalty = model.tar * ((hs[1:] - hs[:-1]) ** 2).mean()
    return loss, penalty, h


# ---------------------------------------------------------------------------------------------
# RNN: names, state


def test_rnn_parameter_names_and_tying():
    model = make_rnn()
    names = [n for n, _ in model.named_parameters()]
    expected = {
        "encoder.weight",
        "rnns.0._W0",
        *(f"rnns.0._Ws.{j}" for j in range(8)),
        "decoder.bias",
        "alphas_recurrent",
    }
    assert set(names) == expected
    assert len(names) == len(expected)
    assert model.decoder.weight is model.encoder.weight
    assert model.rnns[0]._W0.shape == (2 * NHID, 2 * NHID)
    assert all(w.shape == (NHID, 2 * NHID) for w in model.rnns[0]._Ws)
    assert model.alphas_recurrent.shape == (36, 5)


def test_rnn_arch_parameters_and_weights():
    model = make_rnn()
    arch = model.arch_parameters()
    assert len(arch) == 1 and arch[0] is model.alphas_recurrent
    weights = model.weights()
    assert all(w is not model.alphas_recurrent for w in weights)
    assert {id(w) for w in weights} == {
        id(p) for n, p in model.named_parameters() if n != "alphas_recurrent"
    }
    assert len(weights) == 11  # encoder(=decoder) weight, W0, 8 Ws, decoder bias


def test_rnn_state_dict_has_alpha_and_weights():
    sd = make_rnn().state_dict()
    keys = [
        "alphas_recurrent",
        "encoder.weight",
        "decoder.weight",
        "decoder.bias",
        "rnns.0._W0",
        "rnns.0._Ws.7",
        "rnns.0.bn.running_mean",
        "rnns.0.bn.running_var",
    ]
    assert [k for k in keys if k not in sd] == []


def test_rnn_state_dict_round_trip_gives_identical_outputs():
    src = make_rnn(seed=1)
    dst = make_rnn(seed=2)
    batch = make_batch(seed=1)
    masks = make_masks(src.mask_specs(batch), seed=1)
    before = dst(batch, masks)
    dst.load_state_dict(src.state_dict())
    assert dst.decoder.weight is dst.encoder.weight  # the tie survives loading
    a, b = src(batch, masks), dst(batch, masks)
    assert not torch.equal(before.loss, a.loss)
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.penalty, b.penalty)
    assert torch.equal(a.state, b.state)


def test_rnn_mask_specs():
    model = make_rnn()
    specs = model.mask_specs(make_batch())
    assert specs == {
        "embedding": MaskSpec((NTOKEN, 1), 0.15),
        "input": MaskSpec((B, NHID), 0.2, batch_dim=0),
        "x": MaskSpec((B, NHID), 0.4, batch_dim=0),
        "h": MaskSpec((B, NHID), 0.25, batch_dim=0),
        "output": MaskSpec((B, NHID), 0.3, batch_dim=0),
    }
    no_e = make_rnn(dropoute=0.0).mask_specs(make_batch())
    assert set(no_e) == {"input", "x", "h", "output"}


# ---------------------------------------------------------------------------------------------
# RNN numerics


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
def test_rnn_forward_matches_independent(with_masks):
    model = make_rnn(seed=3)
    batch = make_batch(seed=3)
    masks = make_masks(model.mask_specs(batch), seed=3) if with_masks else None
    if with_masks:
        assert set(masks) == {"embedding", "input", "x", "h", "output"}
    out = model(batch, masks)
    assert isinstance(out, SearchOutput)
    assert out.logits is None
    loss, penalty, state = independent_rnn(model, batch, masks)
    assert out.state.shape == (B, NHID)
    torch.testing.assert_close(out.loss, loss, **TIGHT)
    torch.testing.assert_close(out.penalty, penalty, **TIGHT)
    torch.testing.assert_close(out.state, state, **TIGHT)
    assert penalty.item() > 0


def test_rnn_masks_matter():
    # each mask changes the loss, so the comparison above exercises every one of them
    model = make_rnn(seed=4)
    batch = make_batch(seed=4)
    masks = make_masks(model.mask_specs(batch), seed=4)
    full = model(batch, masks).loss
    for name in masks:
        partial = {k: v for k, v in masks.items() if k != name}
        assert not torch.allclose(model(batch, partial).loss, full, rtol=1e-9, atol=0), name


@pytest.mark.parametrize("with_masks", [True, False], ids=["masks", "no_masks"])
def test_rnn_gradients_match_independent(with_masks):
    model = make_rnn(seed=5)
    batch = make_batch(seed=5)
    masks = make_masks(model.mask_specs(batch), seed=5) if with_masks else None
    params = [model.alphas_recurrent, model.rnns[0]._W0, model.rnns[0]._Ws[3]]
    out = model(batch, masks)
    got = torch.autograd.grad(out.loss + 100 * out.penalty, params)
    loss, penalty, _ = independent_rnn(model, batch, masks)
    want = torch.autograd.grad(loss + 100 * penalty, params)
    for g_got, g_want in zip(got, want):
        assert g_want.abs().max() > 1e-6
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-13)


def test_rnn_single_step_has_zero_penalty():
    model = make_rnn(seed=6)
    batch = make_batch(seed=6, steps=1)
    out = model(batch, None)
    loss, _, state = independent_rnn(model, batch, None)
    assert out.penalty.item() == 0.0
    torch.testing.assert_close(out.loss, loss, **TIGHT)
    torch.testing.assert_close(out.state, state, **TIGHT)


def _explicit_mixture(states, ch, probs):
    n, b, d = states.shape
    acts = {
        1: math.tanh,
        2: lambda v: max(v, 0.0),
        3: lambda v: 1.0 / (1.0 + math.exp(-v)),
        4: lambda v: v,
    }
    out = [[0.0] * d for _ in range(b)]
    for i in range(n):
        for k in range(1, 5):
            p = float(probs[i, k])
            for bb in range(b):
                for dd in range(d):
                    s = float(states[i, bb, dd])
                    c = 1.0 / (1.0 + math.exp(-float(ch[i, bb, dd])))
                    h = float(ch[i, bb, d + dd])
                    out[bb][dd] += p * (s + c * (acts[k](h) - s))
    return torch.tensor(out, dtype=DT)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_recurrent_mixed_reference_triple_loop(n):
    g = torch.Generator().manual_seed(40 + n)
    states = torch.randn(n, 2, 3, generator=g, dtype=DT)
    ch = torch.randn(n, 2, 6, generator=g, dtype=DT) * 2
    probs = torch.rand(n, 5, generator=g, dtype=DT)
    probs[:, 0] = 5.0  # a big `none` weight must contribute nothing
    got = recurrent_mixed_reference(states, ch, probs)
    torch.testing.assert_close(got, _explicit_mixture(states, ch, probs), **TIGHT)


# ---------------------------------------------------------------------------------------------
# RNN BatchNorm modes


def _bn_buffers(model):
    bn = model.rnns[0].bn
    return [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]


def test_rnn_eval_uses_running_stats():
    model = make_rnn(seed=7)
    bn = model.rnns[0].bn
    g = torch.Generator().manual_seed(77)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(NHID, generator=g, dtype=DT) * 0.3)
        bn.running_var.copy_(torch.rand(NHID, generator=g, dtype=DT) + 0.5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    before = _bn_buffers(model)
    batch = make_batch(seed=7)
    model.eval()
    out = model(batch, None)
    loss, penalty, state = independent_rnn(
        model, batch, None, bn=lambda x: (x - rm) / torch.sqrt(rv + 1e-5)
    )
    torch.testing.assert_close(out.loss, loss, **TIGHT)
    torch.testing.assert_close(out.penalty, penalty, **TIGHT)
    torch.testing.assert_close(out.state, state, **TIGHT)
    for a, b in zip(before, _bn_buffers(model)):
        assert torch.equal(a, b)
    # and it is not the batch-statistics answer
    train_loss, _, _ = independent_rnn(model, batch, None)
    assert not torch.allclose(train_loss, loss, rtol=1e-6, atol=0)


def test_frozen_bn_stats():
    model = make_rnn(seed=8)
    bn = model.rnns[0].bn
    batch = make_batch(seed=8)
    masks = make_masks(model.mask_specs(batch), seed=8)
    model.train()
    before = _bn_buffers(model)
    with model.frozen_bn_stats():
        assert bn.track_running_stats is False
        frozen = model(batch, masks)
    for a, b in zip(before, _bn_buffers(model)):
        assert torch.equal(a, b)
    assert bn.track_running_stats is True
    normal = model(batch, masks)
    # same batch statistics inside and outside the block
    torch.testing.assert_close(frozen.loss, normal.loss, **TIGHT)
    torch.testing.assert_close(frozen.state, normal.state, **TIGHT)
    after = _bn_buffers(model)
    assert not torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])
    assert after[2].item() == before[2].item() + T * 9  # 9 BN calls per step


def test_frozen_bn_stats_restores_on_error():
    model = make_rnn(seed=9)
    with pytest.raises(RuntimeError, match="boom"), model.frozen_bn_stats():
        raise RuntimeError("boom")
    assert model.rnns[0].bn.track_running_stats is True


# ---------------------------------------------------------------------------------------------
# CNN helpers


def make_cnn(layers: int = 3, seed: int = 0) -> ConvSearchModel:
    torch.manual_seed(seed)
    model = ConvSearchModel(C=4, num_classes=10, layers=layers).to(DT)
    g = torch.Generator().manual_seed(500 + seed)
    with torch.no_grad():
        model.alphas_normal.copy_(torch.randn(14, 8, generator=g, dtype=DT))
        model.alphas_reduce.copy_(torch.randn(14, 8, generator=g, dtype=DT))
    return model


def image_batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(600 + seed)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 10, (2,), generator=g)
    return Batch(x, y)


def bn2d(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def independent_op(name: str, module: nn.Module, x: torch.Tensor, stride: int) -> torch.Tensor:
    """One primitive written out functionally, reading only its conv kernels from ``module``."""
    c = x.shape[1]
    if name == "none":
        return torch.zeros_like(x[:, :, ::stride, ::stride])
    if name == "max_pool_3x3":
        return bn2d(F.max_pool2d(x, 3, stride, 1))
    if name == "avg_pool_3x3":
        return bn2d(F.avg_pool2d(x, 3, stride, 1, count_include_pad=False))
    if name == "skip_connect":
        if stride == 1:
            return x
        w1, w2 = (m.weight for m in _convs(module))
        r = x.clamp(min=0)
        return bn2d(
            torch.cat([F.conv2d(r, w1, stride=2), F.conv2d(r[:, :, 1:, 1:], w2, stride=2)], 1)
        )
    kernel = int(name[-1])
    if name.startswith("sep_conv"):
        dw1, pw1, dw2, pw2 = (m.weight for m in _convs(module))
        pad = kernel // 2
        y = F.conv2d(x.clamp(min=0), dw1, stride=stride, padding=pad, groups=c)
        y = bn2d(F.conv2d(y, pw1))
        y = F.conv2d(y.clamp(min=0), dw2, stride=1, padding=pad, groups=c)
        return bn2d(F.conv2d(y, pw2))
    # dil_conv: dilation 2, padding = 2 * (kernel // 2)
    dw, pw = (m.weight for m in _convs(module))
    y = F.conv2d(x.clamp(min=0), dw, stride=stride, padding=2 * (kernel // 2), dilation=2, groups=c)
    return bn2d(F.conv2d(y, pw))


# edges reading one of the two cell inputs (node i's inputs 0 and 1 at offsets 0, 2, 5, 9)
STRIDE2_EDGES = (0, 1, 2, 3, 5, 6, 9, 10)

CNN_NAMES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


# ---------------------------------------------------------------------------------------------
# CNN


def test_cnn_logits_and_loss():
    model = make_cnn()
    batch = image_batch()
    out = model(batch)
    assert out.logits.shape == (2, 10)
    assert out.state is None
    assert out.penalty.item() == 0.0
    logits = out.logits
    lse = torch.log(torch.exp(logits).sum(1))
    manual = (lse - logits[torch.arange(2), batch.targets]).mean()
    torch.testing.assert_close(out.loss, manual, **TIGHT)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, batch.targets), **TIGHT)


def test_cnn_names_stem_cells_classifier_alpha():
    model = make_cnn(layers=3)
    sd = model.state_dict()
    keys = [
        "stem.0.weight",
        "stem.1.weight",
        "stem.1.bias",
        "stem.1.running_mean",
        "cells.0._ops.0._ops.1.1.running_mean",  # max_pool's BatchNorm
        "cells.0._ops.13._ops.2.1.running_var",  # avg_pool's BatchNorm
        "cells.1._ops.0._ops.3.conv_1.weight",  # stride-2 skip = FactorizedReduce
        "cells.1._ops.1._ops.3.bn.running_mean",
        "cells.2.preprocess0.conv_2.weight",  # after a reduction cell
        "classifier.weight",
        "classifier.bias",
        "alphas_normal",
        "alphas_reduce",
    ]
    assert [k for k in keys if k not in sd] == []
    assert sd["alphas_normal"].shape == (14, 8)
    assert sd["alphas_reduce"].shape == (14, 8)
    assert len(model.cells[0]._ops) == 14
    assert all(len(m._ops) == 8 for m in model.cells[0]._ops)
    arch = model.arch_parameters()
    assert len(arch) == 2
    assert arch[0] is model.alphas_normal and arch[1] is model.alphas_reduce
    assert all(not n.startswith("alphas_") for n, _ in model.named_weights())


def test_cnn_op_param_names_match_original_darts_op_wrapper():
    """BUG (fastdarts/spaces/cnn.py): the original's ReLUConvBN / SepConv / DilConv hold
    their layers in ``self.op = nn.Sequential(...)``, so its state_dicts have
    ``...preprocess0.op.1.weight`` and ``..._ops.4.op.1.weight``; here the classes subclass
    nn.Sequential and the ``.op`` level is missing, so original state_dicts do not load."""
    sd = make_cnn(layers=3).state_dict()
    keys = [
        "cells.0.preprocess0.op.1.weight",
        "cells.0.preprocess1.op.1.weight",
        "cells.0._ops.0._ops.4.op.1.weight",  # sep_conv_3x3 depthwise
        "cells.0._ops.0._ops.4.op.7.running_mean",
        "cells.0._ops.0._ops.6.op.2.weight",  # dil_conv_3x3 pointwise
    ]
    assert [k for k in keys if k not in sd] == []


@pytest.mark.parametrize(
    ("layers", "flags", "shapes"),
    [
        (3, [False, True, True], [(16, 8), (32, 4), (64, 2)]),
        (4, [False, True, True, False], [(16, 8), (32, 4), (64, 2), (64, 2)]),
        (5, [False, True, False, True, False], [(16, 8), (32, 4), (32, 4), (64, 2), (64, 2)]),
    ],
)
def test_cnn_reduction_cells_and_channels(layers, flags, shapes):
    model = make_cnn(layers=layers)
    assert [c.reduction for c in model.cells] == flags
    assert model.classifier.in_features == 4 * 4 * 4
    seen = []
    hooks = [
        c.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape))) for c in model.cells
    ]
    model(image_batch())
    for h in hooks:
        h.remove()
    assert seen == [(2, c, s, s) for c, s in shapes]
    # stride-2 edges exactly on a reduction cell's two inputs
    for cell, red in zip(model.cells, flags):
        skips = [type(m._ops[3]) for m in cell._ops]
        want = [FactorizedReduce if red and e in STRIDE2_EDGES else Identity for e in range(14)]
        assert skips == want


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_weighted_sum(stride):
    torch.manual_seed(11)
    op = MixedOp(4, stride).to(DT)
    g = torch.Generator().manual_seed(12 + stride)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    w = torch.tensor([0.3, -0.7, 1.1, 0.5, 0.9, -0.2, 0.4, 1.3], dtype=DT)
    got = op(x, w)
    parts = [independent_op(n, m, x, stride) for n, m in zip(CNN_NAMES, op._ops)]
    out_hw = 8 // stride
    assert all(p.shape == (2, 4, out_hw, out_hw) for p in parts)
    want = sum(wk * p for wk, p in zip(w, parts))
    assert got.shape == (2, 4, out_hw, out_hw)
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)
    # structure: `none` gives zeros, pools end in BN(affine=False), stride-2 skip reduces
    assert torch.count_nonzero(op._ops[0](x)) == 0
    for k in (1, 2):
        last = list(op._ops[k].modules())[-1]
        assert isinstance(last, nn.BatchNorm2d) and not last.affine
    assert isinstance(op._ops[3], FactorizedReduce) == (stride == 2)
    if stride == 1:
        assert torch.equal(op._ops[3](x), x)


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_one_hot_equals_single_op(stride):
    torch.manual_seed(13)
    op = MixedOp(4, stride).to(DT)
    g = torch.Generator().manual_seed(14 + stride)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=DT)
    outs = []
    for k in range(8):
        e_k = torch.zeros(8, dtype=DT)
        e_k[k] = 1.0
        got = op(x, e_k)
        torch.testing.assert_close(got, op._ops[k](x), rtol=0, atol=0)
        outs.append(got)
    # the eight ops really are different (none aside, no two coincide)
    for a in range(1, 8):
        for b in range(a + 1, 8):
            assert not torch.allclose(outs[a], outs[b]), (a, b)


def test_cnn_gradients_flow():
    model = make_cnn(layers=3)
    out = model(image_batch(seed=1))
    out.loss.backward()
    for p in model.arch_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == p.numel()
    for name, p in model.named_weights():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_cnn_alpha_gradient_matches_finite_difference():
    model = make_cnn(layers=3, seed=2)
    batch = image_batch(seed=2)
    loss = model(batch).loss
    grad_n, grad_r = torch.autograd.grad(loss, [model.alphas_normal, model.alphas_reduce])
    eps = 1e-6
    for alpha, grad, idx in [
        (model.alphas_normal, grad_n, (4, 5)),
        (model.alphas_reduce, grad_r, (0, 3)),
    ]:
        with torch.no_grad():
            alpha[idx] += eps
            up = model(batch).loss.item()
            alpha[idx] -= 2 * eps
            down = model(batch).loss.item()
            alpha[idx] += eps
        assert grad[idx].item() == pytest.approx((up - down) / (2 * eps), rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# Import without CUDA


@pytest.mark.parametrize("flop_counter_first", [False, True], ids=["ours-first", "torch-first"])
def test_flop_formulas_register_whenever_the_flop_counter_is_imported(flop_counter_first):
    """fastdarts' FLOP formulas reach FlopCounterMode whether torch.utils.flop_counter (which
    imports triton) is imported before fastdarts or after it: importing fastdarts alone
    imports neither."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    imports = ["import fastdarts", "from torch.utils.flop_counter import FlopCounterMode"]
    code = "\n".join(
        [
            "import sys, torch",
            *(imports[::-1] if flop_counter_first else imports[:1]),
            "assert ('torch.utils.flop_counter' in sys.modules) is " + str(flop_counter_first),
            imports[1],
            "edge = fastdarts.MixedOp(4, 1)",
            "x, w = torch.randn(2, 4, 8, 8), torch.softmax(torch.randn(8), 0)",
            "with FlopCounterMode(display=False) as counter:",
            "    edge(x, w)",
            "print(sorted(str(k) for k in counter.get_flop_counts()['Global']))",
        ]
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert "['fastdarts.depthwise', 'fastdarts.pointwise']" in res.stdout


def test_import_does_not_initialise_cuda_or_load_kernels():
    """``import fastdarts`` touches no GPU and loads neither Triton, nor the compiled
    extension, nor any kernel module: each is loaded on first use."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(root)}
    code = (
        "import sys, torch, fastdarts\n"
        "assert fastdarts.RNNSearchModel and fastdarts.ConvSearchModel\n"
        "bad = [m for m in sys.modules if m in ('triton', 'fastdarts._C')\n"
        "       or m.startswith('fastdarts.kernels')]\n"
        "assert not bad, bad\n"
        "print('cuda_initialized', torch.cuda.is_initialized())\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "cuda_initialized False" in res.stdout
