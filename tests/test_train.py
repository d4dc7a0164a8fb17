"""python -m fastdarts.train: the evaluation networks' sizes, short runs of both spaces on the
real data, exact resume, averaged SGD, cutout, drop-path and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import snapshot

from fastdarts.genotypes import NAMED_GENOTYPES, save_genotype
from fastdarts.models import NetworkCIFAR, RNNModel
from fastdarts.models.cnn import drop_path
from fastdarts.ops.backends import BACKENDS
from fastdarts.train.__main__ import main
from fastdarts.train.tasks import cutout

RNN_TINY = ["--space", "rnn", "--genotype", "DARTS_V2", "--emsize", "8", "--nhid", "8"]
RNN_TINY += ["--batch-size", "4", "--bptt", "5", "--eval-batches", "3", "--log-every", "1"]
RNN_TINY += ["--test-batch-size", "8", "--device", "cpu"]
CNN_TINY = ["--space", "cnn", "--genotype", "DARTS_V2", "--init-channels", "4", "--layers", "3"]
CNN_TINY += ["--batch-size", "4", "--eval-batches", "1", "--log-every", "1", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("datasets_read_once")


def run(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def n_params(model: torch.nn.Module, skip: str = "\0") -> int:
    # parameters() yields the tied embedding/decoder matrix once.
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(skip))


def test_paper_sizes_match_the_published_code():
    with torch.device("meta"):
        rnn = RNNModel(10_000, NAMED_GENOTYPES["rnn"]["DARTS_V2"], 850, 850)
        cnn = NetworkCIFAR(NAMED_GENOTYPES["cnn"]["DARTS_V2"], C=36, layers=20)
    assert n_params(rnn) == 22_960_000
    assert n_params(cnn, skip="auxiliary_head") == 3_349_342


def records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("time_s", None)
    return rows


@pytest.mark.parametrize(
    ("args", "key"),
    [(RNN_TINY, "test_ppl"), (CNN_TINY, "test_error")],
    ids=["rnn", "cnn"],
)
def test_short_run_writes_outputs_and_tests(tmp_path, capsys, args, key):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, *args, "--epochs", "2", "--epoch-steps", "2", "--out", str(out))
    assert code == 0, err
    for name in ("config.json", "genotype.json", "metrics.jsonl", "checkpoint.pt", "result.json"):
        assert (out / name).is_file(), name
    result = json.loads((out / "result.json").read_text())
    assert json.loads(stdout) == result
    assert result[key] > 0 and result["step"] == 4 and result["complete"] is False
    rows = records(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    evals = [r for r in rows if "valid_loss" in r or ("test_loss" in r and "split" not in r)]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert rows[-1]["split"] == "test" and rows[-1][key] == result[key]
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 4 and saved["epoch"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["genotype"] == "DARTS_V2" and config["epochs"] == 2
    assert config["resolved"] == {"device": "cpu", "backend": "reference"}
    if key == "test_ppl":
        assert (out / "best.pt").is_file() and result["weights"] == "best"


def test_a_test_row_carries_its_last_steps_epoch(tmp_path, capsys):
    """Stopped mid-epoch by --max-steps, the test row and result.json name the epoch its
    last step was in, as the step rows do (they said the epochs finished: one fewer)."""
    out = tmp_path / "run"
    args = ["--epochs", "3", "--epoch-steps", "3", "--max-steps", "4", "--out", str(out)]
    code, stdout, err = run(capsys, *RNN_TINY, *args)
    assert code == 0, err
    rows = records(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["epoch"] for r in steps] == [1, 1, 1, 2]
    assert rows[-1]["split"] == "test" and rows[-1]["epoch"] == 2
    assert json.loads(stdout)["epoch"] == json.loads((out / "result.json").read_text())["epoch"]
    assert json.loads(stdout)["epoch"] == 2


@pytest.mark.parametrize(
    ("args", "steps", "stop_at"),
    [
        (RNN_TINY, 7, 3),
        pytest.param(
            [*RNN_TINY, "--backend", "fused"],
            7,
            3,
            marks=pytest.mark.skipif(
                BACKENDS["fused"].why_not("rnn", "cpu") is not None, reason="no fused op here"
            ),
        ),
        (CNN_TINY, 5, 3),
    ],
    ids=["rnn", "rnn-fused", "cnn"],
)
def test_stop_then_resume_equals_straight_run(tmp_path, capsys, args, steps, stop_at):
    # Epochs of 2 steps: the stop falls inside an epoch, after an epoch evaluation.
    common = [*args, "--epochs", "4", "--epoch-steps", "2", "--checkpoint-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(capsys, *common, "--max-steps", str(steps), "--out", str(straight))[0] == 0
    assert run(capsys, *common, "--max-steps", str(stop_at), "--out", str(split))[0] == 0
    code, _, err = run(capsys, "--resume", "--out", str(split), "--max-steps", str(steps))
    assert code == 0, err
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == steps
    for name, tensor in a["task"]["model"].items():
        assert torch.equal(tensor, b["task"]["model"][name]), name
    assert records(straight) == records(split)
    assert (straight / "result.json").read_text() == (split / "result.json").read_text()


def test_averaged_sgd_switch_and_average(tmp_path, capsys):
    from fastdarts.train.config import TrainConfig
    from fastdarts.train.tasks import RNNTrainTask

    cfg = TrainConfig(space="rnn", emsize=8, nhid=8, batch_size=4, bptt=5, nonmono=2).resolved()
    task = RNNTrainTask(cfg, NAMED_GENOTYPES["rnn"]["DARTS_V1"], torch.device("cpu"))
    task.begin_epoch(0)
    losses = iter([4.0, 5.0, 5.0, 4.5])
    task._perplexity = lambda *args: next(losses)
    switched = []
    for _ in range(4):
        metrics, _ = task.end_epoch(None)
        switched.append(metrics["asgd"])
    # 4.5 is worse than the best before the last 2 epochs (4.0): switch.
    assert switched == [False, False, False, True]
    # Evaluation uses torch.optim.ASGD(t0=0, lambd=0)'s average (the paper's script's) of
    # the same iterates: its `ax` after each of 4 steps, side by side.
    params = [p.detach().clone().requires_grad_() for p in task.params]
    asgd = torch.optim.ASGD(params, lr=1.0, t0=0, lambd=0.0)
    for step in range(4):
        task.step()
        for p, q in zip(params, task.params):
            p.grad = p.detach() - q.detach()  # steps p to the task's iterate
        asgd.step()
        for i, (avg, p) in enumerate(zip(task.eval_weights(), params)):
            ax = asgd.state[p]["ax"]
            assert torch.allclose(p, task.params[i]) and torch.allclose(avg, ax, atol=1e-6), i
        if step >= 2:  # from the third step on, not the latest iterate
            assert not torch.equal(task.eval_weights()[0], task.params[0])
    assert task.asgd_steps == 4


def test_cutout_squares():
    images = torch.ones(64, 3, 32, 32)
    out = cutout(images, 16, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1)  # (B, H, W): every channel cut
    assert torch.equal(zeros, (out == 0).any(1))
    for z in zeros:
        rows, cols = z.any(1).nonzero().flatten(), z.any(0).nonzero().flatten()
        # A square of side 16 clipped at the border: both sides in [8, 16], contiguous.
        assert 8 <= len(rows) <= 16 and 8 <= len(cols) <= 16
        assert rows[-1] - rows[0] + 1 == len(rows) and cols[-1] - cols[0] + 1 == len(cols)
        assert z.sum() == len(rows) * len(cols)
    assert torch.equal(cutout(images, 0, torch.Generator()), images)


def test_drop_path_only_in_training():
    x = torch.ones(1000, 2, 3, 3)
    y = drop_path(x, 0.25, torch.Generator().manual_seed(0))
    kept = (y != 0).all((1, 2, 3))
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert 0.2 < 1 - kept.double().mean() < 0.3
    model = NetworkCIFAR(NAMED_GENOTYPES["cnn"]["DARTS_V2"], C=4, layers=3).eval()
    images = torch.randn(2, 3, 32, 32)
    a, aux = model(images, 0.5, torch.Generator().manual_seed(1))
    b, _ = model(images)
    assert aux is None and torch.equal(a, b)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--space", "rnn"], ["--genotype is required"]),
        (["--space", "rnn", "--genotype", "DARTS_V9"], ["DARTS_V9", "no such genotype"]),
        (["--space", "cnn", "--genotype", "DARTS_V2", "--dataset", "ptb"], ["does not go"]),
        ([*RNN_TINY, "--nhid", "9"], ["--emsize and --nhid must be equal"]),
        ([*RNN_TINY, "--data", "/nonexistent"], ["/nonexistent"]),
        ([*CNN_TINY, "--drop-path", "1.5"], ["--drop-path"]),
        ([*CNN_TINY, "--grad-clip", "0"], ["--grad-clip must be positive"]),
        ([*RNN_TINY, "--clip", "0"], ["--clip must be positive"]),
        (["--space", "rnn", "--genotype", "DARTS_V2", "--device", "cuda:7"], ["cuda"]),
        ([*RNN_TINY, "--batch-size", "4", "--bptt", "300000"], ["--bptt 300000: longer than"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, fragments):
    code, _, err = run(capsys, *args, "--out", str(tmp_path / "run"))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_genotype_file_of_the_other_space(tmp_path, capsys):
    path = tmp_path / "cnn.json"
    save_genotype(NAMED_GENOTYPES["cnn"]["DARTS_V1"], path)
    code, _, err = run(capsys, *RNN_TINY, "--genotype", str(path), "--out", str(tmp_path / "r"))
    assert code == 2 and "a cnn genotype, but the space is rnn" in err
    path = tmp_path / "rnn.json"
    save_genotype(NAMED_GENOTYPES["rnn"]["DARTS_V1"], path)
    args = ["--space", "cnn", "--genotype", str(path), "--out", str(tmp_path / "c")]
    code, _, err = run(capsys, *args)
    assert code == 2 and "an rnn genotype, but the space is cnn" in err


def test_existing_run_and_foreign_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(capsys, *RNN_TINY, "--max-steps", "1", "--out", str(out))[0] == 0
    before = snapshot(out)
    code, _, err = run(capsys, *RNN_TINY, "--max-steps", "1", "--out", str(out))
    assert code == 2 and "--resume" in err
    code, _, err = run(capsys, "--resume", "--out", str(out), "--lr", "3")
    assert code == 2 and "other settings" in err
    code, _, err = run(capsys, "--resume", "--out", str(out), "--genotype", "DARTS_V1")
    assert code == 2 and "other settings (genotype='DARTS_V2')" in err
    assert snapshot(out) == before
    # The same genotype by its file, and a backend auto resolves to here, are the same run.
    same = ["--genotype", str(out / "genotype.json"), "--backend", "reference"]
    code, _, err = run(capsys, "--resume", "--out", str(out), "--max-steps", "2", *same)
    assert code == 0, err
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 2
    # The run keeps its own names (auto: another device could resolve it otherwise).
    for config in (saved["config"], json.loads((out / "config.json").read_text())):
        assert (config["genotype"], config["backend"]) == ("DARTS_V2", "auto")
    code, _, err = run(capsys, "--resume", "--out", str(tmp_path / "none"), "--space", "rnn")
    assert code == 2 and "no checkpoint.pt" in err
    search = tmp_path / "search"
    search.mkdir()
    torch.save({"format": 1, "config": {"space": "rnn"}, "task": {}}, search / "checkpoint.pt")
    code, _, err = run(capsys, *RNN_TINY, "--resume", "--out", str(search))
    assert code == 2 and "a search's checkpoint, not a training run's" in err
    torch.save({"format": 1, "config": {"space": "rnn"}}, search / "checkpoint.pt")
    code, _, err = run(capsys, *RNN_TINY, "--resume", "--out", str(search))
    assert code == 2 and "not a fastdarts training checkpoint" in err


def identity_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode with fresh statistics (mean 0, variance 1) and an eps that 1 + eps rounds
    away (torch 2.11 refuses eps = 0): every BatchNorm is exactly the identity."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-300
    return model.eval()


def projected(
    alpha: torch.Tensor, edges: list[tuple[str, int]], n_inputs: int, per_node: int, primitives
) -> torch.Tensor:
    """α whose softmax is one-hot on the genotype's ops, and on none for the other edges."""
    out = torch.full_like(alpha, -torch.inf)
    out[:, 0] = 0.0
    for n, (op, j) in enumerate(edges):
        node = n // per_node
        row = sum(n_inputs + i for i in range(node)) + j
        out[row] = -torch.inf
        out[row, primitives.index(op)] = 0.0
    return out


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_rnn_model_is_the_search_cell_projected_onto_the_genotype(name):
    from fastdarts.genotypes import RNN_PRIMITIVES
    from fastdarts.spaces import Batch, RNNSearchModel

    genotype = NAMED_GENOTYPES["rnn"][name]
    torch.manual_seed(0)
    model = RNNModel(30, genotype, 6, 6).double().eval()
    search = identity_batchnorm(RNNSearchModel(30, 6, 6).double())
    search.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        search.alphas_recurrent.copy_(
            projected(search.alphas_recurrent, genotype.recurrent, 1, 1, RNN_PRIMITIVES)
        )
    tokens, hidden = torch.randint(0, 30, (4, 3)), torch.randn(3, 6, dtype=torch.float64)
    logits, hiddens = model(tokens, hidden)
    out = search(Batch(tokens, tokens, hidden))
    assert torch.allclose(hiddens[-1], out.state, rtol=1e-12, atol=1e-13)
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), tokens.reshape(-1))
    assert torch.allclose(out.loss, want, rtol=1e-12)


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_cnn_model_is_the_search_network_projected_onto_the_genotype(name):
    from fastdarts.genotypes import CNN_PRIMITIVES
    from fastdarts.spaces import ConvSearchModel

    genotype = NAMED_GENOTYPES["cnn"][name]
    torch.manual_seed(0)
    model = identity_batchnorm(NetworkCIFAR(genotype, C=4, layers=3, auxiliary=False).double())
    search = identity_batchnorm(ConvSearchModel(C=4, layers=3).double())
    # Copy the evaluation network's weights into the search network's matching modules.
    state = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "cells" and parts[2] == "_ops":
            cell, n = int(parts[1]), int(parts[3])
            edges = genotype.reduce if model.cells[cell].reduction else genotype.normal
            op, j = edges[n]
            row = sum(2 + i for i in range(n // 2)) + j
            parts[3:4] = [str(row), "_ops", str(CNN_PRIMITIVES.index(op))]
        state[".".join(parts)] = value
    target = search.state_dict()
    dropped = {k: v for k, v in state.items() if k not in target}
    # Only the evaluation network's affine BatchNorm parameters (still 1 and 0) have no
    # place in the search network, whose cell BatchNorms are not affine.
    assert all(k.rsplit(".", 1)[1] in ("weight", "bias") for k in dropped)
    assert all(
        torch.equal(v, torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v))
        for k, v in dropped.items()
    )
    search.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    with torch.no_grad():
        for alpha, edges in (
            (search.alphas_normal, genotype.normal),
            (search.alphas_reduce, genotype.reduce),
        ):
            alpha.copy_(projected(alpha, edges, 2, 2, CNN_PRIMITIVES))
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    logits, aux = model(images)
    assert aux is None
    assert torch.allclose(logits, search.logits(images), rtol=1e-10, atol=1e-12)


def lm_pass(model: RNNModel, tokens, hidden, masks) -> tuple[torch.Tensor, ...]:
    """(logits, hiddens, NLL + TAR) of one training pass, as RNNTrainTask computes it."""
    logits, hiddens = model(tokens, hidden, masks)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), tokens.roll(-1).reshape(-1))
    return logits, hiddens, nll + 1e-3 * (hiddens[1:] - hiddens[:-1]).pow(2).mean()


@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_fused_rnn_model_equals_the_reference(name):
    from fastdarts.ops.recurrent_mixed import recurrent_mixed
    from fastdarts.search.masks import MaskSampler

    genotype = NAMED_GENOTYPES["rnn"][name]
    torch.manual_seed(0)
    ref = RNNModel(40, genotype, 6, 6, dropoute=0.1).double()
    fused = RNNModel(40, genotype, 6, 6, dropoute=0.1, node_op=recurrent_mixed).double()
    assert list(fused.state_dict()) == list(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    start = {k: v.clone() for k, v in ref.state_dict().items()}
    sampler = MaskSampler(1)
    tokens = torch.randint(0, 40, (5, 3))
    h0 = torch.randn(3, 6, dtype=torch.float64)
    masks = sampler.draw(ref.mask_specs(3), torch.float64)
    outs, grads = [], []
    for model in (ref, fused):
        hidden = h0.clone().requires_grad_()
        out = lm_pass(model, tokens, hidden, masks)
        names, params = zip(*model.named_parameters())
        wrt = [*params, hidden]
        grads.append(dict(zip((*names, "hidden"), torch.autograd.grad(out[-1], wrt))))
        outs.append(out)
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][key], rtol=1e-10, atol=1e-14), key
    # A few SGD steps (clipped, as in training) give the same weights.
    opts = [torch.optim.SGD(m.parameters(), lr=5.0, weight_decay=1e-4) for m in (ref, fused)]
    for _ in range(4):
        masks = sampler.draw(ref.mask_specs(3), torch.float64)
        for model, opt in zip((ref, fused), opts):
            opt.zero_grad()
            lm_pass(model, tokens, h0, masks)[-1].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
    for (key, a), b in zip(ref.state_dict().items(), fused.state_dict().values()):
        assert not torch.equal(a, start[key]), key
        assert torch.allclose(a, b, rtol=0, atol=1e-10), key


def test_backend_flag(tmp_path, capsys):
    import torch.nn.functional as F

    from fastdarts.ops.cross_entropy import cross_entropy
    from fastdarts.ops.recurrent_mixed import recurrent_mixed
    from fastdarts.train.config import TrainConfig
    from fastdarts.train.tasks import RNNTrainTask

    fused_here = BACKENDS["fused"].why_not("rnn", "cpu") is None
    # auto keeps the reference on the CPU, where the fused node op is slower.
    options = [("reference", None, F.cross_entropy), ("auto", None, F.cross_entropy)]
    options += [("fused", recurrent_mixed, cross_entropy)] if fused_here else []
    for backend, want, loss in options:
        cfg = TrainConfig(emsize=8, nhid=8, batch_size=4, backend=backend).resolved()
        task = RNNTrainTask(cfg, NAMED_GENOTYPES["rnn"]["DARTS_V2"], torch.device("cpu"))
        assert task.model.rnns[0].node_op is want, backend
        assert task.cross_entropy is loss, backend
    code, _, err = run(capsys, *CNN_TINY, "--backend", "fused", "--out", str(tmp_path / "c"))
    assert code == 2 and "one op per edge" in err and not (tmp_path / "c").exists()
    args = [*RNN_TINY, "--max-steps", "2", "--epoch-steps", "2"]
    results = {}
    for backend in ("reference", "fused") if fused_here else ("reference",):
        out = tmp_path / backend
        code, stdout, err = run(capsys, *args, "--backend", backend, "--out", str(out))
        assert code == 0, err
        results[backend] = json.loads(stdout)["test_loss"]
    # float32: the two agree to rounding.
    assert max(results.values()) - min(results.values()) < 1e-4 * results["reference"]
