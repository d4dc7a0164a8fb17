"""Pictures: a search's α over time (alpha.png) and a genotype's cells.

python -m fastdarts.plot GENOTYPE -o cell.png draws the cell(s) of a genotype JSON file or a
published genotype (with --space), with Graphviz ``dot`` when it is installed, otherwise
with matplotlib.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.backend_bases import FigureCanvasBase

from fastdarts.cli import OneLineParser, report
from fastdarts.errors import ConfigError, FastDartsError
from fastdarts.genotypes import NAMED_GENOTYPES, Genotype, RecurrentGenotype, load_genotype
from fastdarts.utils import atomic_write

PROG = "python -m fastdarts.plot"


def _limits(values: list[float]) -> tuple[float, float]:
    """An axis range over ``values`` with a 5 % margin (a single value gets ±0.5)."""
    lo, hi = min(values), max(values)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5
    return lo - pad, hi + pad


def alpha_history_figure(doc: dict) -> plt.Figure:
    """``alpha.json``'s history as a figure: one panel per edge, one line per op, per α
    matrix; ``doc`` = {"primitives": [...], "history": [{"step", "epoch", "alphas": {name:
    (E, K)}}]}."""
    history, primitives = doc["history"], doc["primitives"]
    names = list(history[0]["alphas"]) if history else []
    steps = [h["step"] for h in history]
    n_edges = max((len(history[0]["alphas"][n]) for n in names), default=1)
    cols = min(n_edges, 7)
    rows_per = math.ceil(n_edges / cols)
    rows = rows_per * max(len(names), 1)
    width, height = 2.2 * cols, 1.8 * rows + 1.0
    # One x and one y range set on every panel, tick labels on the outer panels only, fixed
    # margins: matplotlib's shared axes and tight_layout made this picture, redrawn at every
    # epoch's end, twice as slow (the RNN's 36 panels: 5.3 s against 2.7, the CNN's 28: 3.4
    # against 1.4; medians of 3 calls, one thread).
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    marker = "." if len(history) <= 50 else None
    values = []
    for a, name in enumerate(names):
        for e in range(len(history[0]["alphas"][name])):
            ax = axes[a * rows_per + e // cols][e % cols]
            for k, op in enumerate(primitives):
                line = [h["alphas"][name][e][k] for h in history]
                values += line
                ax.plot(steps, line, marker=marker, label=op)
            ax.set_title(f"{name} edge {e}", fontsize=7)
            ax.tick_params(labelsize=6)
    for ax in axes.flat:
        ax.set_visible(ax.has_data())
        if values:
            ax.set_xlim(*_limits(steps))
            ax.set_ylim(*_limits(values))
    # Tick labels on the first column, and under each panel with no panel below it.
    for r, row in enumerate(axes):
        for c, ax in enumerate(row):
            last = r + 1 == len(axes) or not axes[r + 1][c].get_visible()
            ax.tick_params(labelleft=c == 0, labelbottom=last)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(primitives), fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("softmax(α)")
    # Margins in inches: the legend above, the axis labels left and below.
    fig.subplots_adjust(
        left=0.85 / width,
        right=1 - 0.1 / width,
        bottom=0.55 / height,
        top=1 - 0.6 / height,
        wspace=0.12,
        hspace=0.35,
    )
    return fig


def plot_alpha_history(doc: dict, path: str | os.PathLike) -> None:
    """Writes :func:`alpha_history_figure` to ``path`` (PNG), atomically."""
    fig = alpha_history_figure(doc)
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=80, format="png"))
    finally:
        plt.close(fig)


# -- cell pictures ------------------------------------------------------------------------------


def _cells(genotype: Genotype) -> list[tuple[str, list[tuple[str, int]], list[int]]]:
    """Per cell: (name, edges (op, input) in node order, concat)."""
    if isinstance(genotype, RecurrentGenotype):
        return [("recurrent", list(genotype.recurrent), list(genotype.concat))]
    return [
        ("normal", list(genotype.normal), list(genotype.normal_concat)),
        ("reduce", list(genotype.reduce), list(genotype.reduce_concat)),
    ]


def _graph(genotype: Genotype, cell: tuple) -> tuple[list[str], list[tuple[int, int, str]], int]:
    """One cell as a graph: node labels in topological order, edges (from, to, op; no op on
    the plain connections), and how many leading nodes are the cell's inputs.

    Recurrent: x_t and h_{t-1} feed node 0 (s0), node j ≥ 1 reads the state the genotype
    names, h_t averages the ``concat`` nodes. Convolutional: inputs c_{k-2}, c_{k-1}, nodes
    0..3 each sum two ops, c_k concatenates the ``concat`` nodes.
    """
    _, edges, concat = cell
    if isinstance(genotype, RecurrentGenotype):
        labels = ["x_t", "h_{t-1}", *[str(i) for i in range(len(edges) + 1)], "h_t"]
        first = 2  # graph id of genotype state 0
        graph = [(0, 2, ""), (1, 2, "")]
        graph += [(first + j, first + 1 + n, op) for n, (op, j) in enumerate(edges)]
    else:
        labels = ["c_{k-2}", "c_{k-1}", *[str(i) for i in range(len(edges) // 2)], "c_k"]
        first = 0
        graph = [(j, 2 + n // 2, op) for n, (op, j) in enumerate(edges)]
    graph += [(first + i, len(labels) - 1, "") for i in concat]
    return labels, graph, 2


def genotype_dot(genotype: Genotype) -> str:
    """Graphviz DOT source of the genotype's cell(s), one cluster per cell."""
    lines = ["digraph genotype {", "  rankdir=LR;", '  node [shape=box, style="rounded,filled"];']
    for cell in _cells(genotype):
        name = cell[0]
        labels, graph, n_inputs = _graph(genotype, cell)
        lines.append(f'  subgraph cluster_{name} {{\n    label="{name}";')
        for i, label in enumerate(labels):
            color = "lightblue" if i < n_inputs or i == len(labels) - 1 else "lightyellow"
            lines.append(f'    {name}_{i} [label="{label}", fillcolor={color}];')
        for a, b, op in graph:
            lines.append(f'    {name}_{a} -> {name}_{b} [label="{op}"];')
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _draw_cell(ax, genotype: Genotype, cell: tuple) -> None:
    # Nodes on a line in topological order; edges as arcs, alternately above and below.
    labels, graph, n_inputs = _graph(genotype, cell)
    gap = 2.0
    for n, (a, b, op) in enumerate(graph):
        rad = (0.3 if n % 2 else -0.3) if b - a > 1 else 0.0
        ax.annotate(
            "",
            xy=(gap * b, 0),
            xytext=(gap * a, 0),
            arrowprops={
                "arrowstyle": "->",
                "connectionstyle": f"arc3,rad={rad}",
                "color": "0.3" if op else "0.75",
                "shrinkA": 14,
                "shrinkB": 14,
            },
        )
        if op:
            # The arc's apex: a quadratic Bézier's midpoint lies halfway to its control point.
            apex = -rad * gap * (b - a) / 2
            box = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none"}
            ax.text(gap * (a + b) / 2, apex, op, ha="center", va="center", fontsize=7, bbox=box)
    for i, label in enumerate(labels):
        color = "lightblue" if i < n_inputs or i == len(labels) - 1 else "lightyellow"
        box = {"boxstyle": "round,pad=0.3", "fc": color, "ec": "0.3"}
        ax.text(gap * i, 0, label, ha="center", va="center", fontsize=8, bbox=box, zorder=3)
    span = gap * (len(labels) - 1)
    ax.set_xlim(-1, span + 1)
    ax.set_ylim(-0.16 * span - 0.5, 0.16 * span + 0.5)
    ax.set_title(cell[0], fontsize=10)
    ax.axis("off")


def plot_genotype(genotype: Genotype, path: str | os.PathLike, engine: str = "auto") -> str:
    """Draw the genotype's cell(s) into one image at ``path`` (atomically); returns the engine
    used: ``dot`` (Graphviz, when installed and ``engine`` is auto or dot) or matplotlib."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".") or "png"
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise ConfigError("--engine dot: Graphviz 'dot' is not installed")
    if engine != "matplotlib" and dot is not None:
        source = genotype_dot(genotype).encode()
        image = subprocess.run([dot, f"-T{fmt}"], input=source, capture_output=True, check=True)
        atomic_write(path, lambda f: f.write(image.stdout))
        return "dot"
    cells = _cells(genotype)
    supported = FigureCanvasBase.get_supported_filetypes()
    if fmt.lower() not in supported:  # matplotlib takes .PNG as png
        raise ConfigError(f"{path}: matplotlib cannot write .{fmt} (use {', '.join(supported)})")
    widest = max(len(_graph(genotype, c)[0]) for c in cells)
    size = (1.3 * widest, 0.5 * widest * len(cells))
    fig, axes = plt.subplots(len(cells), 1, figsize=size, squeeze=False)
    for ax, cell in zip(axes[:, 0], cells):
        _draw_cell(ax, genotype, cell)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format=fmt))
    finally:
        plt.close(fig)
    return "matplotlib"


def main(argv: list[str] | None = None) -> int:
    """python -m fastdarts.plot GENOTYPE -o cell.png: draw a genotype's cell(s)."""
    parser = OneLineParser(prog=PROG, description="draw a genotype's cell(s)")
    parser.add_argument(
        "genotype",
        help="a genotype JSON file, a search's run folder, or a published name with --space",
    )
    parser.add_argument("--space", choices=("rnn", "cnn"), help="space of a named genotype")
    parser.add_argument("-o", "--out", default="cell.png", help="image to write (default cell.png)")
    parser.add_argument(
        "--engine",
        choices=("auto", "dot", "matplotlib"),
        default="auto",
        help="auto: Graphviz dot when installed, else matplotlib",
    )
    args = parser.parse_args(argv)
    if Path(args.genotype).is_dir():  # a search's run folder, as derive takes it
        args.genotype = str(Path(args.genotype) / "genotype.json")
    try:
        if args.space is None and not Path(args.genotype).is_file():
            known = [s for s, named in NAMED_GENOTYPES.items() if args.genotype in named]
            if known:
                raise ConfigError(f"{args.genotype}: give --space ({' or '.join(known)})")
        genotype = load_genotype(args.genotype, args.space)
        engine = plot_genotype(genotype, args.out, args.engine)
    except FastDartsError as e:
        return report(PROG, e)
    except (OSError, subprocess.CalledProcessError) as e:
        return report(PROG, ConfigError(f"{args.out}: cannot write the picture ({e})"))
    print(f"{args.out} ({engine})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
