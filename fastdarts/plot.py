"""alpha.png: each edge's op weights (softmax of α) over the search."""

from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot_alpha_history(doc: dict, path: str | os.PathLike) -> None:
    """Plot ``alpha.json``'s history: one panel per edge, one line per op, per α matrix.

    ``doc`` = {"primitives": [...], "history": [{"step", "epoch", "alphas": {name: (E, K)}}]}.
    """
    history, primitives = doc["history"], doc["primitives"]
    names = list(history[0]["alphas"]) if history else []
    steps = [h["step"] for h in history]
    n_edges = max((len(history[0]["alphas"][n]) for n in names), default=1)
    cols = min(n_edges, 7)
    rows_per = math.ceil(n_edges / cols)
    fig, axes = plt.subplots(
        rows_per * max(len(names), 1),
        cols,
        figsize=(2.2 * cols, 1.8 * rows_per * max(len(names), 1)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for a, name in enumerate(names):
        for e in range(len(history[0]["alphas"][name])):
            ax = axes[a * rows_per + e // cols][e % cols]
            for k, op in enumerate(primitives):
                ax.plot(steps, [h["alphas"][name][e][k] for h in history], marker=".", label=op)
            ax.set_title(f"{name} edge {e}", fontsize=7)
            ax.tick_params(labelsize=6)
    for ax in axes.flat:
        if not ax.has_data():
            ax.set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(primitives), fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("softmax(α)")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
