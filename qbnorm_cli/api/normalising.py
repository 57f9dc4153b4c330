"""`normalise`: re-score queries against the gallery with a probe's statistics."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.api.common import (
    bounded,
    check_choice,
    check_count,
    clustered,
    other_gallery,
    progress_or_none,
    score_source,
    warn,
)
from qbnorm_cli.core import scale
from qbnorm_cli.core.results import Ranking
from qbnorm_cli.errors import DataError, plain_text
from qbnorm_cli.io import limits
from qbnorm_cli.io.paramsfile import tuned_on_warning
from qbnorm_cli.io.probefile import Probe
from qbnorm_cli.io.sinks import Column, Sink
from qbnorm_cli.streaming import cluster as clustering
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, make_budget
from qbnorm_cli.streaming.engine import run_normalise
from qbnorm_cli.streaming.sources import SIMILARITIES, MatrixScores, sample_stats

DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class Written:
    """What a run wrote: the file, its kind and uuid, which rows were normalised, the settings."""

    path: str
    kind: str
    uuid: str
    normalised: np.ndarray
    params: dict
    warnings: tuple[str, ...] = ()
    inputs: tuple[dict, ...] = ()  # what was read, as recorded in the file
    cluster: dict | None = None    # what a run on a dask cluster cost (workers, tasks, bytes moved)


def _engine(session):
    """The streaming driver of run_normalise's protocol: here, or on a cluster's session."""
    return run_normalise if session is None else functools.partial(clustering.run_normalise, session)


def _as_probe(value) -> Probe:
    return value if isinstance(value, Probe) else Probe.load(value)


@bounded
@methods.takes_parameters
def normalise(queries=None, gallery=None, probe=None, *, method: str = methods.DEFAULT.name,
              top_k: int | None = None, sims=None, transpose: bool = False,
              similarity: str | None = None, dtype: str = "float64", memory=DEFAULT_MEMORY,
              block_rows: int | None = None, output=None, force: bool = False, accept_mismatch: bool = False,
              progress=None, provenance: str | None = None, extra_params: dict | None = None,
              tuned: dict | None = None, cluster=None, **parameters):
    """Normalise query × gallery similarities with a probe's statistics (`method`: see
    qbnorm_cli.methods.METHODS; default dis).

    queries, gallery: embeddings (arrays, memory maps, h5py datasets, `PATH[::/dataset]` strings),
    compared as the probe compared its bank (or by `similarity`); or `sims`, precomputed query ×
    gallery scores (transpose=True: stored gallery × queries, read transposed; v2t from a t2v dump:
    the items become the queries). probe: a `Probe` or a probe file. The method's parameters are
    keywords, one per parameter the registry declares (methods.PARAMETERS, each with its symbol,
    range and help; defaults: the registry's, β the probe's; parameters the method does not take
    are ignored). top_k: keep each
    query's N best items instead of every score. tuned: the settings of a params file
    (`load_params`) these options came from: a warning when the inputs are the validation data they
    were tuned on.
    cluster: run on a dask cluster ("local", "local:N", "tcp://HOST:PORT", a scheduler file, a
    distributed.Client or a Cluster; docs/distributed.md), with the same results to the bit and
    `memory` per worker.

    Returns the dense (Q, G) scores (`dtype`), or with `top_k` a `Ranking` (indices, scores,
    normalised); with `output`, writes the similarity or ranking file there instead (streamed, atomic)
    and returns what it wrote (`Written`). Rows a dynamic method leaves alone keep raw scores; the
    log-domain scores of the inverted-softmax methods compare within a row, not across rows.
    """
    budget = make_budget(memory, block_rows)
    spec = methods.get(method)
    check_choice(dtype, DTYPES, "dtype")
    probe = _as_probe(probe)
    n_gallery = probe.n_gallery
    ranked = top_k is not None

    if sims is None:
        probed = probe.attrs.get("similarity", "cosine")
        similarity = similarity or (probed if probed in SIMILARITIES else "cosine")
    scores, inputs, _ = score_source(queries, gallery, sims, rows_name="queries", cols_name="gallery",
                                     sims_name="sims", similarity=similarity, budget=budget, what="normalise",
                                     eager_cols=not ranked, transpose=transpose, eager=cluster is None)
    columns = inputs[-1]
    if sims is not None and columns.cols != n_gallery:
        raise DataError(f"{columns.label} has {columns.cols} columns but the probe's gallery has {n_gallery} items")
    if sims is None and columns.rows != n_gallery:
        raise DataError(f"{columns.label} has {columns.rows} rows but {probe.label} was made from a gallery "
                        f"of {n_gallery}")
    identity = columns.attrs.get("gallery_identity") if sims is not None else columns.identity
    mismatch = other_gallery(probe, identity, columns.label, accept_mismatch)

    if top_k is not None:
        check_count(top_k, "top_k", n_gallery, "gallery size")
    k, values = checked_settings(spec, parameters, probe)
    found, score_scale = _scale_warnings(probe, values, scores)
    found = [w for w in (mismatch, *found) if w]
    norm = methods.build(spec, probe, values)
    if norm.gate is not None and not norm.gate.any():
        found.append(methods.unused_gate_warning(spec, values, k))

    params = {
        "method": spec.name, **{name: values.get(name) for name in methods.PARAMETERS}, "k": k, "top_k": top_k,
        "similarity": "precomputed" if sims is not None else similarity, "transpose": transpose, "dtype": dtype,
        "probe_uuid": probe.uuid, "memory": budget.memory, "block_rows": block_rows, **(extra_params or {}),
    }
    record = [*inputs, {"path": probe.path, "dataset": None, "kind": "probe", "uuid": probe.uuid}]
    if tuned is not None:
        found = [w for w in (*found, tuned_on_warning(tuned["path"], tuned, [i.describe() for i in inputs])) if w]
    for message in found:
        warn(message)
    n_rows = scores.n_rows
    kind = "ranking" if ranked else "similarity"
    width = top_k if ranked else n_gallery
    columns = {"/scores": Column(width, dtype)}
    if ranked:
        columns["/neighbors"] = Column(width, np.int64, np.int32)
    if output is not None:
        item_bytes = sum(np.dtype(column.stored).itemsize for column in columns.values())
        limits.check_output(output, n_rows * width * item_bytes,
                            f"{n_rows} × {width} {'scores and neighbours' if ranked else 'scores'}")
    normalised = np.zeros(n_rows, dtype=bool)
    with clustered(cluster) as session, \
            Sink(output, kind, n_rows, columns, force=force, params=params, inputs=record,
                 provenance=provenance) as sink, \
            progress_or_none(progress)("normalise", n_rows * n_gallery, per=n_gallery) as advance:
        for q0, (block, indices, gated) in _engine(session)(scores, norm, budget, top_k, progress=advance,
                                                            dtype=np.dtype(dtype)):
            sink.write(q0, "/scores", block)
            if ranked:
                sink.write(q0, "/neighbors", indices)
            normalised[q0:q0 + len(gated)] = gated
            del block, indices  # freed while the next block is computed
        sink.finish({"/normalised": normalised},
                    {"method": spec.name, "score_scale": score_scale or None, "gallery_rows": n_gallery,
                     "gallery_identity": identity or None,
                     "score_domain": "log (compare within a row)" if spec.log_domain else None}, found)
    if output is None:
        if ranked:
            return Ranking(sink.arrays["/neighbors"], sink.arrays["/scores"], normalised, n_gallery)
        return sink.arrays["/scores"]
    return Written(str(output), kind, sink.uuid, normalised, params, tuple(plain_text(w) for w in found),
                   sink.inputs, session.report() if session is not None else None)


def checked_settings(method: methods.Method, given: Mapping, probe: Probe) -> tuple[int, dict]:
    """k (checked whatever the method: it is recorded with every output) and the method's parameter
    values (methods.settings), those that count gallery items within the gallery."""
    n_gallery = probe.n_gallery
    k = given.get("k")
    k = methods.PARAMETERS["k"].check(methods.PARAMETERS["k"].default if k is None else k)
    check_count(k, "k", n_gallery, "gallery size")
    values = methods.settings(method, {**given, "k": k}, probe)
    for name in method.within_gallery:
        check_count(values[name], name, n_gallery, "gallery size")
    return k, values


def _scale_warnings(probe: Probe, values: dict, scores) -> tuple[list[str], str | None]:
    """Warnings when β looks wrong for the bank scores' scale, or the query scores are on another
    scale than the bank's; and the detected scale to record."""
    found = []
    probe_stats = scale.ScoreStats.from_attrs(probe.attrs)
    score_scale = scale.classify(probe_stats) if probe_stats else None
    if isinstance(scores, MatrixScores) and probe_stats is not None:
        sims_stats = sample_stats(scores)
        if scale.classify(sims_stats) != score_scale:
            found.append(f"{scores.source.label} holds scores {scale.describe(sims_stats)}, but the probe's bank "
                         f"scores are {scale.describe(probe_stats)}; score queries and bank the same way")
    return [*found, *methods.scale_warnings(values, probe)], score_scale
