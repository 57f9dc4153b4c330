"""Staging and interrupts, in one place: how an output reaches its path, and what Ctrl-C, SIGTERM
and SIGHUP do on the way.

An output is staged (`Staged`): written to a temporary file or directory beside its target,
renamed onto the target when complete (the commit point), removed on any failure or interrupt.
Without `force` the rename never replaces what is there (renameat2(RENAME_NOREPLACE), else link()
or an exclusive placeholder): a file another process created at the target while the run wrote is
kept, and the run fails. With `force` the target is checked again just before it is replaced: a
regular file (or, for directory outputs, what `owned` accepts) or nothing.

SIGINT, SIGTERM and SIGHUP end a run of the `qbnorm` program with exit 130 and no partial output
(docs/errors.md), in every phase of the process:
- loading (`guard_loading`, from startup.py): nothing is open yet; one line and exit 130 at once;
- running (`run_interruptibly`, from cli/app.py): a signal is noted and raised in the main thread
  as KeyboardInterrupt, which removes the staged output on its way out;
- held steps (`held`): creating, renaming or removing a staged output, HDF5 writing from the main
  thread, a local cluster starting or stopping: the signal is raised when the step ends (or
  dropped, `discard`, when the run is complete);
- after the command (`run_interruptibly` ends): the outputs are complete; signals are dropped;
- worker processes (`ignore_in_worker`): the program alone ends the run.
Signals that are ignored when qbnorm starts (nohup, background jobs) stay ignored.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from qbnorm_cli.errors import EXIT_INTERRUPTED, RuntimeFailure, UsageError, one_line, param

# ctypes, shutil and tempfile are imported where first used: the `qbnorm` program imports this
# module before its loading guard is up (startup.py), so it imports no more than it must.

TERMINATING = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

# --- the program's phases ---------------------------------------------------------------------------

_LOADING: dict = {}  # the handlers guard_loading replaced


def exit_at_once(signum, frame) -> None:
    """While the program loads its libraries nothing is open or written: say so and exit 130."""
    os.write(2, b"qbnorm: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def guard_loading() -> None:
    """Exit 130 on a signal while the `qbnorm` program imports (about a second), instead of a
    traceback from the middle of an import (SIGINT) or a bare kill (SIGTERM)."""
    for signum in TERMINATING:
        try:
            if signal.getsignal(signum) in (signal.SIG_IGN, None):
                continue  # ignored (nohup, background jobs) or not set from Python: leave it
            _LOADING[signum] = signal.signal(signum, exit_at_once)
        except (ValueError, OSError):  # not the main thread
            return


def end_loading() -> bool:
    """Give the signals back the handlers guard_loading replaced; True when it guarded (this is
    the `qbnorm` program)."""
    was_guarding = bool(_LOADING)
    while _LOADING:
        signum, handler = _LOADING.popitem()
        try:
            signal.signal(signum, handler)
        except (ValueError, OSError):
            pass
    return was_guarding


def ignore(signums=TERMINATING) -> None:
    """Ignore `signums` in this process (nothing when not the main thread)."""
    for signum in signums:
        try:
            signal.signal(signum, signal.SIG_IGN)
        except (ValueError, OSError):  # not the main thread
            return


def ignore_in_worker() -> None:
    """A worker of the `qbnorm` program's local dask cluster: Ctrl-C on a terminal (SIGINT), a
    lost terminal (SIGHUP) or a job stopped as a whole (SIGTERM to its process group) reach every
    process of the group, but the program alone ends the run (cancelling the tasks, closing the
    cluster: its workers end with it), so they do not die of it first."""
    try:
        os.setpgid(0, 0)  # out of the terminal's foreground group: its Ctrl-C no longer reaches here
    except (AttributeError, OSError):
        pass
    ignore()


@contextmanager
def children_ignore(signums):
    """`signums` ignored, and this thread's mask kept, while a child process is started inside:
    ignored signals are inherited across exec, handlers are not (the cluster's resource tracker)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


# --- interrupts noted, checked and held -------------------------------------------------------------

# Signals noted by the handler. It also raises KeyboardInterrupt, but Python drops an exception
# raised inside a weakref callback or __del__; outputs check this before every write and before
# the rename, so an interrupted run never completes an output.
_NOTED: list[int] = []
# Signals that arrived while a step was held: raised as KeyboardInterrupt when it ends. A
# process-directed signal goes to any thread that does not block it (a BLAS or HDF5 thread), and
# Python runs its handler in the main thread at once: the mask alone holds nothing.
_HOLDING: list[int] = []
_HELD: list[int] = []
# The outputs committed since the program's command started (None: not recording), so that an
# interrupt after a commit is not reported as "no output was written".
_COMMITTED: list[str] | None = None


class _Run:
    running = False  # a command is running: a signal then ends it (set without a call: see below)


def is_running() -> bool:
    """Whether the program's command is running (run_interruptibly): a signal then ends it."""
    return _Run.running


def note_interrupt(signum: int) -> bool:
    """Note a signal; False while a step holds signals back, so that the handler does not raise in
    the middle of it."""
    _NOTED.append(signum)
    if _HOLDING:
        _HELD.append(signum)
        return False
    _HELD.clear()  # raised now: none is left to raise again when a hold ends
    return True


def clear_interrupts() -> None:
    _NOTED.clear()
    _HELD.clear()


def check_interrupt() -> None:
    """KeyboardInterrupt when a signal was noted: the run ends before its next write or commit."""
    if _NOTED:
        raise KeyboardInterrupt


@contextmanager
def held(*, discard: bool = False):
    """Hold SIGINT / SIGTERM / SIGHUP back for one step (a temporary output created, renamed or
    removed; HDF5 writing from the main thread; a local cluster started or stopped), so that an
    interrupt never lands between its two halves: blocked in this thread, and noted without
    raising by the handler whichever thread the signal reached; raised when the step ends.
    discard: the run is complete (its output in place), so one that came meanwhile is dropped, as
    the program drops those after its command returned. Signal handlers run in the main thread
    only: other threads need no hold."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    block = hasattr(signal, "pthread_sigmask")
    noted = len(_NOTED)
    # Held before the mask is set and until it is restored: Python runs the handlers of pending
    # signals inside pthread_sigmask, and one that raised there would skip the step or leave the
    # mask set; a signal delivered when the mask is restored is then held like the others.
    _HOLDING.append(1)
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, TERMINATING) if block else None
        try:
            yield
        finally:
            if block:
                pending = set(signal.sigpending()) & set(TERMINATING) if discard else set()
                dropped = {signum: signal.signal(signum, signal.SIG_IGN) for signum in pending}
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                for signum, handler in dropped.items():
                    signal.signal(signum, handler)
    finally:
        _HOLDING.pop()
        if discard and not _HOLDING:
            _HELD.clear()
            del _NOTED[noted:]
        if _HELD and not _HOLDING:
            _HELD.clear()
            raise KeyboardInterrupt


def shielded(method):
    """A method a C library calls back (HDF5's file object): an interrupt raised inside it (Python
    runs a signal handler wherever the main thread is) would be a failed write to the library. It
    is noted instead (the run ends at its next check) and the step done again: the methods
    shielded are positioned reads and writes, so repeating one changes nothing."""

    @functools.wraps(method)
    def call(*args):
        while True:
            try:
                return method(*args)
            except KeyboardInterrupt:
                note_interrupt(signal.SIGINT)

    return call


def _on_signal(signum, frame) -> None:
    # noted even if the exception below lands where Python drops it; held while a step is held
    # (raised when it ends). Python may run this well after the signal came (another thread took
    # it while the main thread blocked it): also after the command returned, when it is dropped.
    if note_interrupt(signum) and _Run.running:
        raise KeyboardInterrupt


def _install() -> dict:
    previous = {}
    for signum in TERMINATING:
        try:
            current = signal.getsignal(signum)
            if current in (signal.SIG_IGN, None):
                continue
            if signum == signal.SIGINT and current is not signal.default_int_handler:
                continue  # someone else handles Ctrl-C: leave it to them
            previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread: leave signals alone
            break
    return previous


def run_interruptibly(command: Callable[[], int], *, program: bool) -> tuple[int, list[str]]:
    """Run the program's `command` (its exit code) with SIGINT, SIGTERM and SIGHUP ending it like
    Ctrl-C: the staged output removed, exit 130. Returns (the exit code, the outputs committed).
    Afterwards the signals are dropped (`program`: the process ends now, and a signal must not
    turn exit 0 into a kill) or their handlers given back (a caller in Python: tests, notebooks)."""
    global _COMMITTED
    clear_interrupts()
    _COMMITTED = []
    previous = _install()
    _Run.running = True
    try:
        code = command()
    except KeyboardInterrupt:  # one raised on the way out of the command, where nothing catches it
        code = EXIT_INTERRUPTED
    finally:
        _Run.running = False  # first: no call before it, so no signal handler runs in between
        committed, _COMMITTED = _COMMITTED or [], None
        if program:
            ignore()
        else:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        clear_interrupts()  # none is left to interrupt the library's next call in this process
    return code, committed


# --- failures of the file system --------------------------------------------------------------------

FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_failure(path, exc: OSError) -> RuntimeFailure:
    """The one-line error of a failed write to the output `path` (or its temporary file)."""
    path = Path(path)
    if exc.errno in FULL:
        what = "disk quota exceeded" if exc.errno != errno.ENOSPC else "no space left on device"
        return RuntimeFailure(f"{what} writing {path}")
    if exc.errno == errno.ENOENT and not path.parent.is_dir():
        return RuntimeFailure(f"{path}: write failed: its directory {str(path.parent)!r} was removed during the run")
    return RuntimeFailure(f"{path}: write failed: {exc.strerror or one_line(exc)}")


# --- the commit: rename without replacing what was not checked --------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@functools.cache
def _libc_renameat2():
    """glibc's renameat2 (2.28+), or None (another C library or system)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # the C library the interpreter links
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


_RENAMEAT2 = True  # use renameat2 where the C library has it (tests set False to try the fallbacks)


def rename_noreplace(source, target) -> None:
    """Rename `source` to `target` unless `target` exists (FileExistsError then), atomically:
    renameat2(RENAME_NOREPLACE) where the kernel and file system have it; else, for a file, a
    hard link then unlink (link() never replaces), and for a directory an exclusive empty
    placeholder that the rename replaces (rename() replaces only an empty directory)."""
    renameat2 = _libc_renameat2() if _RENAMEAT2 else None
    if renameat2 is not None:
        if renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = _errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.isdir(source) and not os.path.islink(source):
        os.mkdir(target)  # FileExistsError if anything is there
        try:
            os.rename(source, target)
        except OSError:
            _remove_quietly(target, directory=True)
            raise
        return
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # no hard links here (some network or FUSE file systems): an exclusive placeholder
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.replace(source, target)
        return
    os.unlink(source)


def _remove_quietly(path, *, directory: bool = False) -> None:
    try:
        os.rmdir(path) if directory else os.unlink(path)
    except OSError:
        pass


def appeared(path) -> UsageError:
    return UsageError(f"{path}: created by another process while this run wrote it; it is left as it was "
                      f"(pass {param('force=True')} to overwrite)")


def check_replaceable(path, *, directory_ok: bool = False) -> bool:
    """Whether `path` exists (a dangling symbolic link counts); refuse (UsageError) anything an
    output may not replace whatever `force` says: a device, a FIFO or a socket (also behind a
    symbolic link), and a directory unless `directory_ok`."""
    if not os.path.lexists(path):
        return False
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a dangling symbolic link: the link itself is replaced
        return True
    if stat.S_ISDIR(mode):
        if not directory_ok:
            raise UsageError(f"{path}: is a directory")
    elif not stat.S_ISREG(mode):
        raise UsageError(f"{path}: not a regular file (a device, FIFO or socket); outputs replace only regular "
                         f"files, whatever {param('force=True')} says")
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Staged:
    """The temporary file (or, with `directory`, directory) an output is written to beside its
    `target`: `create()` makes it, `commit()` renames it onto the target (the commit point),
    `discard()` removes it. Each step holds signals back (`held`); the commit checks for an
    interrupt first, so an interrupted run never completes an output. A directory target is
    replaced only with `force`, and only a directory that `owned(path)` accepts (an earlier
    output), checked again at the commit: never someone's directory, also one created meanwhile."""

    def __init__(self, target, *, force: bool, directory: bool = False, owned=None) -> None:
        self.target = Path(target)
        self.force = force
        self.directory = directory
        self.owned = owned
        self.path: str | None = None

    def create(self) -> str:
        """The temporary path, created (mode 0600 / 0700 until the commit)."""
        import tempfile

        parent = self.target.parent
        with held():
            try:
                prefix, suffix = f".{self.target.name}.", ".qbnorm-tmp"
                if self.directory:
                    self.path = tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=suffix)
                else:
                    fd, self.path = tempfile.mkstemp(dir=parent, prefix=prefix, suffix=suffix)
                    os.close(fd)
            except OSError as exc:
                if exc.errno in FULL:
                    raise write_failure(self.target, exc) from None
                what = "a directory" if self.directory else "a file"
                raise RuntimeFailure(f"{self.target}: cannot create {what} in {str(parent)!r}: "
                                     f"{exc.strerror or exc}") from None
        return self.path

    def check_ours(self, path: Path) -> None:
        """Refuse (UsageError) to replace a directory that `owned` does not accept."""
        if path.is_dir() and not path.is_symlink() and not (self.owned is not None and self.owned(path)):
            raise UsageError(f"{self.target}: is a directory that qbnorm did not write; choose another path")

    def commit(self) -> None:
        """Give the temporary output the mode a plain open() or mkdir() would, and rename it onto
        the target, recorded as written. OSError as it comes (the caller names the output)."""
        check_interrupt()
        os.chmod(self.path, (0o777 if self.directory else 0o666) & ~_umask())
        # One held step: the commit and the removal of the earlier output it replaced (or, when
        # it fails, putting that back). An interrupt handled between the two would leave it
        # behind: a signal the main thread blocks is taken by another thread, whose handler may
        # run whenever that thread is next scheduled.
        with held():
            check_interrupt()
            if self.directory:
                self._commit_directory()
            else:
                self._commit_file()
            self.path = None
            if _COMMITTED is not None:
                _COMMITTED.append(str(self.target))

    def _commit_file(self) -> None:
        if self.force:
            check_replaceable(self.target)
            os.replace(self.path, self.target)
            return
        try:
            rename_noreplace(self.path, self.target)
        except FileExistsError:
            raise appeared(self.target) from None

    def _commit_directory(self) -> None:
        import shutil

        old = self._move_aside()
        try:
            rename_noreplace(self.path, self.target)
        except BaseException as failure:
            if old is not None:  # put the previous output back
                try:
                    rename_noreplace(old / "previous", self.target)
                    os.rmdir(old)
                except OSError:
                    pass  # left where it is, beside the target: a previous output is never deleted
            if isinstance(failure, FileExistsError):
                raise appeared(self.target) from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _move_aside(self) -> Path | None:
        """Move what the target holds now into a temporary directory (checked again: `force` and an
        earlier output, or a file), or None when there is nothing."""
        if not check_replaceable(self.target, directory_ok=True):
            return None
        if not self.force:
            raise appeared(self.target)
        self.check_ours(self.target)
        import tempfile

        old = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".qbnorm-old"))
        try:
            os.rename(self.target, old / "previous")
        except OSError:
            os.rmdir(old)
            raise
        try:
            self.check_ours(old / "previous")  # what was moved is what was checked
        except UsageError:
            rename_noreplace(old / "previous", self.target)
            os.rmdir(old)
            raise
        return old

    def discard(self) -> None:
        """Remove the temporary output, if any (nothing fails here)."""
        import shutil

        with held():
            if self.path is not None:
                if self.directory:
                    shutil.rmtree(self.path, ignore_errors=True)
                else:
                    _remove_quietly(self.path)
            self.path = None
