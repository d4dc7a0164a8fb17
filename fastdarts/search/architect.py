r"""The architecture (α) step of DARTS: first or second order (reference implementation).

First order: α-grad = ∇α L_val(w, α).

Second order, one rule for both spaces (η the weight step's learning rate, λ its weight
decay, μ its momentum and buf its momentum buffer, zero before the first step):

    g  = ∇w L_train(w, α)                       c = min(1, clip / ‖g‖)   (1 with no clip)
    w' = w − η · (μ · buf + c · g + λ · w)
    v  = ∇w' L_val(w', α), clipped to norm ``clip`` as well (when there is one)
    ε  = r / ‖v‖,  r = 0.01,   w± = w ± ε · v
    α-grad = ∇α L_val(w', α) − η · c · (∇α L_train(w⁺, α) − ∇α L_train(w⁻, α)) / (2ε)

- CNN: μ = 0.9, λ = 3e-4, no clip, η the cosine-scheduled learning rate.
- RNN: μ = 0, λ = 5e-7, clip 0.25, η = ξ, the step's learning rate after its rescaling by
  seq_len / bptt; the losses are the plain NLL (no activation regularisation).

The last term is η·c times a central finite difference of the Hessian-vector product
∇²_{α,w} L_train · v; its truncation error is (ε²/6)·∂³ of ∇α L_train along v, i.e. of
relative order r² ≈ 1e-4 times the loss's third- to first-derivative ratio along v̂
(``hvp="exact"`` replaces it by double backward). The passes at w' and w± reuse the masks
of the matching pass at w (the train masks for w±), so the difference quotient
differentiates one function; they update no BatchNorm running statistics.

``amp="bf16"`` runs the passes at w and w' (and the first-order pass) under bfloat16
autocast; the w± passes stay in float32, because ε·v is below bfloat16's resolution for
most weights (w⁺ and w⁻ would round to the same value). ``hvp="exact"`` differentiates the
autocast graph instead. For the same reason the w± passes run in full float32 on every
device (:func:`ieee_fp32`): no TF32, which torch allows by default in cuDNN convolutions and
whose 2⁻¹¹ relative steps are far coarser than εv (norm r over all weights: 7e-6 per weight
as root mean square in the paper's CNN, against a median |w| near 0.1).

``foreach=True`` computes the per-weight arithmetic (the virtual step, the norms, v's clip,
w±) as multi-tensor ``torch._foreach_*`` ops: a few dispatches instead of several per
weight tensor (the small CNN has 283 fused, 1,399 under the reference), the same values
up to rounding.

``compat="darts"`` reproduces the published code instead, where it departs from the maths:
its correction is scaled by clip/‖g‖ even when that exceeds 1 (nothing was clipped); its
virtual model keeps the old tied embedding (the state_dict load of the copied model writes
the stale ``decoder.weight`` over the updated ``encoder.weight``); every pass draws new
dropout masks, w⁺ and w⁻ included; w± are formed in place (w + εv − 2εv + εv, which
rounds); and the w± passes update BatchNorm running statistics.

In a distributed run (:mod:`fastdarts.distributed`) every gradient above is the global
batch's: each rank differentiates its shard's loss weighted by its share of the batch and
the results are summed across ranks before use (g; ∇α and v at w' in one all-reduce; the w±
difference quotient, or the exact HVP, in another), so the clip coefficients and ε come from
the global g and v and every rank takes the same α step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import functional_call

from fastdarts import distributed
from fastdarts.search.masks import MaskSampler
from fastdarts.spaces.base import Batch, SearchModel, SearchOutput

COMPAT_MODES = ("darts",)
HVP_MODES = ("fd", "exact")
AMP_MODES = ("off", "bf16")


def autocast(model: torch.nn.Module, amp: str) -> torch.autocast:
    """Autocast to bfloat16 on ``model``'s device when ``amp == "bf16"`` (matmuls and
    convolutions in bfloat16; softmax, losses and reductions stay float32), else a no-op."""
    device_type = next(model.parameters()).device.type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp == "bf16")


# The settings TF32 goes by for matmuls and convolutions, in torch's fp32_precision API (set
# through it, the legacy allow_tf32 flags are unreadable until the settings are restored).
_PRECISIONS = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """Within the block float32 matmuls and convolutions compute in full float32 (no TF32);
    the previous settings are restored after it."""
    saved = [backend.fp32_precision for backend in _PRECISIONS]
    try:
        for backend in _PRECISIONS:
            backend.fp32_precision = "ieee"
        yield
    finally:
        for backend, precision in zip(_PRECISIONS, saved):
            backend.fp32_precision = precision


@dataclass(frozen=True)
class UnrollRule:
    """The virtual step's hyper-parameters besides η (see the module docstring)."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    clip: float | None = None


def _norm(tensors: list[torch.Tensor], foreach: bool = False) -> torch.Tensor:
    norms = (
        torch._foreach_norm(tensors) if foreach else [torch.linalg.vector_norm(t) for t in tensors]
    )
    return torch.linalg.vector_norm(torch.stack(norms))


class Architect:
    """Computes α-gradients and steps α's optimiser.

    ``step(train, val, lr, weight_optimizer)`` runs one α step and returns the validation
    pass's output (its ``state`` is the RNN's next validation hidden state).
    """

    def __init__(
        self,
        model: SearchModel,
        optimizer: torch.optim.Optimizer,
        sampler: MaskSampler,
        *,
        order: int = 2,
        rule: UnrollRule = UnrollRule(),
        compat: str | None = None,
        hvp: str = "fd",
        fd_radius: float = 0.01,
        batched_fd: bool = False,
        amp: str = "off",
        foreach: bool = False,
    ) -> None:
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        if compat not in (None, *COMPAT_MODES):
            raise ValueError(f"compat must be one of {COMPAT_MODES} or None, got {compat!r}")
        if hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {hvp!r}")
        if compat and hvp != "fd":
            raise ValueError("compat='darts' reproduces the finite-difference HVP only")
        if amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
        if compat and batched_fd:
            raise ValueError("compat='darts' runs w+ and w- one after the other, in place")
        if compat and foreach:
            raise ValueError("compat='darts' steps the weights one by one, as the published code")
        self.model, self.optimizer, self.sampler = model, optimizer, sampler
        self.order, self.rule, self.compat, self.hvp = order, rule, compat, hvp
        self.fd_radius, self.batched_fd, self.amp = fd_radius, batched_fd, amp
        self.foreach = foreach

    def step(
        self,
        train: Batch,
        val: Batch,
        lr: float | torch.Tensor,
        weight_optimizer: torch.optim.Optimizer | None = None,
    ) -> SearchOutput:
        """One α update; ``lr`` is η (ξ for the RNN), ``weight_optimizer`` holds the momentum."""
        out, grads = self.alpha_grads(train, val, lr, weight_optimizer)
        for alpha, grad in zip(self.model.arch_parameters(), grads):
            alpha.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def alpha_grads(
        self,
        train: Batch,
        val: Batch,
        lr: float | torch.Tensor,
        weight_optimizer: torch.optim.Optimizer | None = None,
    ) -> tuple[SearchOutput, list[torch.Tensor]]:
        """The α-gradient of this step (without applying it) and the validation output."""
        if self.order == 1:
            with autocast(self.model, self.amp):
                out = self.model(val, self._masks(val))
            return out, _global_grad(out.loss, val, self.model.arch_parameters())
        return self._second_order(train, val, lr, weight_optimizer)

    def _masks(self, batch: Batch) -> dict[str, torch.Tensor]:
        dtype = next(iter(self.model.weights())).dtype
        return self.sampler.draw(self.model.mask_specs(batch), dtype)

    def _second_order(self, train, val, lr, weight_optimizer):
        model, rule = self.model, self.rule
        alphas = model.arch_parameters()
        names, weights = zip(*model.named_weights())

        train_masks = self._masks(train)
        with autocast(model, self.amp):
            out_train = model(train, train_masks)
        # This rank's part of g keeps its graph for the exact HVP; the step uses the sum.
        g_local = torch.autograd.grad(
            distributed.scale(out_train.loss, train.share),
            weights,
            create_graph=self.hvp == "exact",
        )
        g = distributed.all_sum(g_local)
        c_step = c_hvp = torch.ones((), dtype=weights[0].dtype, device=weights[0].device)
        if rule.clip is not None:
            with torch.no_grad():
                coef = rule.clip / (_norm(g, self.foreach) + 1e-6)
            c_step = coef.clamp(max=1.0)
            c_hvp = coef if self.compat else c_step

        if self.foreach:
            virtual = self._virtual_foreach(weights, g, c_step, lr, weight_optimizer)
        else:
            virtual = self._virtual(names, weights, g, c_step, lr, weight_optimizer)
        virtual = [t.requires_grad_() for t in virtual]

        val_masks = self._masks(val)
        with model.frozen_bn_stats(), autocast(model, self.amp):
            out_val = functional_call(model, dict(zip(names, virtual)), (val, val_masks))
        grads = _global_grad(out_val.loss, val, [*alphas, *virtual])
        dalpha, v = list(grads[: len(alphas)]), list(grads[len(alphas) :])
        if rule.clip is not None:
            c_v = (rule.clip / (_norm(v, self.foreach) + 1e-6)).clamp(max=1.0)
            v = torch._foreach_mul(v, c_v) if self.foreach else [t * c_v for t in v]

        if self.hvp == "exact":
            hvp = torch.autograd.grad(g_local, alphas, grad_outputs=v)
        else:
            with ieee_fp32():
                if self.compat:
                    hvp = self._hvp_fd_in_place(v, train)
                elif self.batched_fd:
                    hvp = self._hvp_fd_batched(names, weights, v, train, train_masks)
                else:
                    hvp = self._hvp_fd(names, weights, v, train, train_masks)
        # The HVP is linear in the ranks' losses: one all-reduce for both w± passes.
        hvp = distributed.all_sum(hvp)
        return out_val, [d - lr * c_hvp * h for d, h in zip(dalpha, hvp)]

    def _virtual(self, names, weights, g, c_step, lr, weight_optimizer) -> list[torch.Tensor]:
        """w' = w − η·(μ·buf + c·g + λ·w), weight by weight (the tied embedding kept as it
        was under ``compat``)."""
        model, rule = self.model, self.rule
        with torch.no_grad():
            virtual = []
            for name, p, gi in zip(names, weights, g):
                if self.compat and name in model.tied_weight_names:
                    virtual.append(p.detach().clone())
                    continue
                step = c_step * gi + rule.weight_decay * p
                if rule.momentum:
                    buf = self._momentum_buffer(weight_optimizer, p)
                    if buf is not None:
                        step = step + rule.momentum * buf
                virtual.append(p - lr * step)
        return virtual

    def _virtual_foreach(self, weights, g, c_step, lr, weight_optimizer) -> list[torch.Tensor]:
        """:meth:`_virtual` as multi-tensor ops (c·g skipped when nothing is clipped)."""
        rule = self.rule
        with torch.no_grad():
            step = torch._foreach_mul(g, c_step) if rule.clip is not None else list(g)
            step = torch._foreach_add(step, weights, alpha=rule.weight_decay)
            # Momentum where a weight has a buffer, as _virtual (a weight without a gradient
            # yet has none).
            bufs = [self._momentum_buffer(weight_optimizer, p) for p in weights]
            held = [(s, b) for s, b in zip(step, bufs) if b is not None]
            if rule.momentum and held:
                steps, held_bufs = zip(*held)
                torch._foreach_add_(list(steps), list(held_bufs), alpha=rule.momentum)
            return torch._foreach_sub(weights, torch._foreach_mul(step, lr))

    @staticmethod
    def _momentum_buffer(optimizer, p):
        if optimizer is None:
            return None
        return optimizer.state.get(p, {}).get("momentum_buffer")

    def _hvp_fd(self, names, weights, v, train, masks):
        """(∇α L_train(w + εv) − ∇α L_train(w − εv)) / 2ε, evaluated functionally."""
        model, alphas = self.model, self.model.arch_parameters()
        eps = self.fd_radius / _norm(v, self.foreach)
        if self.foreach:
            with torch.no_grad():
                ev = torch._foreach_mul(v, eps)
        diffs = []
        for sign in (1.0, -1.0):
            if self.foreach:
                with torch.no_grad():
                    shifted = dict(zip(names, torch._foreach_add(weights, ev, alpha=sign)))
            else:
                shifted = {n: p.detach() + (sign * eps) * t for n, p, t in zip(names, weights, v)}
            with model.frozen_bn_stats():
                loss = functional_call(model, shifted, (train, masks)).loss
            diffs.append(torch.autograd.grad(distributed.scale(loss, train.share), alphas))
        return [(gp - gn) / (2 * eps) for gp, gn in zip(*diffs)]

    def _hvp_fd_batched(self, names, weights, v, train, masks):
        """:meth:`_hvp_fd` as one pass: w⁺ and w⁻ stacked on a new leading dim and run under
        vmap (each half normalised by its own BatchNorm statistics, the masks shared), and
        ∇α(L(w⁺) − L(w⁻)) from a single backward."""
        model, alphas = self.model, self.model.arch_parameters()
        eps = self.fd_radius / _norm(v, self.foreach)
        if self.foreach:
            with torch.no_grad():
                # Written in place by four multi-tensor ops, where the expression below is
                # two launches per weight (566 a small CNN step, counted on the CUDA path).
                pairs = [p.new_empty(2, *p.shape) for p in weights]
                plus, minus = [t[0] for t in pairs], [t[1] for t in pairs]
                ev = torch._foreach_mul(v, eps)
                torch._foreach_copy_(plus + minus, weights + weights)
                torch._foreach_add_(plus, ev)
                torch._foreach_sub_(minus, ev)
            stacked = dict(zip(names, pairs))
        else:
            # ±ε from ε on the device (a torch.tensor([1, -1]) would be a blocking host copy).
            shifts = torch.stack([eps, -eps])
            stacked = {
                n: p.detach() + shifts.view(2, *[1] * p.dim()) * t
                for n, p, t in zip(names, weights, v)
            }

        def loss_at(w: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(model, w, (train, masks)).loss

        with model.frozen_bn_stats():
            losses = torch.func.vmap(loss_at)(stacked)
        diff = torch.autograd.grad(distributed.scale(losses[0] - losses[1], train.share), alphas)
        return [d / (2 * eps) for d in diff]

    def _hvp_fd_in_place(self, v, train):
        """The published code's version: w moved in place, new masks for each pass."""
        model, alphas, weights = self.model, self.model.arch_parameters(), self.model.weights()
        eps = self.fd_radius / _norm(v)
        diffs, moved = [], 0.0
        try:
            for shift in (float(eps), -2 * float(eps)):
                with torch.no_grad():
                    for p, t in zip(weights, v):
                        p.add_(t, alpha=shift)
                moved += shift
                loss = model(train, self._masks(train)).loss
                diffs.append(torch.autograd.grad(distributed.scale(loss, train.share), alphas))
        finally:  # w back where it was, also when a pass raises (out of memory, say)
            with torch.no_grad():
                for p, t in zip(weights, v):
                    p.add_(t, alpha=-moved)
        return [(gp - gn) / (2 * eps) for gp, gn in zip(*diffs)]


def _global_grad(
    loss: torch.Tensor, batch: Batch, inputs: list[torch.Tensor]
) -> list[torch.Tensor]:
    """∇ of the global batch's loss: this rank's loss weighted by its share, summed across
    ranks in one all-reduce (``torch.autograd.grad`` as it is in one process)."""
    return distributed.all_sum(torch.autograd.grad(distributed.scale(loss, batch.share), inputs))
