"""Reference recurrent search space (DARTS on Penn Treebank), in plain PyTorch.

One recurrent cell per time step, with input x (B, D) and previous hidden state h (B, D):

    [c0, h0] = [x ⊙ mx, h ⊙ mh] · W0,   s0 = BN(h + σ(c0) · (tanh(h0) − h))
    node j:  [C_i, H_i] = (s_i ⊙ mh) · W_j                       for every i < j
             s_j = BN( Σ_i Σ_{k≠none} p_{ij,k} · (s_i + σ(C_i) · (f_k(H_i) − s_i)) )
    h_new = mean(s_1, …, s_8)

with f ∈ {tanh, relu, sigmoid, identity}, p = softmax of α's row for edge (i, j), one W_j
per node shared by its predecessors, the mixture on the unmasked s_i, and one BatchNorm
(affine=False) shared by s0 and every node. The language model around it ties the embedding
and the decoder (emsize = nhid) and applies locked (variational) dropout masks that stay
fixed over the sequence: on embedding rows (dropoute), embeddings (dropouti), the cell's
inputs (dropoutx) and hidden states (dropouth), and the output (dropout). The training loss
adds temporal activation regularisation: β · mean((h_{t+1} − h_t)²) over the cell outputs.

Parameter names follow the original code (``encoder.weight``, ``rnns.0._W0``,
``rnns.0._Ws.j``, ``decoder.*``) so its state_dicts load; α is ``alphas_recurrent``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fastdarts.genotypes import RNN_PRIMITIVES, RNN_STEPS, RecurrentGenotype, derive_recurrent
from fastdarts.spaces.base import Batch, MaskSpec, SearchModel, SearchOutput

INIT_RANGE = 0.04
# The language models' dropout arguments, as the search and training settings name them too.
DROPOUTS = ("dropout", "dropouth", "dropoutx", "dropouti", "dropoute")
# The locked mask each one drops with, in the order the masks are drawn.
_MASK_OF = {"dropoute": "embedding", "dropouti": "input", "dropoutx": "x", "dropouth": "h"}
_MASK_OF["dropout"] = "output"

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}


def recurrent_mixed_reference(
    states: torch.Tensor, ch: torch.Tensor, probs: torch.Tensor
) -> torch.Tensor:
    """One node's mixture over its predecessors and the candidate activations.

    states (n, B, D) the predecessors s_i; ch (n, B, 2D) their projections [C_i, H_i];
    probs (n, K) the edges' op weights, K = len(RNN_PRIMITIVES) with ``none`` first.
    Returns (B, D) = Σ_i Σ_{k≠none} probs[i, k] · (s_i + σ(C_i) · (f_k(H_i) − s_i)).
    Leading dims (…, n, B, D) are batch dims (the fused op's vmap rules batch it so).
    """
    c, h = ch.chunk(2, dim=-1)
    c = torch.sigmoid(c)
    out = torch.zeros_like(states[..., 0, :, :])
    for k, name in enumerate(RNN_PRIMITIVES):
        if name == "none":
            continue
        candidate = states + c * (ACTIVATIONS[name](h) - states)
        out = out + (probs[..., k, None, None] * candidate).sum(-3)
    return out


def cell_forward_nodes(
    inputs: torch.Tensor,
    hidden: torch.Tensor,
    probs: torch.Tensor,
    x_mask: torch.Tensor | None,
    h_mask: torch.Tensor | None,
    w0: torch.Tensor,
    ws: Sequence[torch.Tensor],
    bn: Callable[[torch.Tensor], torch.Tensor],
    node_op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """The search cell over a sequence, node by node, in torch ops (see the module docstring).

    inputs (T, B, ninp), hidden (B, nhid), probs (E, K), masks (B, ·) or None, w0
    (ninp + nhid, 2·nhid), ws one (nhid, 2·nhid) per node, ``bn`` the shared BatchNorm,
    ``node_op`` one node's mixture → hidden states (T, B, nhid).
    """
    outputs = []
    for x in inputs:
        xm = x if x_mask is None else x * x_mask
        hm = hidden if h_mask is None else hidden * h_mask
        c0, h0 = (torch.cat([xm, hm], dim=-1) @ w0).chunk(2, dim=-1)
        s0 = bn(hidden + torch.sigmoid(c0) * (torch.tanh(h0) - hidden))
        states = s0.unsqueeze(0)
        offset = 0
        for j, w in enumerate(ws):
            masked = states if h_mask is None else states * h_mask
            # Under autocast the projection comes out in bfloat16; the mixture and BN run in
            # the states' precision (a no-op cast otherwise).
            ch = (masked @ w).to(states.dtype)
            s = bn(node_op(states, ch, probs[offset : offset + j + 1]))
            states = torch.cat([states, s.unsqueeze(0)])
            offset += j + 1
        hidden = states[1:].mean(0)
        outputs.append(hidden)
    return torch.stack(outputs)


class RecurrentSearchCell(nn.Module):
    """The DARTS recurrent search cell, run over a whole sequence.

    ``node_op`` computes one node's mixture (see :func:`recurrent_mixed_reference`, the
    default); fast backends swap in a fused op with the same signature, or set ``cell_op``
    to run the whole cell at once (``cell_op(cell, inputs, hidden, probs, x_mask, h_mask)``).
    """

    def __init__(self, ninp: int, nhid: int, steps: int = RNN_STEPS) -> None:
        super().__init__()
        self.nhid, self.steps = nhid, steps
        self._W0, self._Ws = init_projections(ninp, nhid, steps)
        self.bn = nn.BatchNorm1d(nhid, affine=False)
        self.node_op = recurrent_mixed_reference
        self.cell_op: Callable[..., torch.Tensor] | None = None

    def forward(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor,
        probs: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        h_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs (T, B, ninp), hidden (B, nhid), probs (E, K) → hidden states (T, B, nhid)."""
        if self.cell_op is not None:
            return self.cell_op(self, inputs, hidden, probs, x_mask, h_mask)
        return self.forward_nodes(inputs, hidden, probs, x_mask, h_mask)

    def forward_nodes(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor,
        probs: torch.Tensor,
        x_mask: torch.Tensor | None = None,
        h_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` node by node with ``node_op`` (whatever ``cell_op`` is)."""
        ws = list(self._Ws)
        return cell_forward_nodes(
            inputs, hidden, probs, x_mask, h_mask, self._W0, ws, self.bn, self.node_op
        )


def init_projections(ninp: int, nhid: int, steps: int) -> tuple[nn.Parameter, nn.ParameterList]:
    """A cell's W0 (ninp + nhid, 2·nhid) and one W_j (nhid, 2·nhid) per node, uniform in
    ±INIT_RANGE (the search and the derived cell alike)."""
    w0 = nn.Parameter(torch.empty(ninp + nhid, 2 * nhid).uniform_(-INIT_RANGE, INIT_RANGE))
    ws = nn.ParameterList(
        nn.Parameter(torch.empty(nhid, 2 * nhid).uniform_(-INIT_RANGE, INIT_RANGE))
        for _ in range(steps)
    )
    return w0, ws


class TiedLanguageModel(nn.Module):
    """The language model around a recurrent cell, shared by the search model and the
    evaluation network: tied embedding and decoder (emsize = nhid), locked dropout masks on
    embedding rows, embeddings, the cell's inputs and hidden states, and the output.
    ``build`` creates the modules in the original code's order (encoder, cell, decoder), so
    parameter names, initial values and random draws match it."""

    def build(
        self,
        ntoken: int,
        emsize: int,
        nhid: int,
        make_cell: Callable[[], nn.Module],
        **dropouts: float,
    ) -> None:
        """dropouts: the rates named in DROPOUTS."""
        if emsize != nhid:
            raise ValueError(f"the tied DARTS cell needs emsize == nhid, got {emsize} and {nhid}")
        self.ntoken, self.nhid = ntoken, nhid
        self.rates = {mask: dropouts[arg] for arg, mask in _MASK_OF.items()}
        self.encoder = nn.Embedding(ntoken, emsize)
        self.rnns = nn.ModuleList([make_cell()])
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -INIT_RANGE, INIT_RANGE)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> torch.Tensor:
        """A zero hidden state (B, nhid)."""
        return self.encoder.weight.new_zeros(batch_size, self.nhid)

    def locked_mask_specs(self, batch_size: int) -> dict[str, MaskSpec]:
        """Locked dropout masks, fixed over the sequence (rate 0 → no mask); all but the
        embedding rows' run over the batch (dim 0)."""
        shapes = {
            "embedding": (self.ntoken, 1),
            "input": (batch_size, self.nhid),
            "x": (batch_size, self.nhid),
            "h": (batch_size, self.nhid),
            "output": (batch_size, self.nhid),
        }
        return {
            k: MaskSpec(shapes[k], r, None if k == "embedding" else 0)
            for k, r in self.rates.items()
            if r > 0
        }

    def embed(self, tokens: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """tokens (T, B) → the cell's inputs (T, B, emsize), embedding dropouts applied."""
        weight = self.encoder.weight
        if "embedding" in masks:
            weight = weight * masks["embedding"]
        emb = F.embedding(tokens, weight)
        return emb * masks["input"] if "input" in masks else emb

    def decode(self, hiddens: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """The cell's outputs (T, B, nhid) → logits (T, B, ntoken), output dropout applied."""
        return self.decoder(hiddens * masks["output"] if "output" in masks else hiddens)


class RNNSearchModel(SearchModel, TiedLanguageModel):
    """The DARTS recurrent search language model (reference implementation).

    Defaults are the paper's search settings: emsize = nhid = 300, dropout 0.75 (output),
    dropouth 0.25, dropoutx 0.75, dropouti 0.2, dropoute 0, TAR β = 1e-3.
    """

    space = "rnn"
    tied_weight_names = ("encoder.weight",)
    # The loss of logits (N, V) and targets (N,); a backend may put a fused one here.
    cross_entropy = staticmethod(F.cross_entropy)

    def __init__(
        self,
        ntoken: int,
        emsize: int = 300,
        nhid: int = 300,
        steps: int = RNN_STEPS,
        dropout: float = 0.75,
        dropouth: float = 0.25,
        dropoutx: float = 0.75,
        dropouti: float = 0.2,
        dropoute: float = 0.0,
        tar: float = 1e-3,
    ) -> None:
        super().__init__()
        self.steps, self.tar = steps, tar
        self.build(
            ntoken,
            emsize,
            nhid,
            lambda: RecurrentSearchCell(emsize, nhid, steps),
            dropout=dropout,
            dropouth=dropouth,
            dropoutx=dropoutx,
            dropouti=dropouti,
            dropoute=dropoute,
        )
        n_edges = steps * (steps + 1) // 2
        self.alphas_recurrent = nn.Parameter(1e-3 * torch.randn(n_edges, len(RNN_PRIMITIVES)))

    def mask_specs(self, batch: Batch) -> dict[str, MaskSpec]:
        return self.locked_mask_specs(batch.inputs.shape[1])

    def forward(self, batch: Batch, masks: dict[str, torch.Tensor] | None = None) -> SearchOutput:
        """batch.inputs / targets (T, B) token ids, batch.state (B, nhid).

        ``masks`` from the mask sampler (training); None runs without dropout (evaluation).
        """
        masks = masks or {}
        emb = self.embed(batch.inputs, masks)
        probs = torch.softmax(self.alphas_recurrent, dim=-1)
        hiddens = self.rnns[0](emb, batch.state, probs, masks.get("x"), masks.get("h"))
        logits = self.decode(hiddens, masks)
        loss = self.cross_entropy(logits.reshape(-1, self.ntoken), batch.targets.reshape(-1))
        if hiddens.shape[0] > 1:
            penalty = self.tar * (hiddens[1:] - hiddens[:-1]).pow(2).mean()
        else:
            penalty = loss.new_zeros(())
        return SearchOutput(loss, penalty, hiddens[-1], None)

    def genotype(self) -> RecurrentGenotype:
        return derive_recurrent(self.alphas_recurrent, self.steps)
