"""The recurrent evaluation network: a single-layer language model around a derived cell.

The cell is the search cell with one op per node and no BatchNorm. With input x (B, D) and
previous hidden state h (B, D):

    [c0, h0] = [x ⊙ mx, h ⊙ mh] · W0,    s0 = h + σ(c0) · (tanh(h0) − h)
    node j (one input s_i, op f):  [c, g] = (s_i ⊙ mh) · W_j,   s_j = s_i + σ(c) · (f(g) − s_i)
    h_new = mean of the states listed in ``concat``

Every node (s0 included, with f = tanh) is the search space's recurrent mixture with one
predecessor and all its weight on one op, so a fused node op (``node_op``, the signature
of :func:`fastdarts.recurrent_mixed`: states (1, B, D), [c, g] (1, B, 2D), one-hot weights
(1, 5)) computes it in one kernel per node; without one the formula runs in torch ops.

The language model ties the embedding and the decoder (emsize = nhid) and uses the same
locked dropout masks as the search model (embedding rows, embeddings, cell inputs, hidden
states, output). Parameter names follow the original code (``encoder.weight``,
``rnns.0._W0``, ``rnns.0._Ws.j``, ``decoder.bias``) so its state_dicts load.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastdarts.genotypes import RNN_PRIMITIVES, RecurrentGenotype
from fastdarts.spaces.base import MaskSpec
from fastdarts.spaces.rnn import ACTIVATIONS, TiedLanguageModel, init_projections

NodeOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DARTSCell(nn.Module):
    """A derived recurrent cell, run over a whole sequence; ``node_op`` None or a fused
    mixture (see the module docstring)."""

    def __init__(
        self, ninp: int, nhid: int, genotype: RecurrentGenotype, node_op: NodeOp | None = None
    ) -> None:
        super().__init__()
        self.nhid = nhid
        self.genotype = genotype
        self.node_op = node_op
        steps = len(genotype.recurrent)
        names = ["tanh"] + [name for name, _ in genotype.recurrent]
        self._activations = [ACTIVATIONS[name] for name in names]
        # Each node's op weights for node_op; not persistent, so the state_dict keeps the
        # original code's keys.
        ops = torch.tensor([RNN_PRIMITIVES.index(name) for name in names])
        one_hot = F.one_hot(ops, len(RNN_PRIMITIVES)).to(torch.get_default_dtype())
        self.register_buffer("_one_hot", one_hot, persistent=False)
        self._W0, self._Ws = init_projections(ninp, nhid, steps)

    def forward(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        h_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs (T, B, ninp), hidden (B, nhid) → hidden states (T, B, nhid)."""
        outputs = []
        for x in inputs:
            hidden = self._step(x, hidden, x_mask, h_mask)
            outputs.append(hidden)
        return torch.stack(outputs)

    def _step(self, x, h_prev, x_mask, h_mask):
        xm = x if x_mask is None else x * x_mask
        hm = h_prev if h_mask is None else h_prev * h_mask
        states = [self._node(0, h_prev, torch.cat([xm, hm], dim=-1) @ self._W0)]
        for j, (_, i) in enumerate(self.genotype.recurrent):
            s_prev = states[i]
            masked = s_prev if h_mask is None else s_prev * h_mask
            states.append(self._node(j + 1, s_prev, masked @ self._Ws[j]))
        return torch.stack([states[i] for i in self.genotype.concat]).mean(0)

    def _node(self, n: int, s: torch.Tensor, ch: torch.Tensor) -> torch.Tensor:
        """Node n (0: s0) from its predecessor s (B, D) and ch = [c, g] (B, 2D):
        s + σ(c) · (f(g) − s), f the node's activation."""
        if self.node_op is not None:
            return self.node_op(s[None], ch[None], self._one_hot[n : n + 1])
        c, g = ch.chunk(2, dim=-1)
        return s + torch.sigmoid(c) * (self._activations[n](g) - s)


class RNNModel(TiedLanguageModel):
    """Language model: tied embedding → DARTSCell → tied decoder.

    Defaults are the paper's evaluation settings: emsize = nhid = 850, dropout 0.75
    (output), dropouth 0.25, dropoutx 0.75, dropouti 0.2, dropoute 0.1. ``node_op`` runs
    the cell's nodes (None: torch ops; see the module docstring).
    """

    def __init__(
        self,
        ntoken: int,
        genotype: RecurrentGenotype,
        emsize: int = 850,
        nhid: int = 850,
        dropout: float = 0.75,
        dropouth: float = 0.25,
        dropoutx: float = 0.75,
        dropouti: float = 0.2,
        dropoute: float = 0.1,
        node_op: NodeOp | None = None,
    ) -> None:
        super().__init__()
        self.build(
            ntoken,
            emsize,
            nhid,
            lambda: DARTSCell(emsize, nhid, genotype, node_op),
            dropout=dropout,
            dropouth=dropouth,
            dropoutx=dropoutx,
            dropouti=dropouti,
            dropoute=dropoute,
        )

    def mask_specs(self, batch_size: int) -> dict[str, MaskSpec]:
        """Locked dropout masks for one training pass, fixed over the sequence."""
        return self.locked_mask_specs(batch_size)

    def forward(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        masks: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (T, B) ids, hidden (B, nhid) → logits (T, B, ntoken), hiddens (T, B, nhid).

        ``masks`` (from a MaskSampler, shaped as ``mask_specs``) for training; None runs
        without dropout. ``hiddens`` are the cell outputs before the output dropout.
        """
        masks = masks or {}
        hiddens = self.rnns[0](self.embed(tokens, masks), hidden, masks.get("x"), masks.get("h"))
        return self.decode(hiddens, masks), hiddens
