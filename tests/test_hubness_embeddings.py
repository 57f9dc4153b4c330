"""Hubness of raw embeddings: `hubness --queries Q --gallery G` (and the library's queries=,
gallery=) scores them itself, streamed; embeddings given where scores are expected are refused."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import reference as ref

import qbnorm_cli
from qbnorm_cli.errors import DataError, UsageError


@pytest.fixture
def data(tmp_path, emb):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as h5:
        h5["queries"] = emb.queries
        h5["gallery"] = emb.gallery
        h5["train_queries"] = emb.bank
        h5["query_gallery_sims"] = emb.scores().S.astype(np.float32)
    return path


@pytest.mark.parametrize("k", [1, 3, 7])
def test_dot_k_occurrence_is_the_dense_oracles(emb, k):
    """Dyadic embeddings: float32 computes every dot product exactly, ties included (broken towards
    the lower index, as the oracle's stable sort breaks them)."""
    S = emb.scores().S
    out = qbnorm_cli.hubness(queries=emb.queries, gallery=emb.gallery, similarity="dot", k=k)
    np.testing.assert_array_equal(out["k_occurrence"][k], ref.k_occurrence(S, k))
    assert out["kind"] == "embeddings" and out["queries"] == S.shape[0] and out["gallery_rows"] == S.shape[1]
    # the same as giving the dense scores
    assert out["by_k"] == qbnorm_cli.hubness(S, k=k)["by_k"]


def test_streamed_blocks_and_memory_do_not_change_it(emb):
    whole = qbnorm_cli.hubness(queries=emb.queries, gallery=emb.gallery, k=[1, 5])
    for options in ({"block_rows": 3}, {"memory": "1MiB"}):
        blocks = qbnorm_cli.hubness(queries=emb.queries, gallery=emb.gallery, k=[1, 5], **options)
        assert blocks["by_k"] == whole["by_k"]


def test_exclude_self_on_the_gallery_against_itself(emb):
    S = emb.gallery.astype(np.float64) @ emb.gallery.astype(np.float64).T
    np.fill_diagonal(S, -np.inf)
    out = qbnorm_cli.hubness(queries=emb.gallery, gallery=emb.gallery, similarity="dot", k=4, exclude_self=True)
    np.testing.assert_array_equal(out["k_occurrence"][4], ref.k_occurrence(S, 4))
    with pytest.raises(UsageError, match="exclude_self"):
        qbnorm_cli.hubness(queries=emb.queries, gallery=emb.gallery, exclude_self=True)


def test_library_options_are_keyword_only_and_checked(emb):
    with pytest.raises(TypeError):
        qbnorm_cli.hubness(emb.queries, emb.gallery)  # the gallery is not a positional argument
    with pytest.raises(UsageError, match=r"queries.*gallery"):
        qbnorm_cli.hubness(queries=emb.queries)
    with pytest.raises(UsageError, match="similarity"):
        qbnorm_cli.hubness(queries=emb.queries, gallery=emb.gallery, similarity="l2")
    with pytest.raises(UsageError, match="scores"):
        qbnorm_cli.hubness()


def test_cli_scores_embeddings_and_records_them(cli, data, tmp_path):
    out = json.loads(cli.ok("hubness", "--queries", f"{data}::/queries", "--gallery", f"{data}::/gallery",
                            "--similarity", "dot", "--k", 3, "--json", "-o", tmp_path / "hub.h5"))
    (res,) = out["inputs"]
    assert res["name"] == "queries × gallery" and res["kind"] == "embeddings"
    expected = qbnorm_cli.hubness(queries=f"{data}::/queries", gallery=f"{data}::/gallery", similarity="dot", k=3)
    assert res["by_k"][0]["skewness"] == expected["by_k"][0]["skewness"]
    with h5py.File(tmp_path / "hub.h5") as h5:
        recorded = json.loads(h5.attrs["inputs"])
        assert [r["dataset"] for r in recorded] == ["/queries", "/gallery"]
        assert json.loads(h5.attrs["params"])["similarity"] == "dot"


@pytest.mark.parametrize("command", ["hubness", "evaluate"])
@pytest.mark.parametrize("dataset", ["/queries", "/train_queries", "/gallery"])
def test_embeddings_where_scores_are_expected_are_refused(cli, data, command, dataset):
    """Before: hubness printed a skewness of the 19 × 8 embedding matrix; evaluate said a gallery
    index was outside the gallery of 8 items."""
    extra = ("--queries-per-item", 1) if command == "evaluate" else ()
    code, out, err = cli(command, f"{data}::{dataset}", *extra)
    assert code == 3 and out == ""
    assert err.count("\n") == 1 and "looks like embeddings" in err and dataset.lstrip("/") in err, err
    assert ("--queries and --gallery" if command == "hubness" else "--method none") in err
    assert "outside the gallery" not in err


def test_a_qbnorm_embeddings_file_is_refused_and_a_scores_name_is_not(cli, data, tmp_path):
    cli.ok("convert", f"{data}::/gallery", "-o", tmp_path / "emb.h5", "--kind", "embeddings")
    code, _, err = cli("hubness", tmp_path / "emb.h5")
    assert code == 3 and "a qbnorm embeddings file" in err
    np.save(tmp_path / "gallery_sims.npy", np.eye(4, dtype=np.float32))
    cli.ok("hubness", f"{data}::/query_gallery_sims", tmp_path / "gallery_sims.npy", "--k", 2)
    # a score matrix stored under an embedding's name: declared by convert, then accepted
    cli.ok("convert", f"{data}::/query_gallery_sims", "-o", tmp_path / "queries.h5", "--kind", "similarity")
    cli.ok("hubness", tmp_path / "queries.h5", "--k", 2)


def test_library_refuses_too(data):
    with pytest.raises(DataError, match=r"looks like embeddings.*queries.*gallery"):
        qbnorm_cli.hubness(f"{data}::/queries")
