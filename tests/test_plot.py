"""Cell pictures of every published genotype, the DOT source, the CLI, and alpha.png."""

from __future__ import annotations

import shutil

import pytest

from fastdarts.genotypes import NAMED_GENOTYPES, save_genotype
from fastdarts.plot import genotype_dot, main, plot_alpha_history, plot_genotype

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


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz dot is not installed")
def test_dot_engine(tmp_path):
    path = tmp_path / "cell.png"
    assert plot_genotype(NAMED_GENOTYPES["cnn"]["DARTS_V2"], path, engine="dot") == "dot"
    assert path.read_bytes()[:8] == PNG


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
    ("args", "fragment"),
    [
        (["DARTS_V2"], "give --space"),
        (["no_such.json"], "no such genotype file"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, fragment):
    assert main([*args, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_alpha_history_still_plots(tmp_path):
    history = [
        {"step": s, "epoch": s, "alphas": {"recurrent": [[0.2] * 5 for _ in range(3)]}}
        for s in (1, 2)
    ]
    doc = {"primitives": ["none", "tanh", "relu", "sigmoid", "identity"], "history": history}
    plot_alpha_history(doc, tmp_path / "alpha.png")
    assert (tmp_path / "alpha.png").read_bytes()[:8] == PNG
