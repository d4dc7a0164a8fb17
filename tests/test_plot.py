"""Cell pictures of every published genotype, the DOT source, the CLI, and alpha.png."""

from __future__ import annotations

import os
import re
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest

from fastdarts.genotypes import NAMED_GENOTYPES, save_genotype
from fastdarts.plot import (
    alpha_history_figure,
    genotype_dot,
    main,
    plot_alpha_history,
    plot_genotype,
)

PNG = b"\x89PNG\r\n\x1a\n"
ALL = [(space, name) for space, named in NAMED_GENOTYPES.items() for name in named]


@pytest.mark.parametrize(("space", "name"), ALL)
def test_every_named_genotype_is_drawn(tmp_path, space, name):
    path = tmp_path / f"{space}-{name}.png"
    assert plot_genotype(NAMED_GENOTYPES[space][name], path, engine="matplotlib") == "matplotlib"
    assert path.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left


@pytest.mark.parametrize(("space", "name"), ALL)
def test_dot_source_has_every_edge(space, name):
    genotype = NAMED_GENOTYPES[space][name]
    lines = genotype_dot(genotype).splitlines()
    cells = ["recurrent"] if space == "rnn" else ["normal", "reduce"]
    for cell in cells:
        assert f"  subgraph cluster_{cell} {{" in lines
        edges = [line for line in lines if line.strip().startswith(f"{cell}_") and "->" in line]
        labelled = sorted(line.split('label="')[1].split('"')[0] for line in edges)
        labelled = [op for op in labelled if op]  # inputs and concat are unlabelled
        assert labelled == sorted(op for op, _ in getattr(genotype, cell))


def dot_cells(source: str) -> dict[str, tuple[list[str], list[str], list[tuple[str, str, str]]]]:
    """Per cluster of a DOT source: node labels, those filled light blue (the cell's inputs
    and output), and the edges as (from label, to label, op) in the order written."""
    cells = {}
    for name, body in re.findall(r"subgraph cluster_(\w+) \{(.*?)\n  \}", source, re.S):
        nodes = dict(re.findall(r'^    (\w+) \[label="([^"]*)", fillcolor=\w+\];$', body, re.M))
        blue = re.findall(r'^    \w+ \[label="([^"]*)", fillcolor=lightblue\];$', body, re.M)
        edges = re.findall(r'^    (\w+) -> (\w+) \[label="([^"]*)"\];$', body, re.M)
        cells[name] = (list(nodes.values()), blue, [(nodes[a], nodes[b], op) for a, b, op in edges])
    return cells


def test_dot_edges_of_the_published_rnn_cell():
    """DARTS_V2's recurrent cell edge by edge: x_t and h_{t-1} feed node 0, node j + 1 reads
    the state the genotype names through its op, and h_t averages nodes 1..8 (not 0)."""
    labels, blue, edges = dot_cells(genotype_dot(NAMED_GENOTYPES["rnn"]["DARTS_V2"]))["recurrent"]
    assert labels == ["x_t", "h_{t-1}", *"012345678", "h_t"]
    assert blue == ["x_t", "h_{t-1}", "h_t"]
    assert edges == [
        ("x_t", "0", ""),
        ("h_{t-1}", "0", ""),
        ("0", "1", "sigmoid"),
        ("1", "2", "relu"),
        ("1", "3", "relu"),
        ("1", "4", "identity"),
        ("2", "5", "tanh"),
        ("5", "6", "sigmoid"),
        ("3", "7", "tanh"),
        ("5", "8", "relu"),
        *[(node, "h_t", "") for node in "12345678"],
    ]


def test_dot_edges_of_the_published_cnn_cells():
    """DARTS_V2's normal and reduction cells edge by edge: two ops into each of nodes 0..3,
    input 2 being node 0, and c_k concatenating nodes 0..3."""
    cells = dot_cells(genotype_dot(NAMED_GENOTYPES["cnn"]["DARTS_V2"]))
    assert list(cells) == ["normal", "reduce"]
    a, b = "c_{k-2}", "c_{k-1}"
    output = [(node, "c_k", "") for node in "0123"]
    expected = {
        "normal": [
            (a, "0", "sep_conv_3x3"),
            (b, "0", "sep_conv_3x3"),
            (a, "1", "sep_conv_3x3"),
            (b, "1", "sep_conv_3x3"),
            (b, "2", "sep_conv_3x3"),
            (a, "2", "skip_connect"),
            (a, "3", "skip_connect"),
            ("0", "3", "dil_conv_3x3"),
            *output,
        ],
        "reduce": [
            (a, "0", "max_pool_3x3"),
            (b, "0", "max_pool_3x3"),
            ("0", "1", "skip_connect"),
            (b, "1", "max_pool_3x3"),
            (a, "2", "max_pool_3x3"),
            ("0", "2", "skip_connect"),
            ("0", "3", "skip_connect"),
            (b, "3", "max_pool_3x3"),
            *output,
        ],
    }
    for name, (labels, blue, edges) in cells.items():
        assert labels == [a, b, *"0123", "c_k"]
        assert blue == [a, b, "c_k"]
        assert edges == expected[name], name


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_dot_engine(tmp_path):
    path = tmp_path / "cell.png"
    assert plot_genotype(NAMED_GENOTYPES["cnn"]["DARTS_V2"], path, engine="dot") == "dot"
    assert path.read_bytes()[:8] == PNG


def test_dot_output_is_written_atomically(tmp_path, capsys, monkeypatch):
    """The dot engine's picture (here a stub dot on PATH, which reads the graph and prints
    bytes) replaces its path whole; a path it cannot replace is one line, nothing left."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "dot"
    stub.write_text("#!/bin/sh\ngrep -q digraph && printf 'picture'\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "pics" / "cell.png"
    assert plot_genotype(NAMED_GENOTYPES["cnn"]["DARTS_V2"], out, engine="dot") == "dot"
    assert out.read_bytes() == b"picture" and os.listdir(out.parent) == ["cell.png"]
    (out.parent / "taken").mkdir()
    args = ["DARTS_V2", "--space", "cnn", "--engine", "dot", "-o", str(out.parent / "taken")]
    assert main(args) == 2
    assert "cannot write the picture" in capsys.readouterr().err
    assert sorted(os.listdir(out.parent)) == ["cell.png", "taken"]


def test_cli_draws_a_file_and_a_name(tmp_path, capsys):
    genotype_file = tmp_path / "g.json"
    save_genotype(NAMED_GENOTYPES["rnn"]["DARTS_V1"], genotype_file)
    out = tmp_path / "sub" / "cell.png"
    assert main([str(genotype_file), "-o", str(out), "--engine", "matplotlib"]) == 0
    assert out.read_bytes()[:8] == PNG
    out2 = tmp_path / "v2.png"
    assert main(["DARTS_V2", "--space", "cnn", "-o", str(out2), "--engine", "matplotlib"]) == 0
    assert out2.read_bytes()[:8] == PNG
    assert str(out2) in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "out", "fragment"),
    [
        (["DARTS_V2"], "x.png", "give --space"),
        (["no_such.json"], "x.png", "no such genotype file"),
        (["DARTS_V2", "--space", "cnn", "--engine", "matplotlib"], "x.jpgx", "cannot write .jpgx"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, out, fragment):
    assert main([*args, "-o", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("engine", ["matplotlib", "auto"])
def test_cli_cannot_write_leaves_nothing(tmp_path, capsys, engine):
    """A picture that cannot replace its path (a folder there) is one line, and no temp
    file stays behind."""
    (tmp_path / "taken").mkdir()
    args = ["DARTS_V2", "--space", "cnn", "--engine", engine, "-o", str(tmp_path / "taken")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot write the picture" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_cli_draws_a_run_folder(tmp_path):
    """A search's run folder, as derive takes it: its genotype.json (and an upper-case
    extension, which matplotlib takes)."""
    save_genotype(NAMED_GENOTYPES["cnn"]["DARTS_V1"], tmp_path / "genotype.json")
    out = tmp_path / "cell.PNG"
    assert main([str(tmp_path), "-o", str(out), "--engine", "matplotlib"]) == 0
    assert out.read_bytes()[:8] == PNG


def test_alpha_history_still_plots(tmp_path):
    history = [
        {"step": s, "epoch": s, "alphas": {"recurrent": [[0.2] * 5 for _ in range(3)]}}
        for s in (1, 2)
    ]
    doc = {"primitives": ["none", "tanh", "relu", "sigmoid", "identity"], "history": history}
    plot_alpha_history(doc, tmp_path / "alpha.png")
    assert (tmp_path / "alpha.png").read_bytes()[:8] == PNG


def test_alpha_history_panels_share_ranges_and_label_the_outer_ones():
    # Two α matrices of 9 edges (2 rows of 7 panels each, 5 of 14 unused): the panels are
    # not matplotlib-shared, so each must be given the range that holds every line.
    rng = np.random.default_rng(0)
    history = [
        {"step": s, "epoch": 0, "alphas": {m: rng.random((9, 3)).tolist() for m in ("a", "b")}}
        for s in (0, 10, 25)
    ]
    doc = {"primitives": ["x", "y", "z"], "history": history}
    values = [v for h in history for m in h["alphas"].values() for row in m for v in row]
    fig = alpha_history_figure(doc)
    try:
        axes = np.array(fig.axes).reshape(4, 7)
        used = [(r, c) for r in range(4) for c in range(7) if (r % 2) * 7 + c < 9]
        assert [ax.get_visible() for ax in axes.flat] == [
            (r, c) in used for r in range(4) for c in range(7)
        ]
        for r, c in used:
            ax = axes[r, c]
            lo, hi = ax.get_ylim()
            assert lo < min(values) and max(values) < hi and hi - lo < 1.2
            assert ax.get_xlim()[0] < 0 and 25 < ax.get_xlim()[1] < 27
            assert [line.get_label() for line in ax.get_lines()] == ["x", "y", "z"]
            assert ax.get_title() == f"{'ab'[r // 2]} edge {(r % 2) * 7 + c}"
            # Tick labels on the first column, and under the panels with none below them.
            assert ax.yaxis.get_tick_params()["labelleft"] == (c == 0)
            assert ax.xaxis.get_tick_params()["labelbottom"] == ((r + 1, c) not in used)
        assert all(ax.get_ylim() == axes[0, 0].get_ylim() for ax in axes.flat)
    finally:
        plt.close(fig)
