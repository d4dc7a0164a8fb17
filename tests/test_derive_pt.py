"""DARTS-PT selection: the α masking it relies on, the decision order, a hand-built supernet
where the strongest α is not the op that matters, and end-to-end runs on real search
checkpoints (deterministic, resumable), plus ``--method argmax``."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import CNN_TINY, RNN_TINY, assert_equal_state

from fastdarts.data import cifar
from fastdarts.derive.__main__ import main as derive
from fastdarts.derive.pt import (
    CELLS,
    STATE_FILE,
    Decision,
    Selector,
    TaskSupernet,
    harm_key,
    one_hot,
    plan,
    removed_op,
)
from fastdarts.errors import ConfigError
from fastdarts.genotypes import (
    CNN_PRIMITIVES,
    PRIMITIVES,
    RNN_PRIMITIVES,
    derive_recurrent,
    load_genotype,
    to_dict,
)
from fastdarts.ops.extension import unavailable_reason
from fastdarts.runs import TRAIN_KIND, read_checkpoint
from fastdarts.search.__main__ import main as search
from fastdarts.spaces import Batch
from fastdarts.spaces.cnn import MixedOp
from fastdarts.spaces.rnn import recurrent_mixed_reference

NONE = RNN_PRIMITIVES.index("none")


pytestmark = pytest.mark.usefixtures("datasets_read_once")


def test_removed_op_zeroes_its_weight_and_keeps_the_others():
    row = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.2], dtype=torch.float64)
    p = torch.softmax(row, -1)
    for k in range(1, 5):
        q = torch.softmax(removed_op(row, k, NONE), -1)
        expected = p.clone()
        expected[NONE] += p[k]
        expected[k] = 0.0
        assert q[k] == 0.0  # exactly
        assert torch.allclose(q, expected, rtol=1e-15, atol=1e-16)
    assert torch.equal(torch.softmax(one_hot(row, 3), -1), torch.eye(5, dtype=torch.float64)[3])


def test_masked_rnn_mixture_is_the_mixture_without_the_op():
    torch.manual_seed(0)
    states, ch = torch.randn(3, 4, 6, dtype=torch.float64), torch.randn(3, 4, 12)
    ch = ch.double()
    alpha = torch.randn(3, 5, dtype=torch.float64)
    masked = alpha.clone()
    masked[1] = removed_op(alpha[1], 2, NONE)  # relu off on edge 1
    masked[2] = one_hot(alpha[2], NONE)  # edge 2 removed
    zeroed = torch.softmax(alpha, -1)
    zeroed[1, 2] = 0.0
    got = recurrent_mixed_reference(states, ch, torch.softmax(masked, -1))
    want = recurrent_mixed_reference(states[:2], ch[:2], zeroed[:2])
    assert torch.allclose(got, want, rtol=1e-13, atol=1e-14)


def test_masked_cnn_mixture_is_the_mixture_without_the_op():
    torch.manual_seed(0)
    op = MixedOp(4, 1).double().eval()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    alpha = torch.randn(8, dtype=torch.float64)
    weights = torch.softmax(alpha, -1)
    zeroed = weights.clone()
    zeroed[4] = 0.0
    got = op(x, torch.softmax(removed_op(alpha, 4, 0), -1))
    assert torch.allclose(got, op(x, zeroed), rtol=1e-13, atol=1e-14)
    assert torch.equal(op(x, torch.softmax(one_hot(alpha, 0), -1)), torch.zeros_like(x))


@pytest.mark.parametrize("space", ["rnn", "cnn"])
def test_plan_decides_in_rounds_every_edge_then_every_node(space):
    """DARTS-PT's rounds: one edge of every cell per round (a seeded shuffle per cell) until
    all are decided, then one node of every cell per round; sequential keeps index order."""
    cells = CELLS[space]
    decisions = plan(cells, seed=3)
    assert decisions == plan(cells, seed=3) and decisions != plan(cells, seed=4)
    rounds = sorted({d.round for d in decisions})
    assert rounds == list(range(len(rounds)))
    for r in rounds:  # each round: one decision per cell, of one kind, cells in order
        members = [d for d in decisions if d.round == r]
        assert [d.alpha for d in members] == list(cells) and len({d.kind for d in members}) == 1
    assert [d.round for d in decisions] == sorted(d.round for d in decisions)
    for name, shape in cells.items():
        ops = [d.index for d in decisions if d.alpha == name and d.kind == "op"]
        nodes = [d.index for d in decisions if d.alpha == name and d.kind == "edge"]
        # Nodes with no more inputs than they keep need no decision.
        wanted = [n for n in range(shape.steps) if shape.n_inputs + n > shape.keep]
        assert sorted(ops) == list(range(shape.n_edges)) and ops != sorted(ops)  # shuffled
        assert sorted(nodes) == wanted and nodes != wanted
        kinds = [d.kind for d in decisions if d.alpha == name]
        assert kinds == ["op"] * shape.n_edges + ["edge"] * len(wanted)
        sequential = [d.index for d in plan(cells, 3, "sequential") if d.alpha == name]
        assert sequential == list(range(shape.n_edges)) + wanted
    assert len(rounds) == {"rnn": 36 + 7, "cnn": 14 + 3}[space]
    if space == "cnn":  # each cell draws its own order
        normal, reduce = ([d.index for d in decisions if d.alpha == name] for name in cells)
        assert normal != reduce


def test_harm_key_orders_by_loss_or_by_accuracy_then_loss():
    """Larger = more harmful: the loss; or the lower accuracy, a tie going to the higher loss."""
    metrics = {"loss": 2.5, "acc": 0.75}
    assert harm_key(metrics, "loss") == (2.5,)
    assert harm_key(metrics, "acc") == (-0.75, 2.5)


def scripted(alpha: torch.nn.Parameter, scores: list[dict[str, float]]):
    """An evaluate that answers ``scores`` in turn and records α as each call saw it."""
    seen = []

    def evaluate() -> dict[str, float]:
        seen.append(alpha.detach().clone())
        return scores[len(seen) - 1]

    return evaluate, seen


@pytest.mark.parametrize(
    ("crit", "scores", "chosen"),
    [
        # relu and sigmoid tie for the highest loss: the lower index, relu.
        ("loss", [{"loss": 1.0}, {"loss": 2.0}, {"loss": 2.0}, {"loss": 0.5}], "relu"),
        # relu and sigmoid tie for the lowest accuracy: the higher loss, sigmoid.
        (
            "acc",
            [
                {"acc": 0.5, "loss": 9.0},
                {"acc": 0.25, "loss": 1.0},
                {"acc": 0.25, "loss": 3.0},
                {"acc": 0.75, "loss": 0.0},
            ],
            "sigmoid",
        ),
    ],
)
def test_op_decision_breaks_ties(crit, scores, chosen):
    """Each candidate op's removal is measured in order (that op's weight 0, α restored
    after); the most harmful removal's op is kept and the edge projected onto it."""
    torch.manual_seed(0)
    alpha = torch.nn.Parameter(torch.randn(36, 5, dtype=torch.float64))
    before = alpha.detach().clone()
    evaluate, seen = scripted(alpha, scores)
    selector = Selector({"alphas_recurrent": alpha}, CELLS["rnn"], evaluate, RNN_PRIMITIVES, crit)
    record = selector.decide(Decision("op", "alphas_recurrent", 3, round=0))
    assert record["candidates"] == ["tanh", "relu", "sigmoid", "identity"]
    assert record["scores"] == scores and record["chosen"] == [chosen]
    for k, measured in enumerate(seen, start=1):
        assert torch.equal(measured[3], removed_op(before[3], k, NONE))
        assert torch.equal(measured[torch.arange(36) != 3], before[torch.arange(36) != 3])
    expected = before.clone()
    expected[3] = one_hot(before[3], RNN_PRIMITIVES.index(chosen))
    assert torch.equal(alpha.detach(), expected)


def test_edge_decision_keeps_the_lower_edges_of_a_tie():
    """Node 2 of the normal cell (α rows 5..8): removing edge 5 hurts least and 6, 7, 8 tie,
    so 6 and 7 are kept; 5 and 8 are removed (all weight on none), the rest untouched."""
    torch.manual_seed(0)
    cells = CELLS["cnn"]
    alphas = {name: torch.nn.Parameter(torch.randn(14, 8, dtype=torch.float64)) for name in cells}
    before = {name: a.detach().clone() for name, a in alphas.items()}
    evaluate, seen = scripted(alphas["alphas_normal"], [{"loss": x} for x in (1.0, 3.0, 3.0, 3.0)])
    selector = Selector(alphas, cells, evaluate, CNN_PRIMITIVES, "loss")
    record = selector.decide(Decision("edge", "alphas_normal", 2, round=0))
    assert record["candidates"] == [5, 6, 7, 8] and record["chosen"] == [6, 7]
    for e, measured in zip(range(5, 9), seen, strict=True):
        expected = before["alphas_normal"].clone()
        expected[e] = one_hot(expected[e], 0)
        assert torch.equal(measured, expected)
    expected = before["alphas_normal"].clone()
    expected[[5, 8]] = one_hot(expected[0], 0)
    assert torch.equal(alphas["alphas_normal"].detach(), expected)
    assert torch.equal(alphas["alphas_reduce"].detach(), before["alphas_reduce"])


@pytest.mark.parametrize(("space", "batches"), [("rnn", 20), ("cnn", 4)])
def test_supernet_measures_eval_batches_batches(space, batches):
    """TaskSupernet's measurement runs the model on ``eval_batches`` validation batches,
    or on all of them with None."""
    from test_engine import make_task

    task = make_task(space, 3)
    calls = []
    task.model.register_forward_hook(lambda *_: calls.append(1))
    for eval_batches, want in ((2, 2), (3, 3), (None, batches)):
        calls.clear()
        TaskSupernet(task, space, eval_batches).evaluate()
        assert len(calls) == want, eval_batches


def test_tune_zero_steps_leaves_the_task_as_it_was():
    """tune(0) takes no weight step: weights, data position, carried state and epoch are
    as they were (one step does move on)."""
    from test_engine import make_task

    task = make_task("rnn", 3)
    task.step()
    weights = {k: v.clone() for k, v in task.model.state_dict().items()}
    pos, hidden = task.pos, task.hidden.clone()
    supernet = TaskSupernet(task, "rnn", 1)
    supernet.tune(0)
    assert task.pos == pos and torch.equal(task.hidden, hidden) and supernet.epoch == 0
    for name, value in task.model.state_dict().items():
        assert torch.equal(value, weights[name]), name
    supernet.tune(1)
    assert task.pos > pos


@pytest.mark.parametrize("crit", ["loss", "acc"])
def test_pt_finds_the_op_that_matters_where_argmax_does_not(crit):
    """A hand-built supernet: on the first edge α favours identity, but identity's weights
    were trained to nothing and relu carries the whole output. Every other edge is
    irrelevant. argmax keeps identity; removing relu hurts most, so DARTS-PT keeps relu.
    By accuracy (the points fitted within 0.1) with the loss held at 0, the same: only the
    accuracy can tell the removals apart there."""
    alpha = torch.nn.Parameter(torch.zeros(36, 5, dtype=torch.float64))
    with torch.no_grad():
        alpha[0] = torch.tensor([0.0, 0.0, 0.5, 0.0, 3.0])  # none tanh relu sigmoid identity
    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    target = torch.relu(x)
    p_relu = torch.softmax(alpha[0].detach(), -1)[2]
    scale = {"tanh": 0.0, "relu": 1.0 / p_relu, "sigmoid": 0.0, "identity": 0.0}
    acts = {
        "tanh": torch.tanh,
        "relu": torch.relu,
        "sigmoid": torch.sigmoid,
        "identity": lambda v: v,
    }

    def evaluate() -> dict[str, float]:
        p = torch.softmax(alpha.detach()[0], -1)
        y = sum(p[k] * scale[op] * acts[op](x) for k, op in enumerate(RNN_PRIMITIVES) if k)
        loss = float(((y - target) ** 2).mean())
        acc = float(((y - target).abs() < 0.1).double().mean())
        return {"loss": loss if crit == "loss" else 0.0, "acc": acc}

    assert evaluate()["loss"] < 1e-20  # the supernet fits the target
    argmax = derive_recurrent(alpha)
    selector = Selector(
        {"alphas_recurrent": alpha}, CELLS["rnn"], evaluate, RNN_PRIMITIVES, crit=crit
    )
    records = [selector.decide(d) for d in plan(CELLS["rnn"], seed=0)]
    pt = derive_recurrent(alpha)
    assert argmax.recurrent[0] == ("identity", 0)
    assert pt.recurrent[0] == ("relu", 0)
    first = next(r for r in records if r["kind"] == "op" and r["index"] == 0)
    assert first["chosen"] == ["relu"]
    if crit == "loss":
        assert first["scores"][1]["loss"] > 0.5  # relu removed: the output is gone
    else:
        assert first["scores"][1]["acc"] < 0.6 and first["scores"][0]["acc"] == 1.0
    # Every α row is now exactly one-hot: on the kept op, or on none for a dropped edge.
    probs = torch.softmax(alpha.detach(), -1)
    assert torch.equal(probs, (probs == 1).double())
    kept = [int((probs[e, 1:] == 1).any()) for e in range(36)]
    assert sum(kept) == 8  # one edge per node


def test_cnn_supernet_is_measured_on_batch_statistics_without_updating_them():
    """DARTS-PT measures a perturbed CNN supernet with each batch's own BatchNorm statistics
    (running ones do not fit it) and leaves the running ones as they were."""
    import copy

    from test_engine import make_task

    task = make_task("cnn", 2)
    for _ in range(2):
        task.step()
    model = task.model
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    got = TaskSupernet(task, "cnn", eval_batches=None).evaluate()
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name

    def mean_loss(twin: torch.nn.Module) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(task.val_idx), task.cfg.batch_size):
                idx = task.val_idx[start : start + task.cfg.batch_size]
                images, labels = task.images.get(idx)
                logits = twin(Batch(cifar.normalize(images, dtype=task.dtype), labels)).logits
                total += float(torch.nn.functional.cross_entropy(logits, labels)) * len(labels)
                count += len(labels)
        return total / count

    assert math.isclose(got["loss"], mean_loss(copy.deepcopy(model).train()), rel_tol=1e-12)
    # The running statistics would give another loss.
    assert abs(got["loss"] - mean_loss(copy.deepcopy(model).eval())) > 1e-6


# -- end to end on real search checkpoints ------------------------------------------------------


@pytest.fixture(scope="module")
def rnn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "rnn"
    args = [*RNN_TINY, "--order", "1", "--max-steps", "3", "--epoch-steps", "2", "--out", str(out)]
    assert search(args) == 0
    return out


def derive_pt(capsys, run, *extra: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = derive(["--run", str(run), "--method", "pt", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("pt_*", "genotype-*"))
    return dst


def test_pt_on_rnn_search_is_deterministic_and_resumes_exactly(rnn_run, tmp_path, capsys):
    runs = [copy_run(rnn_run, tmp_path / name) for name in ("a", "b")]
    eval_args = ["--eval-batches", "1", "--tune-steps", "1", "--seed", "5"]
    code, stdout, err = derive_pt(capsys, runs[0], *eval_args)
    assert code == 0, err
    genotype = load_genotype(runs[0] / "genotype-pt.json", "rnn")
    assert json.loads(stdout) == to_dict(genotype)
    decisions = json.loads((runs[0] / "pt_decisions.json").read_text())
    assert len(decisions) == len(plan(CELLS["rnn"], seed=5))
    # The same selection stopped after 10 decisions, then resumed, ends identically.
    code, stdout, err = derive_pt(capsys, runs[1], *eval_args, "--max-decisions", "10")
    assert code == 0 and stdout == "" and "--resume" in err
    assert not (runs[1] / "genotype-pt.json").exists()
    assert derive_pt(capsys, runs[1], *eval_args, "--resume")[0] == 0
    for name in ("genotype-pt.json", "pt_decisions.json"):
        assert (runs[1] / name).read_text() == (runs[0] / name).read_text()
    states = [torch.load(r / STATE_FILE, weights_only=True) for r in runs]
    for name, tensor in states[0]["task"]["model"].items():
        assert torch.equal(tensor, states[1]["task"]["model"][name]), name
    # The selection projected α onto the genotype; the search's own files are untouched.
    alpha = states[0]["task"]["model"]["alphas_recurrent"]
    assert derive_recurrent(alpha) == genotype
    # Every node keeps the edge its decision chose: later tuning did not undo one.
    shape = CELLS["rnn"]["alphas_recurrent"]
    for record in decisions:
        if record["kind"] == "edge":
            (chosen,) = record["chosen"]
            node = record["index"]
            assert genotype.recurrent[node][1] == chosen - shape.edges_of(node).start, node
    assert torch.isinf(alpha).sum() == 36 * 4
    search_ckpt = torch.load(rnn_run / "checkpoint.pt", weights_only=True)
    assert torch.isfinite(search_ckpt["task"]["model"]["alphas_recurrent"]).all()


def test_pt_with_zero_tune_steps_only_measures(rnn_run, tmp_path, capsys, monkeypatch):
    """--tune-steps 0: two decisions run the model only for their measurements, each
    candidate's on --eval-batches batches (2 decisions × 4 ops × 2), and leave every weight
    as the search saved it; only the two decided α rows change."""
    from fastdarts.spaces import RNNSearchModel

    forward = RNNSearchModel.forward
    calls = []

    def counting(self, batch):
        calls.append(len(batch.inputs))
        return forward(self, batch)

    monkeypatch.setattr(RNNSearchModel, "forward", counting)
    run = copy_run(rnn_run, tmp_path / "r")
    args = ["--eval-batches", "2", "--tune-steps", "0", "--max-decisions", "2"]
    code, _, err = derive_pt(capsys, run, *args)
    assert code == 0, err
    assert len(calls) == 2 * 4 * 2
    searched = torch.load(run / "checkpoint.pt", weights_only=True)["task"]
    state = torch.load(run / STATE_FILE, weights_only=True)["task"]
    assert state["pos"] == searched["pos"]
    for name, value in state["model"].items():
        if name != "alphas_recurrent":
            assert torch.equal(value, searched["model"][name]), name
    changed = (state["model"]["alphas_recurrent"] != searched["model"]["alphas_recurrent"]).any(-1)
    decided = [d.index for d in plan(CELLS["rnn"], seed=0)[:2]]
    assert changed.nonzero().flatten().tolist() == sorted(decided)


def test_pt_refuses_to_overwrite_or_resume_nothing(rnn_run, tmp_path, capsys):
    run = copy_run(rnn_run, tmp_path / "r")
    code, _, err = derive_pt(capsys, run, "--eval-batches", "1", "--tune-steps", "1", "--resume")
    assert code == 2 and "no pt_state.pt" in err
    assert (
        derive_pt(capsys, run, "--eval-batches", "1", "--tune-steps", "1", "--max-decisions", "1")[
            0
        ]
        == 0
    )
    code, _, err = derive_pt(capsys, run, "--eval-batches", "1", "--tune-steps", "1")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pass --resume to continue it, or delete it to start again" in err
    code, _, err = derive_pt(capsys, run, "--eval-batches", "2", "--tune-steps", "1", "--resume")
    assert code == 2 and "other settings" in err
    # The search went on after the selection started: that selection is of another supernet.
    assert search(["--resume", "--out", str(run), "--max-steps", "4"]) == 0
    code, _, err = derive_pt(capsys, run, "--eval-batches", "1", "--tune-steps", "1", "--resume")
    assert code == 2 and "started on the search at step 3" in err
    assert "now at step 4; delete it to start again" in err


def test_argmax_writes_the_search_genotype(rnn_run, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert derive(["--run", str(rnn_run), "--method", "argmax", "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert printed == json.loads((rnn_run / "genotype.json").read_text())


def test_a_training_checkpoint_or_the_other_space_is_one_line(rnn_run, tmp_path, capsys):
    """derive (every way) and search --resume refuse a training run's checkpoint (it has
    no α), and derive a search of the other space than --space, in one line."""
    run = copy_run(rnn_run, tmp_path / "t")
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    saved["kind"] = TRAIN_KIND
    del saved["task"]["model"]["alphas_recurrent"]
    torch.save(saved, run / "checkpoint.pt")
    training = "a training run's checkpoint, not a search's"
    calls = [
        (derive, [str(run)], training),
        (derive, ["--run", str(run)], training),
        (derive, ["--run", str(run), "--method", "pt"], training),
        (derive, [str(rnn_run), "--space", "cnn"], "a search of the rnn space, but --space is cnn"),
        (derive, ["--run", str(rnn_run), "--space", "cnn"], "but --space is cnn"),
        (search, ["--resume", "--out", str(run)], training),
    ]
    for main, args, fragment in calls:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert fragment in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    ("saved", "kind", "fragment"),
    [
        ({"format": 1, "task": {}, "config": {}, "kind": TRAIN_KIND}, "search", "a training run's"),
        ({"format": 1, "task": {}, "config": {}}, "train", "a search's checkpoint, not a"),
        ({"format": 2, "task": {}, "config": {}}, "search", "checkpoint format 2 unknown"),
        ({"format": 1, "config": {}}, "search", "not a fastdarts search checkpoint"),
        ({"format": 1, "task": {}, "config": {}, "kind": "x"}, "train", "not a fastdarts training"),
        ([1, 2], "train", "not a fastdarts training checkpoint"),
    ],
)
def test_read_checkpoint_says_what_a_file_is(tmp_path, saved, kind, fragment):
    """The one check every reader of checkpoints (search --resume, train --resume, derive,
    DARTS-PT) shares: the wrong kind, format or contents is named in one line."""
    path = tmp_path / "checkpoint.pt"
    torch.save(saved, path)
    with pytest.raises(ConfigError, match=fragment):
        read_checkpoint(path, kind)


def test_pt_says_what_is_wrong_with_its_inputs_in_one_line(rnn_run, tmp_path, capsys):
    """Another space than the search's, a criterion the space has not, a state file that is
    not one, a search checkpoint without α, and a fine-tuning that diverges."""
    run = copy_run(rnn_run, tmp_path / "r")
    quick = ["--eval-batches", "1", "--tune-steps", "1"]
    cases = [
        (["--space", "cnn"], "a search of the rnn space, but --space is cnn"),
        (["--crit", "acc"], "--crit acc: choose loss (rnn, cnn) or acc (cnn)"),
    ]
    for extra, fragment in cases:
        code, _, err = derive_pt(capsys, run, *quick, *extra)
        assert code == 2 and fragment in err and err.count("\n") == 1, err
    torch.save({"kind": "something else"}, run / STATE_FILE)
    code, _, err = derive_pt(capsys, run, *quick, "--resume")
    assert code == 2 and f"{run / STATE_FILE}: not a DARTS-PT state file" in err
    (run / STATE_FILE).unlink()

    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    weights = saved["task"]["model"]
    torch.save(saved, run / "kept.pt")
    for name in weights:
        if not name.startswith("alphas") and weights[name].is_floating_point():
            weights[name] = torch.full_like(weights[name], math.nan)
    torch.save(saved, run / "checkpoint.pt")
    code, _, err = derive_pt(capsys, run, *quick, "--max-decisions", "2")
    assert code == 3 and "fine-tuning diverged (loss nan)" in err, err
    saved = torch.load(run / "kept.pt", weights_only=True)
    del saved["task"]["model"]["alphas_recurrent"]
    torch.save(saved, run / "checkpoint.pt")
    assert derive([str(run)]) == 2
    assert "no α in this search checkpoint (damaged?)" in capsys.readouterr().err


def test_load_task_state_names_a_foreign_backends_state_only(tmp_path, capsys):
    """A state that does not fit is a ConfigError only when another backend saved it (the
    one that cannot run here); the same backend's failure is raised as it is. An unchanged
    backend resumes without a note."""
    from fastdarts.ops.backends import BACKENDS
    from fastdarts.runs import load_task_state, resume_backend

    class Stub:
        def load_state_dict(self, state):
            raise KeyError("weight_optimizer")

    reference = BACKENDS["reference"]
    with pytest.raises(KeyError):
        load_task_state(Stub(), {}, "reference", reference, tmp_path / "c.pt")
    with pytest.raises(ConfigError, match="saved by backend 'fused', which does not run here"):
        load_task_state(Stub(), {}, "fused", reference, tmp_path / "c.pt")
    assert resume_backend("reference", "reference", lambda n: BACKENDS[n]) is reference
    assert capsys.readouterr().err == ""


def test_read_checkpoint_returns_its_kind(tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'best.pt'}: no such file"):
        read_checkpoint(tmp_path / "best.pt", "search")
    path = tmp_path / "checkpoint.pt"
    for kind, extra in (("search", {}), ("train", {"kind": TRAIN_KIND})):
        saved = {"format": 1, "task": {"step": 3}, "config": {"space": "rnn"}, **extra}
        torch.save(saved, path)
        assert read_checkpoint(path, kind) == saved


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--method", "pt"], "either SOURCE or --run"),
        (["DARTS_V2", "--space", "rnn", "--run", "x"], "either SOURCE or --run"),
        (["--run", "/nonexistent", "--method", "pt"], "no checkpoint.pt"),
        (["DARTS_V2", "--space", "rnn", "--method", "pt"], "--method goes with --run"),
        (["--run", "x", "--method", "pt", "--seed", "-1"], "--seed must lie in [0, 2^32)"),
        (["--run", "x", "--method", "pt", "--tune-steps", "-1"], "must be non-negative, got -1"),
        (["--run", "x", "--method", "pt", "--max-decisions", "0"], "must be positive, got 0"),
        (["--run", "x", "--tune-steps", "3"], "--tune-steps goes with --method pt"),
        (["DARTS_V2", "--space", "cnn", "--resume"], "--resume goes with --method pt"),
        (["--run", "x", "--method", "argmax", "--order", "sequential"], "--order goes with"),
        (["DARTS_V2", "--space", "cnn", "--max-decisions", "3"], "--max-decisions goes with"),
        (["--run", "x", "--method", "pt", "--seed", str(2**32)], "--seed must lie in [0, 2^32)"),
    ],
)
def test_derive_bad_input(capsys, args, fragment):
    assert derive(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1


def test_an_interrupted_selection_says_how_to_resume(rnn_run, tmp_path, capsys, monkeypatch):
    """Ctrl-C: one line, exit 130, --resume offered once a decision was saved."""
    import fastdarts.derive.pt as pt

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pt, "run_pt", interrupted)
    run = copy_run(rnn_run, tmp_path / "r")
    assert derive(["--run", str(run), "--method", "pt"]) == 130
    assert capsys.readouterr().err.endswith("interrupted; nothing to resume\n")
    (run / STATE_FILE).write_bytes(b"")
    assert derive(["--run", str(run), "--method", "pt"]) == 130
    assert capsys.readouterr().err.endswith(f"continue with --run {run} --method pt --resume\n")


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    """A one-step search on a CIFAR-10-shaped tree of 40 random JPEGs (the selection's
    mechanics need no real images, and this skips extracting 60,000 files)."""
    from PIL import Image

    from fastdarts.data.cifar import CLASSES

    data = tmp_path_factory.mktemp("cifar")
    generator = torch.Generator().manual_seed(0)
    for name in CLASSES:
        (data / "train" / name).mkdir(parents=True)
        for i in range(4):
            pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(data / "train" / name / f"{i}.jpg")
    out = tmp_path_factory.mktemp("pt") / "cnn"
    args = [*CNN_TINY, "--order", "1", "--max-steps", "1", "--epoch-steps", "1", "--out", str(out)]
    args += ["--data", str(data)]
    assert search(args) == 0
    return out


def test_pt_on_cnn_search_first_decisions(cnn_run, tmp_path, capsys):
    run = copy_run(cnn_run, tmp_path / "r")
    args = ["--eval-batches", "1", "--tune-steps", "1", "--max-decisions", "2"]
    code, _, err = derive_pt(capsys, run, *args)
    assert code == 0, err
    decisions = json.loads((run / "pt_decisions.json").read_text())
    assert [(d["round"], d["kind"]) for d in decisions] == [(0, "op"), (0, "op")]
    assert [d["alpha"] for d in decisions] == ["alphas_normal", "alphas_reduce"]
    assert all(len(d["scores"]) == 7 and "acc" in d["scores"][0] for d in decisions)
    state = torch.load(run / STATE_FILE, weights_only=True)
    projected = 0
    for name in ("alphas_normal", "alphas_reduce"):
        probs = torch.softmax(state["task"]["model"][name], -1)
        projected += int((probs == 1).any(-1).sum())
    assert projected == 2
    # Fine-tuning moved the weights.
    search_model = torch.load(run / "checkpoint.pt", weights_only=True)["task"]["model"]
    assert not torch.equal(state["task"]["model"]["stem.0.weight"], search_model["stem.0.weight"])


@pytest.mark.slow
def test_pt_on_cnn_search_to_the_end(cnn_run, tmp_path, capsys):
    run = copy_run(cnn_run, tmp_path / "r")
    code, stdout, err = derive_pt(capsys, run, "--eval-batches", "1", "--tune-steps", "1")
    assert code == 0, err
    genotype = load_genotype(run / "genotype-pt.json", "cnn")
    assert json.loads(stdout) == to_dict(genotype)
    decisions = json.loads((run / "pt_decisions.json").read_text())
    assert len(decisions) == 28 + 2 * 3
    state = torch.load(run / STATE_FILE, weights_only=True)
    for name in ("alphas_normal", "alphas_reduce"):
        probs = torch.softmax(state["task"]["model"][name], -1)
        assert torch.equal(probs, (probs == 1).to(probs.dtype))
        assert math.isclose(float(probs[:, 1:].sum()), 8.0)  # 2 edges × 4 nodes kept


@pytest.mark.skipif(unavailable_reason() is not None, reason="needs the C++ extension")
def test_pt_takes_the_backend_the_search_ran_with(cnn_run, tmp_path, capsys, monkeypatch):
    """A search by --backend auto (the fused ops, on the CPU with the C++ kernels) is
    selected on with the fused ops where auto now picks another; where they cannot run,
    one line says the search's state does not fit the other backend (not a traceback)."""
    from fastdarts.ops import backends

    data = json.loads((cnn_run / "config.json").read_text())["data"]
    run = tmp_path / "auto"
    args = [*CNN_TINY, "--order", "1", "--max-steps", "1", "--epoch-steps", "1"]
    assert search([*args, "--backend", "auto", "--data", data, "--out", str(run)]) == 0
    pt_args = ["--eval-batches", "1", "--tune-steps", "1", "--max-decisions", "1"]
    monkeypatch.setattr(backends, "AUTO_ORDER", ("reference", "fused"))
    code, _, err = derive_pt(capsys, copy_run(run, tmp_path / "a"), *pt_args)
    assert code == 0, err
    assert "with backend 'fused', which this run's 'auto' chose" in err
    monkeypatch.setattr(backends, "unavailable_reason", lambda: "not built (test)")
    code, _, err = derive_pt(capsys, copy_run(run, tmp_path / "b"), *pt_args)
    assert code == 2
    assert err.startswith("python -m fastdarts.derive: error: ") and err.count("\n") == 1
    assert "saved by backend 'fused', which does not run here" in err


@pytest.mark.parametrize("space", ["rnn", "cnn"])
def test_fine_tuning_restarts_the_weight_optimizer_at_a_tenth_of_the_lr(
    space, rnn_run, cnn_run, tmp_path, capsys, monkeypatch
):
    """As DARTS-PT's code: no momentum from the search, a tenth of its learning rate (the
    RNN's rescaled by seq_len / bptt, as its steps are), and tuning only between rounds
    (two rounds here: 2 RNN decisions, 4 CNN ones)."""
    from fastdarts.search.tasks import SearchTask

    seen = []
    step = SearchTask.weight_step

    def recording(self, batch, lr):
        seen.append((lr, len(self.weight_optimizer.state), len(batch.inputs)))
        return step(self, batch, lr)

    monkeypatch.setattr(SearchTask, "weight_step", recording)
    run = copy_run(rnn_run if space == "rnn" else cnn_run, tmp_path / space)
    decisions = "2" if space == "rnn" else "4"
    args = ["--eval-batches", "1", "--tune-steps", "2", "--max-decisions", decisions]
    code, _, err = derive_pt(capsys, run, *args)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert len(seen) == 4
    for lr, _, seq_len in seen:
        scale = seq_len / config["bptt"] if space == "rnn" else 1.0
        assert lr == pytest.approx(config["lr"] / 10 * scale)
    states = [n for _, n, _ in seen]
    if space == "cnn":  # momentum: the search's buffers dropped, then the tuning's own
        assert states[0] == 0 and states[1] > 0
    else:  # plain SGD keeps no state
        assert states == [0] * 4


@pytest.mark.parametrize(
    ("space", "order", "backend"),
    [
        ("rnn", "1", "reference"),
        ("rnn", "2", "fused"),
        ("cnn", "2", "reference"),
        ("cnn", "1", "fused"),
    ],
)
def test_fine_tuning_steps_alpha_on_the_undecided_edges_only(
    space, order, backend, cnn_run, tmp_path, capsys, monkeypatch
):
    """As DARTS-PT's code, tuning takes α steps too, first order after a search of either
    order (on either backend, through α rows of -inf), Adam's state carried on from the
    search: the undecided rows move, the decided ones stay exactly where the decisions put
    them, and Adam's state stays finite."""
    from fastdarts.search.architect import Architect

    if backend == "fused" and unavailable_reason() is not None:
        pytest.skip("needs the C++ extension")
    run = tmp_path / "run"
    args = [*(RNN_TINY if space == "rnn" else CNN_TINY), "--order", order, "--backend", backend]
    args += ["--max-steps", "1", "--epoch-steps", "1", "--out", str(run)]
    if space == "cnn":
        args += ["--data", json.loads((cnn_run / "config.json").read_text())["data"]]
    assert search(args) == 0
    orders, alpha_step = [], Architect.step

    def recording(self, *args, **kwargs):
        orders.append(self.order)
        return alpha_step(self, *args, **kwargs)

    monkeypatch.setattr(Architect, "step", recording)
    code, _, err = derive_pt(
        capsys, run, "--eval-batches", "1", "--tune-steps", "2", "--max-decisions", "3"
    )
    assert code == 0, err
    planned = plan(CELLS[space], seed=0)
    tunings = sum(planned[i + 1].round != planned[i].round for i in range(3))
    assert orders == [1] * 2 * tunings
    decisions = json.loads((run / "pt_decisions.json").read_text())
    state = torch.load(run / STATE_FILE, weights_only=True)["task"]
    searched = torch.load(run / "checkpoint.pt", weights_only=True)["task"]["model"]
    primitives = PRIMITIVES[space]
    for name in CELLS[space]:
        alpha, before = state["model"][name], searched[name]
        decided = {d["index"]: d["chosen"][0] for d in decisions if d["alpha"] == name}
        for e in range(len(alpha)):
            if e in decided:
                assert torch.equal(alpha[e], one_hot(alpha[e], primitives.index(decided[e]))), e
            else:
                assert torch.isfinite(alpha[e]).all() and not torch.equal(alpha[e], before[e]), e
    for moments in state["arch_optimizer"]["state"].values():
        assert float(moments["step"]) == 1 + 2 * tunings  # the search's step, then tuning's
        assert torch.isfinite(moments["exp_avg"]).all()
        assert torch.isfinite(moments["exp_avg_sq"]).all()


@pytest.mark.parametrize(("space", "epochs"), [("rnn", 1), ("cnn", 5)])
def test_default_tuning_between_rounds(
    space, epochs, rnn_run, cnn_run, tmp_path, capsys, monkeypatch
):
    """Without --tune-steps a round is followed by 5 search epochs on the CNN (DARTS-PT's
    proj_intv for the DARTS space) and 1 on the RNN."""
    seen = []
    monkeypatch.setattr(
        TaskSupernet, "tune", lambda self, steps: seen.append((steps, self.task.steps_per_epoch()))
    )
    run = copy_run(rnn_run if space == "rnn" else cnn_run, tmp_path / space)
    rounds = 2
    decisions = rounds * len(CELLS[space])
    code, _, err = derive_pt(capsys, run, "--eval-batches", "1", "--max-decisions", str(decisions))
    assert code == 0, err
    assert [steps for steps, _ in seen] == [epochs * per_epoch for _, per_epoch in seen]
    assert len(seen) == rounds and seen[0][1] > 1
    # The state records the length taken, so a resume under another default is refused.
    settings = torch.load(run / STATE_FILE, weights_only=True)["settings"]
    assert settings["tune_steps"] == seen[0][0]


def test_a_selection_started_by_an_older_plan_is_not_resumed(rnn_run, tmp_path, capsys):
    """A state file from before decisions came in rounds (it records no plan) would resume
    on another order of decisions: one line says so."""
    run = copy_run(rnn_run, tmp_path / "r")
    args = ["--eval-batches", "1", "--tune-steps", "1"]
    assert derive_pt(capsys, run, *args, "--max-decisions", "1")[0] == 0
    state = torch.load(run / STATE_FILE, weights_only=True)
    del state["plan"]
    torch.save(state, run / STATE_FILE)
    code, _, err = derive_pt(capsys, run, *args, "--resume")
    assert code == 2 and err.count("\n") == 1
    assert "older fastdarts" in err and "delete it to start again" in err


def test_a_cuda_graphs_search_is_tuned_eagerly(tmp_path, capsys, monkeypatch):
    """The held α rows change with every decision, which a captured step would not see: a
    search run with --cuda-graphs (on a GPU; its checkpoint says so here) is tuned without."""
    run = tmp_path / "run"
    args = [*RNN_TINY, "--order", "1", "--max-steps", "1", "--out", str(run)]
    assert search(args) == 0
    saved = torch.load(run / "checkpoint.pt", weights_only=True)
    saved["config"]["cuda_graphs"] = True
    torch.save(saved, run / "checkpoint.pt")
    tasks = []
    init = TaskSupernet.__init__

    def recording(self, task, *rest):
        tasks.append(task)
        init(self, task, *rest)

    monkeypatch.setattr(TaskSupernet, "__init__", recording)
    code, _, err = derive_pt(
        capsys, run, "--eval-batches", "1", "--tune-steps", "1", "--max-decisions", "1"
    )
    assert code == 0, err
    assert tasks[0].graphed is None and not tasks[0].cfg.cuda_graphs


def test_pt_on_cnn_resumes_mid_round_exactly(cnn_run, tmp_path, capsys):
    """Stopped inside a round (after the normal cell's decision), resumed: the same
    decisions, weights, α and both optimisers' states (SGD momentum, Adam's moments) as
    an uninterrupted selection."""
    runs = [copy_run(cnn_run, tmp_path / name) for name in ("a", "b")]
    args = ["--eval-batches", "1", "--tune-steps", "2"]
    assert derive_pt(capsys, runs[0], *args, "--max-decisions", "4")[0] == 0
    assert derive_pt(capsys, runs[1], *args, "--max-decisions", "3")[0] == 0
    assert derive_pt(capsys, runs[1], *args, "--max-decisions", "4", "--resume")[0] == 0
    name = "pt_decisions.json"
    assert (runs[0] / name).read_text() == (runs[1] / name).read_text()
    a, b = (torch.load(r / STATE_FILE, weights_only=True) for r in runs)
    assert_equal_state(a, b, "state")
    assert len(a["task"]["weight_optimizer"]["state"]) > 0  # momentum buffers were compared
