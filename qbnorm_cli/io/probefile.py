"""The probe: what a querybank measured of a gallery, in memory or as a probe file.

Datasets (G = gallery size, N = bank rows, Nh = gallery-bank rows):
  /log_norm               (n_betas, G) float64, attr betas: logsumexp_i(β·P[i, j])
  /bank_neighbors         (N, kmax) int32: each bank row's best gallery items, best first
  /activation_count       (G,) int32, attr k: bank-side k-occurrence for the chosen k
  /topk_mean              (n_ks, G) float64, attr ks: mean of the K largest P[:, j]
  /column_mean            (G,) float64: mean_i P[i, j] (Distribution Normalisation)
  /topk_kth, /topk_distance  (n_ks, G) float64, attr ks: the K-th largest P[:, j] (Local Scaling's σ_j
                          = √(2 − 2·it)) and the mean of √(2 − 2·P) over the K largest (NICDM's μ_j)
  /column_std             (G,) float64, optional: std_i P[i, j] (Mutual Proximity's σ_j)
  /centroid_distance      (n_centroid_ks, G) float64, attr ks, optional: ‖g_j − c_K(g_j)‖², c_K the
                          centroid of the K bank queries nearest g_j (DisSimLocal; needs bank and
                          gallery embeddings)
  /gallery_mean, /gallery_second_moment  (d,), (d, d) float64, optional: ḡ = mean_j g_j and
                          M = mean_j g_j g_jᵀ of the (L2-normalised) gallery, whence a query's mean and
                          variance over the gallery: μ_q = q·ḡ, σ_q² = qᵀMq − μ_q² (Mutual Proximity)
  /gallery_log_norm, /gallery_bank_neighbors, /gallery_activation_count  the same for H (optional)
  /sorted_bank_scores     (G, N) float32 ascending, only with keep_sorted (for gc)
  /sinkhorn_log_u         (n_betas, G) float64, only with sinkhorn: log u_j of the Sinkhorn scalings
                          of exp(β·P) (core/sinkhorn.py); attrs betas, and per β: iterations (int64),
                          change (max |Δ log u|, |Δ log v| of the last iteration), marginal_error
                          (max_b |Σ_j π[b, j] − 1/N|), converged (change < tol, int8); and tol,
                          max_iters (0 for both when a fixed number was asked for), fixed_iters (0: until
                          converged), scores_held (1: the scores were kept in memory, 0: recomputed on
                          every iteration)
  /dual_sinkhorn_log_u    (n_betas, G) float64, with sinkhorn and a gallery bank: the gallery's part of
                          the scalings of exp(β·[P | PB]) (rows: the gallery, then the Nh gallery-bank
                          items; PB = bank × gallery-bank scores), the same attrs plus gallery_bank_rows
  /bank_top_items, /bank_top_scores, /item_top_scores, /item_score_{sum,sumsq,min,max},
  /bank_row_hash, /gallery_row_hash (and the gallery bank's; /item_top_rows with dsl's
                          statistics): what `update_probe` merges (core/probestats.py declares
                          every dataset: shape, dtype, validity and merge rule)
Root attributes: gallery_rows, bank_rows, gallery_bank_rows, similarity, gallery_identity (the
gallery's identity, so that normalise can refuse another gallery), score_min/max/mean/std (and
gallery_score_* for the gallery bank), score_scale, warnings. io/schemas.py declares the same
layout and `Probe.load` checks a file against it; what is read later (neighbour lists, sorted bank
scores) is checked as it is read.
"""

from __future__ import annotations

import h5py
import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.core.memory import MAPPED_FROM, mapped_empty
from qbnorm_cli.core.probestats import BY_NAME, ITEM_FIELDS, item_record
from qbnorm_cli.core.sinkhorn import SinkhornResult
from qbnorm_cli.core.statistics import BankAccumulator, activation_mask, occurrence
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.io import fileschema, schemas
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.hdf5 import has_checksum, open_qbnorm, reading
from qbnorm_cli.methods import DEFAULT_BETA

SORTED = "/sorted_bank_scores"


class Stored:
    """An in-memory dataset: an array and its attributes, read the way h5py.Dataset is."""

    def __init__(self, data, attrs: dict | None = None):
        self.data = np.asarray(data)
        self.attrs = dict(attrs or {})

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __getitem__(self, key):
        return self.data[key]


def _row_for(values: list[float], value: float) -> int | None:
    """The row of a per-parameter dataset (one row per β or K) computed for `value`, or None."""
    return next((row for row, v in enumerate(values) if np.isclose(v, value, rtol=1e-12, atol=0)), None)


class CheckedRows:
    """A probe file's dataset read by row slices (the sorted bank scores, for gc): each slice read
    through `reading` and checked against the schema's declared values."""

    def __init__(self, ds: h5py.Dataset, layout: fileschema.Layout):
        self.ds, self.layout = ds, layout
        self.shape = tuple(ds.shape)

    def __getitem__(self, key: slice) -> np.ndarray:
        start = key.indices(self.shape[0])[0] if isinstance(key, slice) else 0
        label = self.layout.label(self.ds.name)
        with reading(label, f"rows {start}:", checksummed=has_checksum(self.ds), remedy=self.layout.schema.remedy):
            block = np.asarray(self.ds[key])
        self.layout.check_block(self.ds.name, block, start)
        return block


def statistics(bank: BankAccumulator, gallery_bank: BankAccumulator | None, k: int) -> dict[str, Stored]:
    """The probe's datasets (the schema above) from the accumulators of a probe pass (or the merged
    records of an update), with what an update of it needs (core/probestats.UPDATE_RECORDS; the
    fingerprints are added by whoever read the rows); the sorted bank scores, when kept, are added
    by whoever collected them."""
    ks = {"ks": np.asarray(bank.topk_ks, dtype=np.int64)}
    out = {"/topk_mean": Stored(bank.largest_means, ks), "/column_mean": Stored(bank.column_mean),
           "/topk_kth": Stored(bank.topk_kth, ks), "/topk_distance": Stored(bank.topk_distance, ks)}
    if bank.column_std is not None:
        out["/column_std"] = Stored(bank.column_std)
    if bank.column_topk_index is not None:  # for an update of the centroid distances
        out["/item_top_rows"] = Stored(bank.column_topk_index.astype(np.int32))
    for prefix, name, acc in (("", "bank", bank), ("gallery_", "gallery_bank", gallery_bank)):
        if acc is not None:
            indices = acc.neighbors.indices
            out[f"/{prefix}log_norm"] = Stored(acc.log_norm, {"betas": np.asarray(acc.betas)})
            out[f"/{name}_neighbors"] = Stored(indices[:, :acc.kept_neighbors].astype(np.int32))
            out[f"/{prefix}activation_count"] = Stored(occurrence(indices, k, acc.n_gallery), {"k": k})
            out[f"/{name}_top_items"] = Stored(indices.astype(np.int32))
            scores = acc.neighbors.values.astype(np.float32)
            scores[indices < 0] = np.nan
            out[f"/{name}_top_scores"] = Stored(scores)
            for field in ITEM_FIELDS:
                if getattr(acc, field).size:  # no K largest scores without a top-K statistic
                    out[item_record(name, field)] = Stored(getattr(acc, field))
    return out


SINKHORN = {False: "/sinkhorn_log_u", True: "/dual_sinkhorn_log_u"}
# What a probe without a gallery bank lacks for the dual methods: the bank itself, not a β₂.
GALLERY_BANK_HINT = f"{param('gallery_bank')} GB (a bank of gallery-modality items)"


def sinkhorn_statistics(results: list[SinkhornResult], n_gallery: int, *, iters: int | None, tol: float | None,
                        max_iters: int | None, held: bool, dual: bool = False) -> dict[str, Stored]:
    """The Sinkhorn potentials of a probe (the schema above): the first n_gallery entries of each
    β's log u, and how each run ended."""
    attrs = {
        "betas": np.array([r.beta for r in results]),
        "iterations": np.array([r.iterations for r in results], dtype=np.int64),
        "change": np.array([r.change for r in results]),
        "marginal_error": np.array([r.marginal_error for r in results]),
        "converged": np.array([r.converged for r in results], dtype=np.int8),
        "fixed_iters": int(iters or 0), "tol": float(tol or 0.0), "max_iters": int(max_iters or 0),
        "scores_held": int(held),
    }
    if dual:
        attrs["gallery_bank_rows"] = int(results[0].log_u.size - n_gallery) if results else 0
    data = np.stack([r.log_u[:n_gallery] for r in results]) if results else np.zeros((0, n_gallery))
    return {SINKHORN[dual]: Stored(data, attrs)}


class Probe:
    """A probe's statistics of one gallery: from `qbnorm_cli.probe` (in memory) or `Probe.load`.

    The normalisers read it through log_norm(β), activation(k), topk_mean(K) …; each names the
    probe parameter to set when the probe lacks what a method asks for.
    """

    def __init__(self, datasets, attrs: dict, *, path: str | None = None, params: dict | None = None,
                 inputs: list | None = None, warnings: list[str] | None = None,
                 layout: fileschema.Layout | None = None):
        self.datasets = datasets  # {name: Stored} in memory, or an open h5py.File
        self.layout = layout      # what schemas.check found in the file (None in memory)
        self.attrs = dict(attrs)
        self.path = path
        self.params = dict(params or {})
        self.inputs = list(inputs or [])
        self.warnings = list(warnings or [])
        self.diagnostics: dict = {}  # the bank's coverage of the gallery (core.statistics.bank_diagnostics)
        self.cluster: dict | None = None  # what a run on a dask cluster cost (workers, tasks, bytes moved)
        self.update: dict | None = None   # what update_probe changed (api/updating.py)

    def __repr__(self) -> str:
        where = f", path={self.path!r}" if self.path else ""
        return (f"Probe(gallery_rows={self.n_gallery}, bank_rows={self.n_bank}, betas={self.betas()}, "
                f"gallery_betas={self.betas(gallery=True)}{where})")

    @property
    def label(self) -> str:
        return self.path or "the probe"

    @property
    def n_gallery(self) -> int:
        return int(self.attrs["gallery_rows"])

    @property
    def n_bank(self) -> int:
        return int(self.attrs.get("bank_rows", 0))

    @property
    def uuid(self) -> str | None:
        return self.attrs.get("uuid")

    # --- reading -------------------------------------------------------------------------------

    @classmethod
    def load(cls, path) -> Probe:
        """A probe file written by `qbnorm probe` or `Probe.save` (kept open until `close`),
        checked against its schema (io/schemas.py): DataError when it is damaged."""
        h5 = open_qbnorm(str(path), "probe")
        try:
            layout = schemas.check(h5, "probe", str(path))
        except BaseException:
            h5.close()
            raise
        return cls(h5, layout.root_attrs, path=str(path), params=layout.params, inputs=layout.inputs,
                   warnings=layout.attrs.get("warnings", []), layout=layout)

    def close(self) -> None:
        if isinstance(self.datasets, h5py.File):
            self.datasets.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def dataset_names(self) -> list[str]:
        return list(self.layout.data_attrs) if self.layout is not None else list(self.datasets)

    def record_attr(self, name: str, attr: str):
        return self._attr(name, attr)

    def has(self, name: str) -> bool:
        """Whether the probe holds this dataset (core/probestats.py declares them)."""
        return self._has(name)

    def record(self, name: str, spare_rows: int = 0) -> np.ndarray:
        """A whole dataset as an array, read and checked as any other (core/probestats.py). With
        `spare_rows`, the array has that many more rows after the dataset's (their values undefined:
        an update's final records, read in place)."""
        if not self._has(name):
            raise UsageError(f"{self.label}: the probe has no {name}")
        if not spare_rows or self.layout is None:
            values = self._read(name)
            return np.concatenate([values, np.empty((spare_rows, *values.shape[1:]), values.dtype)]) \
                if spare_rows else values
        shape = self._shape(name)
        out = mapped_empty((shape[0] + spare_rows, *shape[1:]), self.datasets[name].dtype)
        self._read(name, out=out[:shape[0]])
        return out

    def _has(self, name: str) -> bool:
        if self.layout is not None:  # a file: the datasets its schema check found
            return name in self.layout.data_attrs
        return name in self.datasets

    def _read(self, name: str, key=(), row: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """datasets[name][key], read through `reading` from a file and checked against the schema's
        declared values where they are checked as read (`row`: the first row read); the whole
        dataset into `out` when given."""
        if self.layout is None:
            return np.asarray(self.datasets[name][key])
        ds = self.datasets[name]
        what = "its values" if key == () else f"rows {row}:"
        with reading(self.layout.label(name), what, checksummed=has_checksum(ds), remedy=self.layout.schema.remedy):
            if out is not None:
                block = out
                ds.read_direct(block)
            elif key == () and ds.dtype.kind in "fiu" and ds.size * ds.dtype.itemsize >= MAPPED_FROM:
                block = mapped_empty(ds.shape, ds.dtype)  # an update's records: mapped at once (core/memory.py)
                ds.read_direct(block)
            else:
                block = np.asarray(ds[key])
        self.layout.check_block(name, block, row)
        return block

    def _attr(self, name: str, attr: str):
        if self.layout is not None:
            return self.layout.data_attrs[name][attr]
        return self.datasets[name].attrs[attr]

    def _shape(self, name: str) -> tuple[int, ...]:
        if self.layout is not None:
            with reading(self.layout.label(name)):
                return tuple(self.datasets[name].shape)
        return tuple(self.datasets[name].shape)

    def _need(self, name: str, what: str, option: str) -> None:
        if not self._has(name):
            raise UsageError(f"{self.label}: the probe has no {what}; probe again with {option}")

    def _pick(self, name: str, value: float) -> np.ndarray:
        """The row of record `name` for `value` of the parameter that picks it (its β, its K)."""
        parameter, attr = methods.picking(name), BY_NAME[name].key
        option, probe_option = parameter.name, parameter.many
        if name.startswith("/gallery_"):  # statistics of a gallery bank: none without one
            self._need(name, "gallery bank", GALLERY_BANK_HINT)
        self._need(name, probe_option.replace("_", " "), param(probe_option))
        have = [float(v) for v in self._attr(name, attr)]
        if (row := _row_for(have, value)) is not None:
            return np.asarray(self._read(name, row), dtype=np.float64)
        listing = ", ".join(f"{v:g}" for v in have)
        raise UsageError(f"{param(option)} {value:g}: {self.label} has {attr} {listing}; "
                         f"probe again with {param(probe_option)} {value:g}")

    def betas(self, gallery: bool = False) -> list[float]:
        name = "/gallery_log_norm" if gallery else "/log_norm"
        return [float(v) for v in self._attr(name, "betas")] if self._has(name) else []

    def log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/log_norm", beta)

    def gallery_log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/gallery_log_norm", beta)

    def topk_mean(self, k: int) -> np.ndarray:
        return self._pick("/topk_mean", k)

    def topk_kth(self, k: int) -> np.ndarray:
        """The K-th largest bank score of each item (Local Scaling)."""
        return self._pick("/topk_kth", k)

    def topk_distance(self, k: int) -> np.ndarray:
        """The mean cosine distance √(2 − 2s) of each item to its K nearest bank queries (NICDM)."""
        return self._pick("/topk_distance", k)

    def column_std(self) -> np.ndarray:
        """std_i P[i, j], the spread of each item's bank scores (Mutual Proximity)."""
        if not self._has("/column_std"):
            raise UsageError(f"{self.label}: the probe has no spread of each item's bank scores; probe again "
                             f"with {param('methods')} mp")
        return np.asarray(self._read("/column_std"), dtype=np.float64)

    def centroid_distance(self, k: int) -> np.ndarray:
        """‖g_j − c_k(g_j)‖², c_k(g_j) the centroid of the k bank queries nearest g_j (DisSimLocal)."""
        if not self._has("/centroid_distance"):
            option = param(methods.picking("/centroid_distance").name)
            raise UsageError(f"{self.label}: the probe has no bank-centroid distances; probe again with "
                             f"{param('methods')} dsl {option} {k} (from bank and gallery embeddings)")
        return self._pick("/centroid_distance", k)

    def gallery_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """(ḡ, M): the gallery's mean vector and second-moment matrix (Mutual Proximity's μ_q, σ_q)."""
        if not self._has("/gallery_mean") or not self._has("/gallery_second_moment"):
            raise UsageError(f"{self.label}: the probe has no gallery moments; probe again with {param('methods')} mp "
                             "(from gallery embeddings)")
        return (np.asarray(self._read("/gallery_mean"), dtype=np.float64),
                np.asarray(self._read("/gallery_second_moment"), dtype=np.float64))

    def neighbors(self, gallery: bool = False, rows: slice = slice(None), k: int | None = None) -> np.ndarray:
        """Each bank row's best gallery items, best first (bank × kmax; `rows` of them, the first
        `k` of each)."""
        name = "/gallery_bank_neighbors" if gallery else "/bank_neighbors"
        self._need(name, "gallery bank" if gallery else "bank neighbours", GALLERY_BANK_HINT if gallery else param("k"))
        return self._read(name, (rows, slice(None, k)), rows.indices(self._shape(name)[0])[0])

    def kmax(self, gallery: bool = False) -> int:
        """How many best items the probe keeps per bank row."""
        name = "/gallery_bank_neighbors" if gallery else "/bank_neighbors"
        self._need(name, "gallery bank" if gallery else "bank neighbours", GALLERY_BANK_HINT if gallery else param("k"))
        return self._shape(name)[1]

    def activation(self, k: int, gallery: bool = False, min_count: int = 1) -> np.ndarray:
        """The DIS activation set: items in the top-k of at least `min_count` bank rows (of the
        gallery bank); min_count 1 is QB-Norm's set, more keeps only the items many queries retrieve."""
        kmax = self.kmax(gallery)
        if k > kmax:
            raise UsageError(f"{param('k')} {k}: {self.label} keeps the top {kmax} items per bank row; "
                             f"probe again with {param('k')} {k}")
        top = self.neighbors(gallery, k=k)
        if min_count <= 1:
            return activation_mask(top, k, self.n_gallery)
        return occurrence(top, k, self.n_gallery) >= min_count

    def column_mean(self) -> np.ndarray:
        """mean_i P[i, j], the bank's mean score of each item (Distribution Normalisation)."""
        if not self._has("/column_mean"):
            raise UsageError(f"{self.label} has no column means of the bank scores (it was made by an older "
                             "qbnorm); probe again")
        return np.asarray(self._read("/column_mean"), dtype=np.float64)

    def sinkhorn_betas(self, dual: bool = False) -> list[float]:
        name = SINKHORN[dual]
        return [float(v) for v in self._attr(name, "betas")] if self._has(name) else []

    def sinkhorn_log_u(self, beta: float, dual: bool = False) -> np.ndarray:
        """log u_j of the (dual-bank) Sinkhorn scalings at this β (core/sinkhorn.py)."""
        name = SINKHORN[dual]
        if not self._has(name):
            what = "dual-bank Sinkhorn potentials" if dual else "Sinkhorn potentials"
            how = f"{param('sinkhorn=True')} and {GALLERY_BANK_HINT}" if dual else param("sinkhorn=True")
            raise UsageError(f"{self.label}: the probe has no {what}; probe again with {how}")
        have = self.sinkhorn_betas(dual)
        if (row := _row_for(have, beta)) is not None:
            return np.asarray(self._read(name, row), dtype=np.float64)
        listing = ", ".join(f"{v:g}" for v in have)
        raise UsageError(f"{param('beta')} {beta:g}: {self.label} has Sinkhorn potentials for betas {listing}; "
                         f"probe again with {param('betas')} {beta:g} and {param('sinkhorn=True')}")

    def sinkhorn_runs(self, dual: bool = False) -> list[dict]:
        """How each β's Sinkhorn iterations ended: beta, iterations, change, marginal_error, converged,
        and whether the scores were held in memory (held) or recomputed on every iteration."""
        name = SINKHORN[dual]
        if not self._has(name):
            return []
        attr = lambda a: self._attr(name, a)
        kinds = {"iterations": int, "change": float, "marginal_error": float, "converged": bool}
        held = bool(attr("scores_held"))
        return [{"beta": float(beta), **{f: kind(attr(f)[i]) for f, kind in kinds.items()}, "held": held}
                for i, beta in enumerate(attr("betas"))]

    def sorted_bank(self):
        """Every gallery item's bank scores, ascending (G × N; read by row slices, and checked as
        read, when it comes from a file)."""
        if not self._has(SORTED):
            raise UsageError(f"{self.label} has no sorted bank scores (gc needs them); probe again with "
                             f"{param('keep_sorted=True')}")
        ds = self.datasets[SORTED]
        return ds.data if isinstance(ds, Stored) else CheckedRows(ds, self.layout)

    def default_beta(self) -> float:
        """The probe's β when it has one, or 20 among several; else UsageError asking for one."""
        betas = self.betas()
        if len(betas) == 1:
            return betas[0]
        if any(np.isclose(b, DEFAULT_BETA) for b in betas):
            return DEFAULT_BETA
        listing = ", ".join(f"{b:g}" for b in betas)
        raise UsageError(f"{self.label} has betas {listing}; choose one with {param('beta')}")

    def default_gallery_beta(self) -> float:
        have = self.betas(gallery=True)
        if not have:
            raise UsageError(f"{self.label}: the probe has no gallery bank; probe again with {GALLERY_BANK_HINT}")
        if len(have) != 1:
            raise UsageError(f"{self.label} has gallery betas {', '.join(f'{b:g}' for b in have)}; choose one with "
                             f"{param(methods.picking('/gallery_log_norm').name)}")
        return have[0]

    # --- writing -------------------------------------------------------------------------------

    def save(self, path, *, force: bool = False, provenance: str | None = None) -> str:
        """Write the probe file atomically; returns its uuid."""
        with OutputFile(str(path), "probe", force=force, params=self.params, inputs=self.inputs,
                        provenance=provenance) as out:
            names = list(self.layout.data_attrs) if self.layout is not None else list(self.datasets)
            for name in names:
                attrs = self.layout.data_attrs[name] if self.layout is not None else dict(self.datasets[name].attrs)
                out.create(name, data=self._read(name), **attrs)
            write_attrs(out, self.attrs)
            out.warnings = list(self.warnings)
        return out.uuid


KEPT_ATTRS = ("gallery_rows", "bank_rows", "gallery_bank_rows", "similarity", "gallery_identity",
              "score_min", "score_max", "score_mean", "score_std", "score_scale",
              "gallery_score_min", "gallery_score_max", "gallery_score_mean", "gallery_score_std")


def write_attrs(out: OutputFile, attrs: dict) -> None:
    """The probe's root attributes (those OutputFile does not write itself)."""
    for name in KEPT_ATTRS:
        if attrs.get(name) is not None:
            out.h5.attrs[name] = attrs[name]
