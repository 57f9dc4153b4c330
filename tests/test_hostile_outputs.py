"""Outputs in a hostile world (issue 24): a full disk, a target created or replaced while a run
writes, a signal at the commit, outputs that are inputs, devices and FIFOs as targets, the output's
directory removed during the run. Every command that writes is tried; each case ends in one line,
its documented exit code, no temporary file, and whatever was at the target (or an input) intact."""

from __future__ import annotations

import _thread
import errno
import gc
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from helpers import run

from qbnorm_cli.io import atomic, indexfile, staging
from qbnorm_cli.io.stores import base, npydirectory

# Left out of .ci/run's reruns under other BLAS kernels (those are for tolerances): slow, and
# testing what happens to outputs on hostile paths and failures (processes, file systems); no
# arithmetic compared
pytestmark = pytest.mark.slow

D = 8
THEIRS = b"written by another process: must survive"


def one_line(err: str) -> str:
    assert "Traceback" not in err and "Can't close" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def leftovers(directory) -> list[str]:
    """Temporary files and directories, and moved-aside earlier exports, left anywhere below."""
    return sorted(str(p.relative_to(directory)) for pattern in ("**/.*.qbnorm-tmp", "**/.*.qbnorm-old")
                  for p in Path(directory).glob(pattern))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """emb.h5 (bank, gallery, queries, /gt), gt.npy, bank.h5, probe.h5 (sorted scores kept),
    sims.h5 (normalised scores), params.json (tune's), exp.h5 (an hdf5 export)."""
    from qbnorm_cli.cli import main

    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(0)
    with h5py.File(root / "emb.h5", "w") as h5:
        h5["bank"] = rng.standard_normal((40, D)).astype(np.float32)
        h5["gallery"] = rng.standard_normal((30, D)).astype(np.float32)
        h5["queries"] = rng.standard_normal((60, D)).astype(np.float32)
        h5["gt"] = rng.integers(0, 30, 60)
    np.save(root / "gt.npy", rng.integers(0, 30, 60))
    np.save(root / "mask.npy", np.ones(60, dtype=bool))
    np.save(root / "more.npy", rng.standard_normal((5, D)).astype(np.float32))  # items for probe --update
    steps = [
        ["build-bank", f"{root}/emb.h5::/bank", "--strategy", "all", "-o", root / "bank.h5"],
        ["probe", "--bank", root / "bank.h5", "--gallery", f"{root}/emb.h5::/gallery", "--keep-sorted",
         "-o", root / "probe.h5"],
        *[[*args, "-o", root / out] for args, out in (
            (NORMALISE, "sims.h5"), (TUNE, "params.json"), (EXPORT, "exp.h5"))],
    ]
    for args in steps:
        args = [str(a).replace("{root}", str(root)) for a in args]
        assert main([*args, "-q"]) == 0, args
    return root


NORMALISE = ["normalise", "--queries", "{root}/emb.h5::/queries", "--gallery", "{root}/emb.h5::/gallery",
             "--probe", "{root}/probe.h5"]
TUNE = ["tune", "--queries", "{root}/emb.h5::/queries", "--gallery", "{root}/emb.h5::/gallery", "--gt",
        "{root}/gt.npy", "--bank", "{root}/bank.h5", "--methods", "dis", "--beta", "20"]
EXPORT = ["export", "--probe", "{root}/probe.h5", "--gallery", "{root}/emb.h5::/gallery", "--method", "dis"]

# Every command that writes, and the name of its output.
WRITERS = {
    "convert": (["convert", "{root}/emb.h5::/queries"], "out.h5"),
    "build-bank": (["build-bank", "{root}/emb.h5::/queries", "--size", "50"], "out.h5"),
    "probe": (["probe", "--bank", "{root}/bank.h5", "--gallery", "{root}/emb.h5::/gallery", "--keep-sorted"], "out.h5"),
    "probe --update": (["probe", "--update", "{root}/probe.h5", "--bank", "{root}/bank.h5", "--gallery",
                        "{root}/emb.h5::/gallery", "--add-gallery", "{root}/more.npy"], "out.h5"),
    "normalise": (NORMALISE, "out.h5"),
    "normalise --top-k": ([*NORMALISE, "--top-k", "3"], "out.h5"),
    "evaluate": (["evaluate", "{root}/sims.h5", "--gt", "{root}/gt.npy"], "out.h5"),
    "evaluate --plot": (["evaluate", "{root}/sims.h5", "--gt", "{root}/gt.npy", "--plot"], "out.png"),
    "hubness": (["hubness", "{root}/sims.h5", "--k", "3"], "out.h5"),
    "tune": (TUNE, "out.json"),
    "export": (EXPORT, "out.h5"),
    "export npy": ([*EXPORT, "--format", "npy"], "out_dir"),
    "export faiss": ([*EXPORT, "--format", "faiss"], "out_dir"),
    "search": (["search", "--index", "{root}/exp.h5", "--queries", "{root}/emb.h5::/queries", "--top-k", "3"],
               "out.h5"),
}
DIRECTORIES = {"export npy", "export faiss"}


def writer(data, name: str, where: Path, *extra) -> tuple[list[str], Path]:
    """The command line of writer `name` writing into `where`, and its output path."""
    args, out_name = WRITERS[name]
    out = where / out_name
    args = [a.replace("{root}", str(data)) for a in args]
    if args[-1] != "--plot":
        args.append("-o")
    return [*args, str(out), "-q", *extra], out


@pytest.fixture
def work(tmp_path):
    return tmp_path


def is_complete(out: Path, name: str) -> bool:
    if name in DIRECTORIES:
        return base.owned_export(out)
    if out.suffix == ".json":
        return json.loads(out.read_text())["qbnorm_kind"] == "params"
    if out.suffix == ".png":
        return out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with h5py.File(out, "r") as h5:
        return "qbnorm_kind" in h5.attrs


def make_previous(data, name, out, capsys) -> bytes | None:
    """An earlier output at `out`: a file's bytes, or an earlier export (its recipe's bytes)."""
    if name in DIRECTORIES:
        assert run(capsys, *writer(data, name, out.parent)[0])[0] == 0
        return (out / "recipe.json").read_bytes()
    out.write_bytes(b"previous output, must survive")
    return out.read_bytes()


def previous_intact(out: Path, name: str, before: bytes | None) -> bool:
    if before is None:
        return not os.path.lexists(out)
    if name in DIRECTORIES:
        return (out / "recipe.json").read_bytes() == before
    return out.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# 1. A full disk


def _fails(code, message="No space left on device"):
    def fail(*args, **kwargs):
        raise OSError(code, message)
    return fail


SIMULATED = [(name, where) for name in ("convert", "normalise", "probe", "export", "export npy")
             for where in ("reserve", "first write", "later write", "truncate") if name != "export npy" or
             where == "reserve"] + [("export npy", "npy write"), ("tune", "json write")]


@pytest.mark.parametrize("name, where", SIMULATED)
def test_disk_full_simulated(data, work, capsys, monkeypatch, name, where):
    """ENOSPC wherever the file system reports it: one line, exit 1, the earlier output intact, no
    temporary file, and no crash when the run's objects are freed (HDF5 never sees the failure)."""
    args, out = writer(data, name, work, "--force")
    before = make_previous(data, name, out, capsys)
    calls = []
    real_pwrite = os.pwrite

    def pwrite(fd, buffer, offset):
        calls.append(offset)
        if where == "first write" or len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, buffer, offset)

    if where == "reserve":
        monkeypatch.setattr(atomic.os, "posix_fallocate", _fails(errno.ENOSPC))
    elif where == "truncate":
        monkeypatch.setattr(atomic.os, "ftruncate", _fails(errno.ENOSPC))
    elif where == "npy write":
        monkeypatch.setattr(npydirectory, "reserve", lambda *a: None)
        real_open = open

        class Full:
            def __init__(self, file):
                self.file = file

            def __getattr__(self, attr):
                return getattr(self.file, attr)

            def write(self, block):
                raise OSError(errno.ENOSPC, "No space left on device")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        monkeypatch.setattr(npydirectory, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    elif where == "json write":
        monkeypatch.setattr(Path, "write_text", _fails(errno.ENOSPC))
    else:
        monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    gc.collect()  # a crash in HDF5 would come when its objects are freed
    assert code == 1, err
    assert one_line(err).startswith(f"qbnorm: error: no space left on device writing {out}")
    assert previous_intact(out, name, before)
    assert leftovers(work) == []


FSIZE_RUN = """
import resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from qbnorm_cli.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("name, limit", [("convert", 2000), ("normalise", 9000), ("export npy", 600)])
def test_file_size_limit(data, work, capsys, name, limit):
    """A real write error from the kernel without root: RLIMIT_FSIZE makes writes beyond it fail
    with EFBIG (Python ignores SIGXFSZ): exit 1, one line, no crash, nothing left behind."""
    args, out = writer(data, name, work, "--force")
    before = make_previous(data, name, out, capsys) if name not in DIRECTORIES else None
    proc = subprocess.run([sys.executable, "-c", FSIZE_RUN, str(limit), *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = one_line(proc.stderr)
    assert str(out) in line and "File too large" in line
    assert previous_intact(out, name, before)
    assert leftovers(work) == []


def _mount_tmpfs(where: Path, size: str) -> bool:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs (root and mount needed; skipped elsewhere, where the simulations above cover
    the same code)."""
    disk = tmp_path / "full"
    if not _mount_tmpfs(disk, "3M"):
        pytest.skip("needs root and mount to make a small tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk to `leave` free bytes (0: to ENOSPC)."""
    info = os.statvfs(disk)
    size = max(0, info.f_bavail * info.f_frsize - leave)
    with open(disk / "filler", "wb", buffering=0) as f:
        try:
            f.write(b"\0" * size)
            if not leave:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.parametrize("leave", [16 << 10, 0], ids=["nearly full", "full"])
@pytest.mark.parametrize("name", ["convert", "build-bank", "probe", "probe --update", "normalise", "normalise --top-k",
                                  "evaluate", "hubness", "tune", "export", "export npy", "export faiss", "search"])
def test_disk_full_on_a_tmpfs(data, tiny_disk, capsys, name, leave):
    """A real full disk (a 3 MiB tmpfs): every command that writes ends with exit 1 and one line,
    the earlier output intact and no temporary file; before the fix a segfault (exit 139), a
    SIGBUS, or an internal error."""
    args, out = writer(data, name, tiny_disk, "--force")
    before = None
    if name not in DIRECTORIES:
        before = make_previous(data, name, out, capsys)
    if name in {"hubness", "evaluate", "tune", "search"} | DIRECTORIES and leave:
        leave = 0  # small outputs without an HDF5 file's reserve: only a full disk refuses them
    fill(tiny_disk, leave)
    code, _, err = run(capsys, *args)
    gc.collect()
    assert code == 1, err
    line = one_line(err)
    assert line.startswith(f"qbnorm: error: no space left on device writing {out}"), line
    assert previous_intact(out, name, before)
    assert leftovers(tiny_disk) == []


# ------------------------------------------------------------------------------------------------
# 2. A target created while the run writes; 3. a signal at the commit

def hook_commit(monkeypatch, out: Path, action) -> list:
    """Run `action()` just before the rename that commits `out` (each of its primitives)."""
    seen = []
    real_noreplace, real_replace = staging.rename_noreplace, os.replace

    def noreplace(source, target):
        if Path(target) == out and not seen:
            seen.append("noreplace")
            action()
        return real_noreplace(source, target)

    def replace(source, target, **kwargs):
        if Path(target) == out and not seen and ".qbnorm-tmp" in str(source):
            seen.append("replace")
            action()
        return real_replace(source, target, **kwargs)

    monkeypatch.setattr(staging, "rename_noreplace", noreplace)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return seen


def without_renameat2(monkeypatch, primitive: str) -> None:
    if primitive in ("link", "placeholder"):
        monkeypatch.setattr(staging, "_RENAMEAT2", False)
    if primitive == "placeholder":
        monkeypatch.setattr(atomic.os, "link", _fails(errno.EPERM, "Operation not permitted"))


RACES = [(name, "renameat2") for name in WRITERS] + [
    (name, primitive) for primitive in ("link", "placeholder") for name in ("normalise", "evaluate --plot", "tune",
                                                                            "export npy")]


@pytest.mark.parametrize("name, primitive", RACES)
def test_target_created_during_the_run(data, work, capsys, monkeypatch, name, primitive):
    """Without --force the commit never replaces what another process put at the target while the
    run wrote (a file; a user's directory for directory outputs): exit 2, theirs kept."""
    args, out = writer(data, name, work)
    without_renameat2(monkeypatch, primitive)

    def theirs():
        if name in DIRECTORIES:
            out.mkdir()
            (out / "mine.txt").write_bytes(THEIRS)
        else:
            out.write_bytes(THEIRS)

    seen = hook_commit(monkeypatch, out, theirs)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert seen, "the commit was not reached"
    assert code == 2, err
    assert f"{out}: created by another process while this run wrote it" in one_line(err)
    assert (out / "mine.txt" if name in DIRECTORIES else out).read_bytes() == THEIRS
    assert leftovers(work) == []


@pytest.mark.parametrize("what", ["user directory", "fifo"])
@pytest.mark.parametrize("name", ["normalise", "tune", "export npy"])
def test_force_replaces_only_what_it_checked(data, work, capsys, monkeypatch, name, what):
    """With --force the target is checked again at the commit: a user's directory or a FIFO that
    appeared during the run is left alone (exit 2)."""
    args, out = writer(data, name, work, "--force")

    def theirs():
        if what == "fifo":
            os.mkfifo(out)
        else:
            out.mkdir()
            (out / "mine.txt").write_bytes(THEIRS)

    seen = []
    real_file, real_aside = staging.Staged._commit_file, staging.Staged._move_aside

    def commit_file(self):
        seen.append(theirs())
        return real_file(self)

    def move_aside(self):
        seen.append(theirs())
        return real_aside(self)

    monkeypatch.setattr(staging.Staged, "_commit_file", commit_file)
    monkeypatch.setattr(staging.Staged, "_move_aside", move_aside)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert seen and code == 2, err
    line = one_line(err)
    if what == "fifo":
        assert "not a regular file" in line and stat.S_ISFIFO(os.lstat(out).st_mode)
    else:
        assert ("did not write" in line or "is a directory" in line) and (out / "mine.txt").read_bytes() == THEIRS
    assert leftovers(work) == []


@pytest.mark.parametrize("force", [False, True], ids=["new", "over an earlier output"])
@pytest.mark.parametrize("name", ["convert", "probe", "probe --update", "normalise", "evaluate --plot", "tune",
                                  "export", "export npy"])
def test_signal_at_the_commit(data, work, capsys, monkeypatch, name, force):
    """SIGTERM while the output is renamed into place: the rename is the commit point, the signal is
    held across it, and the message says the output was written (it was); an earlier export moved
    aside is removed. The signal goes to the main thread, which holds it: sent to the process, it
    is taken by a thread that does not block it (BLAS's, the pool's), whose handler runs when that
    thread is next scheduled, on a loaded machine after the run ended (that case is the next test's)."""
    args, out = writer(data, name, work, *(["--force"] if force else []))
    before = make_previous(data, name, out, capsys) if force else None
    seen = hook_commit(monkeypatch, out, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM))
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert seen and code == 130, err
    assert one_line(err) == f"qbnorm: interrupted; {out} was written, nothing else"
    assert is_complete(out, name) and not previous_intact(out, name, before)
    assert leftovers(work) == []


def signal_after_the_commit(monkeypatch, out: Path, after: int) -> list:
    """Have SIGTERM reach the process's handler at the `after`-th line of qbnorm's atomic writer
    run once `out` is renamed into place (its own lines, and the CLI's clean-up after the command
    returned: "late"), as when another thread took the signal (the main thread blocks it while it
    commits) and ran its C handler only then. Returns where it was sent: ["in the run"] or ["late"]."""
    sent, state = [], {"lines": 0, "phase": None}
    real_noreplace, real_replace = staging.rename_noreplace, os.replace
    writers = (atomic.__file__, staging.__file__)

    def trace(frame, event, arg):
        if frame.f_code.co_filename not in writers or sent:
            return None
        if state["phase"] is None:
            return trace  # its lines are traced once the output is committed
        if event == "call" and frame.f_code.co_name == "clear_interrupts" and not staging.is_running():
            state["phase"] = None  # the signal handlers are restored
            return None
        if event == "line" and not (frame.f_code.co_name == "run_interruptibly" and staging.is_running()):
            # (the store that ends the command is reached without a call: no handler runs before it)
            state["lines"] += 1
            if state["lines"] > after:
                sent.append("in the run" if staging.is_running() else "late")
                _thread.interrupt_main(signal.SIGTERM)  # what the C handler does, in whichever thread
        return trace

    def committed(result, target):
        if Path(target) == out and not state["lines"]:
            state["phase"] = "in the run"
        return result

    monkeypatch.setattr(staging, "rename_noreplace", lambda s, t: committed(real_noreplace(s, t), t))
    monkeypatch.setattr(atomic.os, "replace", lambda s, t, **k: committed(real_replace(s, t, **k), t))
    sys.settrace(trace)
    return sent


@pytest.mark.parametrize("name", ["tune", "export npy"])
def test_signal_handled_after_the_commit(data, work, capsys, monkeypatch, name):
    """Wherever the signal's handler runs after the commit: while the command runs, the run exits
    130 and says the output was written; after it returned, the signal is dropped (exit 0), never
    a KeyboardInterrupt out of main(). Either way the output is complete and nothing is left
    behind: removing the earlier export moved aside is part of the commit's held step."""
    args, out = writer(data, name, work, "--force")
    phases = set()
    for after in range(1000):
        shutil.rmtree(out) if out.is_dir() else out.unlink(missing_ok=True)
        before = make_previous(data, name, out, capsys)
        sent = signal_after_the_commit(monkeypatch, out, after)
        try:
            code, _, err = run(capsys, *args)
        finally:
            sys.settrace(None)
            monkeypatch.undo()
        if not sent:  # past the last line
            break
        phases.add(sent[0])
        if sent == ["late"]:
            assert code == 0 and err == "", (after, err)
        else:
            assert code == 130, (after, err)
            assert one_line(err) == f"qbnorm: interrupted; {out} was written, nothing else", after
        assert is_complete(out, name) and not previous_intact(out, name, before), after
        assert leftovers(work) == [], after
    assert phases == {"in the run", "late"}


@pytest.mark.parametrize("at", [1, 5])
def test_interrupt_inside_an_hdf5_write(data, work, capsys, monkeypatch, at):
    """Python runs a signal handler wherever the main thread is, also inside HDF5's call back into
    qbnorm's file object: it must not turn into a failed write (an internal error, or a crash)."""
    real, calls = os.pwrite, []

    def pwrite(fd, buffer, offset):
        calls.append(offset)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(fd, buffer, offset)

    monkeypatch.setattr(atomic.os, "pwrite", pwrite)
    args, out = writer(data, "normalise", work)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    gc.collect()
    assert len(calls) >= at and code == 130, err
    assert one_line(err) == "qbnorm: interrupted; no output was written"
    assert not out.exists() and leftovers(work) == []


def test_signal_before_the_commit_writes_nothing(data, work, capsys, monkeypatch):
    args, out = writer(data, "export npy", work, "--force")
    before = make_previous(data, "export npy", out, capsys)
    real = staging.check_interrupt

    def interrupted():
        if any(work.glob(".*.qbnorm-tmp/recipe.json")):
            staging.note_interrupt(signal.SIGTERM)
        real()

    monkeypatch.setattr(staging, "check_interrupt", interrupted)
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert code == 130 and one_line(err) == "qbnorm: interrupted; no output was written"
    assert previous_intact(out, "export npy", before) and leftovers(work) == []


# ------------------------------------------------------------------------------------------------
# 4. An output that is an input

def _victims(data, work):
    """(command line, the input it names as output) for every option that reads a file."""
    gt_h5 = work / "victim.h5"
    shutil.copy(data / "emb.h5", gt_h5)
    (work / "victim.json").write_bytes((data / "params.json").read_bytes())
    mask = work / "mask.npy"
    shutil.copy(data / "mask.npy", mask)
    os.link(data / "gt.npy", work / "gt-hard.png")
    (work / "gt-sym.h5").symlink_to(data / "gt.npy")
    sims, exp = str(data / "sims.h5"), str(data / "exp.h5")
    norm = [a.replace("{root}", str(data)) for a in NORMALISE]
    tune = [a.replace("{root}", str(data)) for a in TUNE]
    export = [a.replace("{root}", str(data)) for a in EXPORT]
    return {
        "evaluate --gt": (["evaluate", sims, "--gt", f"{gt_h5}::/gt", "-o", gt_h5], gt_h5),
        "evaluate --query-mask": (["evaluate", sims, "--gt", data / "gt.npy", "--query-mask", mask, "-o", mask], mask),
        "evaluate --plot onto --gt (hard link)": (["evaluate", sims, "--gt", data / "gt.npy", "--plot",
                                                  work / "gt-hard.png"], data / "gt.npy"),
        "evaluate -o onto --gt (symlink)": (["evaluate", sims, "--gt", data / "gt.npy", "-o", work / "gt-sym.h5"],
                                            data / "gt.npy"),
        "normalise --params": ([*norm, "--params", work / "victim.json", "-o", work / "victim.json"],
                               work / "victim.json"),
        "export --params": ([*export, "--params", work / "victim.json", "-o", work / "victim.json"],
                            work / "victim.json"),
        "tune -o --gt": ([*tune[:tune.index("--gt") + 1], work / "gt-hard.png", *tune[tune.index("--gt") + 2:],
                          "-o", work / "gt-hard.png"], data / "gt.npy"),
        "tune --plot onto --gt": ([*tune, "-o", work / "p.json", "--plot", work / "gt-hard.png"], data / "gt.npy"),
        "search --index": (["search", "--index", exp, "--queries", f"{data}/emb.h5::/queries", "--top-k", 3,
                            "-o", exp], Path(exp)),
        "hubness SCORES": (["hubness", sims, "--k", 3, "-o", sims], Path(sims)),
        "probe --bank": (["probe", "--bank", data / "bank.h5", "--gallery", f"{data}/emb.h5::/gallery", "-o",
                          data / "bank.h5"], data / "bank.h5"),
        "hubness -o and --plot": (["hubness", sims, "--k", 3, "-o", work / "x.png", "--plot", work / "x.png"], None),
    }


CASES = ["evaluate --gt", "evaluate --query-mask", "evaluate --plot onto --gt (hard link)",
         "evaluate -o onto --gt (symlink)", "normalise --params", "export --params", "tune -o --gt",
         "tune --plot onto --gt", "search --index", "hubness SCORES", "probe --bank", "hubness -o and --plot"]


@pytest.mark.parametrize("case", CASES)
def test_output_is_an_input(data, work, capsys, case):
    """Every file a command reads, options included, is an input: naming it as an output (by its
    path, a symbolic or a hard link) is exit 2, with --force too, and the file is untouched."""
    args, victim = _victims(data, work)[case]
    before = victim.read_bytes() if victim is not None else None
    code, _, err = run(capsys, *args, "--force")
    assert code == 2, err
    line = one_line(err)
    assert ("output would overwrite an input" in line) if victim is not None else ("two outputs" in line)
    if victim is not None:
        assert victim.read_bytes() == before
    assert leftovers(work) == [] and leftovers(data) == []


# ------------------------------------------------------------------------------------------------
# 5. Devices and FIFOs are never replaced

def _special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        if os.geteuid() != 0:
            pytest.skip("making a device node needs root")
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    else:  # a symbolic link to a FIFO
        os.mkfifo(path.with_name("real-fifo"))
        path.symlink_to(path.with_name("real-fifo"))


@pytest.mark.parametrize("kind", ["fifo", "device", "link to a fifo"])
@pytest.mark.parametrize("name", ["convert", "tune", "evaluate --plot", "export npy", "export"])
def test_special_files_are_never_replaced(data, work, capsys, name, kind):
    args, out = writer(data, name, work, "--force")
    _special(out, kind)
    mode = os.lstat(out).st_mode
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert "not a regular file" in one_line(err)
    assert os.lstat(out).st_mode == mode
    assert leftovers(work) == []


# ------------------------------------------------------------------------------------------------
# 13. The output's directory removed during the run

@pytest.mark.parametrize("name", ["normalise", "export", "export npy", "export faiss"])
def test_output_directory_removed_during_the_run(data, work, capsys, monkeypatch, name):
    sub = work / "sub"
    sub.mkdir()
    args, out = writer(data, name, sub)
    removed = []

    def remove_once(real):
        def check():
            if not removed and any(sub.glob(".*.qbnorm-tmp")):
                removed.append(True)
                shutil.rmtree(sub)
            return real()
        return check

    monkeypatch.setattr(atomic, "check_interrupt", remove_once(atomic.check_interrupt))
    monkeypatch.setattr(indexfile, "check_interrupt", remove_once(indexfile.check_interrupt))
    code, _, err = run(capsys, *args)
    monkeypatch.undo()
    assert removed and code == 1, err
    assert one_line(err) == f"qbnorm: error: {out}: write failed: its directory '{sub}' was removed during the run"
    assert not sub.exists()
