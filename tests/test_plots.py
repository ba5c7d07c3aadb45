"""Plots: the matrices behind them (maps, edges as a sparse fallback, rollout) against the stored
rows, cropping and word merging through character offsets, and valid PNG/SVG files from
`attnpipe plot` (heatmap, --grid, --rollout, --span, --words)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from attnpipe.errors import ReadError
from attnpipe.read.matrices import (Matrix, attention_matrix, crop, merge_words, rollout_matrix, word_groups,
                                    word_labels)

from conftest import invoke


PNG = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 50 and image.shape[1] > 50


def assert_svg(path):
    root = ET.parse(path).getroot()
    assert root.tag.endswith("svg")


# --- matrices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("head", [0, 2])
def test_heatmap_matrix_is_the_stored_map(dense, head):
    m = attention_matrix(dense, "d-anim", 1, head)
    assert m.source.startswith("maps")
    maps = dense.to_pandas("maps", {"doc_id": "d-anim", "layer": 1, "head": head}).sort_values("query_pos")
    expected = np.stack([np.asarray(w) for w in maps["weights"]])
    np.testing.assert_array_equal(m.weights, expected)
    tokens = dense.tokens("d-anim")
    assert m.row_labels == m.col_labels and len(m.col_labels) == len(tokens)
    assert not m.sparse


def test_heatmap_falls_back_to_edges_when_no_map(sparse):
    m = attention_matrix(sparse, "d-anim", 0, 1)
    assert m.source.startswith("edges, topk") and m.sparse
    edges = sparse.to_pandas("edges", {"doc_id": "d-anim", "layer": 0, "head": 1})
    assert np.isfinite(m.weights).sum() == len(edges)
    for q, k, w in zip(edges["query_pos"], edges["key_pos"], edges["weight"]):
        assert m.weights[q, k] == w


def test_missing_heads_layers_and_documents_are_named(sparse, dense):
    with pytest.raises(ReadError, match="mean of heads.*edges heads 0, 1, 2, 3"):
        attention_matrix(sparse, "d-anim", 0, -1)  # only per-head edges were stored
    with pytest.raises(ReadError, match="layer 7 is not stored.*0, 1"):
        attention_matrix(dense, "d-anim", 7, 0)
    with pytest.raises(ReadError, match="'nope'"):
        attention_matrix(dense, "nope", 0, 0)


def test_rollout_matrix_is_the_stored_rollout(dense):
    m, tokens = rollout_matrix(dense, "d-anim", "it")
    pos = tokens["token"].tolist().index("it")
    rows = dense.to_pandas("rollout", {"doc_id": "d-anim", "window_index": 0, "query_pos": pos})
    assert m.weights.shape == (2, len(tokens))
    for layer, k, w in zip(rows["layer"], rows["key_pos"], rows["weight"]):
        assert m.weights[layer, k] == w
    assert np.isfinite(m.weights).sum() == len(rows)
    assert rollout_matrix(dense, "d-anim", pos)[0].title == m.title
    with pytest.raises(ReadError, match="no token 'zebra'"):
        rollout_matrix(dense, "d-anim", "zebra")


def _tokens(pieces: list[tuple[str, int, int, bool]]) -> pd.DataFrame:
    return pd.DataFrame(pieces, columns=["token", "char_start", "char_end", "special"])


def test_word_groups_from_character_offsets():
    # "He didn't (really) see well-known cats." -> wordpieces with offsets
    tokens = _tokens([("[CLS]", 0, 0, True), ("he", 0, 2, False), ("didn", 3, 7, False), ("'", 7, 8, False),
                      ("t", 8, 9, False), ("(", 10, 11, False), ("real", 11, 15, False), ("##ly", 15, 17, False),
                      (")", 17, 18, False), ("see", 19, 22, False), ("well", 23, 27, False), ("-", 27, 28, False),
                      ("known", 28, 33, False), ("cats", 34, 38, False), (".", 38, 39, False), ("[SEP]", 0, 0, True)])
    groups = word_groups(tokens)
    assert word_labels(tokens, groups) == ["[CLS]", "he", "didn't", "(", "really", ")", "see", "well-known",
                                           "cats", ".", "[SEP]"]
    assert groups[2] == [2, 3, 4]


def test_merge_words_sums_keys_and_averages_queries():
    tokens = _tokens([("[CLS]", 0, 0, True), ("play", 0, 4, False), ("##ing", 4, 7, False), ("now", 8, 11, False)])
    rng = np.random.default_rng(0)
    w = rng.random((4, 4))
    w /= w.sum(1, keepdims=True)
    m = merge_words(Matrix(w, list("abcd"), list("abcd"), "t", "maps"), tokens)
    expected = np.array([
        [w[0, 0], w[0, 1] + w[0, 2], w[0, 3]],
        [(w[1, 0] + w[2, 0]) / 2, (w[1, 1] + w[1, 2] + w[2, 1] + w[2, 2]) / 2, (w[1, 3] + w[2, 3]) / 2],
        [w[3, 0], w[3, 1] + w[3, 2], w[3, 3]],
    ])
    np.testing.assert_allclose(m.weights, expected)
    np.testing.assert_allclose(m.weights.sum(1), 1.0)  # rows still sum to one
    assert m.col_labels == ["[CLS]", "playing", "now"] and m.row_name == "query word"
    sparse = w.copy()
    sparse[:, 3] = np.nan  # a word none of whose cells were stored stays unknown
    assert np.isnan(merge_words(Matrix(sparse, list("abcd"), list("abcd"), "t", "edges"), tokens).weights[:, 2]).all()


def test_crop(dense):
    m = attention_matrix(dense, "d-long", 1, 0, window_index=1)
    cut = crop(m, 5, 15)
    assert cut.weights.shape == (10, 10) and cut.col_labels == m.col_labels[5:15]
    np.testing.assert_array_equal(cut.weights, m.weights[5:15, 5:15])
    assert crop(m, 5, 10_000).weights.shape[0] == m.weights.shape[0] - 5
    with pytest.raises(ReadError, match="empty"):
        crop(m, 4, 4)


# --- files --------------------------------------------------------------------------------------

def test_plot_heatmap_png_and_svg(data, tmp_path):
    png, svg = tmp_path / "h.png", tmp_path / "h.svg"
    assert invoke("plot", data["dense"], "--doc", "d-anim", "--layer", 1, "--head", "mean", "-o", png).exit_code == 0
    assert_png(png)
    result = invoke("plot", data["dense"], "--doc", "d-anim", "--layer", 0, "--head", 3, "-o", svg)
    assert result.exit_code == 0, result.output
    assert_svg(svg)
    assert "d-anim" in svg.read_text()


def test_plot_sparse_grid_rollout_span_words(data, tmp_path):
    cases = {
        "sparse.png": ("plot", data["sparse"], "--doc", "d-rain", "--layer", 1, "--head", 0),
        "recipe.png": ("plot", data["dense"], "--doc", "d-rain", "--layer", 1, "--head", "mean", "--recipe", "topk"),
        "grid.png": ("plot", data["dense"], "--grid", "entropy_norm"),
        "grid.svg": ("plot", data["dense"], "--grid", "prev_mass"),
        "rollout.png": ("plot", data["dense"], "--doc", "d-anim", "--rollout", "it", "--words"),
        "long.png": ("plot", data["dense"], "--doc", "d-long", "--window", 1, "--layer", 0, "--head", 1,
                     "--span", "0:30", "--words"),
    }
    for name, args in cases.items():
        result = invoke(*args, "-o", tmp_path / name)
        assert result.exit_code == 0, (name, result.output)
        (assert_png if name.endswith(".png") else assert_svg)(tmp_path / name)


@pytest.mark.parametrize("args, message", [
    (("--doc", "d-anim", "--layer", 0, "--head", 0, "-o", "{tmp}/x.jpg"), "name it .png or .svg"),
    (("--doc", "d-anim", "--layer", 0, "--head", 0), "-o FILE.png"),
    (("--layer", 0, "--head", 0, "-o", "{tmp}/x.png"), "--doc ID"),
    (("--doc", "d-anim", "-o", "{tmp}/x.png"), "--layer L and --head H"),
    (("--doc", "d-anim", "--layer", 0, "--head", "first", "-o", "{tmp}/x.png"), "'mean'"),
    (("--grid", "nope", "-o", "{tmp}/x.png"), "unknown statistic 'nope'"),
    (("--doc", "d-anim", "--layer", 0, "--head", 0, "--span", "a:b", "-o", "{tmp}/x.png"), "START:END"),
    (("--doc", "d-anim", "--layer", 0, "--head", 0, "-o", "{tmp}/missing/x.png"), "does not exist"),
])
def test_plot_errors_are_one_line(data, tmp_path, args, message):
    result = invoke("plot", data["dense"], *[str(a).format(tmp=tmp_path) for a in args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
