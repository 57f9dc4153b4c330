"""Choosing a normaliser and its parameters on validation data, and judging a bank.

`tune` evaluates a grid of methods × β × k … on validation queries with ground truth. Every
setting needs only statistics that one probe pass computes for all β and K at once, so the bank is
read once; each setting then costs one streamed normalise of the validation scores. The winner is
written as a small JSON file (kind `params`) that `probe --params` and `normalise --params` read.

Bank diagnostics (used by `probe`): coverage is the share of gallery items in the top-k of at least
one bank query (the DIS activation set); a bank from another domain, or an adversarial one whose
queries all retrieve the same few hubs, covers little of the gallery and shows a very skewed
bank-side k-occurrence. QB-Norm (Bogolin et al., CVPR 2022, Sec. 4) shows such banks make IS worse
than no normalisation, while DIS, which leaves queries outside the activation set alone, is robust.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli import FORMAT_VERSION, __version__
from qbnorm_cli.core import hubness, metrics
from qbnorm_cli.core import normalisers as nz
from qbnorm_cli.core.scale import ScoreStats, beta_grid
from qbnorm_cli.core.statistics import occurrence
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError
from qbnorm_cli.io import files
from qbnorm_cli.io.probefile import DEFAULT_BETA, Probe, build_normaliser
from qbnorm_cli.streaming.budget import Budget, spans, spread
from qbnorm_cli.streaming.engine import run_normalise

# Grids for cosine-scale scores; `scale.beta_grid` adds their equivalents on other scales.
BETAS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0)
GALLERY_BETAS = (1.0, 2.0, 5.0, 10.0, 20.0)
DIS_KS = (1, 2, 5)
CSLS_KS = (5, 10, 20)
NNN_KS = (16, 64, 128)
NNN_ALPHAS = (0.5, 0.75, 1.0)
DEFAULT_METHODS = ("is", "dis", "csls", "nnn", "dual-is", "dual-dis")
DUAL = ("dual-is", "dual-dis")
BETA_METHODS = ("is", "dis", *DUAL)

METRICS = {"geom": "GeomR", "R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "MdR": "MdR"}
PARAMS_KIND = "params"
LOW_COVERAGE = 0.5
CONCENTRATED = 0.1  # coverage below this: the bank piles onto a few items (far-domain or adversarial)
SMALL_BANK = 5  # bank rows × k below this many times the gallery size: too few to cover it under hubness
TUNED_ROLES = ("queries", "gallery", "sims")  # banks are meant to be shared between splits
TOP_CANDIDATES = 10


@dataclass(frozen=True)
class Setting:
    """One point of the grid; fields a method does not use are None."""

    method: str
    beta: float | None = None
    k: int | None = None
    gallery_beta: float | None = None
    topk_mean: int | None = None
    alpha: float | None = None

    def label(self) -> str:
        parts = [self.method if self.method != "none" else "raw"]
        for name, value in (("β", self.beta), ("k", self.k), ("β₂", self.gallery_beta),
                            ("K", self.topk_mean), ("α", self.alpha)):
            if value is not None:
                parts.append(f"{name}={value:g}")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def parse_methods(text: str | None, has_gallery_bank: bool) -> list[str]:
    """`is,dis,…` → methods; the dual methods are dropped (or refused if named) without a gallery bank."""
    if text is None:
        return [m for m in DEFAULT_METHODS if has_gallery_bank or m not in DUAL]
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names:
        raise UsageError("--methods: name at least one method")
    for name in names:
        if name not in nz.METHODS:
            raise UsageError(f"--methods {name!r}: choose from {', '.join(m for m in nz.METHODS if m != 'none')}")
        if name in DUAL and not has_gallery_bank:
            raise UsageError(f"--methods {name}: needs a gallery bank (--gallery-bank or --gallery-bank-sims)")
    return list(dict.fromkeys(m for m in names if m != "none"))


def grid(methods: list[str], stats: ScoreStats | None, betas=None, gallery_betas=None) -> list[Setting]:
    """The raw baseline, then every setting of each method (β grids follow the score scale)."""
    b1 = sorted({float(b) for b in betas}) if betas else beta_grid(BETAS, stats)
    b2 = sorted({float(b) for b in gallery_betas}) if gallery_betas else beta_grid(GALLERY_BETAS, stats)
    out = [Setting("none")]
    for method in methods:
        if method == "is":
            out += [Setting("is", beta=b) for b in b1]
        elif method == "dis":
            out += [Setting("dis", beta=b, k=k) for b in b1 for k in DIS_KS]
        elif method == "csls":
            out += [Setting("csls", topk_mean=k) for k in CSLS_KS]
        elif method == "nnn":
            out += [Setting("nnn", topk_mean=k, alpha=a) for k in NNN_KS for a in NNN_ALPHAS]
        elif method == "gc":
            out.append(Setting("gc"))
        elif method == "dual-is":
            out += [Setting("dual-is", beta=b, gallery_beta=g) for b in b1 for g in b2]
        elif method == "dual-dis":
            out += [Setting("dual-dis", beta=b, gallery_beta=g, k=k) for b in b1 for g in b2 for k in DIS_KS]
    return out


@dataclass
class Needs:
    """What one probe pass must compute for a list of settings."""

    betas: list[float]
    gallery_betas: list[float]
    kmax: int
    topk_ks: tuple[int, ...]
    keep_sorted: bool

    @classmethod
    def of(cls, settings: list[Setting]) -> Needs:
        betas = sorted({s.beta for s in settings if s.beta is not None}) or [DEFAULT_BETA]
        gallery = sorted({s.gallery_beta for s in settings if s.gallery_beta is not None}) or [1.0]
        kmax = max([s.k for s in settings if s.k is not None] or [1])
        ks = tuple(sorted({s.topk_mean for s in settings if s.topk_mean is not None}))
        return cls(betas, gallery, kmax, ks, any(s.method == "gc" for s in settings))


class CachedScores:
    """Query × gallery scores computed once and kept when they fit a quarter of the budget (every
    setting re-reads them); otherwise the wrapped scores, recomputed tile by tile."""

    def __init__(self, scores, budget: Budget):
        self.inner = scores
        self.n_rows, self.n_cols = scores.n_rows, scores.n_cols
        self.full = None
        self._span = (0, self.n_cols)
        if budget.fits(self.n_rows * self.n_cols * 4 * 2, 0.25):
            self.full = np.empty((self.n_rows, self.n_cols), dtype=np.float32)
            scores.column_block(0, self.n_cols)
            for r0, r1 in spans(self.n_rows, max(1, (1 << 24) // max(self.n_cols, 1))):
                self.full[r0:r1] = scores.tile(r0, r1)

    def column_block(self, c0: int, c1: int) -> None:
        if self.full is None:
            self.inner.column_block(c0, c1)
        self._span = (c0, c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        if self.full is None:
            return self.inner.tile(r0, r1)
        return self.full[r0:r1, self._span[0]:self._span[1]]

    def col_bytes(self) -> int:
        return 0 if self.full is not None else self.inner.col_bytes()

    @property
    def row_chunk(self) -> int | None:
        return None if self.full is not None else self.inner.row_chunk

    @property
    def col_chunk(self) -> int | None:
        return None if self.full is not None else self.inner.col_chunk


def sample_stats(scores, rows: int = 256, max_cols: int = 4096) -> ScoreStats:
    """Statistics of evenly spaced rows of a score source (before the probe pass fixes the grid)."""
    scores.column_block(0, min(scores.n_cols, max_cols))
    return ScoreStats.of(np.concatenate([scores.tile(r, r + 1) for r in spread(scores.n_rows, rows)]))


def normaliser(probe: Probe, setting: Setting) -> nz.Normaliser:
    if setting.method == "none":
        return nz.none()
    norm = build_normaliser(probe, setting.method, beta=setting.beta, k=setting.k or 1,
                            gallery_beta=setting.gallery_beta, topk_k=setting.topk_mean,
                            alpha=setting.alpha if setting.alpha is not None else 0.0)
    return norm


def evaluate(scores, norm: nz.Normaliser, relevant: np.ndarray, budget: Budget) -> dict:
    """R@K, MdR, MnR, GeomR of one normaliser on the validation scores, plus the normalised share."""
    rank = np.empty(scores.n_rows)
    gated = np.zeros(scores.n_rows, dtype=bool)
    for q0, (values, _, rows_gated) in run_normalise(scores, norm, budget, None):
        q1 = q0 + len(values)
        rank[q0:q1] = metrics.ranks(values, relevant[q0:q1])
        gated[q0:q1] = rows_gated
    out = metrics.recall_summary(rank)
    out["normalised"] = 100.0 * float(gated.mean())
    return out


def sort_key(metric: str):
    """Best first: higher recall (lower MdR), then higher R@1, GeomR; grid order breaks ties."""
    sign = 1.0 if metric in metrics.LOWER_IS_BETTER else -1.0
    return lambda row: (sign * row["metrics"][metric], -row["metrics"]["R@1"], -row["metrics"]["GeomR"])


def rank_results(rows: list[dict], metric: str) -> list[dict]:
    return sorted(rows, key=sort_key(metric))  # sorted() is stable: grid order on exact ties


def edge_note(best: Setting, settings: list[Setting]) -> str | None:
    """A hint when the winning β or β₂ is the largest or smallest value tried for its method."""
    for field, option in (("beta", "--beta"), ("gallery_beta", "--gallery-beta")):
        value = getattr(best, field)
        tried = sorted({getattr(s, field) for s in settings if s.method == best.method} - {None})
        if value is None or len(tried) < 3 or value not in (tried[0], tried[-1]):
            continue
        side, further = ("largest", value * 2) if value == tried[-1] else ("smallest", value / 2)
        return (f"the best {best.method} setting uses the {side} {option} tried ({value:g}); the optimum may lie "
                f"beyond: try {option} {value:g} {option} {further:g} …")
    return None


def best_per_method(ranked: list[dict]) -> list[dict]:
    seen, out = set(), []
    for row in ranked:
        if row["setting"].method not in seen:
            seen.add(row["setting"].method)
            out.append(row)
    return out


# --- bank diagnostics ------------------------------------------------------------------------

def bank_diagnostics(neighbors: np.ndarray, k: int, n_gallery: int) -> dict:
    """Coverage of the activation set and the skewness of the bank-side k-occurrence."""
    counts = occurrence(neighbors, k, n_gallery)
    covered = int(np.count_nonzero(counts))
    return {"coverage": covered / n_gallery, "covered_items": covered, "occurrence_skewness": hubness.skewness(counts),
            "k": k, "bank_rows": int(neighbors.shape[0])}


def coverage_warning(diag: dict, n_gallery: int) -> str | None:
    """A one-line warning and recommendation when the bank covers under half of the gallery."""
    if diag["coverage"] >= LOW_COVERAGE:
        return None
    small = diag["bank_rows"] * diag["k"] < SMALL_BANK * n_gallery
    size = f"{diag['bank_rows']} queries for {n_gallery} gallery items"
    if small and diag["coverage"] >= CONCENTRATED:
        advice = f"enlarge the bank (it has {size})"
    elif small:
        advice = f"re-sample the bank from in-domain training queries and enlarge it (it has {size})"
    else:
        advice = "re-sample the bank from in-domain training queries"
    return (f"low bank coverage: the top-{diag['k']} items of the {diag['bank_rows']} bank queries cover only "
            f"{100 * diag['coverage']:.1f}% of the gallery ({diag['covered_items']} of {n_gallery} items; "
            f"k-occurrence skewness {diag['occurrence_skewness']:.1f}); a far-domain or adversarial bank can make "
            f"is/csls worse than no normalisation: use --method dis (it leaves queries outside the activation "
            f"set alone), or {advice}")


# --- the params file -------------------------------------------------------------------------

def check_params_target(path: str, force: bool, inputs: list[files.ArrayInput]) -> Path:
    target = Path(path)
    if "::" in path:
        raise UsageError(f"{path}: the settings are written to a plain JSON file, e.g. params.json")
    if not target.parent.is_dir():
        raise UsageError(f"{path}: no such directory {str(target.parent)!r}")
    if target.is_dir():
        raise UsageError(f"{path}: is a directory")
    for item in inputs:
        if Path(item.path).resolve() == target.resolve():
            raise UsageError(f"{path}: output would overwrite an input; choose another path")
    if target.exists() and not force:
        raise UsageError(f"{path}: exists; pass --force to overwrite")
    return target


def params_document(setting: Setting, result: dict, raw: dict, metric: str, validation: dict,
                    stats: ScoreStats, scale_name: str, ranked: list[dict], evaluated: int) -> dict:
    return {
        "qbnorm_kind": PARAMS_KIND, "qbnorm_version": FORMAT_VERSION, "created_by": f"qbnorm {__version__}",
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["qbnorm", *files.COMMAND_LINE]),
        **setting.as_dict(),
        "metric": metric, "metrics": _metric_values(result), "raw_metrics": _metric_values(raw),
        "score_scale": scale_name, "scores": stats.as_dict(),
        "validation": validation, "settings_evaluated": evaluated,
        "candidates": [{**row["setting"].as_dict(), "metrics": _metric_values(row["metrics"])}
                       for row in ranked[:TOP_CANDIDATES]],
    }


def _metric_values(result: dict) -> dict:
    return {k: v for k, v in result.items() if k in metrics.METRIC_NAMES or k == "normalised"}


def write_params(target: Path, document: dict) -> None:
    """Atomically: a temporary file beside the target, renamed into place."""
    text = json.dumps(document, indent=2) + "\n"
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".qbnorm-tmp")
    except OSError as exc:
        raise RuntimeFailure(f"{target}: cannot write: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, target)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise RuntimeFailure(f"{target}: write failed: {exc.strerror or exc}") from None
        raise


def load_params(path: str) -> dict:
    """The settings of a params file from `qbnorm tune` (fields a method does not use are None)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--params {path}: no such file")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--params {path}: not a JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("qbnorm_kind") != PARAMS_KIND:
        raise DataError(f"--params {path}: not a qbnorm params file (write one with `qbnorm tune`)")
    if int(doc.get("qbnorm_version", 0)) > FORMAT_VERSION:
        raise DataError(f"--params {path}: qbnorm_version {doc['qbnorm_version']} is newer than this qbnorm supports")
    method = doc.get("method")
    if method not in nz.METHODS:
        raise DataError(f"--params {path}: unknown method {method!r}")
    out = {"method": method, "validation": doc.get("validation") or {}}
    for name, kind in (("beta", float), ("k", int), ("gallery_beta", float), ("topk_mean", int), ("alpha", float)):
        value = doc.get(name)
        try:
            out[name] = None if value is None else kind(value)
        except (TypeError, ValueError):
            raise DataError(f"--params {path}: {name} {value!r} is not a number") from None
    return out


def tuned_on(params: dict, inputs: list[files.ArrayInput]) -> list[str]:
    """Labels of `inputs` that are the validation inputs the params were tuned on (same data
    identity, or the same file and dataset)."""
    validation = params.get("validation", {})
    recorded = [validation[role] for role in TUNED_ROLES if isinstance(validation.get(role), dict)]
    hits = []
    for item in inputs:
        for rec in recorded:
            same_id = rec.get("identity") and rec.get("identity") == item.identity
            same_path = (rec.get("path") and _resolved(rec["path"]) == _resolved(item.path)
                         and (rec.get("dataset") or None) == (item.dataset or None))
            if same_id or same_path:
                hits.append(item.label)
                break
    return hits


def tuned_on_warning(params_path: str, params: dict, inputs: list[files.ArrayInput]) -> str | None:
    hits = tuned_on(params, inputs)
    if not hits:
        return None
    return (f"{', '.join(hits)} {'is' if len(hits) == 1 else 'are'} the validation data {params_path} was tuned "
            "on: figures measured on it are optimistic; apply the settings to a held-out test split")


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path
