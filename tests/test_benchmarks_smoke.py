"""The benchmark runner works end to end at tiny sizes (no timing assertions: a shared machine).

Each comparison runs as its own test (every `qbnorm` command is a process of its own, and each
process start costs about a second): together they cover `python -m benchmarks --tiny`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# Left out of .ci/run's reruns under other BLAS kernels (those are for tolerances): slow, and
# testing the benchmark runner's plumbing (each test starts several processes); no tolerance to hold
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def runner(tmp_path, only: str) -> tuple[str, dict]:
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", only, "--json", str(out),
                           "--keep", str(tmp_path / "data")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_matmul_and_official(tmp_path):
    text, results = runner(tmp_path, "matmul,official")
    assert "ratio qbnorm / product" in text and "speed-up" in text
    assert results["matmul"]["ours_s"] > 0 and results["matmul"]["bare_s"] > 0
    official = results["official"]
    assert official["rankings"].startswith("identical"), official["rankings"]
    assert official["ours_mib"] > 0 and official["official_mib"] > 0


def test_memory(tmp_path):
    text, results = runner(tmp_path, "memory")
    assert "B/item" in text
    assert len(results["memory"]["rows"]) == 2
    assert results["memory"]["peak_mib"] > 0


def test_scaling(tmp_path):
    text, results = runner(tmp_path, "scaling")
    assert "ns per score" in text and "ns per added score" in text and "with the probe of bank" in text
    assert len(results["scaling"]["lines"]) == 6


def test_transpose(tmp_path):
    text, results = runner(tmp_path, "transpose")
    rows = results["transpose"]["rows"]
    assert [(r["layout"], r["memory"]) for r in rows] == [(layout, memory) for layout in ("contiguous", "rows", "tiles")
                                                         for memory in ("1GiB", "16MiB")]
    assert all(r["outputs"].startswith("identical") for r in rows), rows
    assert "ratio" in text


def test_transposed_io_measures_every_layout():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.transposed_io", "--tiny"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("npy", "contiguous", "rows", "tiles", "convert --transpose"):
        assert name in proc.stdout


def test_sinkhorn(tmp_path):
    text, results = runner(tmp_path, "sinkhorn")
    assert "sn converged (tol 1e-6)" in text and "sn 10 iterations" in text
    runs = results["sinkhorn"]["runs"]
    for memory in ("1GiB",):  # the only budget at tiny size: it holds the kernel
        fixed, converged = runs[f"10 iterations, --memory {memory}"], runs[f"converged (tol 1e-6), --memory {memory}"]
        assert fixed["new_iterations"] == fixed["today_iterations"] == 10 and fixed["held"] is True
        assert 1 <= converged["new_iterations"] and fixed["new_ratio"] > 0 and fixed["today_ratio"] > 0
    peer = results["sinkhorn"]["peer"]
    assert peer == {} or (peer["pot_s"] > 0 and peer["log_u_gap"] < 1e-3)


def test_sinkhorn_is_not_in_the_default_run(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.__main__ import DEFAULT_RUN, SIZES

    assert "sinkhorn" in SIZES and "sinkhorn" not in DEFAULT_RUN
    assert SIZES["sinkhorn"]["default"] == (20000, 100000, 512)


def test_cluster(tmp_path):
    text, results = runner(tmp_path, "cluster")
    assert "ratio local:2 / local" in text and "identical datasets" in text
    assert results["cluster"]["identical"] and results["cluster"]["normalise_cluster_s"] > 0


def test_unknown_comparison_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--only", "nope"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--only nope" in proc.stderr


def test_official_dense_baseline_matches_formula():
    """The baseline is the official algorithm: exp-domain IS on the rows whose top-1 is a bank hub."""
    import numpy as np
    import tolerance as tol

    from benchmarks.official_dense import qb_norm

    rng = np.random.default_rng(0)
    bank, test = rng.uniform(-1, 1, (40, 7)), rng.uniform(-1, 1, (9, 7))
    scores, gated = qb_norm(bank, test, beta=20.0, k=1)
    hubs = np.unique(np.argmax(bank, axis=1))
    want_gated = np.isin(np.argmax(test, axis=1), hubs)
    np.testing.assert_array_equal(gated, want_gated)
    want = np.exp(20 * test)
    want[want_gated] /= np.exp(20 * bank).sum(axis=0)
    # exp-domain on both sides: exp(20·x) is within (20·|x| + EXP_ULPS)·u relative, a sum of 40 within
    # γ₄₀, the quotient one more ulp; the same formula evaluated twice, maybe in another order
    relative = 2 * (tol.U64 * (20 * 1.0 + tol.EXP_ULPS) * 2 + tol.gamma(42, tol.U64))
    tol.assert_close(scores, want, relative * np.abs(want))


def test_timed_commands_start_with_their_inputs_read(tmp_path, monkeypatch):
    """warm() reads the files a command names, datasets of HDF5 paths included, but not its -o output."""
    import builtins

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.__main__ import warm

    for name in ("queries.h5", "gallery.h5", "out.h5"):
        (tmp_path / name).write_bytes(b"x" * 10)
    opened = []
    real = builtins.open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    warm(["qbnorm", "normalise", "--queries", f"{tmp_path}/queries.h5::/emb", "--gallery", tmp_path / "gallery.h5",
          "-o", tmp_path / "out.h5", "--top-k", 5, "--missing", tmp_path / "nothing.h5"])
    assert opened == ["queries.h5", "gallery.h5"]


def test_the_measured_package_is_byte_compiled(monkeypatch):
    """compile_package() leaves a cached bytecode file beside every module of qbnorm_cli, as an
    install would, so that no timed command compiles qbnorm's sources (PYTHONDONTWRITEBYTECODE)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks.__main__ import compile_package

    compile_package()
    modules = sorted((ROOT / "qbnorm_cli").rglob("*.py"))
    assert modules and all(Path(importlib.util.cache_from_source(m)).is_file() for m in modules)


def test_benchmark_scripts_import():
    """Every script in benchmarks/ imports (a moved library module must not break one unnoticed)."""
    import importlib

    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        if path.stem != "__main__":
            importlib.import_module(f"benchmarks.{path.stem}")


def test_checksum_cost_script():
    """benchmarks/checksums.py (standalone, issue 15): the filter-alone measurement at tiny size."""
    proc = subprocess.run([sys.executable, "benchmarks/checksums.py", "io", "--tiny"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "write without" in proc.stdout and "read  without" in proc.stdout


def test_serving(tmp_path):
    """qbnorm search on faiss exports against plain faiss, and the approximate indexes (needs faiss)."""
    import pytest

    pytest.importorskip("faiss")
    text, results = runner(tmp_path, "serving")
    assert "plain faiss" in text and "speed-up over flat" in text and "recall@10" in text
    serving = results["serving"]
    assert set(serving["methods"]) == {"is", "nnn", "csls", "dual-is", "dis"}
    assert all(r["ratio"] > 0 and r["searches_per_query"] >= 1 for r in serving["methods"].values())
    assert serving["methods"]["is"]["searches_per_query"] == 1
    assert set(serving["approximate"]) == {"plain-hnsw", "plain-ivf", "dis-hnsw", "dis-ivf"}
    assert all(0 < r["recall"] <= 1 for r in serving["approximate"].values())


def test_serving_columns(tmp_path):
    """The extra column's scale against SQ, PQ and HNSW indexes runs end to end (needs faiss)."""
    import pytest

    pytest.importorskip("faiss")
    out = tmp_path / "columns.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serving_columns", "--tiny", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = json.loads(out.read_text())
    assert lines[0]["variant"] == "qbnorm's c" and len(lines) == 6
    assert all(0 <= line[key] <= 1 for line in lines for key in ("SQ8 uniform", "PQ8", "HNSW32"))


def test_adversarial_hubs(tmp_path):
    """benchmarks/adversarial_hubs.py (issue 28) on synthetic embeddings: every attack, method and view."""
    out = tmp_path / "adv.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.adversarial_hubs", "--tiny", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Attack success" in proc.stdout and "Detection by the hub audit" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["kind"] for r in results["attacks"]] == ["centroid", "targeted", "mimic", "uncovered", "poisoned"]
    for r in results["attacks"]:
        assert set(r["methods"]) == set(results["methods"]) and 0 <= r["bank_view"]["recall@1%"] <= 100
        assert r["methods"]["none"]["top1"] > 50  # the raw retrieval falls for them


def test_equivalence_against_head(tmp_path):
    """benchmarks.equivalence compares this checkout with a revision checked out beside it; against
    HEAD, with nothing changed, its outputs are byte-identical (one method keeps it short)."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: the benchmark compares with a revision")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.equivalence", "--only", "none", "--keep",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "3 of 3 outputs byte-identical to HEAD" in proc.stdout
    assert (tmp_path / "this" / "none-dense.h5").exists() and (tmp_path / "other" / "none-top10.h5").exists()
