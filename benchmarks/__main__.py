"""Benchmark runner: qbnorm against the physical limit, the official algorithm, and its memory bound.

    python -m benchmarks [--tiny | --quick | --full] [--only NAME[,NAME…]] [--repeat N] [--keep DIR]

Comparisons (NAME):
  matmul    target 1: `qbnorm normalise --method dis --top-k 100` on embeddings against the bare
            float32 product of the same shapes (numpy/BLAS, the product alone, in its own process)
  official  target 2: `qbnorm probe --bank-sims` + `qbnorm normalise --sims` (DIS, dense output)
            against the dense official algorithm (benchmarks/official_dense.py) on the MSR-VTT
            full-split shape; checks that the rankings are identical
  memory    target 3: peak memory of probe and of normalise (top-100) as the gallery grows
  scaling   target 4: time against queries × gallery and bank × gallery; a larger bank costs
            normalise nothing
  transpose QB-Norm in the v2t direction on t2v-layout dumps (probe --bank-sims --transpose,
            normalise --sims --transpose, evaluate --direction v2t) against the same commands on
            transposed copies, for contiguous, row-chunked and tile-chunked HDF5 dumps; checks
            that the outputs are identical
  sinkhorn  issue 30: `qbnorm probe --sinkhorn` (sn: converged, and the paper's 10 iterations) of
            this checkout and of the per-score float64 path it replaced (commit BASELINE_SINKHORN,
            exported with git archive), against the IS probe of the same data, interleaved, bank
            20k × gallery 100k × 512 by default, at the default --memory and at one that holds
            the kernel; then, at Multi30k size (10,000 × 1,000, the shared data when present), the
            library's Sinkhorn against POT's `ot.sinkhorn(method="sinkhorn_log")` (pip install pot)
            on the same in-memory matrix. Not in the default run (tens of minutes at the default
            size on 2 cores): ask for it with --only sinkhorn
  serving   `qbnorm search` on faiss exports against a plain faiss IndexFlatIP search of the same
            shapes (offset methods ≤ 1.1×, dis ≤ 1.1 × (1 + gated share)); HNSW/IVF recall and
            speed-up (benchmarks/serving.py)
  cluster   issue 19: `normalise --method dis --top-k 100` and `probe` with --cluster local:2 (a
            LocalCluster of two worker processes) against the same commands run locally; checks
            that the outputs are identical

Sizes: default = the issue's shapes for matmul, official and sinkhorn, the mid size for memory (10k ×
250k → 1M); --quick finishes in under a minute; --full adds memory at 100k × 1M (long: about 1e14
flops per command on 2 cores); --tiny is the smoke test's.

Every command runs as a subprocess; its peak resident memory comes from os.wait4 (that process
alone). Timings are wall-clock, each comparison's pair interleaved (ABBA) and repeated; ratios are
medians of the per-repeat ratios, so slow moments of a shared machine hit both sides. Before
each timed command the files it reads are read into the page cache (`warm`), for both sides.
"""

from __future__ import annotations

import argparse
import compileall
import functools
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from benchmarks import data, serving

QBNORM = [sys.executable, "-m", "qbnorm_cli"]
ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # matmul: queries, gallery, dim, bank (for the probe DIS needs)
    "matmul": {"tiny": (200, 3000, 64, 200), "quick": (2000, 40000, 512, 1000),
               "default": (10000, 100000, 512, 2000), "full": (10000, 100000, 512, 2000)},
    # official: test queries, gallery, bank (captions per video: 20)
    "official": {"tiny": (600, 299, 600), "quick": (5980, 2990, 6000),
                 "default": (59800, 2990, 60000), "full": (59800, 2990, 60000)},
    # memory: bank = queries, galleries, dim
    "memory": {"tiny": (300, (4000, 16000), 32), "quick": (2000, (25000, 100000), 128),
               "default": (10000, (250000, 500000, 1000000), 512),
               "full": (100000, (250000, 1000000), 512)},
    # scaling: dim, gallery, queries list; queries, gallery list; bank list
    "scaling": {"tiny": (32, 4000, (200, 400), 200, (2000, 4000), (200, 800)),  # 8 commands
                "quick": (128, 20000, (1000, 4000), 1000, (10000, 40000), (1000, 8000)),
                "default": (512, 50000, (2000, 8000), 2000, (25000, 100000), (2000, 16000)),
                "full": (512, 50000, (2000, 4000, 8000), 2000, (25000, 50000, 100000), (2000, 8000, 32000))},
    # transpose: test captions, items, bank items (20 captions per item)
    "transpose": {"tiny": (600, 30, 300), "quick": (5980, 299, 3000), "default": (59800, 2990, 6000),
                  "full": (59800, 2990, 6000)},
    # sinkhorn: bank, gallery, dim
    "sinkhorn": {"tiny": (300, 2000, 32), "quick": (2000, 20000, 128), "default": (20000, 100000, 512),
                 "full": (20000, 100000, 512)},
    # sinkhorn's peer (POT): bank, gallery, dim; Multi30k's shape (its data, when ../shared has it) but at tiny
    "sinkhorn_peer": {"tiny": (300, 100, 32), "quick": (10000, 1000, 384), "default": (10000, 1000, 384),
                      "full": (10000, 1000, 384)},
    "serving": serving.SIZES,
    # cluster: queries, gallery, dim, bank (as matmul)
    "cluster": {"tiny": (200, 3000, 64, 200), "quick": (2000, 40000, 512, 1000),
                "default": (10000, 100000, 512, 2000), "full": (10000, 100000, 512, 2000)},
}
BASELINE_SINKHORN = "223f4a0"  # the last commit with the per-score float64 Sinkhorn (issue 30's "today")
DEFAULT_RUN = ("matmul", "official", "memory", "scaling")  # the others only on request (--only): long at full size
# repeats of each timed pair (scaling: best of); quick stays under a minute on 2 cores
REPEATS = {"tiny": {},
           "quick": {"matmul": 3, "official": 2, "scaling": 1, "transpose": 1, "sinkhorn": 1, "serving": 2,
                     "cluster": 2},
           "default": {"matmul": 3, "official": 3, "scaling": 2, "transpose": 2, "sinkhorn": 1, "serving": 3,
                       "cluster": 3},
           "full": {"matmul": 5, "official": 5, "scaling": 3, "transpose": 3, "sinkhorn": 3, "serving": 5,
                    "cluster": 5}}
TRANSPOSE_LAYOUTS = ("contiguous", "rows", "tiles")
TRANSPOSE_MEMORY = ("1GiB", "16MiB")  # the default budget, and one that splits every read into many blocks


@dataclass
class Run:
    seconds: float
    peak_mib: float
    stdout: str


TIME = shutil.which("time", path="/usr/bin:/bin")
PEAK_MARK = "QBNORM-BENCH-PEAK-KIB="


def warm(cmd: list[str]) -> None:
    """Read the files a command names (not its -o output) into the page cache, as hyperfine's
    --prepare would: every timed command then starts from the same state. This VM runs DAMON with
    a pageout scheme that evicts file pages it sees touched at most once per 5 s for a minute, so
    an input read once per repeat drifts out of memory during a comparison (the gallery of target
    1 is 196 MB: 0.02 s from memory, 0.37 s from disk at 530 MB/s)."""
    args = [str(a) for a in cmd]
    outputs = {args[i + 1] for i, a in enumerate(args[:-1]) if a == "-o"}
    for arg in args:
        path = arg.split("::")[0]
        if arg not in outputs and os.path.isfile(path):
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass


def compile_package() -> None:
    """Byte-compile qbnorm_cli, as installing a package does: this VM sets PYTHONDONTWRITEBYTECODE,
    so the sources (run from this checkout) would otherwise be compiled again by every command,
    0.04 s of its start-up that an installed qbnorm never pays. Python still checks each cached
    file against its source, so an edited module is never run stale."""
    compileall.compile_dir(ROOT / "qbnorm_cli", quiet=1)


def run(cmd: list[str], root: Path = ROOT) -> Run:
    """Run a command to completion: wall time and that process's own peak resident memory
    (qbnorm_cli imported from `root`: this checkout, or a baseline's copy).

    The peak comes from GNU time (%M) where it exists: it forks from a tiny process, whereas the
    maximum RSS that os.wait4 reports for a child of this (larger) runner includes the pages the
    child inherited at fork. Without /usr/bin/time, os.wait4's figure is used (an upper bound).
    """
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    full = [TIME, "-f", PEAK_MARK + "%M", *cmd] if TIME else cmd
    warm(cmd)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env, cwd=root)  # python -m: cwd first
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{stderr[-2000:]}")
    peak_kib = usage.ru_maxrss  # KiB on Linux
    for line in stderr.splitlines():
        if line.startswith(PEAK_MARK):
            peak_kib = int(line[len(PEAK_MARK):])
    return Run(seconds, peak_kib / 1024, stdout)


def qbnorm(*args) -> list[str]:
    return [*QBNORM, *map(str, args), "--quiet", "--force"]


def median_ratio(pairs: list[tuple[Run, Run]]) -> float:
    return statistics.median(a.seconds / b.seconds for a, b in pairs)


def interleaved(n: int, first, second) -> list[tuple]:
    """n repeats of (first(), second()), alternating which runs first (ABBA)."""
    pairs = []
    for i in range(n):
        if i % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        pairs.append((a, b))
    return pairs


def per_repeat(pairs: list[tuple[Run, Run]]) -> str:
    """Each repeat's ratio with both times, so that one slow moment can be told from a slow side."""
    return ", ".join(f"{a.seconds / b.seconds:.2f} ({a.seconds:.2f}/{b.seconds:.2f} s)" for a, b in pairs)


def fmt_s(x: float) -> str:
    return f"{x:8.2f} s"


def fmt_mib(x: float) -> str:
    return f"{x:8.0f} MiB"


class TransposeBench:
    """The `transpose` comparison (a mixin of Bench)."""

    def transpose(self) -> None:
        nt, ng, nb = SIZES["transpose"][self.mode]
        self.say(f"== transpose: v2t QB-Norm from t2v dumps read --transpose vs transposed copies read plainly; "
                 f"{nt:,} captions × {ng:,} items, bank {nb:,} items × {nt:,} captions")
        bank_t2v, test_t2v = self.path("tr_bank.h5"), self.path("tr_test.h5")
        data.write_similarities(bank_t2v, nt, nb, seed=51, per_item=20, noise_seed=1)  # captions × bank
        data.write_similarities(test_t2v, nt, ng, seed=52, per_item=20, noise_seed=2)  # captions × items
        copies = {}
        for name, t2v in (("bank", bank_t2v), ("test", test_t2v)):
            copies[name] = self.path(f"tr_{name}_T.h5")
            data.write_transposed(t2v, copies[name], "rows")
        rows = []
        for layout, memory in itertools.product(TRANSPOSE_LAYOUTS, TRANSPOSE_MEMORY):
            dumps = {}
            for name, t2v in (("bank", bank_t2v), ("test", test_t2v)):
                dumps[name] = t2v if layout == "contiguous" else self.path(f"tr_{name}_{layout}.h5")
                if layout != "contiguous" and not os.path.exists(dumps[name]):
                    data.write_layout(t2v, dumps[name], layout)
            steps = {}
            for step in ("probe", "normalise", "evaluate"):
                flipped = functools.partial(self._transpose_step, step, dumps["bank"], dumps["test"], True, layout,
                                            memory)
                plain = functools.partial(self._transpose_step, step, copies["bank"], copies["test"], False, layout,
                                          memory)

                plain()  # the probe (and the outputs) each side's later steps read
                flipped()
                pairs = interleaved(self.repeats_of("transpose"), flipped, plain)
                steps[step] = (median_ratio(pairs), statistics.median(a.seconds for a, _ in pairs),
                               statistics.median(b.seconds for _, b in pairs),
                               max(a.peak_mib for a, _ in pairs), max(b.peak_mib for _, b in pairs))
            same = compare_rankings(self.path(f"tr_out_{layout}_T.h5"), self.path(f"tr_out_{layout}_plain.h5"))
            for step, (ratio, ta, tb, ma, mb) in steps.items():
                self.say(f"   {layout:10s} {memory:>6s} {step:9s} --transpose {fmt_s(ta)} peak {fmt_mib(ma)}   "
                         f"copy {fmt_s(tb)} peak {fmt_mib(mb)}   ratio {ratio:.2f}")
            self.say(f"   {layout:10s} {memory:>6s} outputs: {same}")
            rows.append({"layout": layout, "memory": memory, "steps": {k: v[0] for k, v in steps.items()},
                         "outputs": same})
        self.results["transpose"] = {"rows": rows}

    def _transpose_step(self, step: str, bank: str, test: str, flipped: bool, layout: str, memory: str):
        side = "T" if flipped else "plain"
        probe, out = self.path(f"tr_probe_{layout}_{side}.h5"), self.path(f"tr_out_{layout}_{side}.h5")
        flag = ["--transpose", "--memory", memory] if flipped else ["--memory", memory]
        if step == "probe":
            return run(qbnorm("probe", "--bank-sims", bank, *flag, "-o", probe))
        if step == "normalise":
            return run(qbnorm("normalise", "--sims", test, *flag, "--probe", probe, "--method", "dis", "-o", out))
        # the raw v2t evaluation of the dump: two passes over its rows, against one over the copy's
        if flipped:
            return run(qbnorm("evaluate", test, "--direction", "v2t", "--queries-per-item", 20, "--memory", memory))
        return run(qbnorm("evaluate", test, "--transpose", "--direction", "v2t", "--queries-per-item", 20,
                          "--memory", memory))


class Bench(TransposeBench):
    def __init__(self, mode: str, workdir: Path, repeats: int | None):
        self.mode = mode
        self.dir = workdir
        self.fixed_repeats = repeats
        self.results: dict = {}

    def repeats_of(self, name: str) -> int:
        return self.fixed_repeats or REPEATS[self.mode].get(name, 1)

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    # -- target 1 ------------------------------------------------------------------------------
    def matmul(self) -> None:
        nq, ng, dim, nb = SIZES["matmul"][self.mode]
        self.say(f"== matmul (target 1): normalise --method dis --top-k 100, {nq:,} queries × {ng:,} gallery × {dim}")
        q, g, b, probe = (self.path(f"mm_{x}") for x in ("queries.h5", "gallery.h5", "bank.h5", "probe.h5"))
        data.write_embeddings(g, ng, dim, seed=11)
        data.write_embeddings(q, nq, dim, seed=11, queries_of=ng, noise_seed=1)
        data.write_embeddings(b, nb, dim, seed=11, queries_of=ng, noise_seed=2)
        run(qbnorm("probe", "--bank", b, "--gallery", g, "-o", probe))
        out = self.path("mm_dis.h5")

        def bare():
            r = run([sys.executable, "-m", "benchmarks.matmul", q, g])
            timings = json.loads(r.stdout)
            r.seconds = timings["seconds"]  # the product's arithmetic alone
            r.allocating = timings["allocating_seconds"]
            return r

        def ours():
            return run(qbnorm("normalise", "--queries", q, "--gallery", g, "--probe", probe, "--method", "dis",
                              "--top-k", 100, "-o", out))

        pairs = interleaved(self.repeats_of("matmul"), ours, bare)
        ratio = median_ratio(pairs)
        t_ours = statistics.median(a.seconds for a, _ in pairs)
        t_bare = statistics.median(b.seconds for _, b in pairs)
        t_alloc = statistics.median(b.allocating for _, b in pairs)
        peak_bare = max(b.peak_mib for _, b in pairs)
        self.say(f"   bare product (numpy/BLAS)   {fmt_s(t_bare)}   (its arithmetic: output pages touched before)")
        self.say(f"   Q @ G.T allocating output   {fmt_s(t_alloc)}   peak {fmt_mib(peak_bare)}   "
                 "(includes the first touch of fresh memory: not the floor)")
        self.say(f"   qbnorm normalise (whole run) {fmt_s(t_ours)}   peak {fmt_mib(max(a.peak_mib for a, _ in pairs))}")
        self.say(f"   ratio qbnorm / product: {ratio:.2f}  (target ≤ 1.25: {'met' if ratio <= 1.25 else 'NOT met'}); "
                 f"qbnorm / allocating Q @ G.T: {statistics.median(a.seconds / b.allocating for a, b in pairs):.2f}")
        self.say(f"   per repeat (qbnorm/product): {per_repeat(pairs)}")
        self.results["matmul"] = {"ratio": ratio, "ours_s": t_ours, "bare_s": t_bare, "allocating_s": t_alloc}

    # -- target 2 ------------------------------------------------------------------------------
    def official(self) -> None:
        nt, ng, nb = SIZES["official"][self.mode]
        self.say(f"== official (target 2): probe --bank-sims + normalise --sims (dis, dense) vs dense official; "
                 f"{nt:,} test × {ng:,} gallery, bank {nb:,}")
        bank, test = self.path("off_bank_sims.h5"), self.path("off_test_sims.h5")
        data.write_similarities(bank, nb, ng, seed=21, per_item=20, noise_seed=1)
        data.write_similarities(test, nt, ng, seed=21, per_item=20, noise_seed=2)
        probe, out, dense = self.path("off_probe.h5"), self.path("off_dis.h5"), self.path("off_dense.h5")

        def ours():
            p = run(qbnorm("probe", "--bank-sims", bank, "-o", probe))
            n = run(qbnorm("normalise", "--sims", test, "--probe", probe, "-o", out))
            return Run(p.seconds + n.seconds, max(p.peak_mib, n.peak_mib), f"{p.seconds:.2f}+{n.seconds:.2f}")

        def official():
            return run([sys.executable, "-m", "benchmarks.official_dense", "--bank-sims", bank, "--sims", test,
                        "-o", dense])

        pairs = interleaved(self.repeats_of("official"), official, ours)
        speedup = median_ratio(pairs)
        t_off = statistics.median(a.seconds for a, _ in pairs)
        t_ours = statistics.median(b.seconds for _, b in pairs)
        m_off = max(a.peak_mib for a, _ in pairs)
        m_ours = max(b.peak_mib for _, b in pairs)
        self.say(f"   official dense (numpy)      {fmt_s(t_off)}   peak {fmt_mib(m_off)}")
        self.say(f"   qbnorm probe + normalise    {fmt_s(t_ours)}   peak {fmt_mib(m_ours)}   "
                 f"(probe+normalise s: {', '.join(b.stdout for _, b in pairs)})")
        self.say(f"   per repeat (official/qbnorm): {per_repeat(pairs)}")
        self.say(f"   speed-up: {speedup:.1f}×  (target ≥ 8: {'met' if speedup >= 8 else 'NOT met'});  "
                 f"memory: {m_ours / m_off:.2f} of the official's (target ≤ 0.25: "
                 f"{'met' if m_ours <= 0.25 * m_off else 'NOT met'})")
        check = compare_rankings(out, dense)
        self.say(f"   rankings: {check}")
        self.results["official"] = {"speedup": speedup, "ours_s": t_ours, "official_s": t_off,
                                    "ours_mib": m_ours, "official_mib": m_off, "rankings": check}

    # -- target 3 ------------------------------------------------------------------------------
    def memory(self) -> None:
        n, galleries, dim = SIZES["memory"][self.mode]
        self.say(f"== memory (target 3): peak RSS, bank = queries = {n:,}, dim {dim}, --memory 1GiB, "
                 f"gallery {' → '.join(f'{g:,}' for g in galleries)}")
        rows = []
        for ng in galleries:
            g, q, b = self.path(f"mem_g{ng}.h5"), self.path(f"mem_q{ng}.h5"), self.path(f"mem_b{ng}.h5")
            probe, out = self.path(f"mem_probe{ng}.h5"), self.path(f"mem_out{ng}.h5")
            data.write_embeddings(g, ng, dim, seed=31)
            data.write_embeddings(b, n, dim, seed=31, queries_of=ng, noise_seed=1)
            data.write_embeddings(q, n, dim, seed=31, queries_of=ng, noise_seed=2)
            p = run(qbnorm("probe", "--bank", b, "--gallery", g, "-o", probe))
            r = run(qbnorm("normalise", "--queries", q, "--gallery", g, "--probe", probe, "--method", "dis",
                           "--top-k", 100, "-o", out))
            rows.append((ng, p, r))
            self.say(f"   gallery {ng:>9,}: probe {fmt_s(p.seconds)} peak {fmt_mib(p.peak_mib)}   "
                     f"normalise {fmt_s(r.seconds)} peak {fmt_mib(r.peak_mib)}")
            for f in (g, q, b, probe, out):
                os.unlink(f)
        (g0, p0, r0), (g1, p1, r1) = rows[0], rows[-1]
        per_item = [(x1.peak_mib - x0.peak_mib) * 2**20 / (g1 - g0) for x0, x1 in ((p0, p1), (r0, r1))]
        peak = max(max(p.peak_mib, r.peak_mib) for _, p, r in rows)
        self.say(f"   growth {g0:,} → {g1:,} items: probe {per_item[0]:.0f} B/item, normalise {per_item[1]:.0f} B/item "
                 f"(O(gallery) statistics vectors); highest peak {peak:.0f} MiB "
                 f"(target ≤ 1.5 GB = {1.5e9 / 2**20:.0f} MiB: {'met' if peak * 2**20 <= 1.5e9 else 'NOT met'})")
        self.results["memory"] = {"rows": [(ng, p.seconds, p.peak_mib, r.seconds, r.peak_mib) for ng, p, r in rows],
                                  "bytes_per_item": per_item, "peak_mib": peak}

    # -- target 4 ------------------------------------------------------------------------------
    def scaling(self) -> None:
        dim, ng, query_list, nq, gallery_list, bank_list = SIZES["scaling"][self.mode]
        self.say(f"== scaling (target 4): dim {dim}; time per score should stay flat")
        galleries = sorted({*gallery_list, ng})
        source = self.path("sc_gallery.h5")
        data.write_embeddings(source, max(galleries), dim, seed=41)
        paths = {}
        with h5py.File(source, "r") as src:
            for size in galleries:
                paths[size] = self.path(f"sc_gallery{size}.h5")
                with h5py.File(paths[size], "w") as dst:
                    dst.create_dataset("embeddings", data=src["embeddings"][:size])
        queries = {}
        for n in sorted({*query_list, nq}):
            queries[n] = self.path(f"sc_q{n}.h5")
            data.write_embeddings(queries[n], n, dim, seed=41, queries_of=ng, noise_seed=1)
        banks = {}
        for size in bank_list:
            banks[size] = self.path(f"sc_bank{size}.h5")
            data.write_embeddings(banks[size], size, dim, seed=41, queries_of=ng, noise_seed=2)

        startup = min(run([*QBNORM, "--version"]).seconds for _ in range(1 if self.mode == "tiny" else 3))
        self.say(f"   process start-up (qbnorm --version): {startup:.2f} s, subtracted below")
        done: dict = {}

        def best(key, cmd):
            if key not in done:
                done[key] = min(run(cmd).seconds for _ in range(self.repeats_of("scaling"))) - startup
            return done[key]

        def probe(bank, gallery):
            out = self.path(f"sc_probe_b{bank}_g{gallery}.h5")
            t = best(("probe", bank, gallery), qbnorm("probe", "--bank", banks[bank], "--gallery", paths[gallery],
                                                      "-o", out))
            return t, out

        def normalise_cmd(n, gallery, probe_path):
            return qbnorm("normalise", "--queries", queries[n], "--gallery", paths[gallery], "--probe", probe_path,
                          "--method", "dis", "--top-k", 100, "-o", self.path("sc_out.h5"))

        def normalise(n, gallery, bank):
            _, probe_path = probe(bank, gallery)
            return best(("normalise", n, gallery, bank), normalise_cmd(n, gallery, probe_path))

        small, large = bank_list[0], bank_list[-1]
        lines = []
        for n in query_list:
            lines.append(("normalise", f"queries {n:,} × gallery {ng:,}", n * ng, normalise(n, ng, small)))
        for size in gallery_list:
            lines.append(("normalise", f"queries {nq:,} × gallery {size:,}", nq * size, normalise(nq, size, small)))
        for size in bank_list:
            lines.append(("probe", f"bank {size:,} × gallery {ng:,}", size * ng, probe(size, ng)[0]))
        groups = {"queries": lines[:len(query_list)],
                  "gallery": lines[len(query_list):len(query_list) + len(gallery_list)],
                  "bank": lines[len(query_list) + len(gallery_list):]}
        for kind, label, scores, t in lines:
            self.say(f"   {kind:9s} {label:32s} {fmt_s(t)}   {t / scores * 1e9:6.2f} ns per score")
        for name, group in groups.items():
            # the marginal cost: fixed costs (reading, the probe's O(gallery) vectors) cancel
            slopes = [(b[3] - a[3]) / (b[2] - a[2]) * 1e9 for a, b in itertools.pairwise(group)]
            self.say(f"   growing {name:8s}: marginal {', '.join(f'{x:.2f}' for x in slopes)} ns per added score")
        # the two banks' normalise runs interleaved (ABBA): the times above come minutes apart
        def with_bank(bank):
            return lambda: run(normalise_cmd(nq, ng, probe(bank, ng)[1]))

        pairs = interleaved(max(2, self.repeats_of("scaling")), with_bank(large), with_bank(small))
        t_large = statistics.median(a.seconds for a, _ in pairs) - startup
        t_small = statistics.median(b.seconds for _, b in pairs) - startup
        self.say(f"   normalise {nq:,} × {ng:,} with the probe of bank {small:,}: {t_small:.2f} s; "
                 f"of bank {large:,}: {t_large:.2f} s (ratio {median_ratio(pairs):.2f} of whole runs, interleaved; "
                 "normalise reads only the probe's O(gallery) vectors)")
        self.results["scaling"] = {"lines": lines, "bank_small_s": t_small, "bank_large_s": t_large}

    # -- Sinkhorn probe cost (issue 30) ---------------------------------------------------------
    def sinkhorn(self) -> None:
        nb, ng, dim = SIZES["sinkhorn"][self.mode]
        self.say(f"== sinkhorn: probe --sinkhorn (new, and {BASELINE_SINKHORN}'s float64 path) against the IS probe, "
                 f"bank {nb:,} × gallery {ng:,} × {dim}")
        g, b, out = self.path("sk_gallery.h5"), self.path("sk_bank.h5"), self.path("sk_probe.h5")
        data.write_embeddings(g, ng, dim, seed=51)
        data.write_embeddings(b, nb, dim, seed=51, queries_of=ng, noise_seed=1)
        baseline = self.path("sk_baseline")
        shutil.rmtree(baseline, ignore_errors=True)
        os.makedirs(baseline)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", BASELINE_SINKHORN, "qbnorm_cli"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", baseline], input=archive, check=True)
        # β where β·std of the bank scores is 3, as β = 100 is for the Multi30k cosines (std 0.029):
        # Sinkhorn's iteration count depends on β × the score spread
        scale = json.loads(run([*qbnorm("probe", "--bank", b, "--gallery", g, "-o", out), "--json"]).stdout)
        beta = float(f"{3 / scale['scores']['std']:.2g}")
        # the default budget, and one that holds the kernel in half of it (with room to spare)
        memories = ["1GiB"] if 8 * nb * ng <= 2**29 else ["1GiB", f"{-(-2 * 4 * nb * ng // 2**30) + 1}GiB"]
        rows = {}
        for label, extra in (("converged (tol 1e-6)", ()), ("10 iterations", ("--sinkhorn-iters", 10))):
            for memory in memories:
                probe = ["probe", "--bank", b, "--gallery", g, "--beta", beta, "-o", out, "--memory", memory]
                runs = {"IS": lambda probe=probe: run(qbnorm(*probe)),
                        "new": lambda probe=probe, extra=extra: run([*qbnorm(*probe, "--sinkhorn", *extra),
                                                                     "--json"]),
                        "today": lambda probe=probe, extra=extra: run([*qbnorm(*probe, "--sinkhorn", *extra),
                                                                       "--json"], root=Path(baseline))}
                timed = {name: [] for name in runs}
                for repeat in range(self.repeats_of("sinkhorn")):
                    order = list(runs) if repeat % 2 == 0 else list(reversed(runs))
                    for name in order:
                        timed[name].append(runs[name]())
                t = {name: statistics.median(r.seconds for r in found) for name, found in timed.items()}
                ratio = {name: statistics.median(a.seconds / c.seconds for a, c in zip(timed[name], timed["IS"],
                                                                                      strict=True))
                         for name in ("new", "today")}
                doc = {name: json.loads(timed[name][0].stdout)["sinkhorn"][0] for name in ("new", "today")}
                self.say(f"   sn {label:20s} --memory {memory:6s} IS {fmt_s(t['IS'])}   today {fmt_s(t['today'])} "
                         f"({ratio['today']:5.2f}×, {doc['today']['iterations']} iterations)   new "
                         f"{fmt_s(t['new'])} ({ratio['new']:5.2f}×, {doc['new']['iterations']} iterations, kernel "
                         f"{'held' if doc['new']['held'] else 'recomputed'}; peak "
                         f"{fmt_mib(max(r.peak_mib for r in timed['new']))})")
                rows[f"{label}, --memory {memory}"] = {
                    "is_s": t["IS"], "today_s": t["today"], "new_s": t["new"], "today_ratio": ratio["today"],
                    "new_ratio": ratio["new"], "today_iterations": doc["today"]["iterations"],
                    "new_iterations": doc["new"]["iterations"], "held": doc["new"]["held"]}
        self.results["sinkhorn"] = {"beta": beta, "bank": nb, "gallery": ng, "dim": dim, "runs": rows,
                                    "peer": sinkhorn_peer(self.say, SIZES["sinkhorn_peer"][self.mode])}

    # -- serving: qbnorm search against plain faiss ---------------------------------------------
    def serving(self) -> None:
        serving.compare(self, sys.modules[__name__])

    # -- issue 19 ------------------------------------------------------------------------------
    def cluster(self) -> None:
        nq, ng, dim, nb = SIZES["cluster"][self.mode]
        self.say(f"== cluster (issue 19): --cluster local:2 against the local run; normalise --method dis --top-k 100, "
                 f"{nq:,} queries × {ng:,} gallery × {dim}; probe with a bank of {nb:,}")
        q, g, b = (self.path(f"cl_{x}") for x in ("queries.h5", "gallery.h5", "bank.h5"))
        data.write_embeddings(g, ng, dim, seed=11)
        data.write_embeddings(q, nq, dim, seed=11, queries_of=ng, noise_seed=1)
        data.write_embeddings(b, nb, dim, seed=11, queries_of=ng, noise_seed=2)
        probe = self.path("cl_probe.h5")
        startup = min(run([*QBNORM, "--version"]).seconds for _ in range(1 if self.mode == "tiny" else 3))

        def normalise(out, *cluster):
            return lambda: run(qbnorm("normalise", "--queries", q, "--gallery", g, "--probe", probe, "--method", "dis",
                                      "--top-k", 100, "-o", self.path(out), *cluster))

        def probing(out, *cluster):
            return lambda: run(qbnorm("probe", "--bank", b, "--gallery", g, "-o", self.path(out), *cluster))

        rows = {}
        for name, local, clustered in (
                ("probe", probing("cl_probe.h5"), probing("cl_probe_cluster.h5", "--cluster", "local:2")),
                ("normalise", normalise("cl_top.h5"), normalise("cl_top_cluster.h5", "--cluster", "local:2"))):
            pairs = interleaved(self.repeats_of("cluster") if name == "normalise" else 1, clustered, local)
            rows[name] = pairs
            t_cluster = statistics.median(a.seconds for a, _ in pairs)
            t_local = statistics.median(b.seconds for _, b in pairs)
            self.say(f"   {name:9s} local {fmt_s(t_local)}   local:2 {fmt_s(t_cluster)}   "
                     f"ratio {median_ratio(pairs):.2f}   (whole processes, cluster start and stop included)")
            self.say(f"      per repeat (local:2 / local): {per_repeat(pairs)}")
        ratio = median_ratio(rows["normalise"])
        self.say(f"   normalise ratio local:2 / local: {ratio:.2f} (aim ≤ 1.3 on 2 cores, where no speed-up is "
                 f"possible: {'met' if ratio <= 1.3 else 'NOT met'}); process start-up {startup:.2f} s")
        same = all(same_datasets(self.path(a), self.path(b)) for a, b in
                   (("cl_probe.h5", "cl_probe_cluster.h5"), ("cl_top.h5", "cl_top_cluster.h5")))
        self.say(f"   outputs: {'identical datasets' if same else 'DIFFERENT'}")
        self.results["cluster"] = {
            "ratio": ratio, "probe_ratio": median_ratio(rows["probe"]), "identical": same, "startup_s": startup,
            **{f"{name}_{side}_s": statistics.median(p[i].seconds for p in pairs)
               for name, pairs in rows.items() for i, side in ((1, "local"), (0, "cluster"))}}


def sinkhorn_peer(say, shape: tuple[int, int, int], beta: float = 100.0) -> dict:
    """The library's converged Sinkhorn (sn, held) against POT's log-domain Sinkhorn on the same
    in-memory bank × gallery matrix of Multi30k's size: the shared data's cosines when present
    (bank = train_queries, gallery = gallery), random unit vectors of its shape otherwise. POT runs
    the iterations today's plain run needed (stopThr 0: POT's test differs); its log u is
    compared after removing the constant a scaling is defined up to."""
    try:
        import ot
    except ImportError:
        say("   POT peer: skipped (pip install pot)")
        return {}
    from qbnorm_cli.core.sinkhorn import Sinkhorn
    from qbnorm_cli.io.specs import as_input
    from qbnorm_cli.streaming.budget import Budget
    from qbnorm_cli.streaming.sinkhorn import run_sinkhorn
    from qbnorm_cli.streaming.sources import MatrixScores

    shared = ROOT.parent / "shared" / "data" / "multi30k-de2en-e5.h5"
    shared = shared if shared.is_file() else ROOT.parent.parent / "shared" / "data" / "multi30k-de2en-e5.h5"
    if shared.is_file() and shape == (10000, 1000, 384):
        with h5py.File(shared, "r") as h5:
            bank, gallery = h5["train_queries"][()], h5["gallery"][()]
        what = "Multi30k"
    else:
        rng = np.random.default_rng(7)
        bank, gallery = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in
                         (rng.standard_normal(shape[::2]), rng.standard_normal(shape[1:])))
        what = "random unit vectors"
    P = (bank.astype(np.float32) @ gallery.astype(np.float32).T).astype(np.float32)

    def ours(accelerate: bool):
        state = Sinkhorn(beta, *P.shape, tol=1e-6, accelerate=accelerate)
        t0 = time.perf_counter()
        run_sinkhorn([MatrixScores(as_input(P, "P"))], [(state, 1)], Budget())
        return time.perf_counter() - t0, state

    t_plain, plain = ours(False)
    t_new, new = ours(True)
    M = -P.astype(np.float64)  # POT's cost: K = exp(−M/reg) = exp(β·P)
    a, b = np.full(P.shape[1], 1 / P.shape[1]), np.full(P.shape[0], 1 / P.shape[0])
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # "did not converge": it ran the iterations asked for
        warnings.simplefilter("ignore")
        _, log = ot.sinkhorn(a, b, M.T, 1 / beta, method="sinkhorn_log", numItermax=plain.iterations, stopThr=0.0,
                             log=True)
    t_pot = time.perf_counter() - t0
    centred = lambda x: x - x.mean()
    gap = float(np.abs(centred(log["log_u"]) - centred(new.log_u)).max())
    say(f"   peer on {what} ({P.shape[0]:,} × {P.shape[1]:,}, β {beta:g}, in memory, sn Sinkhorn only): "
        f"qbnorm {t_new:.2f} s ({new.iterations} iterations, Anderson-accelerated), qbnorm plain {t_plain:.2f} s "
        f"({plain.iterations}), POT sinkhorn_log {t_pot:.2f} s ({plain.iterations} iterations): "
        f"{t_pot / t_new:.1f}× ours; max |Δ log u| (centred) {gap:.2g}")
    return {"data": what, "qbnorm_s": t_new, "qbnorm_iterations": new.iterations, "plain_s": t_plain,
            "plain_iterations": plain.iterations, "pot_s": t_pot, "speedup": t_pot / t_new, "log_u_gap": gap}


def same_datasets(a: str, b: str) -> bool:
    """Every dataset of two HDF5 files equal byte for byte (values, dtype, shape)."""
    def read(path):
        found = {}
        with h5py.File(path, "r") as h5:
            h5.visititems(lambda name, obj: found.__setitem__(name, (obj.dtype.str, obj.shape, obj[()].tobytes()))
                          if isinstance(obj, h5py.Dataset) else None)
        return found
    return read(a) == read(b)


def compare_rankings(ours_path: str, dense_path: str, top: int = 10) -> str:
    """Top-`top` rankings of every row, qbnorm's log-domain scores against the exp-domain ones."""
    with h5py.File(ours_path, "r") as a, h5py.File(dense_path, "r") as b:
        gated_same = bool((a["normalised"][()] == b["normalised"][()]).all())
        n = a["scores"].shape[0]
        differ = tie_only = 0
        for r0 in range(0, n, 4096):
            x = a["scores"][r0:r0 + 4096].astype(np.float64)
            y = b["scores"][r0:r0 + 4096].astype(np.float64)
            ix = np.argsort(-x, axis=1, kind="stable")[:, :top]
            iy = np.argsort(-y, axis=1, kind="stable")[:, :top]
            bad = np.nonzero((ix != iy).any(axis=1))[0]
            differ += bad.size
            for row in bad:
                # a difference is a float32 tie when the two orders give the same values in either file
                if (np.array_equal(x[row, ix[row]], x[row, iy[row]])
                        or np.array_equal(y[row, ix[row]], y[row, iy[row]])):
                    tie_only += 1
    verdict = "identical" if differ == tie_only else "DIFFERENT"
    return (f"{verdict}: top-{top} of {n:,} rows equal in {n - differ:,}"
            + (f", the other {differ:,} differ only among float32-tied scores" if differ else "")
            + f"; same rows normalised: {'yes' if gated_same else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_const", dest="mode", const="tiny", help="smoke-test sizes (seconds)")
    size.add_argument("--quick", action="store_const", dest="mode", const="quick", help="under a minute")
    size.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="the full target-3 size (100k × 1M: hours on 2 cores)")
    parser.add_argument("--only", default=",".join(DEFAULT_RUN),
                        help=f"comparisons (default {','.join(DEFAULT_RUN)}; "
                             "also sinkhorn, transpose, serving, cluster)")
    parser.add_argument("--repeat", type=int, default=None, help="repeats per timed pair (default: by mode)")
    parser.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    mode = args.mode or "default"
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    for name in names:
        if name not in SIZES:
            parser.error(f"--only {name}: choose from {', '.join(SIZES)}")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="qbnorm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(mode, workdir, args.repeat)
    compile_package()
    t0 = time.perf_counter()
    print(f"qbnorm benchmarks, mode {mode}, {os.cpu_count()} cores, data in {workdir}", flush=True)
    try:
        for name in names:
            getattr(bench, name)()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(bench.results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
