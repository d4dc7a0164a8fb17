"""One search step per space: data order, α step, weight step, evaluation, resumable state.

A task owns the model, both optimisers, the architect and the data position; the loop
(``loop.py``) only calls ``begin_epoch``, ``step``, ``evaluate`` and the state methods.
Every random draw comes from a generator the task checkpoints: the mask sampler (dropout),
a NumPy generator (the RNN's sequence lengths) and a torch generator (the CNN's shuffling
and augmentation), so a resumed run repeats an uninterrupted one exactly.

Distributed (:mod:`fastdarts.distributed`): every rank draws what one process draws for the
global batch and keeps its shard — the CNN's rank r the samples [r·B/N, (r+1)·B/N) of each
batch, the RNN's rank r its block of the batchified columns (and only those columns' hidden
state). Gradients are the global batch's, so w and α stay identical on every rank. Without
``--sync-bn`` each shard is normalised by its own BatchNorm statistics and the running
statistics are averaged across ranks after every step (the updates are linear in the batch
statistics, so this equals averaging after each pass), keeping them identical too. Every
rank evaluates the whole validation set, with the same weights and statistics, so the
numbers are one process's. Reported losses are the global batch's.
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import torch

from fastdarts import distributed
from fastdarts.data import cifar, ptb
from fastdarts.errors import ConfigError
from fastdarts.ops.backends import Backend
from fastdarts.ops.backends import resolve as resolve_backend
from fastdarts.search.architect import Architect, UnrollRule, autocast
from fastdarts.search.config import SearchConfig
from fastdarts.search.graphs import GraphedStep
from fastdarts.search.masks import MaskSampler
from fastdarts.spaces import Batch, ConvSearchModel, RNNSearchModel, SearchModel
from fastdarts.spaces.base import SearchOutput
from fastdarts.spaces.rnn import DROPOUTS
from fastdarts.utils import perplexity


def _optimizer_lr(lr: float | torch.Tensor) -> float | torch.Tensor:
    """The learning rate as the weight optimiser takes it: CUDA's fused SGD reads a tensor
    learning rate as float32 whatever the weights' dtype (the CPU's reads it on the host as a
    double), so a float64 run under --cuda-graphs hands it a float32 copy of ξ (a cast the
    graph records, so each replay casts the value filled before it)."""
    if isinstance(lr, torch.Tensor) and lr.is_cuda:
        return lr.float()
    return lr


class SearchTask:
    """What both spaces share: the optimisers, the architect and the weight step."""

    model: SearchModel

    def __init__(
        self,
        cfg: SearchConfig,
        model: SearchModel,
        device: torch.device,
        backend: Backend | None = None,
    ):
        """``backend`` (None: ``cfg.backend`` resolved here) runs the model's ops."""
        self.cfg, self.model, self.device = cfg, model, device
        (backend or resolve_backend(cfg.backend, model.space, device.type)).apply(model)
        if cfg.sync_bn and distributed.active():
            distributed.convert_sync_batchnorm(model)
        self.dtype = next(iter(model.parameters())).dtype
        self.sampler = MaskSampler(cfg.seed + 1, device)
        on_gpu = device.type == "cuda"
        # Under CUDA graphs: fused SGD takes ξ as a device tensor without reading it (on the
        # CPU it rounds a few elements a unit apart from foreach SGD, by the vector width) and
        # capturable Adam keeps its step count on the GPU.
        self.weight_optimizer = torch.optim.SGD(
            model.weights(),
            lr=cfg.lr,
            momentum=self.momentum,
            weight_decay=cfg.weight_decay,
            foreach=(cfg.foreach and not cfg.cuda_graphs) or None,
            fused=cfg.cuda_graphs or None,
        )
        self.arch_optimizer = torch.optim.Adam(
            model.arch_parameters(),
            lr=cfg.arch_lr,
            betas=self.arch_betas,
            weight_decay=cfg.arch_weight_decay,
            capturable=cfg.cuda_graphs and on_gpu,
        )
        self.architect = Architect(
            model,
            self.arch_optimizer,
            self.sampler,
            order=cfg.order,
            rule=UnrollRule(self.momentum, cfg.weight_decay, self.unroll_clip),
            compat=cfg.compat,
            hvp=cfg.hvp,
            batched_fd=cfg.batched_fd,
            amp=cfg.amp,
            foreach=cfg.foreach,
        )
        self.graphed: GraphedStep | None = None
        if cfg.cuda_graphs:
            # On the CPU (tests) the same static-buffer path runs eagerly.
            # ξ in the weights' dtype, as a Python float would be cast in every use.
            lr = torch.zeros((), dtype=self.dtype, device=device)
            generators = (self.sampler.generator,) if on_gpu else ()
            self.graphed = GraphedStep(self._step, lr, capture=on_gpu, generators=generators)

    momentum = 0.0
    arch_betas = (0.9, 0.999)
    unroll_clip: float | None = None
    weight_clip: float = math.inf

    def end_epoch(self) -> None:
        """Called once an epoch's steps are done (the CNN steps its scheduler)."""

    def search_step(self, train: Batch, val: Batch, lr: float) -> tuple[SearchOutput, SearchOutput]:
        """The α step on ``val`` then the weight step on ``train`` at learning rate ``lr`` (η,
        or ξ for the RNN); returns (validation output, training output)."""
        if self.graphed is None:
            return self._step(train, val, lr)
        outputs = self.graphed(train, val, lr)
        for group in self.weight_optimizer.param_groups:
            group["lr"] = lr  # the graph's device tensor stays out of the optimiser's state
        return outputs

    def _step(
        self, train: Batch, val: Batch, lr: float | torch.Tensor
    ) -> tuple[SearchOutput, SearchOutput]:
        val_out = self.architect.step(train, val, lr, self.weight_optimizer)
        return val_out, self.weight_step(train, lr)

    def weight_step(self, batch: Batch, lr: float | torch.Tensor) -> SearchOutput:
        """One SGD step on the weights with the training loss (+ penalty); returns the output."""
        for group in self.weight_optimizer.param_groups:
            group["lr"] = _optimizer_lr(lr)
        weights = self.model.weights()
        masks = self.sampler.draw(self.model.mask_specs(batch), self.dtype)
        with autocast(self.model, self.cfg.amp):
            out = self.model(batch, masks)
        loss = distributed.scale(out.loss + out.penalty, batch.share)
        grads = distributed.all_sum(torch.autograd.grad(loss, weights))
        for p, g in zip(weights, grads):
            # Fused SGD (torch 2.14, CPU) steps a gradient with other strides than its weight
            # as if they matched: a convolution's weight gradient comes out channels-last
            # from a channels-last input (the CIFAR batches were, before they were made
            # (B, C, H, W) in memory; kept for any that still are).
            p.grad = g.contiguous()
        torch.nn.utils.clip_grad_norm_(weights, self.weight_clip, foreach=self.cfg.foreach or None)
        self.weight_optimizer.step()
        self.weight_optimizer.zero_grad(set_to_none=True)
        return out

    def sync_statistics(self) -> None:
        """After a step, the mean over ranks of BatchNorm's running statistics (they come from
        each rank's shard unless --sync-bn); nothing in one process."""
        if not self.cfg.sync_bn:
            distributed.average_buffers(self.model)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "weight_optimizer": self.weight_optimizer.state_dict(),
            "arch_optimizer": self.arch_optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.weight_optimizer.load_state_dict(state["weight_optimizer"])
        self.arch_optimizer.load_state_dict(state["arch_optimizer"])
        self.sampler.load_state_dict(state["sampler"])


class RNNTask(SearchTask):
    """DARTS on Penn Treebank: α steps on the validation split, carried hidden states.

    Each step draws its sequence length like the paper's code (bptt, or bptt/2 with
    probability 0.05), rescales the learning rate by seq_len / bptt, takes an α step on the
    validation batch at the same position, then an SGD step (gradient clipped to 0.25).
    """

    unroll_clip = 0.25

    def __init__(
        self,
        cfg: SearchConfig,
        device: torch.device,
        dtype: torch.dtype,
        corpus: ptb.Corpus | None = None,
        backend: Backend | None = None,
    ):
        """``corpus`` replaces PTB (benchmarks pass synthetic tokens of the same shape)."""
        corpus = corpus if corpus is not None else ptb.load_ptb(cfg.data)
        torch.manual_seed(cfg.seed)
        dropouts = {k: getattr(cfg, k) for k in DROPOUTS}
        model = RNNSearchModel(corpus.vocab_size, cfg.emsize, cfg.nhid, **dropouts, tar=cfg.tar)
        model = model.to(device, dtype)
        self.weight_clip = cfg.clip
        self.unroll_clip = cfg.clip
        super().__init__(cfg, model, device, backend)
        # This rank's block of columns (all of them in one process).
        train = ptb.batchify_split(corpus.train, cfg.batch_size, "--batch-size", "train", 3)
        ptb.check_bptt(cfg.bptt, train, "--batch-size")
        valid = ptb.batchify_split(corpus.valid, cfg.batch_size, "--batch-size", "valid", 3)
        self.train_data, self.search_data = distributed.shard(train, 1), distributed.shard(valid, 1)
        self.train_data, self.search_data = self.train_data.to(device), self.search_data.to(device)
        self.share = distributed.share(cfg.batch_size)
        valid = ptb.batchify_split(corpus.valid, cfg.eval_batch_size, "--eval-batch-size", "valid")
        self.eval_data = valid.to(device)
        self.rng = np.random.default_rng(cfg.seed)
        self.pos = 0
        self.hidden = self.hidden_valid = None

    def steps_per_epoch(self) -> int:
        # Expected sequence length: 0.95·bptt + 0.05·bptt/2.
        return math.ceil((len(self.train_data) - 2) / (0.975 * self.cfg.bptt))

    def begin_epoch(self, epoch: int) -> None:
        self.pos = 0
        columns = self.train_data.shape[1]
        self.hidden = self.model.init_state(columns)
        self.hidden_valid = self.model.init_state(columns)

    def epoch_done(self) -> bool:
        return self.pos >= len(self.train_data) - 2

    def draw_seq_len(self) -> int:
        """The next training step's sequence length: bptt, or bptt/2 with probability 0.05
        (the paper's search script; its learning rate scales by seq_len / bptt)."""
        bptt = self.cfg.bptt if self.rng.random() < 0.95 else self.cfg.bptt / 2
        return max(1, int(bptt))

    def step(self, base_lr: float | None = None) -> dict[str, torch.Tensor | float]:
        """One α step and one weight step; the losses stay on the device (0-d tensors).
        ``base_lr`` replaces ``--lr`` (DARTS-PT's fine-tuning); either is rescaled by
        seq_len / bptt."""
        cfg = self.cfg
        seq_len = self.draw_seq_len()
        lr = (cfg.lr if base_lr is None else base_lr) * seq_len / cfg.bptt
        data, targets = ptb.get_batch(self.train_data, self.pos, seq_len)
        vdata, vtargets = ptb.get_batch(
            self.search_data, self.pos % (len(self.search_data) - 1), cfg.bptt
        )
        train = Batch(data, targets, self.hidden, self.share)
        val = Batch(vdata, vtargets, self.hidden_valid, self.share)
        val_out, out = self.search_step(train, val, lr)
        self.hidden_valid = val_out.state.detach()
        self.hidden = out.state.detach()
        self.sync_statistics()
        self.pos += seq_len
        loss, val_loss = distributed.global_values(
            [(out.loss, train.share), (val_out.loss, val.share)]
        )
        return {"loss": loss, "ppl": perplexity(loss), "val_loss": val_loss, "lr": lr}

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Validation perplexity without dropout, BN on running statistics (as the paper)."""
        self.model.eval()
        hidden = self.model.init_state(self.cfg.eval_batch_size)
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0
        for n, i in enumerate(range(0, len(self.eval_data) - 1, self.cfg.bptt)):
            if max_batches is not None and n >= max_batches:
                break
            data, targets = ptb.get_batch(self.eval_data, i, self.cfg.bptt)
            out = self.model(Batch(data, targets, hidden))
            hidden = out.state
            total += out.loss.double() * len(data)
            count += len(data)
        self.model.train()
        loss = total.item() / max(count, 1)
        return {"valid_loss": loss, "valid_ppl": perplexity(loss)}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "pos": self.pos,
            # The global batch's hidden states (every rank's columns), so that a run resumes
            # with any number of processes.
            "hidden": distributed.gather(self.hidden),
            "hidden_valid": distributed.gather(self.hidden_valid),
            "rng": json.dumps(self.rng.bit_generator.state),
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pos = state["pos"]
        self.hidden = distributed.shard(state["hidden"]).to(self.device)
        self.hidden_valid = distributed.shard(state["hidden_valid"]).to(self.device)
        self.rng.bit_generator.state = json.loads(state["rng"])


class CNNTask(SearchTask):
    """DARTS on CIFAR-10: a 50/50 split of the training set for weights and α.

    Cosine learning rate (0.025 → 0.001 over the epochs), momentum 0.9 (``--momentum``: the
    weight optimiser's and the unrolled step's), weight decay 3e-4, weight gradients clipped
    to norm 5; α by Adam (3e-4, betas (0.5, 0.999), wd 1e-3). Both
    splits get the search augmentation (random crop with padding 4, horizontal flip). The
    α batches cycle through a shuffled validation half (the paper's code instead takes the
    first batch of a fresh shuffle at every step).
    """

    arch_betas = (0.5, 0.999)

    def __init__(
        self,
        cfg: SearchConfig,
        device: torch.device,
        dtype: torch.dtype,
        images: cifar.CIFAR10Split | None = None,
        backend: Backend | None = None,
    ):
        """``images`` replaces CIFAR-10's training set (benchmarks pass synthetic images)."""
        self.images = images if images is not None else cifar.load_cifar10(cfg.data, train=True)
        torch.manual_seed(cfg.seed)
        model = ConvSearchModel(cfg.init_channels, len(self.images.classes), cfg.layers)
        self.momentum, self.weight_clip = cfg.momentum, cfg.grad_clip
        super().__init__(cfg, model.to(device, dtype), device, backend)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.weight_optimizer, float(cfg.epochs), eta_min=cfg.lr_min
        )
        self.train_idx, self.val_idx = cifar.search_split(len(self.images), cfg.train_portion)
        last = len(self.train_idx) % cfg.batch_size
        if 0 < last < distributed.world_size():
            raise ConfigError(
                f"the last batch of each epoch holds {last} images, fewer than the "
                f"{distributed.world_size()} processes; choose another --batch-size"
            )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.order = self.val_order = torch.empty(0, dtype=torch.long)
        self.pos = self.val_pos = 0

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_idx) / self.cfg.batch_size)

    def begin_epoch(self, epoch: int) -> None:
        self.pos = 0
        self.order = self.train_idx[torch.randperm(len(self.train_idx), generator=self.generator)]

    def epoch_done(self) -> bool:
        return self.pos >= len(self.order)

    def _batch(self, idx: torch.Tensor) -> Batch:
        """The batch of ``idx`` (this rank's samples of it, augmented as one process would)."""
        images, labels = self.images.get(idx)
        # The whole batch is augmented on every rank: its draws keep the generator in step.
        x = distributed.shard(cifar.augment(images, self.generator, dtype=self.dtype))
        labels = distributed.shard(labels)
        share = distributed.share(len(idx))
        return Batch(_to_device(x, self.device), _to_device(labels, self.device), share=share)

    def _next_val_indices(self) -> torch.Tensor:
        bs = self.cfg.batch_size
        if self.val_pos + bs > len(self.val_order):
            perm = torch.randperm(len(self.val_idx), generator=self.generator)
            self.val_order, self.val_pos = self.val_idx[perm], 0
        self.val_pos += bs
        return self.val_order[self.val_pos - bs : self.val_pos]

    def step(self, base_lr: float | None = None) -> dict[str, torch.Tensor | float]:
        """One α step and one weight step; the losses stay on the device (0-d tensors).
        ``base_lr`` replaces the schedule's learning rate (DARTS-PT's fine-tuning)."""
        bs = self.cfg.batch_size
        train = self._batch(self.order[self.pos : self.pos + bs])
        val = self._batch(self._next_val_indices())
        lr = self.scheduler.get_last_lr()[0] if base_lr is None else base_lr
        val_out, out = self.search_step(train, val, lr)
        self.sync_statistics()
        self.pos += bs
        loss, acc, val_loss = distributed.global_values(
            [
                (out.loss, train.share),
                (_accuracy(out.logits, train.targets), train.share),
                (val_out.loss, val.share),
            ]
        )
        return {"loss": loss, "acc": acc, "val_loss": val_loss, "lr": lr}

    def end_epoch(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def evaluate(
        self, max_batches: int | None = None, batch_stats: bool = False
    ) -> dict[str, float]:
        """Loss and accuracy on the α half of the training set, no augmentation; BatchNorm on
        its running statistics, or with ``batch_stats`` on each batch's own, the running
        ones left as they are (DARTS-PT's measurement of a perturbed supernet)."""
        self.model.train(batch_stats)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        correct, count = torch.zeros((), dtype=torch.long, device=self.device), 0
        bs = self.cfg.batch_size
        with self.model.frozen_bn_stats() if batch_stats else contextlib.nullcontext():
            for n, start in enumerate(range(0, len(self.val_idx), bs)):
                if max_batches is not None and n >= max_batches:
                    break
                images, labels = self.images.get(self.val_idx[start : start + bs])
                x = cifar.normalize(images, dtype=self.dtype).to(self.device)
                labels = labels.to(self.device)
                out = self.model(Batch(x, labels))
                total += out.loss.double() * len(labels)
                correct += (out.logits.argmax(-1) == labels).sum()
                count += len(labels)
        self.model.train()
        total_loss, n_correct = torch.stack([total, correct.double()]).tolist()
        return {"valid_loss": total_loss / max(count, 1), "valid_acc": n_correct / max(count, 1)}

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "order": self.order,
            "pos": self.pos,
            "val_order": self.val_order,
            "val_pos": self.val_pos,
        }

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.order, self.pos = state["order"], state["pos"]
        self.val_order, self.val_pos = state["val_order"], state["val_pos"]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; to a GPU through pinned memory without waiting (a copy from
    pageable memory synchronises the host with the device)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == targets).double().mean()


TASKS = {"rnn": RNNTask, "cnn": CNNTask}
