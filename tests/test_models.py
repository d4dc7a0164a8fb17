"""The derived recurrent cell's dropout masks, against a hand computation of its formula."""

from __future__ import annotations

import torch

from fastdarts.genotypes import NAMED_GENOTYPES
from fastdarts.models.rnn import DARTSCell

ACT = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda v: v}


def by_hand(cell, x, h, mx, mh, highway_masked=False):
    """One step of the cell's formula, written out node by node: x ⊙ mx and h ⊙ mh feed
    node 0, each predecessor s_i enters its node's matmul as s_i ⊙ mh, and the highway term
    takes s_i itself (``highway_masked``: s_i ⊙ mh there too, the variant to tell apart)."""
    w0, ws = cell._W0.detach(), [w.detach() for w in cell._Ws]
    d = h.shape[1]
    pre = torch.cat([x * mx, h * mh], dim=1) @ w0
    carry = h * mh if highway_masked else h
    states = [carry + torch.sigmoid(pre[:, :d]) * (torch.tanh(pre[:, d:]) - carry)]
    for (op, i), w in zip(cell.genotype.recurrent, ws):
        pre = (states[i] * mh) @ w
        carry = states[i] * mh if highway_masked else states[i]
        states.append(carry + torch.sigmoid(pre[:, :d]) * (ACT[op](pre[:, d:]) - carry))
    return sum(states[i] for i in cell.genotype.concat) / len(cell.genotype.concat)


def test_dropout_masks_hit_the_inputs_of_the_matmuls_not_the_highway():
    """Two steps of DARTS_V2's cell (nodes reading s0, s1, s2, s3 and s5) with 0/2 masks
    on x (ninp ≠ nhid) and h, fixed over the sequence: each step is the hand computation,
    which the highway taking the masked state, or no mask on a predecessor, would change."""
    torch.manual_seed(0)
    ninp, nhid, batch = 4, 5, 3
    cell = DARTSCell(ninp, nhid, NAMED_GENOTYPES["rnn"]["DARTS_V2"]).double()
    with torch.no_grad():  # weights large enough for every term to matter
        for w in cell.parameters():
            w.copy_(torch.randn_like(w) * 0.6)
    inputs = torch.randn(2, batch, ninp, dtype=torch.float64)
    h0 = torch.randn(batch, nhid, dtype=torch.float64)
    mx = 2.0 * torch.randint(0, 2, (batch, ninp), dtype=torch.float64)
    mh = 2.0 * torch.randint(0, 2, (batch, nhid), dtype=torch.float64)
    assert 0 < mx.count_nonzero() < mx.numel() and 0 < mh.count_nonzero() < mh.numel()
    with torch.no_grad():
        got = cell(inputs, h0, mx, mh)
    first = by_hand(cell, inputs[0], h0, mx, mh)
    want = torch.stack([first, by_hand(cell, inputs[1], first, mx, mh)])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    ones_h = torch.ones_like(mh)
    for other in (
        by_hand(cell, inputs[0], h0, mx, mh, highway_masked=True),
        by_hand(cell, inputs[0], h0, torch.ones_like(mx), mh),
        by_hand(cell, inputs[0], h0, mx, ones_h),
    ):
        assert (other - got[0]).abs().max() > 1e-3
    # Without masks the cell is the formula with masks of ones.
    with torch.no_grad():
        plain = cell(inputs[:1], h0)[0]
    assert torch.allclose(plain, by_hand(cell, inputs[0], h0, torch.ones_like(mx), ones_h))
