"""`qbnorm search` against a plain faiss search of the same shapes, and approximate indexes.

Run by `python -m benchmarks --only serving` (benchmarks/__main__.py times every command as a whole
process, interleaved ABBA). On a seeded problem (queries × gallery × dim, unit rows):

* flat: `qbnorm search --index EXPORT --top-k 100` on an exact faiss export (IndexFlatIP over the
  d+1-dimensional augmented vectors) against benchmarks/faiss_plain.py, a plain IndexFlatIP search
  of the raw d-dimensional gallery (read the index and the queries, normalise, search, write), for
  each offset method (target ≤ 1.1×) and for dis (target ≤ 1.1 × (1 + gated share): its raw search
  decides the gate, the gated rows are searched again);
* hnsw, ivf: the same search on approximate exports: build time, recall@100 against the exact
  normalised ranking on a sample of queries (search --check-recall), and speed-up over flat; beside
  them the same faiss index type built on the raw gallery (recall against its exact raw ranking),
  so that what the extra column costs an approximate index can be told from what the data costs.

The embeddings have a low intrinsic dimension, as a model's do (`write_structured`): items of a
few hundred clusters in a 32-dimensional latent space, mapped into `dim` dimensions, queries close
to an item. (On isotropic noise in 512 dimensions every top-100 beyond the first few items is a
near-tie, and no approximate index can reach a useful recall: that measures the data, not the index.)
"""

from __future__ import annotations

import json
import statistics
import sys

import h5py
import numpy as np

OFFSET_METHODS = ("is", "nnn", "csls", "dual-is")
GATED = "dis"
# queries, gallery, dim, bank (and gallery bank), top-k, recall sample (share of the queries)
SIZES = {"tiny": (200, 3000, 64, 400, 10, 0.25), "quick": (2000, 20000, 512, 1000, 100, 0.05),
         "default": (10000, 100000, 512, 2000, 100, 0.01), "full": (10000, 100000, 512, 2000, 100, 0.01)}
APPROXIMATE = {
    "tiny": {"hnsw": ["--hnsw-m", 16, "--ef-construction", 64, "--ef-search", 64], "ivf": ["--nprobe", 16]},
    "quick": {"hnsw": ["--hnsw-m", 32, "--ef-construction", 200, "--ef-search", 128], "ivf": ["--nprobe", 16]},
    "default": {"hnsw": ["--hnsw-m", 32, "--ef-construction", 200, "--ef-search", 128], "ivf": ["--nprobe", 16]},
}
APPROXIMATE["full"] = APPROXIMATE["default"]
TARGET = 1.1
LATENT, CLUSTERS, CHUNK = 32, 256, 8192


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def structured_rows(r0: int, r1: int, dim: int, seed: int) -> np.ndarray:
    """Rows r0:r1 of a gallery of low intrinsic dimension (the same rows whatever the chunking)."""
    mix = np.random.default_rng([seed, 1]).standard_normal((LATENT, dim)) / np.sqrt(LATENT)
    centres = np.random.default_rng([seed, 2]).standard_normal((CLUSTERS, LATENT)) * 1.5
    out = np.empty((r1 - r0, dim), dtype=np.float32)
    for c0 in range(r0 - r0 % CHUNK, r1, CHUNK):
        rng = np.random.default_rng([seed, 3, c0])
        z = centres[rng.integers(0, CLUSTERS, CHUNK)] + rng.standard_normal((CHUNK, LATENT))
        x = z @ mix + 0.1 * rng.standard_normal((CHUNK, dim)) / np.sqrt(dim)
        a, b = max(r0, c0), min(r1, c0 + CHUNK)
        out[a - r0:b - r0] = x[a - c0:b - c0]
    return _unit(out)


def write_structured(path: str, n: int, dim: int, seed: int, *, near: int | None = None, noise: float = 0.3,
                     noise_seed: int = 1) -> None:
    """n unit rows in /embeddings: a gallery, or (near=n_gallery) rows close to random items of one."""
    with h5py.File(path, "w") as h5:
        ds = h5.create_dataset("embeddings", shape=(n, dim), dtype=np.float32,
                               chunks=(min(n, max(1, (1 << 20) // (4 * dim))), dim))
        for r0 in range(0, n, CHUNK):
            r1 = min(n, r0 + CHUNK)
            if near is None:
                ds[r0:r1] = structured_rows(r0, r1, dim, seed)
                continue
            rng = np.random.default_rng([seed, noise_seed, r0])
            targets = np.sort(rng.integers(0, near, r1 - r0))
            base = np.concatenate([structured_rows(int(t), int(t) + 1, dim, seed) for t in targets]) \
                if r1 - r0 < 64 else _rows_of(targets, dim, seed)
            ds[r0:r1] = _unit(base + noise * rng.standard_normal(base.shape).astype(np.float32) / np.sqrt(dim))


def _rows_of(targets: np.ndarray, dim: int, seed: int) -> np.ndarray:
    out = np.empty((targets.size, dim), dtype=np.float32)
    for c0 in range(int(targets.min()) - int(targets.min()) % CHUNK, int(targets.max()) + 1, CHUNK):
        inside = (targets >= c0) & (targets < c0 + CHUNK)
        if inside.any():
            out[inside] = structured_rows(c0, c0 + CHUNK, dim, seed)[targets[inside] - c0]
    return out


def compare(bench, h) -> None:
    """The serving comparison; `h` is the runner module (run, qbnorm, interleaved, …)."""
    nq, ng, dim, nb, top, check = SIZES[bench.mode]
    bench.say(f"== serving: qbnorm search (faiss) vs a plain faiss IndexFlatIP search, {nq:,} queries × {ng:,} "
              f"gallery × {dim}, top-{top}")
    g, q, b, gb, probe = (bench.path(f"sv_{x}") for x in ("gallery.h5", "queries.h5", "bank.h5", "gbank.h5",
                                                           "probe.h5"))
    write_structured(g, ng, dim, seed=51)
    write_structured(q, nq, dim, seed=51, near=ng, noise_seed=1)
    write_structured(b, nb, dim, seed=51, near=ng, noise_seed=2)
    write_structured(gb, nb, dim, seed=51, near=ng, noise=0.6, noise_seed=3)
    h.run(h.qbnorm("probe", "--bank", b, "--gallery", g, "--gallery-bank", gb, "--topk-mean", 10,
                   "--topk-mean", 128, "-o", probe))
    plain_faiss = [sys.executable, "-m", "benchmarks.faiss_plain"]

    def plain_index(kind: str, extra=()) -> tuple[str, float]:
        where = bench.path(f"sv_plain_{kind}.faiss")
        option = [] if kind == "flat" else [f"--{kind}", *map(str, extra)]
        return where, json.loads(h.run([*plain_faiss, "build", g, where, *option]).stdout)["build_seconds"]

    flat_index, _ = plain_index("flat")
    out = bench.path("sv_out.h5")

    def plain(where: str = flat_index, *extra):
        def go():
            r = h.run([*plain_faiss, "search", where, q, str(top), bench.path("sv_plain.h5"), *extra])
            r.report = json.loads(r.stdout)
            r.search = r.report["search_seconds"]
            return r
        return go

    def exported(method: str, kind: str = "flat", extra=()) -> tuple[str, float]:
        where = bench.path(f"sv_{method}_{kind}")
        r = h.run(h.qbnorm("export", "--probe", probe, "--gallery", g, "--method", method, "--format", "faiss",
                           "--index-type", kind, *extra, "-o", where))
        return where, r.seconds

    def searching(where: str, *extra):
        def go():
            r = h.run([*h.qbnorm("search", "--index", where, "--queries", q, "--top-k", top, "-o", out, *extra),
                       "--json"])
            r.report = json.loads(r.stdout)
            return r
        return go

    results = {"methods": {}, "approximate": {}}
    flats = {}
    for method in (*OFFSET_METHODS, GATED):
        where, _ = exported(method)
        flats[method] = where
        pairs = h.interleaved(bench.repeats_of("serving"), searching(where), plain())
        ratio = h.median_ratio(pairs)
        share = pairs[0][0].report["normalised_share"]
        searches = pairs[0][0].report["searches_per_query"]
        target = TARGET * (searches if method == GATED else 1.0)
        t_ours = statistics.median(a.seconds for a, _ in pairs)
        t_plain = statistics.median(b.seconds for _, b in pairs)
        t_search = statistics.median(b.search for _, b in pairs)
        bench.say(f"   {method:8s} flat: qbnorm search {h.fmt_s(t_ours)}  plain faiss {h.fmt_s(t_plain)} "
                  f"(its search {t_search:.2f} s)  ratio {ratio:.2f}  searches/query {searches:.3f} "
                  f"(gated share {share:.3f}); target ≤ {target:.2f}: {'met' if ratio <= target else 'NOT met'}")
        bench.say(f"            per repeat: {h.per_repeat(pairs)}")
        results["methods"][method] = {"ratio": ratio, "ours_s": t_ours, "plain_s": t_plain, "plain_search_s": t_search,
                                      "searches_per_query": searches, "gated_share": share, "target": target}
    plain_hnsw = APPROXIMATE[bench.mode]["hnsw"]
    baselines = {"hnsw": [plain_hnsw[1], plain_hnsw[3], plain_hnsw[5]], "ivf": [APPROXIMATE[bench.mode]["ivf"][1]]}
    for kind, extra in baselines.items():
        where, build = plain_index(kind, extra)
        checked = plain(where, "--exact", flat_index, "--sample", str(check))()
        pairs = h.interleaved(bench.repeats_of("serving"), plain(), plain(where))
        speedup = h.median_ratio(pairs)
        alone = statistics.median(a.search / b.search for a, b in pairs)
        bench.say(f"   plain    {kind}: build {build:.1f} s on the raw gallery; speed-up over flat {speedup:.2f}× "
                  f"(index.search alone {alone:.2f}×); recall@{top} {checked.report['recall']:.4f} against its "
                  f"exact raw ranking")
        results["approximate"][f"plain-{kind}"] = {"build_s": build, "speedup": speedup, "speedup_search": alone,
                                                   "recall": checked.report["recall"]}
    for method in ("is", GATED) if bench.mode != "tiny" else (GATED,):  # tiny: the smoke test's, seconds
        for kind, extra in APPROXIMATE[bench.mode].items():
            where, build = exported(method, kind, [str(x) for x in extra])
            checked = searching(where, "--check-recall", check)()
            recall = checked.report["recall"]
            pairs = h.interleaved(bench.repeats_of("serving"), searching(flats[method]), searching(where))
            speedup = h.median_ratio(pairs)
            t_approx = statistics.median(b.seconds for _, b in pairs)
            bench.say(f"   {method:8s} {kind}: build {build:.1f} s ({' '.join(map(str, extra))}); search "
                      f"{h.fmt_s(t_approx)}, speed-up over flat {speedup:.2f}×; recall@{top} {recall['recall']:.4f} "
                      f"(worst query {recall['min']:.2f}, {recall['queries']} sampled queries)")
            results["approximate"][f"{method}-{kind}"] = {"build_s": build, "search_s": t_approx, "speedup": speedup,
                                                          "recall": recall["recall"], "recall_min": recall["min"],
                                                          "recall_queries": recall["queries"]}
    bench.results["serving"] = results
