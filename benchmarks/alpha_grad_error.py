"""The second-order α-gradient's error per precision mode, against float64 and the exact HVP.

On one search step's batches (synthetic data of the real shapes, the step's own masks), the
α-gradient of each mode is compared with the float64 α-gradient through the exact HVP
(double backward); the error is ‖g − g₆₄‖ / ‖g₆₄‖ over all α. Modes: float32 and
bfloat16 autocast (``--amp bf16``), each with the finite-difference HVP (w± in float32) and
the exact one; float64 with the finite difference shows the difference quotient's own
truncation error, at the paper's radius r = 0.01 and at each of ``--radii`` (ε = r / ‖v‖).
Each float64 finite-difference row also counts the switches between its w⁺ and w⁻ passes:
ReLU outputs whose sign differs and max-pool windows whose argmax differs. The difference
quotient divides each such jump in the gradient by 2ε, so they explain its error.

    python benchmarks/alpha_grad_error.py --space rnn --config small --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness
from benchmarks.search_step import PRESETS, build_task, search_config
from fastdarts.data import ptb
from fastdarts.search.tasks import RNNTask, SearchTask
from fastdarts.spaces import Batch

SCRIPT = "benchmarks/alpha_grad_error.py"
# (dtype, amp, hvp): the float64 exact gradient is the reference.
MODES = [
    ("float64", "off", "fd"),
    ("float32", "off", "fd"),
    ("float32", "off", "exact"),
    ("float32", "bf16", "fd"),
    ("float32", "bf16", "exact"),
]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


class Replay:
    """A mask sampler that hands out the masks a first run drew, cast to each run's dtype."""

    def __init__(self, sampler) -> None:
        self.sampler, self.drawn, self.i = sampler, [], None

    def draw(self, specs, dtype):
        if self.i is None:
            masks = self.sampler.draw(specs, torch.float64)
            self.drawn.append(masks)
        else:
            masks, self.i = self.drawn[self.i], self.i + 1
        return {k: v.to(dtype) for k, v in masks.items()}

    def rewind(self) -> None:
        self.i = 0


class SwitchCounter(TorchDispatchMode):
    """Records each ReLU's sign pattern and each max-pool's argmax in the forward passes it
    sees; :meth:`counts` compares the first half of them (w⁺) with the second (w⁻)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.relu.default:
            self.seen.append(("relu", out > 0))
        elif func is torch.ops.aten.max_pool2d_with_indices.default:
            self.seen.append(("max_pool", out[1].clone()))
        elif func in (torch.ops.aten.relu_.default, torch.ops.aten.max_pool2d.default):
            raise NotImplementedError(f"{func} is not counted: the switch count would be short")
        return out

    def counts(self) -> dict[str, int]:
        """Per kind, the elements that switched and the elements compared."""
        half = len(self.seen) // 2
        plus, minus = self.seen[:half], self.seen[half:]
        if len(plus) != len(minus) or any(
            (k1, a.shape) != (k2, b.shape) for (k1, a), (k2, b) in zip(plus, minus)
        ):
            raise RuntimeError("the w+ and w- passes ran different ops: cannot pair them")
        counts = {"relu_flips": 0, "relu_outputs": 0, "pool_changes": 0, "pool_windows": 0}
        for (kind, a), (_, b) in zip(plus, minus):
            changed, total = "relu_flips", "relu_outputs"
            if kind == "max_pool":
                changed, total = "pool_changes", "pool_windows"
            counts[changed] += int((a != b).sum())
            counts[total] += a.numel()
        return counts


def counting_switches(architect) -> SwitchCounter:
    """Makes ``architect``'s (unbatched) finite-difference HVP run under a new counter."""
    counter, hvp_fd = SwitchCounter(), architect._hvp_fd

    def counted(*args):
        with counter:
            return hvp_fd(*args)

    architect._hvp_fd = counted
    return counter


def first_batches(task: SearchTask) -> tuple[Batch, Batch]:
    """The training and validation batches of the task's first step, in float64."""
    if isinstance(task, RNNTask):
        bptt, bs = task.cfg.bptt, task.cfg.batch_size
        data, targets = ptb.get_batch(task.train_data, 0, bptt)
        vdata, vtargets = ptb.get_batch(task.search_data, 0, bptt)
        zeros = task.model.init_state(bs)
        return Batch(data, targets, zeros), Batch(vdata, vtargets, zeros)
    bs = task.cfg.batch_size
    return task._batch(task.order[:bs]), task._batch(task.order[bs : 2 * bs])


def _cast(batch: Batch, dtype: torch.dtype) -> Batch:
    inputs = batch.inputs.to(dtype) if batch.inputs.is_floating_point() else batch.inputs
    state = None if batch.state is None else batch.state.to(dtype)
    return Batch(inputs, batch.targets, state)


def alpha_grad_errors(
    space: str, preset: str, device: torch.device, radii: tuple[float, ...] = ()
) -> list[dict]:
    """One row per mode, then per extra finite-difference radius (float64): its α-gradient's
    relative error against float64 + exact HVP."""
    base = search_config(space, 2, preset, {})
    lr = base.lr
    ref_task = build_task(dataclasses.replace(base, hvp="exact"), device, torch.float64, 2)
    train, val = first_batches(ref_task)
    replay = Replay(ref_task.sampler)
    ref_task.architect.sampler = replay
    state = ref_task.model.state_dict()
    _, want = ref_task.architect.alpha_grads(train, val, lr, ref_task.weight_optimizer)
    want = torch.cat([g.reshape(-1) for g in want])
    rows = []
    modes = [(*mode, None) for mode in MODES] + [("float64", "off", "fd", r) for r in radii]
    for dtype_name, amp, hvp, radius in modes:
        dtype = DTYPES[dtype_name]
        cfg = dataclasses.replace(base, hvp=hvp, amp=amp, dtype=dtype_name)
        task = build_task(cfg, device, dtype, 2)
        if radius is not None:
            task.architect.fd_radius = radius
        counter = None
        if dtype == torch.float64 and hvp == "fd" and not task.architect.batched_fd:
            counter = counting_switches(task.architect)
        task.model.load_state_dict(state)
        replay.rewind()
        task.architect.sampler = replay
        _, got = task.architect.alpha_grads(
            _cast(train, dtype), _cast(val, dtype), lr, task.weight_optimizer
        )
        got = torch.cat([g.reshape(-1).double() for g in got])
        rows.append(
            {
                "space": space,
                "config": preset,
                "dtype": dtype_name,
                "amp": amp,
                "hvp": hvp,
                "radius": task.architect.fd_radius if hvp == "fd" else None,
                "rel_error": ((got - want).norm() / want.norm()).item(),
                "cosine": torch.nn.functional.cosine_similarity(got, want, dim=0).item(),
                **(counter.counts() if counter is not None else {}),
            }
        )
    return rows


COLUMNS = [
    ("space", "space"),
    ("config", "config"),
    ("dtype", "dtype"),
    ("amp", "amp"),
    ("hvp", "hvp"),
    ("radius r", "radius"),
    ("‖g − g64‖/‖g64‖", "rel_error"),
    ("cosine", "cosine"),
    ("ReLU flips", "relu_flips"),
    ("max-pool changes", "pool_changes"),
]


def radii(text: str) -> tuple[float, ...]:
    """argparse type of ``--radii``: positive numbers, comma-separated."""
    try:
        return tuple(harness.positive_float(r) for r in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive numbers, comma-separated (e.g. 1e-3,1e-4), got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> dict:
    """Measures each mode's α-gradient error; returns (and optionally writes) the result
    document."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--space", choices=("rnn", "cnn"), required=True)
    p.add_argument("--config", choices=tuple(PRESETS["rnn"]), default="small")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--radii",
        type=radii,
        default=(),
        help="more finite-difference radii r, comma-separated, each a float64 row",
    )
    harness.add_threads_argument(p)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    harness.check_device(p, args.device)
    harness.check_json_path(p, args.json)
    device = harness.setup(args.device, args.threads)
    rows = alpha_grad_errors(args.space, args.config, device, args.radii)
    doc = {
        "env": harness.env_info(device, [SCRIPT, *(sys.argv[1:] if argv is None else argv)]),
        "rows": rows,
        "run": {
            "reference": "float64, exact HVP (double backward), same weights, batches, masks",
            "preset": PRESETS[args.space][args.config],
            "data": "synthetic, seed 0 (see benchmarks/search_step.py)",
        },
    }
    return harness.report(doc, COLUMNS, args.json)


if __name__ == "__main__":
    main()
