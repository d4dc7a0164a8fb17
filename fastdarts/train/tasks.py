"""One training step per space, evaluation, and the resumable state of each.

Every random draw comes from a generator the task checkpoints: the mask sampler (the RNN's
dropout masks, the CNN's drop-path masks, on the model's device), a NumPy generator (the
RNN's sequence lengths) and a torch generator on the CPU (the CNN's shuffling, augmentation
and cutout), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import json
import math

import numpy as np
import torch
import torch.nn.functional as F

from fastdarts.data import cifar, ptb
from fastdarts.genotypes import ConvGenotype, RecurrentGenotype
from fastdarts.models import NetworkCIFAR, RNNModel
from fastdarts.ops.backends import Backend, resolve
from fastdarts.search.masks import MaskSampler
from fastdarts.spaces.rnn import DROPOUTS
from fastdarts.train.config import TrainConfig
from fastdarts.utils import perplexity


def cutout(images: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """images (B, C, H, W) with one length×length square per image set to 0, its centre
    uniform over the image and the square clipped at the borders (DARTS's Cutout)."""
    if length <= 0:
        return images
    b, _, h, w = images.shape
    cy = torch.randint(0, h, (b, 1), generator=generator).to(images.device)
    cx = torch.randint(0, w, (b, 1), generator=generator).to(images.device)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    half = length // 2
    in_rows = (rows >= cy - half) & (rows < cy + half)  # (B, H)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # (B, W)
    square = in_rows[:, :, None] & in_cols[:, None, :]
    return images * (~square)[:, None].to(images.dtype)


class RNNTrainTask:
    """The derived recurrent cell in a language model on PTB, trained as in the paper.

    Each step draws its sequence length like the published evaluation script (bptt, or
    bptt/2 with probability 0.05, then normal with std 5, at least 5 and at most bptt +
    max_seq_len_delta), rescales the learning rate by seq_len / bptt, and takes one SGD step
    on NLL + TAR with the gradient clipped. After each epoch the validation perplexity is
    measured; once it is worse than the best of all but the last ``nonmono`` epochs, the
    run switches to averaged SGD: the same steps, plus torch's ASGD average of the weights
    (the mean of the iterates from the second step after the switch on), which evaluation
    and the final test then use.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        genotype: RecurrentGenotype,
        device: torch.device,
        backend: Backend | None = None,
    ):
        """``backend`` (None: ``cfg.backend`` resolved here) runs the cell's nodes."""
        self.cfg, self.device = cfg, device
        backend = backend or resolve(cfg.backend, "rnn", device.type, "train")
        node_op = backend.rnn_node_op
        # The decoder's loss: the fused backend's kernels where they run, else torch's.
        self.cross_entropy = backend.rnn_cross_entropy or F.cross_entropy
        corpus = ptb.load_ptb(cfg.data)
        torch.manual_seed(cfg.seed)
        dropouts = {k: getattr(cfg, k) for k in DROPOUTS}
        model = RNNModel(
            corpus.vocab_size, genotype, cfg.emsize, cfg.nhid, **dropouts, node_op=node_op
        )
        self.model = model.to(device)
        self.params = list(self.model.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        splits = [
            (corpus.train, cfg.batch_size, "--batch-size", "train", 3),
            (corpus.valid, cfg.eval_batch_size, "--eval-batch-size", "valid"),
            (corpus.test, cfg.test_batch_size, "--test-batch-size", "test"),
        ]
        self.train_data, self.valid_data, self.test_data = (
            ptb.batchify_split(*split).to(device) for split in splits
        )
        ptb.check_bptt(cfg.bptt, self.train_data, "--batch-size")
        self.sampler = MaskSampler(cfg.seed + 1, device)
        self.rng = np.random.default_rng(cfg.seed)
        self.pos = 0
        self.hidden = self.model.init_state(cfg.batch_size)
        self.averaged: list[torch.Tensor] | None = None  # ASGD's running average, once on
        self.asgd_steps = 0  # steps since the switch
        self.val_history: list[float] = []
        self.best_val = math.inf

    def steps_per_epoch(self) -> int:
        return math.ceil((len(self.train_data) - 2) / (0.975 * self.cfg.bptt))

    def begin_epoch(self, epoch: int) -> None:
        self.pos = 0
        self.hidden = self.model.init_state(self.cfg.batch_size)

    def epoch_done(self) -> bool:
        return self.pos >= len(self.train_data) - 2

    def step(self) -> dict[str, torch.Tensor | float]:
        """One SGD step on a sequence of drawn length (the class docstring's); its metrics
        stay on the device."""
        cfg = self.cfg
        bptt = cfg.bptt if self.rng.random() < 0.95 else cfg.bptt / 2
        seq_len = max(5, int(self.rng.normal(bptt, 5)))
        seq_len = min(seq_len, cfg.bptt + cfg.max_seq_len_delta)
        lr = cfg.lr * seq_len / cfg.bptt
        data, targets = ptb.get_batch(self.train_data, self.pos, seq_len)
        masks = self.sampler.draw(self.model.mask_specs(cfg.batch_size), torch.float32)
        logits, hiddens = self.model(data, self.hidden, masks)
        loss = self.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        penalty = cfg.tar * (hiddens[1:] - hiddens[:-1]).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        (loss + penalty).backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.averaged is not None:
            # torch.optim.ASGD(t0=0, lambd=0)'s average, which the paper's script switches
            # to: its factor after step k is 1 / max(1, k - 1), so the average restarts at
            # the first two steps' weights and is the mean of iterates 2..k from then on.
            self.asgd_steps += 1
            with torch.no_grad():
                for avg, p in zip(self.averaged, self.params):
                    avg.add_(p - avg, alpha=1.0 / max(1, self.asgd_steps - 1))
        self.hidden = hiddens[-1].detach()
        self.pos += len(data)
        loss = loss.detach()
        return {"loss": loss, "ppl": perplexity(loss), "lr": lr}

    def eval_weights(self) -> list[torch.Tensor]:
        """The weights evaluation uses: the running average under ASGD, else the current."""
        return self.averaged if self.averaged is not None else [p.detach() for p in self.params]

    @torch.no_grad()
    def _perplexity(self, source: torch.Tensor, weights, max_batches: int | None) -> float:
        saved = [p.detach().clone() for p in self.params]
        for p, w in zip(self.params, weights):
            p.copy_(w)
        self.model.eval()
        hidden = self.model.init_state(source.shape[1])
        total, count = 0.0, 0
        for n, i in enumerate(range(0, len(source) - 1, self.cfg.bptt)):
            if max_batches is not None and n >= max_batches:
                break
            data, targets = ptb.get_batch(source, i, self.cfg.bptt)
            logits, hiddens = self.model(data, hidden)
            hidden = hiddens[-1]
            loss = self.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            total += loss.item() * len(data)
            count += len(data)
        self.model.train()
        for p, s in zip(self.params, saved):
            p.copy_(s)
        return total / max(count, 1)

    def end_epoch(self, max_batches: int | None) -> tuple[dict[str, float], bool]:
        """Validate; switch to ASGD when validation stalls. Returns (metrics, new best)."""
        loss = self._perplexity(self.valid_data, self.eval_weights(), max_batches)
        improved = loss < self.best_val
        self.best_val = min(self.best_val, loss)
        nonmono = self.cfg.nonmono
        if (
            self.averaged is None
            and len(self.val_history) > nonmono
            and loss > min(self.val_history[:-nonmono])
        ):
            self.averaged = [p.detach().clone() for p in self.params]
            self.asgd_steps = 0
        self.val_history.append(loss)
        averaging = self.averaged is not None
        metrics = {"valid_loss": loss, "valid_ppl": perplexity(loss), "asgd": averaging}
        return metrics, improved

    def best_state(self) -> dict[str, torch.Tensor]:
        """The evaluation weights as a state_dict (kept when validation improves)."""
        names = [n for n, _ in self.model.named_parameters()]
        return {n: w.detach().clone() for n, w in zip(names, self.eval_weights())}

    def test(self, state: dict[str, torch.Tensor] | None, max_batches: int | None) -> dict:
        """Test perplexity with ``state``'s weights (else the evaluation weights)."""
        if state is None:
            weights = self.eval_weights()
        else:
            weights = [state[n].to(self.device) for n, _ in self.model.named_parameters()]
        loss = self._perplexity(self.test_data, weights, max_batches)
        return {"test_loss": loss, "test_ppl": perplexity(loss)}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": json.dumps(self.rng.bit_generator.state),
            "pos": self.pos,
            "hidden": self.hidden,
            "averaged": self.averaged,
            "asgd_steps": self.asgd_steps,
            "val_history": self.val_history,
            "best_val": self.best_val,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.pos = state["pos"]
        self.hidden = state["hidden"].to(self.device)
        averaged = state["averaged"]
        self.averaged = None if averaged is None else [a.to(self.device) for a in averaged]
        # A checkpoint from before torch's ASGD average counted the switch's weights in.
        self.asgd_steps = state.get("asgd_steps", state.get("n_averaged", 1) - 1)
        self.val_history = list(state["val_history"])
        self.best_val = state["best_val"]


class CNNTrainTask:
    """NetworkCIFAR from a derived genotype, trained on all 50,000 CIFAR-10 training images.

    SGD (momentum 0.9, weight decay 3e-4), cosine learning rate to 0 over the epochs,
    gradient norm clipped to 5, loss = CE + 0.4 · auxiliary CE, augmentation = random crop
    (padding 4), horizontal flip and cutout 16; drop-path probability rising linearly from
    0 to 0.2 · (epochs − 1)/epochs. Evaluation is on the test split (as the paper's script).
    Nothing fused applies to the network (one op per edge): it runs on the reference ops.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        genotype: ConvGenotype,
        device: torch.device,
        backend: Backend | None = None,
    ):
        """``backend``: the reference, whatever is given (``resolve`` refuses the fused one
        for this network); taken so that both spaces' tasks are built alike."""
        self.cfg, self.device = cfg, device
        self.images = cifar.load_cifar10(cfg.data, train=True)
        self.test_images = cifar.load_cifar10(cfg.data, train=False)
        torch.manual_seed(cfg.seed)
        self.model = NetworkCIFAR(
            genotype,
            cfg.init_channels,
            len(self.images.classes),
            cfg.layers,
            auxiliary=cfg.auxiliary_weight > 0,
        ).to(device)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.optimizer, float(cfg.epochs)
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.sampler = MaskSampler(cfg.seed + 1, device)
        self.order = torch.empty(0, dtype=torch.long)
        self.pos = 0
        self.drop_prob = 0.0
        # A fixed shuffle of the test split (its files are sorted by class), so that an
        # evaluation capped by --eval-batches sees every class.
        self.test_order = torch.randperm(
            len(self.test_images), generator=torch.Generator().manual_seed(0)
        )

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.images) / self.cfg.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        self.pos = 0
        self.order = torch.randperm(len(self.images), generator=self.generator)
        self.drop_prob = self.cfg.drop_path * epoch / self.cfg.epochs

    def epoch_done(self) -> bool:
        return self.pos >= len(self.order)

    def step(self) -> dict[str, torch.Tensor | float]:
        """One SGD step on an augmented batch (crop, flip, cutout), with the auxiliary head's
        loss; its metrics stay on the device."""
        cfg = self.cfg
        images, labels = self.images.get(self.order[self.pos : self.pos + cfg.batch_size])
        x = cutout(cifar.augment(images, self.generator), cfg.cutout, self.generator)
        x, labels = x.to(self.device), labels.to(self.device)
        logits, logits_aux = self.model(x, self.drop_prob, self.sampler.generator)
        loss = F.cross_entropy(logits, labels)
        total = loss
        if logits_aux is not None:
            total = total + cfg.auxiliary_weight * F.cross_entropy(logits_aux, labels)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.pos += len(labels)
        acc = (logits.argmax(-1) == labels).double().mean()
        return {"loss": loss.detach(), "acc": acc, "lr": self.scheduler.get_last_lr()[0]}

    @torch.no_grad()
    def _evaluate(self, max_batches: int | None) -> tuple[float, float]:
        self.model.eval()
        total, correct, count = 0.0, 0, 0
        bs = max(self.cfg.batch_size, 256)
        for n, start in enumerate(range(0, len(self.test_images), bs)):
            if max_batches is not None and n >= max_batches:
                break
            images, labels = self.test_images.get(self.test_order[start : start + bs])
            logits, _ = self.model(cifar.normalize(images).to(self.device))
            labels = labels.to(self.device)
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += len(labels)
        self.model.train()
        return total / max(count, 1), correct / max(count, 1)

    def end_epoch(self, max_batches: int | None) -> tuple[dict[str, float], bool]:
        """Step the schedule; evaluate on the test split. Returns (metrics, False)."""
        self.scheduler.step()
        loss, acc = self._evaluate(max_batches)
        return {"test_loss": loss, "test_acc": acc}, False

    def test(self, state: dict[str, torch.Tensor] | None, max_batches: int | None) -> dict:
        """Test error of the final weights (the paper reports the last epoch's)."""
        loss, acc = self._evaluate(max_batches)
        return {"test_loss": loss, "test_acc": acc, "test_error": 1.0 - acc}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "sampler": self.sampler.state_dict(),
            "order": self.order,
            "pos": self.pos,
            "drop_prob": self.drop_prob,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        self.order, self.pos = state["order"], state["pos"]
        self.drop_prob = state["drop_prob"]


TASKS = {"rnn": RNNTrainTask, "cnn": CNNTrainTask}
