"""Small helpers shared by the CLI tests."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli import methods
from qbnorm_cli.cli import main
from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.io.probefile import SORTED, Probe, Stored, statistics

DEXTER = Path(__file__).parent / "fixtures" / "dexter_cosine_triu.npz"


def run(capsys, *args) -> tuple[int, str, str]:
    """Run `qbnorm ARGS` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@contextmanager
def interruptible() -> Iterator[None]:
    """Ctrl-C as in an interactive run, whatever this process inherited: SIGINT raises
    KeyboardInterrupt here, and processes started inside begin with it at its default. A shell
    starts a background job (`pytest &` in a script) with SIGINT ignored, exec keeps an ignored
    signal ignored, and qbnorm rightly leaves it so (io/staging.py): a test's SIGINT would never
    end its child. exec resets a handled signal to its default, so Python's handler here is all a
    child needs (no preexec_fn, which is unsafe beside the threads of a test's dask client)."""
    with signal_set(signal.SIGINT, signal.default_int_handler):
        yield


@contextmanager
def signal_set(signum: int, handler) -> Iterator[None]:
    """`signum` handled by `handler` inside the block, whatever this process inherited; the
    previous disposition given back after."""
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def leftovers(directory) -> list[str]:
    """Temporary output files, and earlier exports moved aside, left in `directory` (there must
    never be any)."""
    return sorted(p.name for pattern in (".*.qbnorm-tmp", ".*.qbnorm-old") for p in Path(directory).glob(pattern))


def dexter_similarity() -> np.ndarray:
    """The 300 × 300 DEXTER cosine matrix (float32) from its stored upper triangle (see fixtures/)."""
    data = np.load(DEXTER)
    n = int(data["n"])
    sim = np.ones((n, n), dtype=np.float32)
    upper = np.triu_indices(n, k=1)
    sim[upper] = data["upper"]
    sim.T[upper] = data["upper"]
    return sim


def exact_probe(P, H=None, *, betas=(20.0,), gallery_betas=(1.0,), kmax: int = 10, ks=(), keep_sorted=False) -> Probe:
    """A Probe of float64 score matrices through the core's accumulators, each matrix one tile
    (no float32 rounding on the way: for hand-checked values)."""
    P = np.asarray(P, dtype=np.float64)
    n_gallery = P.shape[1]

    def accumulate(M, bs, topk_ks=(), sort=False):
        acc = BankAccumulator(M.shape[0], n_gallery, np.array(bs, dtype=np.float64), kmax, tuple(ks if topk_ks else ()),
                              sort)
        acc.start_block(0, n_gallery)
        acc.update(0, M)
        return acc, acc.finish_block()

    bank, sorted_block = accumulate(P, betas, ks, keep_sorted)
    gallery = None if H is None else accumulate(np.asarray(H, dtype=np.float64), gallery_betas)[0]
    datasets = statistics(bank, gallery, 1)
    if keep_sorted:
        datasets[SORTED] = Stored(sorted_block)
    return Probe(datasets, {"gallery_rows": n_gallery}, path="the exact probe")


def normaliser(probe, method: str, **params) -> Normaliser:
    """The registry's normaliser of `method` with these parameters (the rest at their defaults)."""
    spec = methods.get(method)
    return methods.build(spec, probe, methods.settings(spec, params, probe))


# --- hooks for qbnorm_cli.Cluster(before_task=…): run on a worker before each task ------------------

@dataclass(frozen=True)
class KillWorkerOnce:
    """The first task numbered `number` kills its worker process (SIGKILL), once: the marker file
    says it happened (created exclusively, so two workers never both die)."""

    marker: str
    number: int = 1

    def __call__(self, kind: str, number: int) -> None:
        if number != self.number:
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class KillWorker:
    """Every task kills its worker process (workers without a nanny are not restarted)."""

    def __call__(self, kind: str, number: int) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class RemoveFile:
    """Every task first removes `path` (a worker that cannot see an input the client sees)."""

    path: str

    def __call__(self, kind: str, number: int) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def wait_for_file(path: str, timeout: float = 120.0) -> None:
    """Hold a worker's thread until `path` exists (a busy cluster)."""
    end = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.05)
