"""`qbnorm hubs` and `qbnorm_cli.hubs`: the hub audit, its score, alerts, labels and file kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import leftovers, run
from test_damage import Battery, byte_damage, datasets, structured_damage

import qbnorm_cli
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core import hubscore
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io import schemas
from qbnorm_cli.io.hdf5 import open_h5

ROOT = Path(__file__).resolve().parent.parent
G, D = 300, 32


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def honest(seed: int = 2) -> dict[str, np.ndarray]:
    """A gallery with natural, heavy-tailed hubness (k-skewness ≈ 4.8, as in real retrieval): items
    around a few shared directions and a component common to all (real embeddings are anisotropic);
    test queries, a bank and another split: noisy copies of its items shifted by a modality gap."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((6, D)))
    gap, common = unit(rng.standard_normal((2, D)))
    gallery = unit(rng.standard_normal((G, D)) / np.sqrt(D) + 0.3 * centres[rng.integers(0, 6, G)] + 2.0 * common)

    def copies(n):
        return unit(gallery[rng.integers(0, G, n)] + gap + 0.5 * rng.standard_normal((n, D)) / np.sqrt(D))

    return {"gallery": gallery, "queries": copies(600), "bank": copies(1200), "other": copies(600)}


def planted(data: dict, m: int = 1) -> np.ndarray:
    """The gallery with m centroid hubs appended: each the normalised mean of 100 queries of a
    split the bank never saw."""
    rng = np.random.default_rng(7)
    hubs = [data["other"][rng.choice(len(data["other"]), 100, replace=False)].mean(axis=0) for _ in range(m)]
    return np.vstack([data["gallery"], unit(np.array(hubs))])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Honest and attacked galleries as files, their probes and raw / normalised rankings."""
    root = tmp_path_factory.mktemp("hubs")
    data = honest()
    attacked = planted(data, m=3)
    for name, value in (("queries", data["queries"]), ("bank", data["bank"]), ("gallery", data["gallery"]),
                        ("attacked", attacked)):
        np.save(root / f"{name}.npy", value)
    with h5py.File(root / "text.h5", "w") as h5:
        h5["text/attacked"] = np.array([f"item [{i}] of the gallery" for i in range(G)] + ["crafted 0", "crafted 1",
                                                                                           "crafted 2"],
                                       dtype=h5py.string_dtype())
        h5["numbers"] = np.arange(G + 3)
    (root / "labels.txt").write_text("".join(f"line {i}\n" for i in range(G + 3)))
    for gallery in ("gallery", "attacked"):
        args = ["probe", "--bank", root / "bank.npy", "--gallery", root / f"{gallery}.npy", "-o",
                root / f"probe-{gallery}.h5", "-q"]
        assert run_main(args) == 0
        for method in ("none", "is"):
            assert run_main(["normalise", "--queries", root / "queries.npy", "--gallery", root / f"{gallery}.npy",
                             "--probe", root / f"probe-{gallery}.h5", "--method", method, "-o",
                             root / f"{method}-{gallery}.h5", "-q"]) == 0
            assert run_main(["normalise", "--queries", root / "queries.npy", "--gallery", root / f"{gallery}.npy",
                             "--probe", root / f"probe-{gallery}.h5", "--method", method, "--top-k", 10, "-o",
                             root / f"{method}-top-{gallery}.h5", "-q"]) == 0
    return root


def run_main(args) -> int:
    from qbnorm_cli.cli import main

    return main([str(a) for a in args])


# --- the score -----------------------------------------------------------------------------------

def test_robust_z_is_median_and_mad():
    x = np.array([1.0, 2.0, 3.0, 4.0, 100.0])
    np.testing.assert_allclose(hubscore.robust_z(x), (x - 3.0) / (hubscore.MAD_TO_SD * 1.0))
    # more than half equal: the MAD is 0 and the mean absolute deviation stands in
    y = np.array([0.0, 0.0, 0.0, 0.0, 5.0])
    np.testing.assert_allclose(hubscore.robust_z(y), y / (hubscore.MEAN_AD_TO_SD * 1.0))
    assert not hubscore.robust_z(np.ones(4)).any()
    np.testing.assert_allclose(hubscore.robust_z(y, min_scale=2.0), y / 2.0)


def test_occurrence_scores_keep_their_scale_when_hubs_take_every_slot():
    """Two crafted items in every query's top k: the others' N_k drop to 0 or 1, and an item
    retrieved once must not look like a hub."""
    nk = np.zeros(100, dtype=np.int64)
    nk[:2] = 1000
    nk[2:5] = 1
    scores = hubscore.occurrence_scores(nk)
    assert (scores[:2] > hubscore.DEFAULT_THRESHOLD).all() and scores[2:].max() < 2
    assert hubscore.flagged(scores, hubscore.DEFAULT_THRESHOLD).tolist() == [0, 1]


def test_order_positions_alerts():
    scores = np.array([1.0, 5.0, 5.0, -2.0, 3.0])
    assert hubscore.order(scores).tolist() == [1, 2, 4, 0, 3]
    assert hubscore.positions(scores).tolist() == [4, 1, 2, 5, 3]
    assert hubscore.alerts(scores, 0.2).tolist() == [1] and hubscore.alerts(scores, 0.41).tolist() == [1, 2, 4]


# --- the library ---------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::qbnorm_cli.QbnormWarning")  # the bank's coverage of the gallery
def test_a_planted_hub_is_flagged_and_an_honest_gallery_is_not():
    data = honest()
    probe = qbnorm_cli.probe(data["bank"], data["gallery"])
    raw = qbnorm_cli.normalise(data["queries"], data["gallery"], probe, method="none")
    nk = hub.k_occurrence(np.argsort(-raw, axis=1)[:, :10], 10, G)
    assert hub.skewness(nk) > 1.0  # heavy-tailed: natural hubs there are
    clean = qbnorm_cli.hubs([probe, raw])
    assert [view["flagged"] for view in clean["inputs"]] == [[], []]
    assert max(view["items"][0]["hub_score"] for view in clean["inputs"]) < hubscore.DEFAULT_THRESHOLD
    attacked = planted(data)
    probe = qbnorm_cli.probe(data["bank"], attacked)
    raw = qbnorm_cli.normalise(data["queries"], attacked, probe, method="none")
    found = qbnorm_cli.hubs([probe, raw], items=5)
    bank, queries = found["inputs"]
    assert bank["flagged"] == [G] and bank["basis"].startswith("log-normaliser")
    for view in found["inputs"]:
        assert view["items"][0]["index"] == G and view["rank"][G] == 1
        assert view["hub_score"].shape == view["n_k"].shape == (G + 1,)
        assert view["share"][G] == view["n_k"][G] / view["queries"] == 1.0  # in every query's top 10
    # by N_k at k = 10 it is one more item in every query's top 10, as the natural hubs of so skewed
    # a gallery are (docs/security.md); in every top 1 it stands out
    assert queries["basis"] == "log(1 + N_k)" and queries["hub_score"][G] < hubscore.DEFAULT_THRESHOLD
    assert qbnorm_cli.hubs(raw, k=1)["inputs"][0]["flagged"] == [G]


def test_library_arguments_are_checked():
    data = honest()
    with pytest.raises(UsageError, match="items"):
        qbnorm_cli.hubs(data["queries"] @ data["gallery"].T, items=0)
    with pytest.raises(UsageError, match="threshold"):
        qbnorm_cli.hubs(data["queries"] @ data["gallery"].T, threshold=float("nan"))
    with pytest.raises(DataError, match="different galleries"):
        qbnorm_cli.hubs([data["queries"] @ data["gallery"].T, data["queries"] @ data["gallery"][:50].T])


# --- the command ---------------------------------------------------------------------------------

def test_json_document_and_rank_beside_the_raw_input(files, capsys):
    code, out, err = run(capsys, "hubs", files / "probe-attacked.h5", files / "is-attacked.h5",
                         files / "none-attacked.h5", "--items", 4, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert {"k", "threshold", "reference", "gallery_rows", "inputs", "warnings"} <= set(doc)
    assert doc["k"] == 10 and doc["threshold"] == hubscore.DEFAULT_THRESHOLD and doc["reference"] == "none-attacked"
    probe, normalised, raw = doc["inputs"]
    assert probe["kind"] == "probe" and normalised["method"] == "is" and raw["method"] == "none"
    for view in doc["inputs"]:
        assert {"name", "kind", "queries", "gallery_rows", "basis", "items", "flagged"} <= set(view)
        assert len(view["items"]) >= 4
        scores = [item["hub_score"] for item in view["items"]]
        assert scores == sorted(scores, reverse=True)
        assert {"index", "hub_score", "n_k", "share", "rank", "n_k_by_input"} <= set(view["items"][0])
    assert sorted(probe["flagged"]) == [G, G + 1, G + 2] and normalised["flagged"] == []
    assert sorted(item["index"] for item in raw["items"][:3]) == [G, G + 1, G + 2]
    assert "rank_change" not in raw["items"][0]
    first = probe["items"][0]
    assert first["rank_change"] == first["rank"] - first["reference_rank"]
    assert first["n_k_by_input"]["is-attacked"] < first["n_k_by_input"]["none-attacked"] == 600  # IS demotes it
    assert "Hubs of probe-attacked" in err and "# in none-attacked" in err


def test_labels_are_read_and_shown(files, capsys):
    code, out, err = run(capsys, "hubs", files / "probe-attacked.h5", "--labels", f"{files}/text.h5::/text/attacked",
                         "--items", 5, "--json")
    assert code == 0, err
    items = json.loads(out)["inputs"][0]["items"]
    assert {item["label"] for item in items[:3]} == {"crafted 0", "crafted 1", "crafted 2"}
    assert "crafted 1" in err and "label" in err
    natural = next(item for item in items if item["index"] < G)
    assert natural["label"] == f"item [{natural['index']}] of the gallery"  # brackets as written
    assert f"item [{natural['index']}] of the gallery" in err
    code, out, _ = run(capsys, "hubs", files / "probe-attacked.h5", "--labels", files / "labels.txt", "--json")
    assert code == 0 and json.loads(out)["inputs"][0]["items"][0]["label"].startswith("line 30")


@pytest.mark.parametrize(("labels", "code", "message"), [
    ("text.h5::/numbers", 3, "labels are strings"),
    ("text.h5::/nothing", 3, "no dataset"),
    ("text.h5", 2, "name the dataset"),
    ("missing.txt", 2, "no such file"),
])
def test_bad_labels_are_one_line(files, capsys, labels, code, message):
    result, _, err = run(capsys, "hubs", files / "probe-attacked.h5", "--labels", files / labels)
    assert result == code and message in err and len(err.strip().splitlines()) == 1, err


def test_labels_of_another_gallery_are_refused(files, capsys, tmp_path):
    (tmp_path / "short.txt").write_text("a\nb\n")
    code, _, err = run(capsys, "hubs", files / "probe-attacked.h5", "--labels", tmp_path / "short.txt")
    assert code == 3 and "2 labels (lines) but the gallery has 303 items" in err
    with h5py.File(tmp_path / "linked.h5", "w") as h5:
        h5["text"] = h5py.ExternalLink(str(files / "text.h5"), "/text/attacked")
    code, _, err = run(capsys, "hubs", files / "probe-attacked.h5", "--labels", f"{tmp_path}/linked.h5::/text")
    assert code == 3 and "link" in err


def test_fail_over_exits_4_naming_the_items(files, capsys, tmp_path):
    code, out, err = run(capsys, "hubs", files / "probe-attacked.h5", "--fail-over", 6, "--quiet")
    assert code == 4 and out == ""
    line, = err.strip().splitlines()
    assert line.startswith("qbnorm: error: hub alert: probe-attacked: 3 item(s) score above 6:")
    assert all(str(j) in line for j in (G, G + 1, G + 2))
    assert run(capsys, "hubs", files / "probe-gallery.h5", "--fail-over", 6, "--quiet") == (0, "", "")
    # -o is written before the alert: the audit is kept for whoever answers it
    code, _, _ = run(capsys, "hubs", files / "probe-attacked.h5", "--fail-over", 6, "-q", "-o", tmp_path / "a.h5")
    assert code == 4 and (tmp_path / "a.h5").exists() and not leftovers(tmp_path)


def test_fail_over_in_a_cron_like_run(files):
    """No terminal, --quiet: nothing but the one line and exit 4."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "qbnorm_cli", "hubs", str(files / "probe-attacked.h5"),
                           "--fail-over", "6", "--quiet"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 4 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "hub alert" in proc.stderr and str(G + 2) in proc.stderr


def test_usage_errors(files, capsys):
    assert run(capsys, "hubs", files / "probe-attacked.h5", "--items", 0)[0] == 2
    assert run(capsys, "hubs", files / "probe-attacked.h5", "--k", 11)[0] == 2  # the probe keeps 10 per bank row
    assert run(capsys, "hubs", files / "probe-attacked.h5", "--fail-over", "nan")[0] == 2
    code, _, err = run(capsys, "hubs", files / "probe-attacked.h5", files / "none-gallery.h5")
    assert code == 3 and "different galleries" in err


def test_a_sparse_query_view_is_warned_about(files, tmp_path, capsys):
    np.save(tmp_path / "few.npy", np.load(files / "queries.npy")[:100] @ np.load(files / "attacked.npy").T)
    code, out, err = run(capsys, "hubs", tmp_path / "few.npy", "--k", 1, "--json", "-q")
    assert code == 0 and err == ""
    warning, = json.loads(out)["warnings"]
    assert "0.33 occurrences per item at k=1" in warning and "--k" in warning


def test_streaming_equals_dense(files, capsys):
    """Row blocks of 7, a small budget, a ranking instead of dense scores: the same document."""
    base = ["hubs", files / "probe-attacked.h5", files / "none-attacked.h5", "--json", "--items", 30]
    whole = json.loads(run(capsys, *base)[1])
    for extra in (["--block-rows", 7], ["--memory", "1MiB"]):
        assert json.loads(run(capsys, *base, *extra)[1])["inputs"] == whole["inputs"]
    ranked = json.loads(run(capsys, "hubs", files / "probe-attacked.h5", files / "none-top-attacked.h5", "--json",
                            "--items", 30)[1])
    assert ranked["inputs"][1]["items"] == [{**item, "n_k_by_input": {"probe-attacked": item["n_k_by_input"][
        "probe-attacked"], "none-top-attacked": item["n_k"]}} for item in whole["inputs"][1]["items"]]
    library = qbnorm_cli.hubs([str(files / "probe-attacked.h5"), np.load(files / "queries.npy") @
                               np.load(files / "attacked.npy").T])
    assert library["inputs"][1]["items"][:5] == [
        {**item, "n_k_by_input": {"probe-attacked": item["n_k_by_input"]["probe-attacked"],
                                  "inputs[1]": item["n_k"]}} for item in whole["inputs"][1]["items"][:5]]


def test_cluster_gives_the_local_document(files, capsys):
    pytest.importorskip("distributed")
    base = ["hubs", files / "probe-attacked.h5", files / "none-attacked.h5", "--json"]
    local = json.loads(run(capsys, *base)[1])
    code, out, err = run(capsys, *base, "--cluster", "local:1")
    assert code == 0, err
    assert json.loads(out)["inputs"] == local["inputs"]


# --- the file kind -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hubs_file(files, tmp_path_factory):
    path = tmp_path_factory.mktemp("kind") / "hubs.h5"
    assert run_main(["hubs", files / "probe-attacked.h5", files / "none-attacked.h5", "-o", path, "-q"]) == 0
    return path


def test_the_hubs_file_follows_its_schema(hubs_file, files, capsys):
    h5 = open_h5(str(hubs_file))
    try:
        layout = schemas.check(h5, "hubs")
        assert layout.dims == {"inputs": 2, "G": G + 3}
        assert h5["hub_score"].fletcher32 and h5["n_k"].fletcher32
        records = json.loads(h5.attrs["hubs"])
        assert [r["name"] for r in records] == ["probe-attacked", "none-attacked"]
        np.testing.assert_array_equal(np.flatnonzero(h5["hub_score"][0] > h5.attrs["threshold"]),
                                      sorted(records[0]["flagged"]))
        assert json.loads(h5.attrs["inputs"])[0]["kind"] == "probe"
    finally:
        h5.close()
    code, _, err = run(capsys, "hubs", files / "probe-attacked.h5", "-o", hubs_file)
    assert code == 2 and "--force" in err


def test_a_damaged_hubs_file_is_refused_or_reads_the_same(hubs_file, capsys, tmp_path):
    battery = Battery(None, capsys, tmp_path)
    rng = np.random.default_rng(28)
    reference = datasets(hubs_file)
    damaged = [(d, p) for d, _, p in structured_damage(hubs_file, tmp_path, rng)]
    for damage, path in [*damaged, *byte_damage(hubs_file, tmp_path, rng, 1)]:
        battery.library("hubs", damage, path, reference)
        path.unlink()
    battery.report("damage of hubs")
    assert battery.count > 20 and not battery.failures, "\n".join(battery.failures)


def test_flags_that_disagree_with_the_scores_are_damage(hubs_file, tmp_path):
    from qbnorm_cli.io.hdf5 import ATTRIBUTE_CHECKSUMS

    bad = tmp_path / "bad.h5"
    bad.write_bytes(hubs_file.read_bytes())
    with h5py.File(bad, "a") as h5:
        del h5.attrs[ATTRIBUTE_CHECKSUMS]
        records = json.loads(h5.attrs["hubs"])
        records[0]["flagged"] = records[0]["flagged"][1:]
        h5.attrs["hubs"] = json.dumps(records)
    h5 = open_h5(str(bad))
    try:
        with pytest.raises(DataError, match="flags 2 items but 3 score above"):
            schemas.check(h5, "hubs")
    finally:
        h5.close()
