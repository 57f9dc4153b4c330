"""The probe file: what `probe` measured of a gallery, and the normalisers built from it.

Datasets (G = gallery size, N = bank rows, Nh = gallery-bank rows):
  /log_norm               (n_betas, G) float64, attr betas: logsumexp_i(β·P[i, j])
  /bank_neighbors         (N, kmax) int32: each bank row's best gallery items, best first
  /activation_count       (G,) int32, attr k: bank-side k-occurrence for the chosen k
  /topk_mean              (n_ks, G) float64, attr ks: mean of the K largest P[:, j]
  /gallery_log_norm, /gallery_bank_neighbors, /gallery_activation_count  the same for H (optional)
  /sorted_bank_scores     (G, N) float32 ascending, only with --keep-sorted (for gc)
"""

from __future__ import annotations

import h5py
import numpy as np

from qbnorm_cli.core import normalisers as nz
from qbnorm_cli.core.statistics import BankAccumulator, activation_mask, occurrence
from qbnorm_cli.errors import DataError, UsageError
from qbnorm_cli.io.files import read_attrs

DEFAULT_BETA = 20.0
DEFAULT_TOPK = {"csls": 10, "nnn": 128}
DEFAULT_ALPHA = 0.75


def datasets(bank: BankAccumulator, gallery_bank: BankAccumulator | None, k: int) -> dict:
    """The probe schema above, from the accumulators of a probe pass: {name: Stored}.
    (/sorted_bank_scores is streamed into the file as it is made, so it is not among them.)"""
    out = {"/topk_mean": Stored(bank.topk_mean, {"ks": np.asarray(bank.topk_ks, dtype=np.int64)})}
    for prefix, name, acc in (("", "bank", bank), ("gallery_", "gallery_bank", gallery_bank)):
        if acc is not None:
            out[f"/{prefix}log_norm"] = Stored(acc.log_norm, {"betas": np.asarray(acc.betas)})
            out[f"/{name}_neighbors"] = Stored(acc.neighbors.indices.astype(np.int32), {})
            out[f"/{prefix}activation_count"] = Stored(occurrence(acc.neighbors.indices, k, acc.n_gallery), {"k": k})
    return out


class Stored:
    """An in-memory dataset: an array and its attributes, read the way h5py.Dataset is."""

    def __init__(self, data, attrs: dict):
        self.data = np.asarray(data)
        self.attrs = attrs

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    def __getitem__(self, key):
        return self.data[key]


class Probe:
    """Read access to a probe's statistics: a probe file, or the datasets of a pass in memory."""

    def __init__(self, h5: h5py.File | dict, path: str | None = None, attrs: dict | None = None):
        self.h5 = h5
        self.path = h5.filename if path is None else path
        self.attrs = read_attrs(h5) if attrs is None else attrs
        self.n_gallery = int(self.attrs["gallery_rows"])

    def _need(self, name: str, what: str) -> h5py.Dataset:
        if name not in self.h5:
            raise UsageError(f"{self.path}: the probe has no {what}; re-run probe with the option that adds it")
        return self.h5[name]

    def _pick(self, name: str, attr: str, value: float, option: str) -> np.ndarray:
        ds = self._need(name, option.lstrip("-"))
        have = [float(v) for v in ds.attrs[attr]]
        for row, v in enumerate(have):
            if np.isclose(v, value, rtol=1e-12, atol=0):
                return np.asarray(ds[row], dtype=np.float64)
        listing = ", ".join(f"{v:g}" for v in have)
        raise UsageError(f"{option} {value:g}: {self.path} has {attr} {listing}; probe again with {option} {value:g}")

    def betas(self, gallery: bool = False) -> list[float]:
        name = "/gallery_log_norm" if gallery else "/log_norm"
        return [float(v) for v in self.h5[name].attrs["betas"]] if name in self.h5 else []

    def log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/log_norm", "betas", beta, "--beta")

    def gallery_log_norm(self, beta: float) -> np.ndarray:
        return self._pick("/gallery_log_norm", "betas", beta, "--gallery-beta")

    def topk_mean(self, k: int) -> np.ndarray:
        return self._pick("/topk_mean", "ks", k, "--topk-mean")

    def activation(self, k: int, gallery: bool = False) -> np.ndarray:
        name = "/gallery_bank_neighbors" if gallery else "/bank_neighbors"
        ds = self._need(name, "gallery bank" if gallery else "bank neighbours")
        if k > ds.shape[1]:
            raise UsageError(f"--k {k}: {self.path} keeps the top {ds.shape[1]} items per bank row; "
                             f"probe again with --k {k}")
        return activation_mask(np.asarray(ds[:, :k]), k, self.n_gallery)

    def sorted_bank(self) -> h5py.Dataset:
        if "/sorted_bank_scores" not in self.h5:
            raise UsageError(f"--method gc: {self.path} has no sorted bank scores; probe again with --keep-sorted")
        return self.h5["/sorted_bank_scores"]

    def default_gallery_beta(self) -> float:
        have = self.betas(gallery=True)
        if len(have) != 1:
            raise UsageError(f"choose --gallery-beta ({self.path} has "
                             f"{', '.join(f'{b:g}' for b in have) or 'no gallery bank'})")
        return have[0]

    def default_beta(self) -> float:
        betas = self.betas()
        if len(betas) == 1:
            return betas[0]
        if any(np.isclose(b, DEFAULT_BETA) for b in betas):
            return DEFAULT_BETA
        raise UsageError(f"{self.path} has betas {', '.join(f'{b:g}' for b in betas)}; choose one with --beta")


def build_normaliser(probe: Probe, method: str, *, beta: float, k: int, gallery_beta: float | None,
                     topk_k: int | None, alpha: float) -> nz.Normaliser:
    """The normaliser `method` with its parameters, from the probe's statistics."""
    if method == "none":
        return nz.none()
    if method == "is":
        return nz.inverted_softmax(probe.log_norm(beta), beta)
    if method == "dis":
        return nz.dynamic_inverted_softmax(probe.log_norm(beta), beta, probe.activation(k))
    if method == "csls":  # r_q averages the row's K best: at most the whole gallery
        return nz.csls(probe.topk_mean(topk_k), min(topk_k, probe.n_gallery))
    if method == "nnn":
        return nz.nnn(probe.topk_mean(topk_k), alpha)
    if method == "gc":
        return nz.globally_corrected(probe.sorted_bank())
    args = (probe.log_norm(beta), beta, probe.gallery_log_norm(gallery_beta), gallery_beta)
    if method == "dual-is":
        return nz.dual_inverted_softmax(*args)
    if method == "dual-dis":
        return nz.dual_dynamic_inverted_softmax(*args, probe.activation(k), probe.activation(k, gallery=True))
    raise DataError(f"unknown method {method}")
