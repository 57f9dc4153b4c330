"""probe, normalise, evaluate and hubness on a dask.distributed cluster, with the local results
to the bit (docs/distributed.md).

The tasks run the local kernels on the local path's own partition, cut into groups of whole units:

  probe      whole gallery column blocks (engine.probe_width wide): engine.probe_block on each,
             for every bank, exactly as the local pass; back come the blocks' statistics, each
             bank row's best items among the task's columns and the partial totals of the score
             sums, which the client folds in column order as the local pass adds them.
  normalise  dense: whole super-blocks of query rows (engine.dense_plan, engine.dense_rows);
             --top-k: whole row tiles of a super-block (ranking.ranking_plan, ranking.rank_rows);
             back come the output rows.
  evaluate   ranges of stored rows, for each pass of streaming.evaluation (the standings of
  hubness    rows, the two passes of column standings, the neighbours): back come the row
             ranges' standings, the columns' maxima and counts, or the top items (`score_rows`).

Why the bits agree. Float32 products from BLAS round differently with the operands' shapes (gemv
for one row, small-matrix kernels, the split of the columns between BLAS threads), and float64
sums with their order. So a task computes exactly the products and sums the local run would:
the same blocks, tiles and row chunks (planned on the client for its cores: the chunks of the
probe's exponential sums and the top-k tiles are cut for parallel.workers() of the client, and
BLAS gets as many threads as the client's), each top-k row tile recomputing its own unsure rows
(ranking._row_tile), and every merge done in the local order. Top-k lists, ranks, neighbours,
minima and maxima are exact whatever the order. Results then agree with a local run on the
client's machine wherever the workers run the same BLAS kernels (the same CPU kind).

Workers read their inputs themselves: every input file must be on storage all of them see, at
the same path (relative paths are made absolute on the client). Arrays handed over in memory
(the library's) go to the workers through the scheduler. dask is imported only here, only when a
cluster is asked for.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qbnorm_cli.core.normalisers import Normaliser
from qbnorm_cli.core.statistics import BankAccumulator
from qbnorm_cli.errors import (
    DataError,
    QbnormError,
    QbnormWarning,
    RuntimeFailure,
    UsageError,
    install_hint,
    one_line,
    param,
)
from qbnorm_cli.io import limits, remote
from qbnorm_cli.io.hdf5 import open_h5
from qbnorm_cli.io.probefile import CheckedRows
from qbnorm_cli.io.scorefiles import ScoreFile
from qbnorm_cli.io.specs import ArrayInput, Transposed, open_array, transposed
from qbnorm_cli.streaming import engine, parallel, ranking
from qbnorm_cli.streaming.budget import Budget, spans
from qbnorm_cli.streaming.sources import Embeddings, EmbeddingScores, MatrixScores

DOCS = "docs/distributed.md"
DEBUG_VARIABLE = "QBNORM_DEBUG"  # =1: dask's own log lines are shown (as the CLI shows tracebacks)
TASKS_PER_THREAD = 4   # tasks per worker thread, at most: balance, progress and cheap reruns
IN_FLIGHT_PER_THREAD = 2  # tasks submitted ahead of the one the client waits for, per worker thread
WATCH_SECONDS = 2.0    # how often a client waiting for tasks looks whether the cluster still has workers
POLL_SECONDS = 0.01    # how often it looks for finished tasks
CACHE_ENTRIES = 4      # score sources a worker keeps between tasks (the bank, the gallery held)
SHARE_BYTES = 1 << 16  # a pass's arrays larger than this go to the workers once, through the scheduler


@dataclass(frozen=True)
class Cluster:
    """Where the work runs.

    address: "local" (a LocalCluster of one worker process per core of this machine), "local:N"
    (N worker processes), a scheduler's address ("tcp://HOST:PORT", "tls://HOST:PORT"), a
    scheduler file, or a `distributed.Client` (left open afterwards). timeout: seconds to wait for
    the scheduler and its first worker (default: dask's distributed.comm.timeouts.connect).
    before_task(kind, number): a picklable callable run on the worker before each task (tests
    inject faults with it). security: how the client proves itself to a scheduler at an address
    or in a scheduler file: a `distributed.Security`, a dict of its keywords (tls_ca_file,
    tls_client_cert, tls_client_key, …) or the path of a YAML or JSON file of them (`load_security`;
    default: dask's configuration, distributed.comm.tls.*). A local cluster makes its own: TLS with
    a certificate made for the run, which no other process has (docs/security.md).
    """

    address: object = "local"
    timeout: float | None = None
    before_task: Callable[[str, int], None] | None = None
    security: object = None


def as_cluster(value) -> Cluster:
    return value if isinstance(value, Cluster) else Cluster(value)


# --- the session: connecting, running tasks in order, what it cost ------------------------------

def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise RuntimeFailure(f"{param('cluster')} needs dask.distributed: {install_hint('dask')}") from None
    return distributed


def _local_workers(text: str) -> int:
    if text == "local":
        return parallel.cores()
    count = text.partition(":")[2]
    if not count.isdigit() or int(count) < 1:
        raise UsageError(f"{param('cluster')} {text!r}: expected local:N with N ≥ 1 worker processes")
    return int(count)


def _timeout(spec: Cluster) -> float:
    if spec.timeout is not None:
        return float(spec.timeout)
    import dask.config
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="seconds"))


def _start(spec: Cluster):
    """(client, the LocalCluster started for it or None, the address as the user gave it)."""
    distributed = _import_distributed()
    address = spec.address
    if isinstance(address, distributed.Client):
        return address, None, str(address.scheduler.address)
    if not isinstance(address, (str, os.PathLike)):
        raise UsageError(f"{param('cluster')} {address!r}: expected local, local:N, tcp://HOST:PORT, a scheduler "
                         "file or a distributed.Client")
    text = str(address).strip()
    timeout = _timeout(spec)
    if text == "local" or text.startswith("local:"):
        n = _local_workers(text)
        if spec.security is not None:
            raise UsageError(f"{param('security')}: {param('cluster')} {text} makes its own (TLS with a certificate "
                             "made for the run); security is for a scheduler's address or file")
        try:
            import cryptography  # noqa: F401  (the local cluster's TLS certificate)
        except ImportError:
            raise RuntimeFailure(f"{param('cluster')} {text} needs cryptography (its TLS certificate): "
                                 f"{install_hint('dask')}") from None
        local = None
        try:
            with interrupts_held():
                local = local_cluster(n)
            return distributed.Client(local, set_as_default=False), local, text
        except Exception as exc:
            _close_local(local)
            raise RuntimeFailure(f"{param('cluster')} {text}: cannot start a local cluster ({one_line(exc)})") from None
        except BaseException:
            _close_local(local)
            raise
    if "://" in text:
        where = {"address": text}
    elif Path(text).is_file():
        where = {"scheduler_file": text}
    else:
        raise UsageError(f"{param('cluster')} {text!r}: expected local, local:N, tcp://HOST:PORT or an existing "
                         "scheduler file")
    security = _security(spec, distributed)
    if security is None and text.startswith("tls://") and not _tls_configured():
        raise UsageError(f"{param('cluster')} {text}: a tls:// scheduler needs {param('security')} (a file naming "
                         "the CA, this client's certificate and key) or dask's distributed.comm.tls configuration")
    try:
        client = distributed.Client(**where, timeout=timeout, set_as_default=False, security=security)
    except Exception as exc:
        raise RuntimeFailure(f"{param('cluster')} {text}: no scheduler reachable within {timeout:g} s "
                             f"({one_line(exc)})") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception:
        client.close()
        raise RuntimeFailure(f"{param('cluster')} {text}: the scheduler has no worker (waited {timeout:g} s)") from None
    return client, None, text


# distributed.Security's keywords a security file may give (paths relative to the file)
SECURITY_KEYS = ("tls_ca_file", "tls_client_cert", "tls_client_key", "tls_ciphers", "require_encryption")
SECURITY_FILES = ("tls_ca_file", "tls_client_cert", "tls_client_key")


def load_security(path) -> dict:
    """distributed.Security's keywords from a YAML or JSON file (JSON is YAML): tls_ca_file and
    tls_client_cert required (tls_client_key unless the certificate file holds the key), paths
    relative to the file, each a readable file. DataError naming the file and the key."""
    import yaml  # dask's own dependency

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{param('cluster_security')} {path}: no such file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: not a YAML or JSON security file ({one_line(exc)})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a mapping of {', '.join(SECURITY_KEYS)}")
    unknown = sorted(str(k) for k in doc if k not in SECURITY_KEYS)
    if unknown:
        raise DataError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(SECURITY_KEYS)}")
    for key in ("tls_ca_file", "tls_client_cert"):
        if key not in doc:
            raise DataError(f"{path}: {key} missing (the CA that signed the scheduler's certificate, and this "
                            "client's certificate)")
    out = {}
    for key, value in doc.items():
        if key == "require_encryption":
            if not isinstance(value, bool):
                raise DataError(f"{path}: require_encryption must be true or false, not {value!r}")
        elif not isinstance(value, str) or not value:
            raise DataError(f"{path}: {key} must be a string, not {value!r}")
        if key in SECURITY_FILES:
            value = str((path.parent / value).resolve())
            try:
                with open(value, "rb"):
                    pass
            except OSError as exc:
                raise DataError(f"{path}: {key} {value}: {exc.strerror or one_line(exc)}") from None
            if not os.path.isfile(value):
                raise DataError(f"{path}: {key} {value}: not a file")
        out[key] = value
    return {"require_encryption": True, **out}


def _security(spec: Cluster, distributed):
    """The Security a client gives a scheduler at an address (None: dask's configuration)."""
    value = spec.security
    if value is None or isinstance(value, distributed.Security):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = load_security(value)
    if not isinstance(value, dict):
        raise UsageError(f"{param('security')} {value!r}: expected a distributed.Security, a dict of its keywords "
                         "or a YAML/JSON file of them")
    try:
        return distributed.Security(**value)
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"{param('security')}: {one_line(exc)}") from None


def _tls_configured() -> bool:
    """Whether dask's configuration gives a client TLS credentials (or a loader that finds them)."""
    import dask.config

    return bool(dask.config.get("distributed.comm.tls.ca-file", None)
                or dask.config.get("distributed.client.security-loader", None))


TERMINATING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextmanager
def interrupts_held(discard: bool = False):
    """Ctrl-C, SIGTERM and SIGHUP held back while a LocalCluster starts or stops, delivered at the
    end: an interrupt then never lands between a cluster's start and the moment it is known to be
    closed. discard: the run is complete (its output in place), so one that came meanwhile is
    dropped, as the program drops those after its output is complete (startup.ignore_late_signals)."""
    held = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
    if held:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(TERMINATING))
    try:
        yield
    finally:
        if held:
            pending = set(signal.sigpending()) & set(TERMINATING) if discard else set()
            handlers = {signum: signal.signal(signum, signal.SIG_IGN) for signum in pending}  # drops them
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started with SIGHUP ignored (it ignores SIGINT and
    SIGTERM itself): a lost terminal would end it, and the named semaphores of the workers with it
    (a worker restarted then fails to start)."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        return
    from multiprocessing import resource_tracker

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())  # ensure_running unblocks SIGINT and SIGTERM
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # inherited across exec, unlike a handler
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _close_local(local, done: bool = False) -> None:
    """Stop a LocalCluster: its worker processes ended, then the rest closed; none outlives the
    run, and dask's own close at exit finds nothing left to do. done: the run is complete
    (interrupts_held)."""
    if local is None:
        return
    from distributed.core import Status

    def end_workers():
        for nanny in list(local.workers.values()):
            nanny.auto_restart = False
            pid = getattr(getattr(nanny, "process", None), "pid", None)
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    with interrupts_held(discard=done):
        # the workers hold nothing the run needs now: ending them first stops the cluster in a
        # tenth of the time their own orderly close takes (0.06 s against 0.4 s here)
        end_workers()
        try:
            local.close(timeout=10)
        except Exception:
            pass
        if local.status != Status.closed:
            end_workers()
            local.status = Status.closed


# dask's nanny puts these in the environment of the process that starts a worker, and leaves them
# there: each would then reach every later child of the client (one BLAS thread, glibc's trimming)
_NOT_FOR_WORKERS = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def local_cluster(n: int):
    """A LocalCluster of `n` single-threaded worker processes on this machine, as `--cluster
    local:N` starts it: each worker's qbnorm threads are its share of the cores (QBNORM_THREADS),
    its environment is the client's (not dask's MALLOC_TRIM_THRESHOLD_, which also turns glibc's
    growing mmap threshold off, so that every large temporary would be fresh pages, nor its one
    BLAS thread: a task sets the client's), and the client's environment is left as it was."""
    import dask.config
    import distributed

    threads = max(1, parallel.cores() // n)
    before = dict(os.environ)
    try:
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{name}": None for name in _NOT_FOR_WORKERS}):
            _start_resource_tracker()
            # TLS with a certificate made for this run (it stays in this process and its workers):
            # any local user can reach 127.0.0.1, and a scheduler runs the code its clients send
            security = distributed.Security.temporary()
            return distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, security=security,
                                            dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                                            env={parallel.THREADS_VARIABLE: str(threads)},
                                            preload=[__name__])  # dask_setup below
    finally:
        os.environ.clear()
        os.environ.update(before)


def numpy_blas() -> tuple[int, str]:
    """The threads (what its products run on) and kernels (what they round like) of the BLAS that
    numpy's products call. Other BLAS libraries in the process (scipy's own, loaded by
    scipy.linalg) compute none of qbnorm's products and would make equal machines look different."""
    from threadpoolctl import threadpool_info

    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    numpy_dir = os.path.dirname(os.path.dirname(np.__file__))  # site-packages: numpy/ and numpy.libs/
    own = [i for i in found if os.path.basename(os.path.dirname(i["filepath"])).startswith("numpy")
           and os.path.dirname(os.path.dirname(i["filepath"])) == numpy_dir]
    found = own or found  # a numpy linked against a system BLAS: every BLAS loaded (one, as a rule)
    threads = max([i["num_threads"] for i in found] or [1])
    kernels = ", ".join(sorted({f"{i.get('internal_api')} {i.get('version')} {i.get('architecture') or ''}".strip()
                                for i in found})) or "no BLAS found"
    return threads, kernels


class Session:
    """A client connected to a cluster, and what has been run on it (`report`)."""

    def __init__(self, client, local, label: str, before_task, patience: float = 30.0):
        self.client, self.local, self.label, self.before_task = client, local, label, before_task
        self.patience = patience  # how long a cluster without workers is waited for (the connect timeout)
        self.started = time.perf_counter()
        nthreads = client.nthreads()
        self.workers = len(nthreads)
        self.threads = max(1, sum(nthreads.values()))
        # the client's cores and BLAS threads: the tasks cut their sums and products for them
        self.client_threads = parallel.workers()
        self.blas, self.kernels = numpy_blas()
        self.worker_kernels: set[str] = set()
        self.tasks = 0
        self.submitted = 0
        self.bytes_sent = 0
        self.bytes_returned = 0
        self.bytes_read = 0
        self.token = uuid.uuid4().hex[:12]

    def report(self) -> dict:
        """Workers, tasks and bytes moved: sent to the workers (arrays in memory, the normaliser, task arguments),
        returned to the client, and read by the workers from the input files."""
        return {"address": self.label, "workers": self.workers, "threads": self.threads, "tasks": self.tasks,
                "bytes_sent": self.bytes_sent, "bytes_returned": self.bytes_returned,
                "bytes_read": self.bytes_read, "seconds": round(time.perf_counter() - self.started, 3),
                "blas": {"client": self.kernels, "workers": sorted(self.worker_kernels)}}

    def share(self, value):
        """`value` for the tasks, as a future they take as an argument. It goes into the task
        graph (the scheduler keeps it) rather than being scattered: data scattered to workers is
        lost with them, and with it every task that needs it, whereas this is recomputed."""
        self.bytes_sent += _nbytes(value)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
            return self.client.submit(_identity, value, key=f"qbnorm-data-{self.token}-{uuid.uuid4().hex[:8]}",
                                      pure=False)

    def _finished(self, kind, future, number, finished, work, progress, killed) -> None:
        """A task done: its failure raised as one line, or its result kept for its turn."""
        if future.status == "error":
            error = future.exception()
            if isinstance(error, killed):
                raise RuntimeFailure(f"{param('cluster')} {self.label}: a {kind} task was lost with its "
                                     f"worker too often ({one_line(error)})") from None
            raise error
        if future.status == "cancelled":
            raise RuntimeFailure(f"{param('cluster')} {self.label}: a {kind} task was cancelled on the cluster "
                                 "(was it restarted, or its data lost?)")
        finished[number] = future
        if progress:
            progress(work[number])

    def _kernels(self, kernels: str) -> None:
        if kernels not in self.worker_kernels:
            self.worker_kernels.add(kernels)
            if kernels != self.kernels:
                warnings.warn(QbnormWarning(
                    f"{param('cluster')} {self.label}: a worker runs BLAS {kernels}, this machine {self.kernels}: "
                    "float32 products round differently there, so results may differ from a local run in the "
                    "last bits (and rankings where scores tie to within them)"), stacklevel=2)

    def target_tasks(self, units: int) -> int:
        return max(1, min(units, TASKS_PER_THREAD * self.threads))

    def run(self, kind: str, fn: Callable, shared: tuple, tasks: list, work: list[int],
            progress: Callable[[int], None] | None = None) -> Iterator:
        """fn(*shared, task) for every task on the cluster; yields the results in the tasks'
        order, calling progress(work[i]) as task i completes (in any order). At most a few tasks
        per worker thread run ahead of the one awaited, so results held here stay bounded.
        On any exception (an interrupt included) the tasks not done are cancelled."""
        from distributed import KilledWorker, as_completed

        futures: dict[str, int] = {}
        finished: dict[int, object] = {}
        waiting = as_completed(loop=self.client.loop)
        window = max(2, IN_FLIGHT_PER_THREAD * self.threads)
        watched = time.monotonic()
        alone_since = None  # when the cluster was last seen without a worker
        submitted = delivered = 0
        live: dict[int, object] = {}  # not yet delivered: a delivered future is let go (its result with it)
        try:
            while delivered < len(tasks):
                while submitted < len(tasks) and submitted - delivered < window:
                    # no worker restrictions, not even loose ones: a task restricted to a worker that
                    # is lost while no other is running stays unrunnable for good (distributed
                    # 2026.8 ignores allow_other_workers when workers join again)
                    future = self.client.submit(
                        _task, kind, submitted, self.before_task, (self.client_threads, self.blas), fn, *shared,
                        tasks[submitted], key=f"qbnorm-{kind}-{self.token}-{self.submitted}", pure=False)
                    self.submitted += 1
                    self.bytes_sent += _nbytes(tasks[submitted])
                    futures[future.key] = submitted
                    live[submitted] = future
                    waiting.add(future)
                    submitted += 1
                if not waiting.has_ready():
                    time.sleep(POLL_SECONDS)
                    if time.monotonic() - watched > WATCH_SECONDS:  # is anyone left to do the work?
                        watched = time.monotonic()
                        if self.client.nthreads():
                            alone_since = None
                        elif alone_since is None:
                            alone_since = watched
                        elif watched - alone_since > self.patience:
                            raise RuntimeFailure(f"{param('cluster')} {self.label}: the cluster has had no worker "
                                                 f"for {self.patience:g} s; {kind} tasks cannot run")
                    continue
                for future in sorted(waiting.next_batch(block=False), key=lambda f: futures[f.key]):
                    if future.status in ("finished", "error", "cancelled"):
                        self._finished(kind, future, futures.pop(future.key), finished, work, progress, KilledWorker)
                    else:  # lost with its worker meanwhile: the scheduler computes it again
                        waiting.add(future)
                while delivered in finished:
                    del live[delivered]
                    result, read, kernels = finished.pop(delivered).result()
                    self.bytes_returned += _nbytes(result)
                    self.bytes_read += read
                    self._kernels(kernels)
                    delivered += 1
                    yield result
        finally:
            self.tasks += delivered
            pending = [f for f in live.values() if not f.done()]
            if pending:
                self.client.cancel(pending, force=True)
            finished.clear()
            live.clear()


def _nbytes(value) -> int:
    """About how many bytes `value` takes on the wire (its arrays, and a little per object)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values()) + 8 * len(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value) + 8 * len(value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(_nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 8


class _Dropped(logging.Filter):
    def filter(self, record) -> bool:
        return False


@contextmanager
def dask_logs_quiet():
    """distributed's log records kept off this process's stderr while a session runs, its close
    included (the client's stderr is qbnorm's one line, whatever dask logs: a worker ended while the
    scheduler still writes to it logs a traceback, "Batched Comm Closed"); restored afterwards.
    LocalCluster's own `silence_logs` restores its level when it closes, before its comms are done.
    QBNORM_DEBUG=1 leaves them as they are."""
    if os.environ.get(DEBUG_VARIABLE) == "1":
        yield
        return
    root = logging.getLogger("distributed")
    dropped = _Dropped()
    named = [name for name in logging.root.manager.loggerDict if name.startswith("distributed.")]
    handlers = {handler for logger in [root, *map(logging.getLogger, named)] for handler in logger.handlers}
    propagate = root.propagate
    for handler in handlers:
        handler.addFilter(dropped)
    # nor through the root logger's handlers (an application's), nor logging's last resort
    # (a record that finds no handler goes to stderr)
    root.propagate = False
    null = logging.NullHandler()
    root.addHandler(null)
    try:
        yield
    finally:
        root.removeHandler(null)
        root.propagate = propagate
        for handler in handlers:
            handler.removeFilter(dropped)


@contextmanager
def connect(cluster) -> Iterator[Session]:
    """A Session on `cluster` (an address, a scheduler file, a distributed.Client or a Cluster),
    closed afterwards (with the LocalCluster it started; a Client handed over stays open).
    RuntimeFailure naming the address when no scheduler answers in time, or when the dask extra
    is missing."""
    spec = as_cluster(cluster)
    with dask_logs_quiet():
        client, local, label = _start(spec)
        owned = client is not spec.address
        clean = False
        try:
            session = Session(client, local, label, spec.before_task, _timeout(spec))
            yield session
            clean = True
        finally:
            try:
                if clean and local is None:
                    client.run(clear_cache)  # a long-lived cluster keeps nothing of this run
            finally:
                if owned:
                    with interrupts_held(discard=clean):
                        client.close()
                _close_local(local, done=clean)


# --- on the worker --------------------------------------------------------------------------------

def dask_setup(worker) -> None:
    """A LocalCluster's workers (preload): Ctrl-C on a terminal reaches every process of its group,
    but the client alone ends the run (it cancels the tasks and closes the cluster). Workers of
    the `qbnorm` program already ignore it from their start (startup.py)."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave it
        pass


_READ = [0]             # bytes read from inputs by this process's tasks
_READ_LOCK = threading.Lock()
_CACHE: dict = {}       # key → (score source, lock), most recently used last
_CACHE_LOCK = threading.Lock()


def _identity(value):
    return value


def _task(kind: str, number: int, before_task, machine: tuple[int, int], fn: Callable, *args):
    """Run one task as the client's machine would run its part: its work cut for the client's
    cores, BLAS on the client's threads (`machine`), whatever this worker's own (they do the work);
    returns the result, the bytes read from the inputs and this worker's BLAS kernels."""
    if before_task is not None:
        before_task(kind, number)
    from threadpoolctl import threadpool_limits

    threads, blas = machine
    start = _READ[0]
    with parallel.planned_for(threads), threadpool_limits(limits=blas, user_api="blas"):
        result = fn(*args)
    return result, _READ[0] - start, _worker_kernels()


@functools.cache
def _worker_kernels() -> str:
    return numpy_blas()[1]


def clear_cache() -> None:
    """Forget the score sources kept between tasks (and close their files)."""
    with _CACHE_LOCK:
        entries = list(_CACHE.values())
        _CACHE.clear()
    for source, _ in entries:
        for item in _inputs_of(source):
            item.close()


def _inputs_of(source) -> list[ArrayInput]:
    if isinstance(source, EmbeddingScores):
        return [source.rows.source, source.cols.source]
    if isinstance(source, MatrixScores):
        return [source.source]
    return []


class _Counted:
    """An input array that counts the bytes read from it (task statistics)."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.chunks = getattr(array, "chunks", None)

    def __getitem__(self, key):
        block = self.array[key]
        with _READ_LOCK:
            _READ[0] += int(getattr(block, "nbytes", 0))
        return block


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return "a worker"


def _open(ref: dict) -> ArrayInput:
    """An input as the client described it (`_ref`), opened here."""
    if "data" in ref:  # handed over in the client's memory (a transposed read as its view)
        return ArrayInput(ref["name"], None, None, _Counted(np.asarray(ref["data"])), name=ref["name"])
    try:
        with limits.applied(allow_external=ref.get("allow_external", False)):  # as the client allowed
            found = open_array(ref["spec"], ndim=(len(ref["shape"]),))
    except QbnormError as exc:
        raise RuntimeFailure(f"{exc.args[0]} (on the worker at {_worker_address()}: {param('cluster')} needs every "
                             f"input on storage all workers see, at the same path; {DOCS})") from None
    found.path = ref["path"]  # labels name the file as the user gave it
    found.array = _Counted(found.array)
    if ref["transposed"] is not None:  # read transposed as on the client, in panels of its size
        found = transposed(found, ref["transposed"])
    if list(found.shape) != list(ref["shape"]):
        found.close()
        raise RuntimeFailure(f"{ref['label']}: the worker at {_worker_address()} reads shape {list(found.shape)}, the "
                             f"client {list(ref['shape'])}: the workers must see the same files as the client")
    return found


def _source(recipe: dict, budget: Budget):
    """The score source a recipe describes (`_recipe`), kept between tasks of this worker."""
    key = (recipe["key"], budget.memory, budget.block_rows)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE[key] = _CACHE.pop(key)
            return _CACHE[key]
    if recipe["kind"] == "matrix":
        source = MatrixScores(_open(recipe["source"]))
    else:
        similarity = "cosine" if recipe["cosine"] else "dot"
        rows = Embeddings(_open(recipe["rows"]), similarity, budget, eager=False)
        cols = Embeddings(_open(recipe["cols"]), similarity, budget, eager=False)
        source = EmbeddingScores(rows, cols)
    entry = (source, threading.Lock())
    with _CACHE_LOCK:
        _CACHE[key] = entry
        while len(_CACHE) > CACHE_ENTRIES:
            old, _ = _CACHE.pop(next(iter(_CACHE)))
            for item in _inputs_of(old):
                item.close()
    return entry


@contextmanager
def _held(recipe: dict, budget: Budget):
    """The recipe's source, for this task alone while it runs (sources keep per-block state)."""
    source, lock = _source(recipe, budget)
    with lock:
        yield source


def _score_file(recipe: dict) -> ScoreFile:
    neighbors = _open(recipe["neighbors"]) if recipe["neighbors"] is not None else None
    return ScoreFile(_open(recipe["scores"]), neighbors, recipe["n_gallery"])


def _normaliser(shipped: dict) -> Normaliser:
    norm = shipped["norm"]
    if shipped["sorted"] is not None:  # the sorted bank scores of a probe file (gc), read and checked here
        path, dataset, layout = shipped["sorted"]
        norm = replace(norm, sorted_bank=CheckedRows(open_h5(path)[dataset], layout))
    return norm


# --- on the client: describing inputs and sources -------------------------------------------------

def _ref(session: Session, item: ArrayInput, shared_data: dict) -> dict:
    """How a worker opens `item`: the file (absolute path) or the array handed over in memory."""
    shape = list(item.shape)
    if item.path is None:
        if id(item) not in shared_data:
            shared_data[id(item)] = {"name": item.label, "data": session.share(np.asarray(item.array)),
                                   "shape": shape, "key": f"memory:{uuid.uuid4().hex}"}
        return shared_data[id(item)]
    path = item.path if remote.is_url(item.path) else os.path.abspath(item.path)  # a URL is the same everywhere
    spec = f"{path}::{item.dataset}" if item.dataset else path
    try:
        stat = os.stat(path)
        stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    except OSError:
        stamp = None
    panel = item.array.panel_bytes if isinstance(item.array, Transposed) else None
    return {"spec": spec, "path": item.path, "label": item.label, "shape": shape, "transposed": panel,
            "key": (spec, stamp, panel), "allow_external": limits.current().allow_external}


def _recipe(session: Session, scores, shared_data: dict) -> dict:
    if isinstance(scores, MatrixScores):
        source = _ref(session, scores.source, shared_data)
        return {"kind": "matrix", "source": source, "key": ("matrix", _key(source))}
    if isinstance(scores, EmbeddingScores):
        rows, cols = _ref(session, scores.rows.source, shared_data), _ref(session, scores.cols.source, shared_data)
        return {"kind": "embeddings", "rows": rows, "cols": cols, "cosine": scores.rows.cosine,
                "key": ("embeddings", _key(rows), _key(cols), scores.rows.cosine)}
    raise UsageError(f"{param('cluster')}: these scores ({type(scores).__name__}) cannot be computed on a cluster")


def _key(ref: dict):
    return ref["key"]


def _ship_normaliser(session: Session, norm: Normaliser):
    """The normaliser on every worker once (its O(gallery) vectors); a probe file's sorted bank
    scores (gc) are read by the workers themselves."""
    sorted_ref = None
    if isinstance(norm.sorted_bank, CheckedRows):
        dataset = norm.sorted_bank.ds
        sorted_ref = (os.path.abspath(dataset.file.filename), dataset.name, norm.sorted_bank.layout)
        norm = replace(norm, sorted_bank=None)
    return session.share({"norm": norm, "sorted": sorted_ref})


def _groups(bounds: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """Consecutive units split into about `count` groups of similar size (in rows or columns)."""
    total = sum(b - a for a, b in bounds)
    target = max(1, math.ceil(total / max(count, 1)))
    groups, current, size = [], [], 0
    for a, b in bounds:
        current.append((a, b))
        size += b - a
        if size >= target:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


def _joined(group: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Adjacent ranges of a group as one range each."""
    out = [list(group[0])]
    for a, b in group[1:]:
        if a == out[-1][1]:
            out[-1][1] = b
        else:
            out.append([a, b])
    return [tuple(r) for r in out]


# --- probe --------------------------------------------------------------------------------------

class _Columns:
    """Columns c0:c1 of a score source, numbered from 0 (a task's share of the gallery)."""

    def __init__(self, inner, c0: int, c1: int):
        self.inner, self.c0 = inner, c0
        self.n_rows, self.n_cols = inner.n_rows, c1 - c0
        self.sub_columns = inner.sub_columns

    def column_block(self, c0: int, c1: int) -> None:
        self.inner.column_block(self.c0 + c0, self.c0 + c1)

    def tile(self, r0: int, r1: int) -> np.ndarray:
        return self.inner.tile(r0, r1)

    def col_bytes(self) -> int:
        return self.inner.col_bytes()

    @property
    def row_chunk(self):
        return self.inner.row_chunk

    @property
    def col_chunk(self):
        return self.inner.col_chunk


def _probe_task(spec: dict, recipes: list, window: tuple[int, int]) -> dict:
    """Gallery columns window[0]:window[1] (whole blocks of spec['width']) against every bank."""
    c0, c1 = window
    budget = spec["budget"]
    out = {"banks": [], "sorted": []}
    for number, (recipe, shape) in enumerate(zip(recipes, spec["banks"], strict=True)):
        acc = BankAccumulator(shape["n_rows"], c1 - c0, np.asarray(shape["betas"]), shape["kmax"],
                              tuple(shape["topk_ks"]), shape["keep_sorted"], shape["column_moments"],
                              shape["neighbor_k"])

        def on_sorted(_, a, b, block, number=number):
            if number == 0:
                out["sorted"].append((a, b, block))

        with _held(recipe, budget) as scores:
            columns = _Columns(scores, c0, c1)
            for a, b in spans(c1 - c0, spec["width"]):
                engine.probe_block([(columns, acc)], a, b, budget, on_sorted=on_sorted)
        values, indices = acc.neighbors.values, acc.neighbors.indices
        out["banks"].append({  # float32 scores: exact
            "columns": acc.column_parts(), "values": values.astype(np.float32), "indices": indices.astype(np.int32)})
    return out


def run_probe(session: Session, banks: list[tuple[object, BankAccumulator]], n_gallery: int, budget: Budget,
              on_sorted=None, progress=None) -> None:
    """engine.run_probe on the cluster: the same accumulators filled with the same values."""
    width = engine.probe_width(banks, n_gallery, budget)
    blocks = list(spans(n_gallery, width))
    shared_data: dict = {}
    recipes = [_recipe(session, scores, shared_data) for scores, _ in banks]
    spec = {"budget": budget, "width": width,
            "banks": [{"n_rows": acc.n_rows, "betas": acc.betas.tolist(), "kmax": acc.kmax,
                       "topk_ks": list(acc.topk_ks), "keep_sorted": acc.keep_sorted,
                       "column_moments": acc.column_moments, "neighbor_k": acc.neighbor_k} for _, acc in banks]}
    windows = [(g[0][0], g[-1][1]) for g in _groups(blocks, session.target_tasks(len(blocks)))]
    rows = sum(scores.n_rows for scores, _ in banks)
    work = [rows * (b - a) for a, b in windows]
    for (c0, c1), result in zip(windows, session.run("probe", _probe_task, (spec, recipes), windows, work, progress),
                                strict=True):
        for (_, acc), part in zip(banks, result["banks"], strict=True):
            _fold_probe(acc, c0, c1, part)
        if on_sorted is not None:
            for a, b, block in result["sorted"]:
                on_sorted(0, c0 + a, c0 + b, block)


def _fold_probe(acc: BankAccumulator, c0: int, c1: int, part: dict) -> None:
    """A task's statistics into the client's accumulator, in column order."""
    acc.place_columns(c0, c1, part["columns"])
    indices = part["indices"]
    rows, slots = np.nonzero(indices >= 0)
    columns = indices[rows, slots].astype(np.int64) + c0
    values = part["values"][rows, slots].astype(np.float64)
    order = np.lexsort((columns, rows))  # rows ascending, columns ascending within a row
    # every column of this task lies right of those merged before: ties keep the lower index
    acc.neighbors.offer(0, rows[order], columns[order], values[order], forward=True)


# --- normalise ----------------------------------------------------------------------------------

def _dense_task(spec: dict, recipe: dict, shipped: dict, ranges: list[tuple[int, int]]) -> list:
    norm = _normaliser(shipped)
    with _held(recipe, spec["budget"]) as scores:
        return [(q0, *engine.dense_rows(scores, norm, spec["budget"], spec["plan"], q0, q1, dtype=spec["dtype"]))
                for q0, q1 in ranges]


def _rank_task(spec: dict, recipe: dict, shipped: dict, ranges: list[tuple[int, int]]) -> list:
    norm = _normaliser(shipped)
    out = []
    plan = spec["plan"]
    with _held(recipe, spec["budget"]) as scores:
        for q0, q1 in ranges:
            # BLAS on one thread or several, as the whole super-block's tiles decide it
            start = q0 - (q0 % plan.super_rows)
            tiles = math.ceil((min(start + plan.super_rows, scores.n_rows) - start) / plan.geom.rows)
            values, indices, gated = ranking.rank_rows(scores, norm, plan, q0, q1,
                                                       threaded=parallel.threads_for(tiles))
            out.append((q0, values, indices.astype(spec["index_dtype"]), gated))
    return out


def run_normalise(session: Session, scores, norm: Normaliser, budget: Budget, top_k: int | None = None,
                  progress=None, dtype=np.float64) -> Iterator[tuple[int, tuple]]:
    """engine.run_normalise on the cluster: the same blocks in the same order, bit for bit."""
    if norm.pairwise is not None:
        raise UsageError(f"{param('cluster')}: a pairwise score (its row statistics come before its blocks) runs "
                         "here only: leave out the cluster")
    shared_data: dict = {}
    recipe = _recipe(session, scores, shared_data)
    n_rows, n_cols = scores.n_rows, scores.n_cols
    if top_k is None:
        plan = engine.dense_plan(scores, budget)
        units = list(spans(n_rows, plan.super_rows))  # whole super-blocks
        fn, spec = _dense_task, {"budget": budget, "plan": plan, "dtype": np.dtype(dtype)}
    else:
        plan = ranking.ranking_plan(scores, norm, budget, top_k, workers=session.client_threads)
        units = [(q0 + a, q0 + b) for q0, q1 in spans(n_rows, plan.super_rows)  # whole row tiles
                 for a, b in spans(q1 - q0, plan.geom.rows)]
        index_dtype = np.int32 if n_cols < 2**31 else np.int64
        fn, spec = _rank_task, {"budget": budget, "plan": plan, "index_dtype": index_dtype}
    count = session.target_tasks(len(units))
    if top_k is not None and plan.geom.block_columns < n_cols:
        # the gallery is read block by block for every task: as few tasks as keep every worker busy
        count = min(count, max(session.threads, len(list(spans(n_rows, plan.super_rows)))))
    tasks = [_joined(g) for g in _groups(units, count)]
    if top_k is not None:  # a range may not cross a super-block: its tiles would shift
        starts = {q0 for q0, _ in spans(n_rows, plan.super_rows)}
        tasks = [_split_at(ranges, starts) for ranges in tasks]
    shipped = _ship_normaliser(session, norm)
    work = [sum(b - a for a, b in ranges) * n_cols for ranges in tasks]
    for result in session.run("normalise", fn, (spec, recipe, shipped), tasks, work, progress):
        for q0, *block in result:
            if top_k is None:
                values, indices, gated = block
            else:
                values, indices, gated = block[0], block[1].astype(np.int64), block[2]
            yield q0, (values, indices, gated)


def _split_at(ranges: list[tuple[int, int]], starts: set[int]) -> list[tuple[int, int]]:
    out = []
    for a, b in ranges:
        cuts = sorted(s for s in starts if a < s < b)
        for x, y in zip([a, *cuts], [*cuts, b], strict=True):
            out.append((x, y))
    return out


# --- evaluate and hubness -------------------------------------------------------------------------

def _score_recipe(session: Session, source: ScoreFile, shared_data: dict) -> dict:
    return {"scores": _ref(session, source.scores, shared_data),
            "neighbors": None if source.neighbors is None else _ref(session, source.neighbors, shared_data),
            "n_gallery": source.n_gallery}


def _row_tasks(session: Session, source: ScoreFile) -> list[tuple[int, int]]:
    q = source.rows
    chunk = source.scores.chunk_rows or 1
    count = session.target_tasks(max(1, q // chunk))
    step = max(chunk, math.ceil(q / count / chunk) * chunk)
    return list(spans(q, step))


def _rows_task(fn: Callable, recipe: dict, names: tuple[str, ...], *values_and_rows):
    """A pass of streaming.evaluation over a range of rows of a stored input (`score_rows`)."""
    *values, rows = values_and_rows
    return fn(_score_file(recipe), rows=rows, **dict(zip(names, values, strict=True)))


def score_rows(session: Session, kind: str) -> Callable:
    """streaming.evaluation.here on the cluster: map_rows(fn, source, progress, **kwargs) runs the
    pass fn(source, rows=…, **kwargs) as tasks over ranges of the stored rows (whole HDF5 chunks)
    and returns their results in row order; progress(n) as a task of n rows completes."""
    def map_rows(fn: Callable, source: ScoreFile, progress=None, **kwargs) -> list:
        tasks = _row_tasks(session, source)
        names = tuple(kwargs)
        values = [session.share(v) if isinstance(v, np.ndarray) and v.nbytes > SHARE_BYTES else v
                  for v in kwargs.values()]
        shared = (fn, _score_recipe(session, source, {}), names, *values)
        return list(session.run(kind, _rows_task, shared, tasks, [b - a for a, b in tasks], progress))
    return map_rows
