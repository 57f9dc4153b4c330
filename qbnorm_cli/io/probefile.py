"""The probe: what a querybank measured of a gallery, in memory or as a probe file.

Datasets (G = gallery size, N = bank rows, Nh = gallery-bank rows):
  /log_norm               (n_betas, G) float64, attr betas: logsumexp_i(β·P[i, j])
  /bank_neighbors         (N, kmax) int32: each bank row's best gallery items, best first
  /activation_count       (G,) int32, attr k: bank-side k-occurrence for the chosen k
  /topk_mean              (n_ks, G) float64, attr ks: mean of the K largest P[:, j]
  /gallery_log_norm, /gallery_bank_neighbors, /gallery_activation_count  the same for H (optional)
  /sorted_bank_scores     (G, N) float32 ascending, only with keep_sorted (for gc)
Root attributes: gallery_rows, bank_rows, gallery_bank_rows, similarity, gallery_identity (the
gallery's identity, so that normalise can refuse another gallery), score_min/max/mean/std (and
gallery_score_* for the gallery bank), score_scale.
"""

from __future__ import annotations

import json

import h5py
import numpy as np

from qbnorm_cli.core.statistics import BankAccumulator, activation_mask, occurrence
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.io.atomic import OutputFile
from qbnorm_cli.io.hdf5 import open_qbnorm, read_attrs
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


def statistics(bank: BankAccumulator, gallery_bank: BankAccumulator | None, k: int) -> dict[str, Stored]:
    """The probe's datasets (the schema above) from the accumulators of a probe pass; the sorted
    bank scores, when kept, are added by whoever collected them."""
    out = {"/topk_mean": Stored(bank.topk_mean, {"ks": np.asarray(bank.topk_ks, dtype=np.int64)})}
    for prefix, name, acc in (("", "bank", bank), ("gallery_", "gallery_bank", gallery_bank)):
        if acc is not None:
            out[f"/{prefix}log_norm"] = Stored(acc.log_norm, {"betas": np.asarray(acc.betas)})
            out[f"/{name}_neighbors"] = Stored(acc.neighbors.indices.astype(np.int32))
            out[f"/{prefix}activation_count"] = Stored(occurrence(acc.neighbors.indices, k, acc.n_gallery), {"k": k})
    return out


class Probe:
    """A probe's statistics of one gallery: from `qbnorm_cli.probe` (in memory) or `Probe.load`.

    The normalisers read it through log_norm(β), activation(k), topk_mean(K) …; each names the
    probe parameter to set when the probe lacks what a method asks for.
    """

    def __init__(self, datasets, attrs: dict, *, path: str | None = None, params: dict | None = None,
                 inputs: list | None = None, warnings: list[str] | None = None):
        self.datasets = datasets  # {name: Stored} in memory, or an open h5py.File
        self.attrs = dict(attrs)
        self.path = path
        self.params = dict(params or {})
        self.inputs = list(inputs or [])
        self.warnings = list(warnings or [])
        self.diagnostics: dict = {}  # the bank's coverage of the gallery (core.statistics.bank_diagnostics)
        self.cluster: dict | None = None  # what a run on a dask cluster cost (workers, tasks, bytes moved)

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
        """A probe file written by `qbnorm probe` or `Probe.save` (kept open until `close`)."""
        h5 = open_qbnorm(str(path), "probe")
        attrs = read_attrs(h5)
        recorded = {name: _json(attrs.get(name), default) for name, default in
                    (("params", {}), ("inputs", []), ("warnings", []))}
        return cls(h5, attrs, path=str(path), **recorded)

    def close(self) -> None:
        if isinstance(self.datasets, h5py.File):
            self.datasets.close()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _need(self, name: str, what: str, option: str):
        if name not in self.datasets:
            raise UsageError(f"{self.label}: the probe has no {what}; probe again with {param(option)}")
        return self.datasets[name]

    def _pick(self, name: str, attr: str, value: float, option: str, probe_option: str) -> np.ndarray:
        ds = self._need(name, probe_option.replace("_", " "), probe_option)
        have = [float(v) for v in ds.attrs[attr]]
        for row, v in enumerate(have):
            if np.isclose(v, value, rtol=1e-12, atol=0):
                return np.asarray(ds[row], dtype=np.float64)
        listing = ", ".join(f"{v:g}" for v in have)
        raise UsageError(f"{param(option)} {value:g}: {self.label} has {attr} {listing}; "
                         f"probe again with {param(probe_option)} {value:g}")

    def betas(self, gallery: bool = False) -> list[float]:
        name = "/gallery_log_norm" if gallery else "/log_norm"
        return [float(v) for v in self.datasets[name].attrs["betas"]] if name in self.datasets else []

    def log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/log_norm", "betas", beta, "beta", "betas")

    def gallery_log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/gallery_log_norm", "betas", beta, "gallery_beta", "gallery_betas")

    def topk_mean(self, k: int) -> np.ndarray:
        return self._pick("/topk_mean", "ks", k, "topk_mean", "topk_means")

    def neighbors(self, gallery: bool = False) -> np.ndarray:
        """Each bank row's best gallery items, best first (bank × kmax)."""
        name = "/gallery_bank_neighbors" if gallery else "/bank_neighbors"
        return np.asarray(self._need(name, "gallery bank" if gallery else "bank neighbours",
                                     "gallery_bank" if gallery else "k")[()])

    def activation(self, k: int, gallery: bool = False) -> np.ndarray:
        """The DIS activation set: items in the top-k of at least one bank row (of the gallery bank)."""
        name = "/gallery_bank_neighbors" if gallery else "/bank_neighbors"
        ds = self._need(name, "gallery bank" if gallery else "bank neighbours", "gallery_bank" if gallery else "k")
        if k > ds.shape[1]:
            raise UsageError(f"{param('k')} {k}: {self.label} keeps the top {ds.shape[1]} items per bank row; "
                             f"probe again with {param('k')} {k}")
        return activation_mask(np.asarray(ds[:, :k]), k, self.n_gallery)

    def sorted_bank(self):
        """Every gallery item's bank scores, ascending (G × N; an HDF5 dataset when read from a file)."""
        if SORTED not in self.datasets:
            raise UsageError(f"{self.label} has no sorted bank scores (gc needs them); probe again with "
                             f"{param('keep_sorted=True')}")
        ds = self.datasets[SORTED]
        return ds.data if isinstance(ds, Stored) else ds

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
        if len(have) != 1:
            raise UsageError(f"choose {param('gallery_beta')} ({self.label} has "
                             f"{', '.join(f'{b:g}' for b in have) or 'no gallery bank'})")
        return have[0]

    # --- writing -------------------------------------------------------------------------------

    def save(self, path, *, force: bool = False, provenance: str | None = None) -> str:
        """Write the probe file atomically; returns its uuid."""
        with OutputFile(str(path), "probe", force=force, params=self.params, inputs=self.inputs,
                        provenance=provenance) as out:
            for name in self.datasets:
                ds = self.datasets[name]
                out.create(name, data=np.asarray(ds[()]), **dict(ds.attrs))
            write_attrs(out, self.attrs)
        return out.uuid


def _json(text, default):
    try:
        return json.loads(text) if isinstance(text, str) else default
    except ValueError:
        return default


KEPT_ATTRS = ("gallery_rows", "bank_rows", "gallery_bank_rows", "similarity", "gallery_identity",
              "score_min", "score_max", "score_mean", "score_std", "score_scale",
              "gallery_score_min", "gallery_score_max", "gallery_score_mean", "gallery_score_std", "warnings")


def write_attrs(out: OutputFile, attrs: dict) -> None:
    """The probe's root attributes (those OutputFile does not write itself)."""
    for name in KEPT_ATTRS:
        if attrs.get(name) is not None:
            out.h5.attrs[name] = attrs[name]
