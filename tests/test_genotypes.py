"""Genotype derivation from hand-written α, the published cells, and the JSON files."""

from __future__ import annotations

import json

import pytest
import torch

from fastdarts.errors import ConfigError
from fastdarts.genotypes import (
    CNN_PRIMITIVES,
    NAMED_GENOTYPES,
    RNN_PRIMITIVES,
    ConvGenotype,
    RecurrentGenotype,
    derive_conv,
    derive_recurrent,
    load_genotype,
    parse_cell,
    save_genotype,
    to_dict,
)

# ---------------------------------------------------------------------------------------------
# Hand-written α for the recurrent cell: 8 nodes, node j has j + 1 incoming edges (rows
# j(j+1)/2 .. j(j+1)/2 + j), columns none, tanh, relu, sigmoid, identity.
Z5 = [0.0, 0.0, 0.0, 0.0, 0.0]
RNN_ALPHA = [
    # node 0 (row 0): `none` is the largest, the op must still be a real one -> relu
    [3.0, 0.0, 1.0, 0.0, 0.0],
    # node 1 (rows 1, 2): raw α favours edge 0 (5 > 1.5), softmax favours edge 1:
    # edge 0 tanh (op tie, lowest index) p = e^5/(1+4e^5) = 0.2496; edge 1 sigmoid p = 0.528
    [0.0, 5.0, 5.0, 5.0, 5.0],
    [0.0, 0.0, 0.0, 1.5, 0.0],
    # node 2 (rows 3..5): edge 0's `none` dominates, so its tanh is ~3e-4 although its raw
    # α (2) is the largest; edge 1 identity p = 0.292 beats edge 2 tanh p = 0.234
    [10.0, 2.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.5],
    [0.0, 0.2, 0.0, 0.0, 0.0],
    # node 3 (rows 6..9): edges 1 and 3 tie exactly -> the lower edge (1) wins, op relu
    Z5,
    [0.0, 0.0, 1.0, 0.0, 0.0],
    Z5,
    [0.0, 0.0, 1.0, 0.0, 0.0],
    # node 4 (rows 10..14): sigmoid and identity tie on edge 2 -> sigmoid (lower op index)
    Z5,
    Z5,
    [0.0, -1.0, 0.0, 2.0, 2.0],
    Z5,
    Z5,
    # node 5 (rows 15..20): everything ties -> edge 0, tanh
    Z5,
    Z5,
    Z5,
    Z5,
    Z5,
    Z5,
    # node 6 (rows 21..27): the last edge is the strongest
    Z5,
    Z5,
    Z5,
    Z5,
    Z5,
    Z5,
    [0.0, 0.0, 0.0, 0.0, 3.0],
    # node 7 (rows 28..35): edge 5 relu p = e^2/(e^-2+e+e^2+2) = 0.604 beats edge 2 tanh 0.503
    Z5,
    Z5,
    [0.0, 1.4, 0.0, 0.0, 0.0],
    Z5,
    Z5,
    [-2.0, 1.0, 2.0, 0.0, 0.0],
    Z5,
    Z5,
]
RNN_EXPECTED = [
    ("relu", 0),
    ("sigmoid", 1),
    ("identity", 1),
    ("relu", 1),
    ("sigmoid", 2),
    ("tanh", 0),
    ("identity", 6),
    ("relu", 5),
]

# Hand-written α for the conv cell: 4 nodes, node i has 2 + i edges (offsets 0, 2, 5, 9),
# columns none, max_pool, avg_pool, skip, sep3, sep5, dil3, dil5.
Z8 = [0.0] * 8
CNN_ALPHA_NORMAL = [
    # node 0: both edges kept, strongest first: dil_conv_3x3 (p 0.51) from 1, then sep3 (0.28)
    [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0, 0.0],
    # node 1: raw α keeps edges {0, 1}; softmax keeps {1, 2}:
    # edge 0 max_pool (op tie) p = e^4/(1+7e^4) = 0.142, edge 1 sep5 p = 0.742,
    # edge 2 skip p = e/(e+7) = 0.280
    [0.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0],
    [0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0],
    [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0],
    # node 2: edge 0 is dominated by `none` (dil5 p = 0.0066); edges 1, 2 tie at 1/8;
    # edge 3 max_pool (op tie among 1..6) p = 1/(7+e^-1) = 0.136 -> keep 3, then 1 (tie)
    [6.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
    Z8,
    Z8,
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0],
    # node 3: edge 4 dil5 p = 0.51, edge 2 sep3/dil3 tie -> sep3 (p = 0.356)
    Z8,
    Z8,
    [0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 2.0, 0.0],
    Z8,
    [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0],
]
CNN_EXPECTED_NORMAL = [
    ("dil_conv_3x3", 1),
    ("sep_conv_3x3", 0),
    ("sep_conv_5x5", 1),
    ("skip_connect", 2),
    ("max_pool_3x3", 3),
    ("max_pool_3x3", 1),
    ("dil_conv_5x5", 4),
    ("sep_conv_3x3", 2),
]
# reduce: all zero except edge 1 of node 3 (row 10), which gets dil_conv_5x5
CNN_ALPHA_REDUCE = [Z8] * 10 + [[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0]] + [Z8] * 3
CNN_EXPECTED_REDUCE = [
    ("max_pool_3x3", 0),
    ("max_pool_3x3", 1),
    ("max_pool_3x3", 0),
    ("max_pool_3x3", 1),
    ("max_pool_3x3", 0),
    ("max_pool_3x3", 1),
    ("dil_conv_5x5", 1),
    ("max_pool_3x3", 0),
]


def _raw_ranking_gene(alpha, steps, n_inputs, k, primitives):
    """Derivation on raw α (the wrong way) — used only to show the α above discriminate."""
    gene, start = [], 0
    for i in range(steps):
        rows = alpha[start : start + n_inputs + i]
        best = [max(range(1, len(r)), key=lambda o, r=r: (r[o], -o)) for r in rows]
        ranked = sorted(range(len(rows)), key=lambda j: -rows[j][best[j]])
        gene += [(primitives[best[j]], j) for j in ranked[:k]]
        start += n_inputs + i
    return gene


def test_hand_alpha_discriminates_raw_from_softmax_ranking():
    # the fixtures are only useful if ranking raw α would give a different answer
    raw_rnn = _raw_ranking_gene(RNN_ALPHA, 8, 1, 1, RNN_PRIMITIVES)
    raw_cnn = _raw_ranking_gene(CNN_ALPHA_NORMAL, 4, 2, 2, CNN_PRIMITIVES)
    assert raw_rnn[1] == ("tanh", 0) != RNN_EXPECTED[1]
    assert raw_rnn[2] == ("tanh", 0) != RNN_EXPECTED[2]
    assert raw_cnn[2:4] == [("max_pool_3x3", 0), ("sep_conv_5x5", 1)] != CNN_EXPECTED_NORMAL[2:4]


def test_derive_recurrent_hand_alpha():
    g = derive_recurrent(torch.tensor(RNN_ALPHA, dtype=torch.float64))
    assert isinstance(g, RecurrentGenotype)
    assert list(g.recurrent) == RNN_EXPECTED
    assert list(g.concat) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_derive_recurrent_accepts_float32_and_grad_alpha():
    alpha = torch.tensor(RNN_ALPHA, dtype=torch.float32, requires_grad=True)
    g = derive_recurrent(alpha)
    assert list(g.recurrent) == RNN_EXPECTED


def test_rnn_model_genotype_uses_its_alpha():
    from fastdarts.spaces.rnn import RNNSearchModel

    model = RNNSearchModel(ntoken=5, emsize=4, nhid=4)
    with torch.no_grad():
        model.alphas_recurrent.copy_(torch.tensor(RNN_ALPHA))
    assert list(model.genotype().recurrent) == RNN_EXPECTED


def test_derive_conv_hand_alpha():
    g = derive_conv(torch.tensor(CNN_ALPHA_NORMAL), torch.tensor(CNN_ALPHA_REDUCE))
    assert isinstance(g, ConvGenotype)
    assert list(g.normal) == CNN_EXPECTED_NORMAL
    assert list(g.reduce) == CNN_EXPECTED_REDUCE
    assert list(g.normal_concat) == [2, 3, 4, 5]
    assert list(g.reduce_concat) == [2, 3, 4, 5]


def test_cnn_model_genotype_uses_normal_and_reduce_alpha():
    from fastdarts.spaces.cnn import ConvSearchModel

    model = ConvSearchModel(C=4, layers=3)
    with torch.no_grad():
        model.alphas_normal.copy_(torch.tensor(CNN_ALPHA_NORMAL))
        model.alphas_reduce.copy_(torch.tensor(CNN_ALPHA_REDUCE))
    g = model.genotype()
    assert list(g.normal) == CNN_EXPECTED_NORMAL
    assert list(g.reduce) == CNN_EXPECTED_REDUCE


def test_parse_cell_on_probabilities_directly():
    # probs are used as given (no softmax inside parse_cell); 2 nodes, 1 input, k = 1
    probs = torch.tensor(
        [
            [0.90, 0.01, 0.02, 0.03, 0.04],  # node 0: none largest -> identity (0.04)
            [0.00, 0.30, 0.10, 0.30, 0.30],  # node 1 edge 0: tanh/sigmoid/identity tie -> tanh
            [0.95, 0.20, 0.29, 0.00, 0.00],  # node 1 edge 1: none huge, relu 0.29 < 0.30
        ],
        dtype=torch.float64,
    )
    gene = parse_cell(probs, steps=2, n_inputs=1, k=1, primitives=RNN_PRIMITIVES)
    assert gene == [("identity", 0), ("tanh", 0)]


def test_parse_cell_edge_tie_keeps_lower_edge_first():
    # one node with 4 edges, k = 2: edges 1, 2, 3 tie at 0.5 -> keep 1 then 2
    probs = torch.tensor(
        [
            [0.0, 0.1, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.5, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.5, 0.0],
            [0.0, 0.5, 0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    gene = parse_cell(probs, steps=1, n_inputs=4, k=2, primitives=RNN_PRIMITIVES)
    assert gene == [("relu", 1), ("sigmoid", 2)]


def test_parse_cell_k2_lists_strongest_first():
    probs = torch.tensor(
        [[0.0, 0.1, 0.0, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.7]],
        dtype=torch.float64,
    )
    gene = parse_cell(probs, steps=1, n_inputs=3, k=2, primitives=RNN_PRIMITIVES)
    assert gene == [("identity", 2), ("relu", 1)]


@pytest.mark.parametrize("shape", [(35, 5), (37, 5), (36, 4), (36, 6), (6, 5)])
def test_derive_recurrent_wrong_shape(shape):
    with pytest.raises(ConfigError, match=r"shape"):
        derive_recurrent(torch.zeros(shape))


@pytest.mark.parametrize(
    ("normal", "reduce"), [((13, 8), (14, 8)), ((14, 8), (14, 7)), ((14, 5), (14, 5))]
)
def test_derive_conv_wrong_shape(normal, reduce):
    with pytest.raises(ConfigError, match=r"shape"):
        derive_conv(torch.zeros(normal), torch.zeros(reduce))


def test_parse_cell_wrong_shape():
    with pytest.raises(ConfigError):
        parse_cell(torch.zeros(3, 5), steps=2, n_inputs=2, k=1, primitives=RNN_PRIMITIVES)


# ---------------------------------------------------------------------------------------------
# Published genotypes (Liu et al. 2019, the authors' genotypes.py)

PUBLISHED = {
    ("rnn", "DARTS_V1"): RecurrentGenotype(
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
        concat=[1, 2, 3, 4, 5, 6, 7, 8],
    ),
    ("rnn", "DARTS_V2"): RecurrentGenotype(
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
        concat=[1, 2, 3, 4, 5, 6, 7, 8],
    ),
    ("cnn", "DARTS_V2"): ConvGenotype(
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


def _as_plain(g):
    return {
        k: [tuple(e) if isinstance(e, (list, tuple)) else e for e in v]
        for k, v in g._asdict().items()
    }


@pytest.mark.parametrize("space", ["rnn", "cnn"])
@pytest.mark.parametrize("name", ["DARTS_V1", "DARTS_V2"])
def test_named_genotypes_exist_and_load_by_name(space, name):
    g = NAMED_GENOTYPES[space][name]
    assert isinstance(g, RecurrentGenotype if space == "rnn" else ConvGenotype)
    loaded = load_genotype(name, space=space)
    assert _as_plain(loaded) == _as_plain(g)


@pytest.mark.parametrize("key", list(PUBLISHED))
def test_published_values(key):
    space, name = key
    assert _as_plain(NAMED_GENOTYPES[space][name]) == _as_plain(PUBLISHED[key])


def test_published_spot_checks():
    rnn = load_genotype("DARTS_V2", space="rnn")
    assert list(rnn.recurrent[:4]) == [("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1)]
    cnn = load_genotype("DARTS_V2", space="cnn")
    assert tuple(cnn.normal[-1]) == ("dil_conv_3x3", 2)
    assert tuple(cnn.reduce[-1]) == ("max_pool_3x3", 1)
    v1 = NAMED_GENOTYPES["cnn"]["DARTS_V1"]
    assert tuple(v1.normal[-1]) == ("skip_connect", 2)
    assert tuple(v1.reduce[-1]) == ("avg_pool_3x3", 0)


def test_name_without_space_is_not_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="DARTS_V2"):
        load_genotype("DARTS_V2")


# ---------------------------------------------------------------------------------------------
# JSON


def test_to_dict_field_names():
    rnn = RecurrentGenotype(recurrent=[("relu", 0), ("tanh", 1)], concat=[1, 2])
    assert to_dict(rnn) == {"recurrent": [["relu", 0], ["tanh", 1]], "concat": [1, 2]}
    cnn = ConvGenotype(
        normal=[("sep_conv_3x3", 0), ("skip_connect", 1)],
        normal_concat=[2],
        reduce=[("max_pool_3x3", 1), ("dil_conv_5x5", 0)],
        reduce_concat=[2],
    )
    assert to_dict(cnn) == {
        "normal": [["sep_conv_3x3", 0], ["skip_connect", 1]],
        "normal_concat": [2],
        "reduce": [["max_pool_3x3", 1], ["dil_conv_5x5", 0]],
        "reduce_concat": [2],
    }


@pytest.mark.parametrize("key", [("rnn", "DARTS_V1"), ("rnn", "DARTS_V2"), ("cnn", "DARTS_V2")])
def test_save_load_round_trip(tmp_path, key):
    space, _ = key
    g = PUBLISHED[key]
    path = tmp_path / "sub" / "g.json"
    path.parent.mkdir()
    save_genotype(g, path)
    on_disk = json.loads(path.read_text())
    assert on_disk == {
        f: [list(e) if isinstance(e, tuple) else e for e in v] for f, v in g._asdict().items()
    }
    loaded = load_genotype(path, space=space)
    assert type(loaded) is type(g)
    assert _as_plain(loaded) == _as_plain(g)
    # the space is read from the keys when not given; a str path works too
    assert _as_plain(load_genotype(str(path))) == _as_plain(g)


def test_save_overwrites(tmp_path):
    path = tmp_path / "g.json"
    save_genotype(PUBLISHED[("rnn", "DARTS_V1")], path)
    save_genotype(PUBLISHED[("rnn", "DARTS_V2")], path)
    assert _as_plain(load_genotype(path)) == _as_plain(PUBLISHED[("rnn", "DARTS_V2")])


def _rnn_dict(**over):
    d = {
        "recurrent": [["relu", 0], ["tanh", 1], ["sigmoid", 2]],
        "concat": [1, 2, 3],
    }
    d.update(over)
    return d


def _cnn_dict(**over):
    d = {
        "normal": [
            ["sep_conv_3x3", 0],
            ["skip_connect", 1],
            ["max_pool_3x3", 2],
            ["avg_pool_3x3", 0],
        ],
        "normal_concat": [2, 3],
        "reduce": [
            ["max_pool_3x3", 0],
            ["dil_conv_3x3", 1],
            ["sep_conv_5x5", 2],
            ["skip_connect", 1],
        ],
        "reduce_concat": [2, 3],
    }
    d.update(over)
    return d


def test_small_valid_dicts_load(tmp_path):
    # the fixtures the bad cases derive from are themselves valid
    p = tmp_path / "r.json"
    p.write_text(json.dumps(_rnn_dict()))
    assert list(load_genotype(p).recurrent) == [("relu", 0), ("tanh", 1), ("sigmoid", 2)]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_cnn_dict()))
    g = load_genotype(p, space="cnn")
    assert tuple(g.reduce[1]) == ("dil_conv_3x3", 1)
    assert list(g.normal_concat) == [2, 3]


BAD_FILES = {
    "not_json": ("{recurrent: oops", "not valid JSON"),
    "not_utf8": (b"\xff\xfe\x00\x81garbage", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "list_not_object": ("[1, 2, 3]", "expected a JSON object"),
    "string_not_object": ('"DARTS_V2"', "expected a JSON object"),
    "missing_concat": (json.dumps({"recurrent": [["relu", 0]]}), "match neither"),
    "extra_key": (json.dumps({**_rnn_dict(), "extra": 1}), "match neither"),
    "mixed_keys": (json.dumps({"recurrent": [], "normal_concat": []}), "match neither"),
    "unknown_op_rnn": (json.dumps(_rnn_dict(recurrent=[["gelu", 0]])), "unknown op 'gelu'"),
    "cnn_op_in_rnn": (
        json.dumps(_rnn_dict(recurrent=[["sep_conv_3x3", 0]], concat=[1])),
        "unknown op 'sep_conv_3x3'",
    ),
    "unknown_op_cnn": (
        json.dumps(_cnn_dict(normal=[["conv_7x7", 0], ["skip_connect", 1]], normal_concat=[2])),
        "unknown op 'conv_7x7'",
    ),
    "none_op_rnn": (json.dumps(_rnn_dict(recurrent=[["none", 0]], concat=[1])), "'none'"),
    "none_op_cnn": (
        json.dumps(_cnn_dict(reduce=[["none", 0], ["skip_connect", 1]], reduce_concat=[2])),
        "'none'",
    ),
    "rnn_input_out_of_range": (
        json.dumps(_rnn_dict(recurrent=[["relu", 0], ["tanh", 2]], concat=[1, 2])),
        "reads input 2",
    ),
    "rnn_node0_input_1": (json.dumps(_rnn_dict(recurrent=[["relu", 1]], concat=[1])), "input 1"),
    "negative_input": (json.dumps(_rnn_dict(recurrent=[["relu", -1]], concat=[1])), "input -1"),
    "cnn_input_out_of_range": (
        json.dumps(_cnn_dict(normal=[["sep_conv_3x3", 0], ["skip_connect", 2]], normal_concat=[2])),
        "reads input 2",
    ),
    "cnn_odd_edges": (
        json.dumps(
            _cnn_dict(normal=[["sep_conv_3x3", 0], ["skip_connect", 1], ["max_pool_3x3", 0]])
        ),
        "2 per node",
    ),
    "empty_edges": (json.dumps(_rnn_dict(recurrent=[], concat=[0])), "non-empty"),
    "edge_not_pair": (json.dumps(_rnn_dict(recurrent=[["relu", 0, 1]], concat=[1])), "[op, input]"),
    "edge_index_str": (json.dumps(_rnn_dict(recurrent=[["relu", "0"]], concat=[1])), "[op, input]"),
    "edge_index_bool": (
        json.dumps(_rnn_dict(recurrent=[["relu", False]], concat=[1])),
        "[op, input]",
    ),
    "rnn_concat_out_of_range": (json.dumps(_rnn_dict(concat=[1, 2, 3, 4])), "'concat'"),
    "rnn_concat_negative": (json.dumps(_rnn_dict(concat=[-1, 1])), "'concat'"),
    "rnn_concat_empty": (json.dumps(_rnn_dict(concat=[])), "'concat'"),
    "rnn_concat_not_list": (json.dumps(_rnn_dict(concat="1-3")), "'concat'"),
    "cnn_concat_out_of_range": (json.dumps(_cnn_dict(reduce_concat=[2, 3, 4])), "'reduce_concat'"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_names_file_and_problem(tmp_path, case):
    content, problem = BAD_FILES[case]
    path = tmp_path / f"bad_{case}.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_genotype(path)
    msg = str(info.value)
    assert str(path) in msg
    assert problem in msg
    assert "\n" not in msg


def test_cnn_file_loaded_as_rnn(tmp_path):
    path = tmp_path / "cnn_genotype.json"
    save_genotype(PUBLISHED[("cnn", "DARTS_V2")], path)
    with pytest.raises(ConfigError) as info:
        load_genotype(path, space="rnn")
    msg = str(info.value)
    assert str(path) in msg
    assert "cnn genotype" in msg and "rnn" in msg


def test_rnn_file_loaded_as_cnn(tmp_path):
    path = tmp_path / "rnn_genotype.json"
    save_genotype(PUBLISHED[("rnn", "DARTS_V2")], path)
    with pytest.raises(ConfigError, match="rnn genotype"):
        load_genotype(path, space="cnn")


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "g.json"
    with pytest.raises(ConfigError) as info:
        load_genotype(path, space="rnn")
    msg = str(info.value)
    assert str(path) in msg
    assert "no such genotype file" in msg


def test_a_run_folder_gives_its_genotype_and_other_sources_say_what_they_are(tmp_path):
    """A search's run folder stands for its genotype.json; a folder without one, a
    checkpoint, and a published name without a space each get their own one-line error."""
    with pytest.raises(ConfigError, match=r"a folder without genotype\.json"):
        load_genotype(tmp_path)
    genotype = NAMED_GENOTYPES["cnn"]["DARTS_V1"]
    save_genotype(genotype, tmp_path / "genotype.json")
    assert load_genotype(tmp_path, space="cnn") == genotype
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="a checkpoint, not a genotype; python -m fastdarts"):
        load_genotype(tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError, match="DARTS_V2: a published genotype of both spaces"):
        load_genotype("DARTS_V2")
