"""qbnorm hubness: k-occurrence and hubness measures of score, ranking or probe files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from qbnorm_cli.cli import options as common
from qbnorm_cli.cli.evaluate import ScoreSource, display_names, open_scores
from qbnorm_cli.core import hubness as hub
from qbnorm_cli.core import topk
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.files import OutputFile, open_h5, open_qbnorm, read_attrs, split_spec
from qbnorm_cli.streaming.budget import Budget, spans

COVERAGE_WARNING = 50.0
BAR_WIDTH = 24


@dataclass
class Subject:
    """One input: where its neighbours come from, and the sizes the measures need."""

    spec: str
    name: str
    n_queries: int
    n_gallery: int
    source: ScoreSource | None = None  # dense or ranking scores
    probe_neighbors: object = None  # the probe's /bank_neighbors dataset
    probe_path: str | None = None

    @property
    def kind(self) -> str:
        if self.probe_neighbors is not None:
            return "probe"
        return "ranking" if self.source.is_ranking else "similarity"

    @property
    def label(self) -> str:
        return self.probe_path if self.probe_neighbors is not None else self.source.label


def _is_probe(spec: str) -> bool:
    path, dataset = split_spec(spec)
    if dataset is not None or path.endswith(".npy"):
        return False
    try:
        with open(path, "rb") as fh:
            if fh.read(6) == b"\x93NUMPY":
                return False
    except OSError:
        return False  # open_array names the problem
    h5 = open_h5(path)
    try:
        return read_attrs(h5).get("qbnorm_kind") == "probe"
    finally:
        h5.close()


def open_subject(spec: str) -> Subject:
    if _is_probe(spec):
        h5 = open_qbnorm(spec, "probe")
        if "/bank_neighbors" not in h5:
            raise DataError(f"{spec}: the probe has no /bank_neighbors")
        ds = h5["/bank_neighbors"]
        return Subject(spec, Path(spec).stem, ds.shape[0], int(h5.attrs["gallery_rows"]),
                       probe_neighbors=ds, probe_path=spec)
    source = open_scores(spec)
    n_gallery = source.n_gallery
    if n_gallery is None:
        raise DataError(f"{source.label}: a ranking file without a gallery_rows attribute; the anti-hub "
                        "measures need the gallery size (set the root attribute gallery_rows)")
    return Subject(spec, "", source.rows, n_gallery, source=source)


def _check_ks(subject: Subject, ks: list[int], exclude_self: bool) -> None:
    kmax = max(ks)
    if subject.probe_neighbors is not None:
        if exclude_self:
            raise UsageError(f"--exclude-self: {subject.label} is a probe (bank × gallery); the bank is not the gallery")
        width = subject.probe_neighbors.shape[1]
        if kmax > width:
            raise UsageError(f"--k {kmax}: {subject.label} keeps the top {width} items per bank query (kmax); "
                             f"probe again with --k {kmax}")
        return
    if exclude_self and subject.n_queries != subject.n_gallery:
        raise UsageError(f"--exclude-self needs a square gallery × gallery matrix; {subject.label} is "
                         f"{subject.n_queries} × {subject.n_gallery}")
    if subject.source.is_ranking:
        listed = subject.source.listed
        usable = listed - 1 if exclude_self else listed
        if kmax > usable:
            extra = " (one of which may be the query itself)" if exclude_self else ""
            raise UsageError(f"--k {kmax}: {subject.label} lists N = {listed} items per query{extra}; "
                             f"use --k ≤ {usable}")
    else:
        limit = subject.n_gallery - 1 if exclude_self else subject.n_gallery
        if kmax > limit:
            raise UsageError(f"--k {kmax}: larger than the {limit} candidate items of {subject.label}")


def _drop_self(block: np.ndarray, r0: int, width: int) -> np.ndarray:
    """Remove each row's own index from its neighbour list and keep the first `width` others."""
    rows = np.arange(r0, r0 + block.shape[0])[:, None]
    keep = block != rows
    order = np.argsort(~keep, axis=1, kind="stable")
    shifted = np.take_along_axis(block, order, axis=1)
    shifted = np.where(np.take_along_axis(keep, order, axis=1), shifted, -1)
    return shifted[:, :width]


def neighbours(subject: Subject, kmax: int, exclude_self: bool, budget: Budget, progress) -> np.ndarray:
    """Each query's top-kmax items (Q × kmax), streamed in row blocks."""
    q = subject.n_queries
    out = np.empty((q, kmax), dtype=np.int64)
    if subject.probe_neighbors is not None:
        step = budget.rows(subject.probe_neighbors.shape[1] * 16, share=0.5, total=q)
        for r0, r1 in spans(q, step):
            out[r0:r1] = np.asarray(subject.probe_neighbors[r0:r1, :kmax])
            progress(r1 - r0)
        if out.min() < 0 or out.max() >= subject.n_gallery:
            raise DataError(f"{subject.label}: bank neighbour indices outside the gallery of {subject.n_gallery}")
        return out
    source = subject.source
    if source.is_ranking:
        step = budget.rows(source.listed * 32, share=0.5, total=q, align=source.scores.chunk_rows)
        for r0, r1 in spans(q, step):
            block = source.read_neighbors(r0, r1)
            out[r0:r1] = _drop_self(block, r0, kmax) if exclude_self else block[:, :kmax]
            progress(r1 - r0)
        return out
    step = budget.rows(subject.n_gallery * 24, share=0.5, total=q, align=source.scores.chunk_rows)
    for r0, r1 in spans(q, step):
        block = source.read_scores(r0, r1)
        if exclude_self:
            block = block.astype(np.float64)
            rows = np.arange(r1 - r0)
            block[rows, rows + r0] = -np.inf
        _, idx = topk.select(block, kmax)
        out[r0:r1] = idx
        progress(r1 - r0)
    return out


def _histogram(name: str, k: int, nk: np.ndarray):
    from rich.panel import Panel
    from rich.table import Table

    bins = hub.log_bins(nk)
    most = max(count for _, count in bins) or 1
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right")
    grid.add_column()
    grid.add_column(justify="right")
    for label, count in bins:
        length = 0 if count == 0 else max(1, round(BAR_WIDTH * count / most))
        grid.add_row(label, "█" * length, str(count))
    return Panel(grid, title=f"{name} · N_{k}", subtitle="items per N_k bin", expand=False)


ROWS = (
    ("k-skewness", "skewness", "{:.2f}"),
    ("Robin Hood", "robin_hood", "{:.3f}"),
    ("Gini", "gini", "{:.3f}"),
    ("Atkinson (ε=0.5)", "atkinson", "{:.3f}"),
    ("anti-hub rate", "antihub_rate_pct", "{:.2f} %"),
    ("hub occurrence", "hub_occurrence_pct", "{:.2f} %"),
    ("groupie ratio", "groupie_ratio", "{:.4f}"),
    ("max N_k", "max_nk", "{}"),
    ("coverage", "coverage_pct", "{:.1f} %"),
)


def command(
    scores: Annotated[list[str], typer.Argument(metavar="SCORES", help="Similarity, ranking or probe files: PATH or PATH::/dataset.")],
    k: Annotated[list[int] | None, typer.Option("--k", metavar="K", help="Neighbourhood size(s) (repeatable; default 10).")] = None,
    exclude_self: Annotated[bool, typer.Option("--exclude-self", help="Ignore the diagonal of a square gallery × gallery matrix.")] = False,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="OUT.h5", help="Write the k-occurrences and measures (kind hubness).")] = None,
    memory: common.Memory = common.DEFAULT_MEMORY_TEXT,
    block_rows: common.BlockRows = None,
    force: common.Force = False,
    json_output: common.Json = False,
    quiet: common.Quiet = False,
) -> None:
    """Hubness of retrieval results: k-skewness, Robin Hood, Gini, Atkinson, anti-hubs, hubs.

    N_k(j) counts the queries that have gallery item j among their k best. A probe file gives the
    bank-side view (its bank queries' top items) and the coverage of the DIS activation set.

    Example: qbnorm hubness raw.h5 dis.h5 --k 1 --k 10
    """
    report = common.reporter(json_output, quiet)
    budget = common.budget(memory, block_rows)
    ks = sorted(set(k or [10]))
    for value in ks:
        if value < 1:
            raise UsageError(f"--k {value}: must be at least 1")
    subjects = [open_subject(spec) for spec in scores]
    names = display_names([(s.probe_path, None) if s.source is None else
                           (s.source.scores.path, None if s.source.is_ranking else s.source.scores.dataset)
                           for s in subjects])
    for subject, name in zip(subjects, names, strict=True):
        subject.name = name
        _check_ks(subject, ks, exclude_self)
    params = {"k": ks, "exclude_self": exclude_self, "memory": budget.memory, "block_rows": block_rows}
    records = []
    for s in subjects:
        records += s.source.inputs if s.source else [{"path": s.probe_path, "dataset": None, "kind": "probe"}]
    out = OutputFile(output, "hubness", force=force, params=params, inputs=records) if output else None

    kmax = max(ks)
    occurrences = []
    results = []
    total = sum(s.n_queries for s in subjects)
    with report.progress("hubness", total, unit="queries") as advance:
        for subject in subjects:
            neigh = neighbours(subject, kmax, exclude_self, budget, advance)
            per_k = []
            counts = []
            for value in ks:
                nk = hub.k_occurrence(neigh, value, subject.n_gallery)
                counts.append(nk)
                row = hub.measures(nk, value, subject.n_queries)
                row["coverage_pct"] = hub.coverage(nk)
                per_k.append(row)
            occurrences.append(counts)
            results.append({"name": subject.name, "input": subject.label, "kind": subject.kind,
                            "queries": subject.n_queries, "gallery_rows": subject.n_gallery, "by_k": per_k})

    for subject, res in zip(subjects, results, strict=True):
        if subject.kind != "probe":
            continue
        for row in res["by_k"]:
            if row["coverage_pct"] < COVERAGE_WARNING:
                report.warn(f"{subject.name}: the top {row['k']} of the bank's queries cover only "
                            f"{row['coverage_pct']:.1f}% of the gallery (< {COVERAGE_WARNING:g}%); "
                            "use --method dis, enlarge or re-sample the bank")

    document = {"k": ks, "exclude_self": exclude_self, "inputs": results}
    if out is not None:
        width = max(s.n_gallery for s in subjects)
        data = np.full((len(subjects), len(ks), width), -1, dtype=np.int64)
        for i, counts in enumerate(occurrences):
            for j, nk in enumerate(counts):
                data[i, j, :nk.size] = nk
        with out:
            ds = out.create("/k_occurrence", data=data.astype(np.int32 if data.max() < 2**31 else np.int64))
            ds.attrs["ks"] = np.asarray(ks, dtype=np.int64)
            ds.attrs["rows"] = json.dumps(names)
            ds.attrs["description"] = "N_k per input × k × gallery item; −1 pads a smaller gallery"
            out.h5.attrs["measures"] = json.dumps(results)
        document["output"] = output
        document["uuid"] = out.uuid

    from rich.columns import Columns  # on first use: see report.py
    from rich.table import Table

    for j, value in enumerate(ks):
        table = Table(title=f"Hubness at k = {value}" + (" (self-matches excluded)" if exclude_self else ""))
        table.add_column("measure")
        for res in results:
            table.add_column(res["name"] + (" (bank)" if res["kind"] == "probe" else ""), justify="right")
        for label, key, fmt in ROWS:
            table.add_row(label, *[fmt.format(res["by_k"][j][key]) for res in results])
        table.add_row("most retrieved", *[_top(res["by_k"][j]["top_items"]) for res in results])
        table.add_row("queries × items", *[f"{res['queries']} × {res['gallery_rows']}" for res in results])
        report.table(table)
        report.table(Columns([_histogram(res["name"], value, occurrences[i][j]) for i, res in enumerate(results)]))
    if out is not None:
        report.info(f"wrote {output}: hubness of {len(subjects)} input(s) at k = {', '.join(map(str, ks))}")
    report.result(document)


def _top(items: list[dict], n: int = 3) -> str:
    return ", ".join(f"{t['item']} ({t['nk']})" for t in items[:n])

