"""The α-gradient of the architect against independent computations, in float64.

- second order (finite-difference HVP) against the exact derivative by double backward
  through w' (c detached), on tiny models of both spaces. The bound: a central difference
  of ∇α L_train along v with step ε = r/‖v‖ has truncation error (ε²‖v‖³/6)·|∂³_v ∇α L|,
  i.e. relative error of order r² ≈ 1e-4 times the ratio of third to first directional
  derivatives. These tiny models put ReLU and max-pool kinks within r = 1e-3 of w along v
  (the paper's r = 0.01 is meant for full-size models), so the test takes r = 1e-4, where
  the expected error is ~1e-8·M; we require < 1e-4 relative and check that the error
  shrinks ~4x when r halves (the signature of ε² truncation; a wrong index, sign or scale
  would leave an error that does not shrink).
- ``compat="darts"`` against a line-by-line transcription of the published algorithm
  (model copy loaded from a state_dict, in-place w± passes, fresh masks for each pass).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call

from fastdarts.ops import backends
from fastdarts.search.architect import Architect, UnrollRule
from fastdarts.search.masks import MaskSampler
from fastdarts.spaces import Batch, ConvSearchModel, RNNSearchModel

SEED = 1234


def rnn_case(gen: torch.Generator, T: int = 4, B: int = 3, ntoken: int = 23, nhid: int = 6):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = RNNSearchModel(ntoken, nhid, nhid, dropoute=0.1).double()
    # Larger α than the 1e-3 init, so the op mixture is not uniform and ∇α is informative.
    with torch.no_grad():
        model.alphas_recurrent.normal_(0, 0.5, generator=gen)

    def batch():
        tokens = torch.randint(0, ntoken, (T + 1, B), generator=gen)
        state = torch.randn(B, nhid, generator=gen, dtype=torch.float64) * 0.3
        return Batch(tokens[:-1], tokens[1:], state)

    return model, batch(), batch()


def cnn_case(gen: torch.Generator, B: int = 2, hw: int = 8):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = ConvSearchModel(C=4, num_classes=5, layers=3).double()
    with torch.no_grad():
        for a in model.arch_parameters():
            a.normal_(0, 0.5, generator=gen)

    def batch():
        x = torch.randn(B, 3, hw, hw, generator=gen, dtype=torch.float64)
        return Batch(x, torch.randint(0, 5, (B,), generator=gen))

    return model, batch(), batch()


def make_architect(model, rule, seed=7, **kw):
    opt = torch.optim.Adam(model.arch_parameters(), lr=1e-3)
    return Architect(model, opt, MaskSampler(seed), order=2, rule=rule, **kw)


def draw(model, sampler, batch):
    return sampler.draw(model.mask_specs(batch), torch.float64)


def exact_parts(model, rule, lr, train, val, train_masks, val_masks, bufs=None):
    """Total dα of L_val(w'(α)) by double backward (c detached), its direct part ∇α L_val
    at fixed w', and v = ∇w' L_val."""
    alphas = model.arch_parameters()
    names, w = zip(*model.named_weights())
    with model.frozen_bn_stats():
        loss = model(train, train_masks).loss
    g = torch.autograd.grad(loss, w, create_graph=True)
    c = 1.0
    if rule.clip is not None:
        norm = torch.sqrt(sum((t.detach() ** 2).sum() for t in g))
        c = min(1.0, rule.clip / (norm.item() + 1e-6))
    bufs = bufs or [torch.zeros_like(p) for p in w]
    virtual = [
        p - lr * (rule.momentum * b + c * gi + rule.weight_decay * p)
        for p, gi, b in zip(w, g, bufs)
    ]
    with model.frozen_bn_stats():
        lv = functional_call(model, dict(zip(names, virtual)), (val, val_masks)).loss
    total = torch.autograd.grad(lv, alphas)
    fixed = [t.detach().requires_grad_() for t in virtual]
    with model.frozen_bn_stats():
        lv2 = functional_call(model, dict(zip(names, fixed)), (val, val_masks)).loss
    grads = torch.autograd.grad(lv2, [*alphas, *fixed])
    return total, grads[: len(alphas)], grads[len(alphas) :]


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


CASES = {
    # clip small (c < 1, g clipped) and large (c = 1): the RNN rule both ways
    "rnn-clipped": (rnn_case, UnrollRule(0.0, 5e-7, 1e-3), 20.0),
    "rnn-unclipped": (rnn_case, UnrollRule(0.0, 5e-7, 100.0), 2.0),
    "cnn": (cnn_case, UnrollRule(0.9, 3e-4, None), 0.025),
}


VARIANTS = [
    (case, backend, batched, foreach)
    for case in CASES
    for backend in (("reference", "fused") if case.startswith("rnn") else ("reference",))
    for batched in (False, True)
    for foreach in (False, True)
]


@pytest.mark.parametrize(("case", "backend", "batched_fd", "foreach"), VARIANTS)
def test_finite_difference_matches_exact_second_order(case, backend, batched_fd, foreach):
    """On every backend, with w± one after the other or batched, the weight arithmetic per
    tensor or multi-tensor (the exact HVP through the fused ops' differentiable backward,
    too)."""
    make_case, rule, lr = CASES[case]
    gen = torch.Generator().manual_seed(SEED)
    model, train, val = make_case(gen)
    sampler = MaskSampler(7)
    train_masks, val_masks = draw(model, sampler, train), draw(model, sampler, val)
    total, direct, v = exact_parts(model, rule, lr, train, val, train_masks, val_masks)
    reason = backends.BACKENDS[backend].why_not(model.space, "cpu")
    if reason:
        pytest.skip(f"backend {backend} {reason}")
    backends.BACKENDS[backend].apply(model)
    c_v = 1.0
    if rule.clip is not None:
        c_v = min(1.0, rule.clip / (flat(v).norm().item() + 1e-6))
    implicit_exact = flat(total) - flat(direct)
    assert implicit_exact.norm() > 1e-6 * flat(direct).norm(), "the test needs a real HVP term"

    errors = []
    for radius in (1e-4, 5e-5):
        arch = make_architect(model, rule, fd_radius=radius, batched_fd=batched_fd, foreach=foreach)
        _, fd = arch.alpha_grads(train, val, lr)
        implicit_fd = (flat(fd) - flat(direct)) / c_v
        errors.append(((implicit_fd - implicit_exact).norm() / implicit_exact.norm()).item())
    assert errors[0] < 1e-4, errors
    assert 3.0 < errors[0] / errors[1] < 5.0, errors  # truncation error ∝ ε²

    arch = make_architect(model, rule, hvp="exact", foreach=foreach)
    _, exact = arch.alpha_grads(train, val, lr)
    implicit = (flat(exact) - flat(direct)) / c_v
    torch.testing.assert_close(implicit, implicit_exact, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("held", ["all", "some"])
def test_second_order_uses_momentum_buffer(foreach, held):
    """Each weight's buffer where it has one ("some": weights that had no gradient yet have
    none)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    model, train, val = cnn_case(gen)
    rule = UnrollRule(0.9, 3e-4, None)
    wopt = torch.optim.SGD(model.weights(), lr=0.025, momentum=0.9, weight_decay=3e-4)
    for i, p in enumerate(model.weights()):
        if held == "all" or i % 2:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    wopt.step()
    bufs = [
        wopt.state[p]["momentum_buffer"] if p in wopt.state else torch.zeros_like(p)
        for p in model.weights()
    ]
    total, _, _ = exact_parts(model, rule, 0.025, train, val, {}, {}, bufs)
    arch = make_architect(model, rule, hvp="exact", foreach=foreach)
    _, exact = arch.alpha_grads(train, val, 0.025, wopt)
    torch.testing.assert_close(flat(exact), flat(total), rtol=1e-10, atol=1e-14)
    total_nobuf, _, _ = exact_parts(model, rule, 0.025, train, val, {}, {})
    assert (flat(total_nobuf) - flat(total)).abs().max() > 1e-8  # the buffer matters


@pytest.mark.parametrize("space", ["rnn", "cnn"])
def test_first_order_is_validation_gradient(space):
    gen = torch.Generator().manual_seed(SEED + 2)
    model, train, val = (rnn_case if space == "rnn" else cnn_case)(gen)
    opt = torch.optim.Adam(model.arch_parameters())
    arch = Architect(model, opt, MaskSampler(3), order=1)
    ref = copy.deepcopy(model)
    out, grads = arch.alpha_grads(train, val, lr=1.0)
    masks = draw(ref, MaskSampler(3), val)
    expected = torch.autograd.grad(ref(val, masks).loss, ref.arch_parameters())
    torch.testing.assert_close(flat(grads), flat(expected), rtol=1e-12, atol=0)
    torch.testing.assert_close(out.loss, ref(val, masks).loss, rtol=1e-12, atol=0)


def bn_counts(model):
    return [
        m.num_batches_tracked.item() for m in model.modules() if hasattr(m, "num_batches_tracked")
    ]


@pytest.mark.parametrize("compat", [None, "darts"])
def test_hvp_passes_leave_bn_statistics(compat):
    gen = torch.Generator().manual_seed(SEED + 3)
    model, train, val = rnn_case(gen)
    ref = copy.deepcopy(model)
    arch = make_architect(model, UnrollRule(0.0, 5e-7, 0.25), seed=5, compat=compat)
    arch.alpha_grads(train, val, lr=20.0)
    ref(train, draw(ref, MaskSampler(5), train))  # the one pass at the real weights
    # The reference's forward updated the statistics once per BN call; the architect's
    # w', w⁺ and w⁻ passes add nothing (the published code's w± passes add two more).
    per_pass = bn_counts(ref)[0]
    assert bn_counts(model)[0] == per_pass * (1 if compat is None else 3)
    if compat is None:
        torch.testing.assert_close(model.rnns[0].bn.running_mean, ref.rnns[0].bn.running_mean)


def test_in_place_hvp_puts_the_weights_back_when_a_pass_raises():
    """compat's w± passes move w in place; a pass that raises (out of memory, say) must not
    leave w at w − εv for the caller that catches it."""
    gen = torch.Generator().manual_seed(SEED + 6)
    model, train, val = rnn_case(gen)
    arch = make_architect(model, UnrollRule(0.0, 5e-7, 0.25), compat="darts")
    calls, forward = [], model.forward

    def counting(*args, **kwargs):
        calls.append(None)
        return forward(*args, **kwargs)

    model.forward = counting
    arch.alpha_grads(train, val, lr=20.0)
    last = len(calls)  # the w⁻ pass is the last forward
    before = [p.detach().clone() for p in model.weights()]

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2 * last:
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    model.forward = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        arch.alpha_grads(train, val, lr=20.0)
    torch.testing.assert_close(flat(model.weights()), flat(before), rtol=0, atol=1e-15)


# -- the published algorithm, transcribed -------------------------------------------------


def published_alpha_grad(model, sampler, lr, train, val, rule, wopt=None):
    """The original code's _backward_step_unrolled, step by step (float64)."""
    names, weights = zip(*model.named_weights())
    alphas = model.arch_parameters()
    loss = model(train, draw(model, sampler, train)).loss
    theta = flat(weights).detach()
    grads = [g.detach().clone() for g in torch.autograd.grad(loss, weights)]
    clip_coef = 1.0
    if rule.clip is not None:  # _clip: scale in place only when the coefficient is < 1
        clip_coef = rule.clip / (flat(grads).norm() + 1e-6)
        if clip_coef < 1:
            for g in grads:
                g.mul_(clip_coef)
    moment = torch.zeros_like(theta)
    if rule.momentum and wopt is not None and wopt.state:
        moment = flat([wopt.state[p]["momentum_buffer"] for p in weights]) * rule.momentum
    dtheta = flat(grads) + rule.weight_decay * theta
    new_theta = theta - lr * (moment + dtheta)

    unrolled = copy.deepcopy(model)
    state = model.state_dict()
    offset = 0
    for n, p in zip(names, weights):
        state[n] = new_theta[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    unrolled.load_state_dict(state)
    unrolled_loss = unrolled(val, draw(unrolled, sampler, val)).loss
    unrolled_alphas = unrolled.arch_parameters()
    unrolled_weights = unrolled.weights()
    g_all = torch.autograd.grad(unrolled_loss, [*unrolled_alphas, *unrolled_weights])
    dalpha = [g.clone() for g in g_all[: len(alphas)]]
    vector = [g.clone() for g in g_all[len(alphas) :]]
    if rule.clip is not None:
        coef = rule.clip / (flat(vector).norm() + 1e-6)
        if coef < 1:
            for g in vector:
                g.mul_(coef)

    R = 0.01 / flat(vector).norm()
    with torch.no_grad():
        for p, v in zip(weights, vector):
            p.add_(v, alpha=R.item())
    grads_p = torch.autograd.grad(model(train, draw(model, sampler, train)).loss, alphas)
    with torch.no_grad():
        for p, v in zip(weights, vector):
            p.add_(v, alpha=-2 * R.item())
    grads_n = torch.autograd.grad(model(train, draw(model, sampler, train)).loss, alphas)
    with torch.no_grad():
        for p, v in zip(weights, vector):
            p.add_(v, alpha=R.item())
    implicit = [(x - y) / (2 * R) for x, y in zip(grads_p, grads_n)]
    return [g - lr * clip_coef * ig for g, ig in zip(dalpha, implicit)]


COMPAT_CASES = {
    "rnn-c<1": (rnn_case, UnrollRule(0.0, 5e-7, 1e-3), 20.0),
    "rnn-c>1": (rnn_case, UnrollRule(0.0, 5e-7, 100.0), 2.0),  # scaled by c even when > 1
    "cnn": (cnn_case, UnrollRule(0.9, 3e-4, None), 0.025),
}


@pytest.mark.parametrize("case", list(COMPAT_CASES))
def test_compat_darts_reproduces_published_code(case):
    make_case, rule, lr = COMPAT_CASES[case]
    gen = torch.Generator().manual_seed(SEED + 4)
    model, train, val = make_case(gen)
    wopt = None
    if rule.momentum:
        wopt = torch.optim.SGD(model.weights(), lr=lr, momentum=rule.momentum)
        for p in model.weights():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
        wopt.step()
    ref = copy.deepcopy(model)
    ref_wopt = None
    if wopt is not None:
        ref_wopt = torch.optim.SGD(ref.weights(), lr=lr, momentum=rule.momentum)
        ref_wopt.load_state_dict(wopt.state_dict())
    expected = published_alpha_grad(ref, MaskSampler(11), lr, train, val, rule, ref_wopt)
    arch = make_architect(model, rule, seed=11, compat="darts")
    _, got = arch.alpha_grads(train, val, lr, wopt)
    torch.testing.assert_close(flat(got), flat(expected), rtol=1e-9, atol=1e-12)
    # Both leave the weights back at w, up to the rounding of the in-place w± passes.
    torch.testing.assert_close(flat(model.weights()), flat(ref.weights()), rtol=0, atol=1e-15)

    # ...and the maths mode really is different where the code departs from it.
    fresh, train2, val2 = make_case(torch.Generator().manual_seed(SEED + 4))
    if case.startswith("rnn"):
        _, maths = make_architect(fresh, rule, seed=11).alpha_grads(train2, val2, lr)
        assert (flat(maths) - flat(got)).abs().max() > 1e-6
