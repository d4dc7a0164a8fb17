"""Genotypes: the discrete cells DARTS derives from α, the published ones, and their JSON form.

A genotype lists, for each intermediate node, its kept incoming edges as ``(op, input)``
pairs. The JSON files use the original namedtuples' field names:
``{"recurrent": [[op, j], ...], "concat": [...]}`` for the recurrent space and
``{"normal": ..., "normal_concat": ..., "reduce": ..., "reduce_concat": ...}`` for the
convolutional one.
"""

from __future__ import annotations

import json
import os
from collections import namedtuple
from collections.abc import Sequence
from pathlib import Path

import torch

from fastdarts.errors import ConfigError

RNN_PRIMITIVES: tuple[str, ...] = ("none", "tanh", "relu", "sigmoid", "identity")
CNN_PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)
PRIMITIVES = {"rnn": RNN_PRIMITIVES, "cnn": CNN_PRIMITIVES}

RNN_STEPS = 8  # intermediate nodes of the recurrent cell
CNN_STEPS = 4  # intermediate nodes of the convolutional cell

RecurrentGenotype = namedtuple("RecurrentGenotype", "recurrent concat")
ConvGenotype = namedtuple("ConvGenotype", "normal normal_concat reduce reduce_concat")
Genotype = RecurrentGenotype | ConvGenotype

# The cells published with DARTS (first- and second-order search).
RNN_GENOTYPES: dict[str, RecurrentGenotype] = {
    "DARTS_V1": RecurrentGenotype(
        recurrent=[
            ("relu", 0),
            ("relu", 1),
            ("tanh", 2),
            ("relu", 3),
            ("relu", 4),
            ("identity", 1),
            ("relu", 5),
            ("relu", 1),
        ],
        concat=list(range(1, 9)),
    ),
    "DARTS_V2": RecurrentGenotype(
        recurrent=[
            ("sigmoid", 0),
            ("relu", 1),
            ("relu", 1),
            ("identity", 1),
            ("tanh", 2),
            ("sigmoid", 5),
            ("tanh", 3),
            ("relu", 5),
        ],
        concat=list(range(1, 9)),
    ),
}
CNN_GENOTYPES: dict[str, ConvGenotype] = {
    "DARTS_V1": ConvGenotype(
        normal=[
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("skip_connect", 2),
        ],
        normal_concat=[2, 3, 4, 5],
        reduce=[
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("avg_pool_3x3", 0),
        ],
        reduce_concat=[2, 3, 4, 5],
    ),
    "DARTS_V2": ConvGenotype(
        normal=[
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 0),
            ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1),
            ("skip_connect", 0),
            ("skip_connect", 0),
            ("dil_conv_3x3", 2),
        ],
        normal_concat=[2, 3, 4, 5],
        reduce=[
            ("max_pool_3x3", 0),
            ("max_pool_3x3", 1),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
            ("max_pool_3x3", 0),
            ("skip_connect", 2),
            ("skip_connect", 2),
            ("max_pool_3x3", 1),
        ],
        reduce_concat=[2, 3, 4, 5],
    ),
}
NAMED_GENOTYPES = {"rnn": RNN_GENOTYPES, "cnn": CNN_GENOTYPES}


def parse_cell(
    probs: torch.Tensor, steps: int, n_inputs: int, k: int, primitives: Sequence[str]
) -> list[tuple[str, int]]:
    """Derive one cell from its mixture weights.

    ``probs`` (E, K) holds each edge's op weights (softmax of α), edges ordered node by node
    with node i having ``n_inputs + i`` incoming edges. For each node keep the ``k`` edges
    whose strongest non-``none`` op is largest, then that op on each kept edge. Ties go to
    the lower edge index and the lower op index (the original's stable sort and strict >),
    so derivation is deterministic; ``none`` never wins, even when it is the largest weight.
    """
    none = primitives.index("none")
    rows = probs.detach().to("cpu", torch.float64).tolist()
    expected = sum(n_inputs + i for i in range(steps))
    if len(rows) != expected or any(len(r) != len(primitives) for r in rows):
        raise ConfigError(
            f"α has shape {tuple(probs.shape)}, expected ({expected}, {len(primitives)})"
        )

    def best_op(row: list[float]) -> int:
        best = None
        for op, w in enumerate(row):
            if op != none and (best is None or w > row[best]):
                best = op
        return best

    gene: list[tuple[str, int]] = []
    start = 0
    for i in range(steps):
        edges = rows[start : start + n_inputs + i]
        ranked = sorted(range(len(edges)), key=lambda j: -edges[j][best_op(edges[j])])
        for j in ranked[:k]:
            gene.append((primitives[best_op(edges[j])], j))
        start += n_inputs + i
    return gene


def derive_recurrent(alpha: torch.Tensor, steps: int = RNN_STEPS) -> RecurrentGenotype:
    """Recurrent genotype from α (36, 5): one input per node; output = mean of all nodes."""
    probs = torch.softmax(alpha.detach().double(), dim=-1)
    gene = parse_cell(probs, steps, n_inputs=1, k=1, primitives=RNN_PRIMITIVES)
    return RecurrentGenotype(recurrent=gene, concat=list(range(1, steps + 1)))


def derive_conv(
    alpha_normal: torch.Tensor, alpha_reduce: torch.Tensor, steps: int = CNN_STEPS
) -> ConvGenotype:
    """Convolutional genotype from α (14, 8) for normal and reduction cells: two inputs per node."""

    def parse(alpha: torch.Tensor) -> list[tuple[str, int]]:
        probs = torch.softmax(alpha.detach().double(), dim=-1)
        return parse_cell(probs, steps, n_inputs=2, k=2, primitives=CNN_PRIMITIVES)

    concat = list(range(2, steps + 2))
    return ConvGenotype(
        normal=parse(alpha_normal),
        normal_concat=concat,
        reduce=parse(alpha_reduce),
        reduce_concat=concat,
    )


def space_of(genotype: Genotype) -> str:
    """``"rnn"`` or ``"cnn"``."""
    return "rnn" if isinstance(genotype, RecurrentGenotype) else "cnn"


def to_dict(genotype: Genotype) -> dict:
    """JSON-ready dict with the original namedtuple field names."""
    out = {}
    for field, value in genotype._asdict().items():
        if field.endswith("concat"):
            out[field] = [int(i) for i in value]
        else:
            out[field] = [[op, int(j)] for op, j in value]
    return out


_CELLS = {
    "rnn": (("recurrent", "concat"),),
    "cnn": (("normal", "normal_concat"), ("reduce", "reduce_concat")),
}
_N_INPUTS = {"rnn": 1, "cnn": 2}  # cell inputs before the intermediate nodes
_KEEP = {"rnn": 1, "cnn": 2}  # edges kept per node


def _parse_edges(value: object, field: str, space: str, source: str) -> list[tuple[str, int]]:
    primitives = PRIMITIVES[space]
    if not isinstance(value, list) or not value or len(value) % _KEEP[space]:
        raise ConfigError(
            f"{source}: '{field}' must be a non-empty list of [op, input], {_KEEP[space]} per node"
        )
    edges = []
    for n, item in enumerate(value):
        if not (
            isinstance(item, (list, tuple))
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], int)
            and not isinstance(item[1], bool)
        ):
            raise ConfigError(f"{source}: '{field}'[{n}] = {item!r} is not [op, input]")
        op, j = item
        if op not in primitives or op == "none":
            raise ConfigError(
                f"{source}: '{field}'[{n}] names unknown op '{op}' "
                f"(the {space} space has {', '.join(primitives[1:])})"
            )
        node = n // _KEEP[space]
        if not 0 <= j < _N_INPUTS[space] + node:
            raise ConfigError(
                f"{source}: '{field}'[{n}] reads input {j}, but node {node} can only "
                f"read inputs 0..{_N_INPUTS[space] + node - 1}"
            )
        edges.append((op, j))
    return edges


def from_dict(data: object, source: str = "genotype") -> Genotype:
    """Validate and build a genotype from its JSON dict; ConfigError says what is wrong."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    kinds = {"rnn": RecurrentGenotype, "cnn": ConvGenotype}
    space = next((sp for sp, c in kinds.items() if set(data) == set(c._fields)), None)
    if space is None:
        raise ConfigError(
            f"{source}: keys {sorted(data)} match neither {list(RecurrentGenotype._fields)} "
            f"(rnn) nor {list(ConvGenotype._fields)} (cnn)"
        )
    fields = {}
    for gene_field, concat_field in _CELLS[space]:
        edges = _parse_edges(data[gene_field], gene_field, space, source)
        n_nodes = _N_INPUTS[space] + len(edges) // _KEEP[space]
        concat = data[concat_field]
        if not (
            isinstance(concat, list)
            and concat
            and all(isinstance(i, int) and not isinstance(i, bool) for i in concat)
            and all(0 <= i < n_nodes for i in concat)
        ):
            raise ConfigError(
                f"{source}: '{concat_field}' must be a list of node indices in 0..{n_nodes - 1}"
            )
        fields[gene_field], fields[concat_field] = edges, concat
    return kinds[space](**fields)


def load_genotype(spec: str | os.PathLike, space: str | None = None) -> Genotype:
    """A genotype from a JSON file (or a search's run folder: its genotype.json), or a
    published one by name (``DARTS_V1``, ``DARTS_V2``).

    A name needs ``space``; a file's space is read from its keys and must match ``space``
    when one is given.
    """
    name = str(spec)
    if space is not None and name in NAMED_GENOTYPES.get(space, {}):
        return NAMED_GENOTYPES[space][name]
    path = Path(spec)
    if path.is_dir() and (path / "genotype.json").is_file():
        path = path / "genotype.json"
    if not path.is_file():
        known = ", ".join(sorted(RNN_GENOTYPES))
        if name in known.split(", "):
            raise ConfigError(f"{name}: a published genotype of both spaces; give --space")
        if path.is_dir():
            raise ConfigError(f"{name}: a folder without genotype.json (not a search run?)")
        raise ConfigError(f"{name}: no such genotype file (or a published name: {known})")
    if path.suffix == ".pt":
        raise ConfigError(
            f"{path}: a checkpoint, not a genotype; python -m fastdarts.derive {path} prints "
            "its genotype (or give its run folder)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    genotype = from_dict(data, source=str(path))
    if space is not None and space_of(genotype) != space:
        found = {"rnn": "an rnn", "cnn": "a cnn"}[space_of(genotype)]
        raise ConfigError(f"{path}: {found} genotype, but the space is {space}")
    return genotype


def save_genotype(genotype: Genotype, path: str | os.PathLike) -> None:
    """Write a genotype as JSON atomically (a reader never sees a half-written file)."""
    from fastdarts.utils import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(genotype), indent=1) + "\n")
