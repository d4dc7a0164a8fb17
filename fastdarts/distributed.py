"""Data-parallel search on torch.distributed, one process per device, launched by torchrun.

Every rank runs the same search on its shard of each global batch: it draws exactly what one
process draws for the whole batch (same seeds, same generators, dropout masks for the global
batch) and keeps its slice. Gradients are summed across ranks after each
``torch.autograd.grad`` — each rank differentiates its loss weighted by its share of the
global batch (:func:`scale`), then :func:`all_sum` adds them up in one flattened all-reduce —
so every rank takes the same step and holds the same w and α. BatchNorm normalises each
shard by its own statistics (what one process computing the shards one by one would do), or
by the global batch's with :func:`convert_sync_batchnorm` (``--sync-bn``).

In one process (no torchrun, or ``WORLD_SIZE=1``) nothing here runs a collective: every
helper returns its input as it is, so the single-process path is unchanged.

Failures: a collective that fails (a peer died) or waits longer than the process group's
timeout (``FASTDARTS_DIST_TIMEOUT`` seconds, default 300) raises :class:`PeerFailure`, and
the SIGTERM torchrun sends to the survivors when a rank exits non-zero raises it too, so
every rank ends with one line saying why it stopped.
"""

from __future__ import annotations

import datetime
import math
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from fastdarts.errors import ConfigError, FastDartsError

TIMEOUT_ENV = "FASTDARTS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(FastDartsError):
    """Another process of a distributed run stopped (or stalled), so this one stops too."""

    exit_code = 4


def env_world_size() -> int:
    """The number of processes the launcher started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in one process)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes in the run (1 in one process)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress (rank 0; before
    the process group exists, the rank torchrun gave it)."""
    return rank() == 0 if active() else os.environ.get("RANK", "0") == "0"


def label(prog: str) -> str:
    """``prog`` with this process's rank when torchrun started several (for error lines)."""
    if env_world_size() <= 1:
        return prog
    return f"{prog} [rank {os.environ.get('RANK', '?')}/{env_world_size()}]"


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun's environment describes (NCCL for CUDA, gloo for the
    CPU) and return this rank's device (``cuda:LOCAL_RANK`` on GPUs). Without torchrun, or
    when the group exists already, only the device is returned."""
    if device.type == "cuda" and env_world_size() > 1:
        if device.index is not None:  # every rank would take that one GPU
            raise ConfigError(
                f"--device {device}: under torchrun each process takes the GPU of its "
                "LOCAL_RANK; pass --device cuda (or choose GPUs with CUDA_VISIBLE_DEVICES)"
            )
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if env_world_size() <= 1 or dist.is_initialized():
        return device
    timeout = _timeout_s()
    with _collective("joining the process group", "check MASTER_ADDR/MASTER_PORT"):
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout),
            device_id=device if device.type == "cuda" else None,
        )
    _catch_launcher_sigterm()
    return device


# SIGTERM's handler before init() took it: shutdown() gives it back.
_sigterm_before: object = signal.SIG_DFL


def _catch_launcher_sigterm() -> None:
    global _sigterm_before
    before = signal.signal(signal.SIGTERM, _stopped_by_launcher)
    if before is not _stopped_by_launcher:
        _sigterm_before = signal.SIG_DFL if before is None else before


def shutdown() -> None:
    """Leave the process group (a no-op in one process), and give SIGTERM back the handler
    init() found (by default, ending the process quietly): the run's error is already
    said, and a PeerFailure raised while Python tears down (an object's __del__) would print
    a traceback after it."""
    if signal.getsignal(signal.SIGTERM) is _stopped_by_launcher:
        signal.signal(signal.SIGTERM, _sigterm_before)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _stopped_by_launcher(signum: int, frame: object) -> None:
    raise PeerFailure(
        f"rank {os.environ.get('RANK', '?')}: stopped by the launcher (SIGTERM): another "
        "process of the run failed or was killed; see its message"
    )


def _timeout_s() -> float:
    """The collectives' timeout: $FASTDARTS_DIST_TIMEOUT seconds, else 300."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise ConfigError(f"{TIMEOUT_ENV}={text!r}: give the timeout in seconds, e.g. 600")
    return seconds


@contextmanager
def _collective(what: str, hint: str | None = None) -> Iterator[None]:
    """Turn a failed collective (gloo and NCCL raise RuntimeError) into a one-line
    PeerFailure saying what failed, the likely cause (``hint``, else a stopped peer) and
    the backend's first line."""
    try:
        yield
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = hint or (
            "another process of the run stopped, was killed or stalled past the "
            f"{_timeout_s():g} s timeout ({TIMEOUT_ENV})"
        )
        raise PeerFailure(
            f"rank {os.environ.get('RANK', '?')}: {what} failed: {hint} ({first})"
        ) from e


# -- sharding --------------------------------------------------------------------------------


def shard_range(n: int) -> tuple[int, int]:
    """This rank's block [lo, hi) of n items: rank r of N gets [r·n/N, (r+1)·n/N)."""
    r, world = rank(), world_size()
    return r * n // world, (r + 1) * n // world


def shard(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """This rank's block of ``tensor`` along ``dim`` (the tensor itself in one process)."""
    if not active():
        return tensor
    lo, hi = shard_range(tensor.shape[dim])
    return tensor.narrow(dim, lo, hi - lo)


def share(n: int) -> float:
    """This rank's share of a global batch of n items (1.0 in one process)."""
    lo, hi = shard_range(n)
    return (hi - lo) / n


def gather(tensor: torch.Tensor | None, dim: int = 0) -> torch.Tensor | None:
    """Every rank's block of ``tensor`` concatenated along ``dim`` in rank order (the inverse
    of :func:`shard` for equal blocks); the tensor itself in one process."""
    if tensor is None or not active():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    with _collective("all_gather"):
        dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim)


# -- gradients and metrics -------------------------------------------------------------------


def scale(loss: torch.Tensor, share: float) -> torch.Tensor:
    """``loss`` weighted by this rank's share of the global batch, so that the sum over ranks
    of its gradients is the global batch's gradient (unchanged in one process)."""
    return loss * share if active() else loss


def all_sum(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """The sum over ranks of each tensor, by one all-reduce of all of them flattened into
    one buffer (the tensors themselves in one process). The results carry no graph."""
    tensors = list(tensors)
    if not active() or not tensors:
        return tensors
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    with _collective("all_reduce"):
        dist.all_reduce(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def global_values(values: list[tuple[torch.Tensor, float]]) -> list[torch.Tensor]:
    """This rank's batch means (a loss, an accuracy), each with its share of the global
    batch, as the global batch's means (share-weighted sums, one all-reduce); in one process
    the values themselves."""
    if not active():
        return [v.detach() for v, _ in values]
    return all_sum([v.detach() * s for v, s in values])


def average_buffers(module: nn.Module) -> None:
    """Replace every floating-point buffer (BatchNorm's running statistics) by its mean over
    ranks, in place (buffers equal on every rank stay equal on every rank, up to the
    rounding of the sum)."""
    if not active():
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    for b, total in zip(buffers, all_sum(buffers)):
        b.copy_(total / world_size())


# -- synchronised BatchNorm ------------------------------------------------------------------


class _AllReduce(torch.autograd.Function):
    """A differentiable sum over ranks (its backward is itself, so it differentiates twice,
    as ``--hvp exact`` needs); failures become :class:`PeerFailure`."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        with _collective("all_reduce (sync BN)"):
            dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduce.apply(grad)


class _GlobalStats:
    """A BatchNorm whose training-mode statistics are the global batch's, in one all-reduce
    per call: every rank contributes its shard's count, mean and centred sum of squares, and
    all combine them exactly (Chan et al.'s parallel variance: no E[x²] − E[x]²
    cancellation). Evaluation uses the running statistics as torch's BatchNorm does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: nn.modules.batchnorm._BatchNorm = self  # type: ignore[assignment]
        if not bn.training and bn.running_mean is not None:
            # Evaluation normalises by the running statistics, as torch's BatchNorm does.
            return super().forward(x)  # type: ignore[misc]
        factor = 0.0 if bn.momentum is None else bn.momentum
        update = bn.training and bn.track_running_stats
        if update and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        dims = [0, *range(2, x.dim())]
        view = [1, -1] + [1] * (x.dim() - 2)
        channels = x.shape[1]
        local_mean = x.mean(dims)
        local_m2 = (x - local_mean.view(view)).pow(2).sum(dims)
        count = x.new_full((1,), x.numel() // channels)
        # Row r holds rank r's statistics, zeros elsewhere: the sum gives every rank all rows.
        rows = [x.new_zeros(2 * channels + 1)] * world_size()
        rows[rank()] = torch.cat([local_mean, local_m2, count])
        stats = _AllReduce.apply(torch.stack(rows))
        means, m2s, counts = stats.split([channels, channels, 1], dim=1)
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (m2s + counts * (means - mean).pow(2)).sum(0) / n
        y = (x - mean.view(view)) * torch.rsqrt(var + bn.eps).view(view)
        if bn.affine:
            y = y * bn.weight.view(view) + bn.bias.view(view)
        if update:
            with torch.no_grad():
                bn.running_mean.lerp_(mean.detach(), factor)
                bn.running_var.lerp_(var.detach() * n / (n - 1), factor)
        return y


class SyncBatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """:class:`nn.BatchNorm1d` with the global batch's statistics (see ``_GlobalStats``)."""


class SyncBatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """:class:`nn.BatchNorm2d` with the global batch's statistics (see ``_GlobalStats``)."""


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm1d/2d module of ``model`` normalise by the global batch; returns
    how many. The modules keep their identity, parameters and buffers (only their class
    changes), so shared modules stay shared and state_dicts are unchanged."""
    converted = 0
    for m in model.modules():
        for plain, synced in ((nn.BatchNorm1d, SyncBatchNorm1d), (nn.BatchNorm2d, SyncBatchNorm2d)):
            if type(m) is plain:
                m.__class__ = synced
                converted += 1
    return converted
