"""python -m fastdarts.train: the evaluation networks' sizes, short runs of both spaces on the
real data, exact resume, averaged SGD, cutout, drop-path and bad input."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import snapshot

from fastdarts.data import cifar
from fastdarts.genotypes import NAMED_GENOTYPES, ConvGenotype, save_genotype
from fastdarts.models import NetworkCIFAR, RNNModel
from fastdarts.models.cnn import Cell, drop_path
from fastdarts.ops.backends import BACKENDS
from fastdarts.search.masks import MaskSampler
from fastdarts.train.__main__ import main
from fastdarts.train.config import TrainConfig
from fastdarts.train.tasks import CNNTrainTask, RNNTrainTask, cutout

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


@pytest.fixture
def float64():
    """float64 as the default dtype while a test builds its task: a step recomputed by hand
    in another order of operations then agrees to ~1e-12, far below any slip's effect."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


def rnn_task(**settings) -> RNNTrainTask:
    """A tiny RNN training task on PTB (8 units, batch 4, bptt 5) on the CPU."""
    tiny = {"emsize": 8, "nhid": 8, "batch_size": 4, "bptt": 5, "backend": "reference"}
    cfg = TrainConfig(space="rnn", **tiny, **settings).resolved()
    return RNNTrainTask(cfg, NAMED_GENOTYPES["rnn"]["DARTS_V2"], torch.device("cpu"))


def numpy_copy(rng: np.random.Generator) -> np.random.Generator:
    copied = np.random.default_rng()
    copied.bit_generator.state = rng.bit_generator.state
    return copied


def draw_seq_len(rng: np.random.Generator, cfg: TrainConfig) -> int:
    """The published script's sequence length: around bptt (bptt/2 with probability 0.05)
    with std 5, truncated, at least 5 and at most bptt + max_seq_len_delta."""
    mean = cfg.bptt / 2 if rng.random() >= 0.95 else cfg.bptt
    return min(max(5, int(rng.normal(mean, 5))), cfg.bptt + cfg.max_seq_len_delta)


def clipped_sgd(params, grads, lr: float, weight_decay: float, clip: float):
    """params after one SGD step with weight decay on grads scaled to norm ``clip`` when
    longer (torch's clip_grad_norm_: factor clip / (norm + 1e-6)); and the grads' norm."""
    norm = torch.cat([g.flatten() for g in grads]).norm()
    scale = min(1.0, clip / (norm.item() + 1e-6))
    new = [p - lr * (scale * g + weight_decay * p) for p, g in zip(params, grads)]
    return new, norm.item()


@pytest.mark.parametrize(
    ("seed", "clip", "clipped"),
    [(82, 0.05, True), (0, 100.0, False)],
    ids=["clipped-half-bptt", "unclipped"],
)
def test_rnn_step_recomputed_by_hand(float64, seed, clip, clipped):
    """Two RNNTrainTask steps equal NLL + TAR, clipped SGD with weight decay at the length-
    scaled rate, recomputed on a copy of the model with copies of its generators; the
    second starts where the first left off (rows and hidden state). Seed 82's first
    length is drawn around bptt/2 (its first uniform draw is 0.998)."""
    task = rnn_task(seed=seed, clip=clip, lr=3.0, weight_decay=0.01, tar=0.5)
    cfg = task.cfg
    model = copy.deepcopy(task.model)
    rng = numpy_copy(task.rng)
    sampler = MaskSampler(0)
    sampler.load_state_dict(task.sampler.state_dict())
    hidden, pos = task.hidden.clone(), 0
    for _ in range(2):
        metrics = task.step()
        seq_len = draw_seq_len(rng, cfg)
        data = task.train_data[pos : pos + seq_len]
        targets = task.train_data[pos + 1 : pos + 1 + seq_len]
        masks = sampler.draw(model.mask_specs(cfg.batch_size), torch.float32)
        logits, hiddens = model(data, hidden, masks)
        nll = F.cross_entropy(logits.reshape(seq_len * cfg.batch_size, -1), targets.flatten())
        tar = cfg.tar * (hiddens[1:] - hiddens[:-1]).square().mean()
        params = list(model.parameters())
        lr = cfg.lr * seq_len / cfg.bptt
        grads = torch.autograd.grad(nll + tar, params)
        new, norm = clipped_sgd(params, grads, lr, cfg.weight_decay, cfg.clip)
        assert (norm > cfg.clip) == clipped
        with torch.no_grad():
            for p, value in zip(params, new):
                p.copy_(value)
        hidden, pos = hiddens[-1].detach(), pos + seq_len
        assert metrics["lr"] == lr
        assert torch.allclose(metrics["loss"], nll, rtol=1e-12, atol=0)
        assert torch.allclose(metrics["ppl"], nll.exp(), rtol=1e-12, atol=0)
        for (name, p), q in zip(task.model.named_parameters(), params):
            assert torch.allclose(p, q, rtol=0, atol=1e-10), name
        assert task.pos == pos
        assert torch.allclose(task.hidden, hidden, rtol=0, atol=1e-12)


def test_rnn_sequence_lengths_follow_the_published_draw():
    """Over 80 steps, each step's learning rate (lr · seq_len / bptt) and advance are those
    of the published length draw from a copy of the task's generator: lengths around bptt
    and bptt/2, clamped at 5 and at bptt + max_seq_len_delta, all occur."""
    task = rnn_task(seed=4, max_seq_len_delta=3)
    cfg = task.cfg
    rng = numpy_copy(task.rng)
    lengths = []
    for _ in range(80):
        before = task.pos
        seq_len = draw_seq_len(rng, cfg)
        assert task.step()["lr"] == cfg.lr * seq_len / cfg.bptt
        assert task.pos - before == seq_len
        lengths.append(seq_len)
    assert {5, 6, 7, 8} <= set(lengths) <= set(range(5, 9))


def cnn_task(**settings) -> CNNTrainTask:
    """A tiny CNN training task on CIFAR-10 (4 channels, 3 cells, batch 2) on the CPU."""
    tiny = {"init_channels": 4, "layers": 3, "batch_size": 2}
    cfg = TrainConfig(space="cnn", **tiny, **settings).resolved()
    return CNNTrainTask(cfg, NAMED_GENOTYPES["cnn"]["DARTS_V2"], torch.device("cpu"))


def torch_copy(generator: torch.Generator) -> torch.Generator:
    return torch.Generator().set_state(generator.get_state())


def test_cnn_step_recomputed_by_hand():
    """Two CNNTrainTask steps of epoch 2 of 4 equal CE + 0.4 · auxiliary CE on the epoch's
    shuffled, augmented and cut-out images with drop-path 0.6 · 2/4, the gradient clipped,
    then SGD with momentum and weight decay: recomputed on a copy of the model with copies
    of the task's generators, weights, BatchNorm statistics and momentum buffers agree."""
    task = cnn_task(epochs=4, lr=0.1, weight_decay=0.01, grad_clip=0.5, drop_path=0.6, cutout=8)
    generator = torch_copy(task.generator)
    task.begin_epoch(2)
    order = torch.randperm(len(task.images), generator=generator)
    assert torch.equal(task.order, order)
    model = copy.deepcopy(task.model)
    masks = torch_copy(task.sampler.generator)
    params = list(model.parameters())
    buffers = [torch.zeros_like(p) for p in params]  # SGD's first step: the gradient
    for start in (0, 2):
        metrics = task.step()
        images, labels = task.images.get(order[start : start + 2])
        x = cutout(cifar.augment(images, generator), 8, generator)
        logits, logits_aux = model(x, 0.3, masks)
        loss = F.cross_entropy(logits, labels)
        total = loss + 0.4 * F.cross_entropy(logits_aux, labels)
        grads = torch.autograd.grad(total, params)
        norm = torch.cat([g.flatten() for g in grads]).norm().item()
        assert norm > 0.5
        grads = [g * 0.5 / (norm + 1e-6) + 0.01 * p for g, p in zip(grads, params)]
        buffers = [0.9 * b + g for b, g in zip(buffers, grads)]
        with torch.no_grad():
            for p, b in zip(params, buffers):
                p.sub_(0.1 * b)
        assert torch.allclose(metrics["loss"], loss, rtol=1e-6, atol=0)
        assert metrics["acc"] == (logits.argmax(1) == labels).double().mean()
        assert metrics["lr"] == 0.1
        # float32: the two orders of operations differ by up to 1e-6 in the momentum buffers
        # (entries up to 0.03), the weights by 1e-7; a slip moves them by 1e-4 or more.
        for name, p in task.model.named_parameters():
            assert torch.allclose(p, model.get_parameter(name), rtol=1e-5, atol=1e-6), name
        for (name, p), b in zip(task.model.named_parameters(), buffers):
            buffer = task.optimizer.state[p]["momentum_buffer"]
            assert torch.allclose(buffer, b, rtol=1e-4, atol=1e-5), name
        for name, value in task.model.named_buffers():
            assert torch.allclose(value, model.get_buffer(name), rtol=1e-5, atol=1e-6), name
    assert task.pos == 4


def test_cnn_schedule_and_test_error():
    """Drop-path rises as drop_path · epoch / epochs; the learning rate follows the cosine
    0.5 · lr · (1 + cos(π · epoch / epochs)) to 0 at the last epoch's end; each evaluation
    (and the test, with test_error = 1 − test_acc) is the test split's first 256 images of
    a fixed shuffle, recomputed here."""
    task = cnn_task(epochs=3, lr=0.2, drop_path=0.3)
    order = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))
    images, labels = task.test_images.get(order[:256])
    for epoch in range(3):
        task.begin_epoch(epoch)
        assert task.drop_prob == pytest.approx(0.3 * epoch / 3, rel=1e-12, abs=0)
        lr = 0.5 * 0.2 * (1 + math.cos(math.pi * epoch / 3))
        assert task.step()["lr"] == pytest.approx(lr, rel=1e-12)
        assert task.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
        evaluation, improved = task.end_epoch(1)
        assert not improved
    assert task.optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-15)
    with torch.no_grad():
        logits, _ = task.model.eval()(cifar.normalize(images))
    task.model.train()
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).double().mean().item()
    assert evaluation == pytest.approx({"test_loss": loss, "test_acc": acc}, rel=1e-6)
    result = task.test(None, 1)
    assert result == pytest.approx(evaluation | {"test_error": 1 - acc}, rel=1e-6)


def test_averaged_sgd_state_survives_a_resume(tmp_path, capsys, monkeypatch):
    """A run that switches to averaged SGD, stopped 3 steps after the switch and resumed,
    ends as an uninterrupted one: same ASGD step count, average, best and history of the
    validation losses, weights and metrics. Validation is scripted (worse at epoch 4's end
    than before the last 2 epochs: the switch); the test is the real one."""
    script = [4.0, 5.0, 5.0, 4.5, 4.6, 4.7]
    perplexity = RNNTrainTask._perplexity

    def scripted(self, source, weights, max_batches):
        if source is self.valid_data:
            return script[len(self.val_history)]
        return perplexity(self, source, weights, max_batches)

    monkeypatch.setattr(RNNTrainTask, "_perplexity", scripted)
    common = [*RNN_TINY, "--nonmono", "2", "--epochs", "6", "--epoch-steps", "2"]
    common += ["--checkpoint-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run(capsys, *common, "--max-steps", "12", "--out", str(straight))[0] == 0
    assert run(capsys, *common, "--max-steps", "11", "--out", str(split))[0] == 0
    stopped = torch.load(split / "checkpoint.pt", weights_only=True)["task"]
    assert stopped["asgd_steps"] == 3 and stopped["val_history"] == script[:5]
    code, _, err = run(capsys, "--resume", "--out", str(split), "--max-steps", "12")
    assert code == 0, err
    a = torch.load(straight / "checkpoint.pt", weights_only=True)["task"]
    b = torch.load(split / "checkpoint.pt", weights_only=True)["task"]
    assert a["asgd_steps"] == b["asgd_steps"] == 4
    assert a["val_history"] == b["val_history"] == script
    assert a["best_val"] == b["best_val"] == 4.0
    for avg, other, weight in zip(a["averaged"], b["averaged"], a["model"].values()):
        assert torch.equal(avg, other) and not torch.equal(avg, weight)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert records(straight) == records(split)
    assert [r["asgd"] for r in records(split) if "asgd" in r] == [False] * 3 + [True] * 3


def test_drop_path_spares_identity_edges():
    """In training, drop-path zeroes (or scales by 1/keep) each example of an op's output,
    but not of a skip_connect (Identity) edge's, as DARTS: node = s0 + max_pool(s1) · mask,
    the mask the first draw from the generator; and none of it in evaluation."""
    edges = [("skip_connect", 0), ("max_pool_3x3", 1)]
    genotype = ConvGenotype(edges, [2], edges, [2])
    cell = Cell(genotype, 3, 3, 3, reduction=False, reduction_prev=False)
    cell.preprocess0 = cell.preprocess1 = torch.nn.Identity()
    torch.manual_seed(0)
    s0, s1 = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    out = cell(s0, s1, 0.3, torch.Generator().manual_seed(5))
    keep = torch.empty(64, 1, 1, 1).bernoulli_(0.7, generator=torch.Generator().manual_seed(5))
    pooled = F.max_pool2d(s1, 3, stride=1, padding=1)
    assert 0 < keep.sum() < 64
    assert torch.allclose(out, s0 + pooled * keep / 0.7, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[keep.flatten() == 0], s0[keep.flatten() == 0])
    assert torch.equal(cell.eval()(s0, s1, 0.3, torch.Generator()), s0 + pooled)


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
        # --max-steps 1: were the setting taken, the run would end at once.
        ([*RNN_TINY, "--max-steps", "1", "--nonmono", "0"], ["--nonmono must be at least 1"]),
        ([*CNN_TINY, "--max-steps", "1", "--cutout", "-1"], ["--cutout must be non-negative"]),
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
