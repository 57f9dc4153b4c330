"""The cluster session: connecting to a dask.distributed cluster (or starting a local one), running
a stage's tasks in order, what it cost, and closing everything at the end or on a signal
(docs/distributed.md). The stages' tasks are cut in tasks.py, run on the workers by worker.py.
dask is imported only here and there, only when a cluster is asked for.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qbnorm_cli.errors import QbnormWarning, RuntimeFailure, UsageError, install_hint, one_line, param
from qbnorm_cli.io import staging
from qbnorm_cli.streaming import parallel
from qbnorm_cli.streaming.cluster.security import client_security, tls_configured
from qbnorm_cli.streaming.cluster.worker import clear_cache, identity, numpy_blas, run_task

DEBUG_VARIABLE = "QBNORM_DEBUG"  # =1: dask's own log lines are shown (as the CLI shows tracebacks)
TASKS_PER_THREAD = 4   # tasks per worker thread, at most: balance, progress and cheap reruns
IN_FLIGHT_PER_THREAD = 2  # tasks submitted ahead of the one the client waits for, per worker thread


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


# --- connecting: a scheduler at an address, or a local cluster started for the run -------------

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
        local = client = None
        try:
            # the client's start held too: it runs on the cluster's event loop, and a client that an
            # interrupt left half started could not be closed here (its close at exit then waited
            # on the closed cluster's loop for a minute, and printed a traceback)
            with staging.held():
                local = local_cluster(n)
                client = distributed.Client(local, set_as_default=False)
            return client, local, text
        except Exception as exc:
            _close(client, local)
            raise RuntimeFailure(f"{param('cluster')} {text}: cannot start a local cluster ({one_line(exc)})") from None
        except BaseException:
            _close(client, local)
            raise
    if "://" in text:
        where = {"address": text}
    elif Path(text).is_file():
        where = {"scheduler_file": text}
    else:
        raise UsageError(f"{param('cluster')} {text!r}: expected local, local:N, tcp://HOST:PORT or an existing "
                         "scheduler file")
    security = client_security(spec.security, distributed)
    if security is None and text.startswith("tls://") and not tls_configured():
        raise UsageError(f"{param('cluster')} {text}: a tls:// scheduler needs {param('security')} (a file naming "
                         "the CA, this client's certificate and key) or dask's distributed.comm.tls configuration")
    try:
        client = distributed.Client(**where, timeout=timeout, set_as_default=False, security=security)
    except Exception as exc:
        raise RuntimeFailure(f"{param('cluster')} {text}: no scheduler reachable within {timeout:g} s "
                             f"({one_line(exc)})") from None
    try:
        client.wait_for_workers(1, timeout=timeout)
    except BaseException as exc:
        _close(client, None)
        if not isinstance(exc, Exception):  # an interrupt
            raise
        raise RuntimeFailure(f"{param('cluster')} {text}: the scheduler has no worker (waited {timeout:g} s)") from None
    return client, None, text


def _close(client, local, done: bool = False) -> None:
    """Close what the run started, in one held step (an interrupt during the client's close must
    not skip the cluster's): the client first, while the LocalCluster's event loop it runs on is
    still up. done: the run is complete (io/staging.held)."""
    with staging.held(discard=done):
        try:
            if client is not None:
                client.close()
        finally:
            _close_local(local, done=done)


def _close_local(local, done: bool = False) -> None:
    """Stop a LocalCluster: its worker processes ended, then the rest closed; none outlives the
    run, and dask's own close at exit finds nothing left to do. done: the run is complete
    (io/staging.held)."""
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

    with staging.held(discard=done):
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


# --- signals: the cluster's part of the program's interrupt handling (io/staging) ----------------
# (held back while a local cluster starts or stops; its workers leave Ctrl-C to the client)

def _start_resource_tracker() -> None:
    """multiprocessing's resource tracker, started with SIGHUP ignored (it ignores SIGINT and
    SIGTERM itself): a lost terminal would end it, and the named semaphores of the workers with it
    (a worker restarted then fails to start)."""
    if not hasattr(signal, "SIGHUP"):
        return
    from multiprocessing import resource_tracker

    with staging.children_ignore((signal.SIGHUP,)):  # ensure_running unblocks SIGINT and SIGTERM
        resource_tracker.ensure_running()


def dask_setup(worker) -> None:
    """A LocalCluster's workers (preload): Ctrl-C on a terminal reaches every process of its group,
    but the client alone ends the run (it cancels the tasks and closes the cluster). Workers of
    the `qbnorm` program already ignore it from their start (startup.py)."""
    staging.ignore((signal.SIGINT,))


# --- the session: running a stage's tasks in order, what it cost ------------------------------

class Session:
    """A client connected to a cluster, and what has been run on it (`report`)."""

    def __init__(self, client, local, label: str, before_task, patience: float = 30.0):
        self.client, self.local, self.label, self.before_task = client, local, label, before_task
        self.token = uuid.uuid4().hex[:12]
        # how long the scheduler lets a task wait for a worker when it has none (`no_workers_timeout`)
        self.patience = client.run_on_scheduler(hold_no_workers_timeout, token=self.token, seconds=patience)
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
            return self.client.submit(identity, value, key=f"qbnorm-data-{self.token}-{uuid.uuid4().hex[:8]}",
                                      pure=False)

    def _finished(self, kind, future, number, finished, work, progress) -> None:
        """A task done: its failure raised as one line, or its result kept for its turn."""
        from distributed import KilledWorker
        from distributed.scheduler import NoWorkerError

        if future.status == "error":
            error = future.exception()
            if isinstance(error, KilledWorker):
                raise RuntimeFailure(f"{param('cluster')} {self.label}: a {kind} task was lost with its "
                                     f"worker too often ({one_line(error)})") from None
            if isinstance(error, NoWorkerError):  # the scheduler's no-workers-timeout ran out
                raise RuntimeFailure(f"{param('cluster')} {self.label}: the cluster has had no worker for "
                                     f"{error.timeout:g} s; {kind} tasks cannot run") from None
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
        A cluster left without workers is the scheduler's to notice (its no-workers-timeout fails
        the tasks). On any exception (an interrupt included) the tasks not done are cancelled."""
        from distributed import as_completed

        numbers: dict[str, int] = {}
        finished: dict[int, object] = {}
        completed = as_completed(loop=self.client.loop)
        window = max(2, IN_FLIGHT_PER_THREAD * self.threads)
        submitted = delivered = 0
        live: dict[int, object] = {}  # not yet delivered: a delivered future is let go (its result with it)
        try:
            while delivered < len(tasks):
                while submitted < len(tasks) and submitted - delivered < window:
                    # no worker restrictions, not even loose ones: a task restricted to a worker that
                    # is lost while no other is running stays unrunnable for good (distributed
                    # 2026.8 ignores allow_other_workers when workers join again)
                    future = self.client.submit(
                        run_task, kind, submitted, self.before_task, (self.client_threads, self.blas), fn, *shared,
                        tasks[submitted], key=f"qbnorm-{kind}-{self.token}-{self.submitted}", pure=False)
                    self.submitted += 1
                    self.bytes_sent += _nbytes(tasks[submitted])
                    numbers[future.key] = submitted
                    live[submitted] = future
                    completed.add(future)
                    submitted += 1
                # blocks until a task ends; the task awaited is among those waited for, so there is
                # one (a signal's exception comes through the wait)
                for future in sorted(completed.next_batch(block=True), key=lambda f: numbers[f.key]):
                    if future.status in ("finished", "error", "cancelled"):
                        self._finished(kind, future, numbers.pop(future.key), finished, work, progress)
                    else:  # lost with its worker meanwhile: the scheduler computes it again
                        completed.add(future)
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


# The scheduler's distributed.scheduler.no-workers-timeout fails the tasks that waited that long
# for a worker while it had none. dask's default is none (wait for good): where the scheduler has
# none of its own, a session sets it to the connect timeout for as long as it runs (or any other
# qbnorm session on that scheduler does), and the last to end gives it back.
NO_WORKERS_HOLDERS = "qbnorm-no-workers-timeout"  # scheduler.extensions: the sessions that set it


def hold_no_workers_timeout(dask_scheduler, token: str, seconds: float) -> float:
    """On the scheduler: the no-workers-timeout in force for session `token`, `seconds` where the
    scheduler has none of its own."""
    holders = dask_scheduler.extensions.get(NO_WORKERS_HOLDERS)
    if holders is None and dask_scheduler.no_workers_timeout is not None:
        return dask_scheduler.no_workers_timeout  # the scheduler's own
    if holders is None:
        holders = dask_scheduler.extensions[NO_WORKERS_HOLDERS] = set()
        dask_scheduler.no_workers_timeout = float(seconds)
    holders.add(token)
    return dask_scheduler.no_workers_timeout


def release_no_workers_timeout(dask_scheduler, token: str) -> None:
    """On the scheduler: session `token` has ended; the last one gives dask's default back."""
    holders = dask_scheduler.extensions.get(NO_WORKERS_HOLDERS)
    if holders is not None and token in holders:
        holders.discard(token)
        if not holders:
            del dask_scheduler.extensions[NO_WORKERS_HOLDERS]
            dask_scheduler.no_workers_timeout = None


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
        session, clean = None, False
        client, local, label = _start(spec)
        try:  # straight after the start: no step between where an interrupt could leave them open
            session = Session(client, local, label, spec.before_task, _timeout(spec))
            yield session
            clean = True
        finally:
            try:
                if session is not None and local is None:  # a long-lived cluster keeps nothing of this run
                    with suppress(Exception):  # a scheduler gone meanwhile keeps nothing either
                        client.run_on_scheduler(release_no_workers_timeout, token=session.token)
                    if clean:
                        client.run(clear_cache)
            finally:
                handed_over = client is spec.address  # a Client handed over stays open
                _close(None if handed_over else client, local, done=clean)
