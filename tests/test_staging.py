"""io/staging.py: the one module that stages outputs (temporary path beside the target, rename,
clean-up) and handles SIGINT / SIGTERM / SIGHUP in every phase of the program. The end-to-end
behaviour (exit 130, no partial output, one line) is tested through the CLI in test_outputs.py,
test_hostile_outputs.py and test_cluster.py; these test the module's own promises."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import signal_set

from qbnorm_cli.errors import EXIT_INTERRUPTED, UsageError
from qbnorm_cli.io import staging

PACKAGE = Path(staging.__file__).resolve().parent.parent


def _kill_main(signum: int) -> None:
    signal.pthread_kill(threading.main_thread().ident, signum)


def hangup_at_default():
    """SIGHUP at its default, whatever this run inherited: `nohup pytest` starts with it ignored,
    and qbnorm rightly leaves an ignored signal alone, so a test of SIGHUP would test nothing."""
    return signal_set(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture
def handled():
    """The program's run phase around a test body: its handlers installed, given back after."""
    results = []

    def run(body):
        results.append(staging.run_interruptibly(body, program=False))
        return results[-1]

    yield run
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_ends_the_command_with_130_and_handlers_are_given_back(handled):
    before = signal.getsignal(signal.SIGINT)

    def body():
        _kill_main(signal.SIGTERM)
        for _ in range(1000):  # the handler runs at the next bytecode check
            pass
        return 0

    code, committed = handled(body)
    assert code == EXIT_INTERRUPTED and committed == []
    assert signal.getsignal(signal.SIGINT) is before
    staging.check_interrupt()  # cleared: nothing left to interrupt the next call


def test_a_held_step_completes_and_the_signal_is_raised_after_it(handled):
    steps = []

    def body():
        try:
            with staging.held():
                _kill_main(signal.SIGHUP)
                for _ in range(1000):
                    pass
                steps.append("inside done")
        except KeyboardInterrupt:
            steps.append("raised after")
            raise
        return 0

    with hangup_at_default():
        code, _ = handled(body)
    assert code == EXIT_INTERRUPTED and steps == ["inside done", "raised after"]


def test_a_held_step_of_a_complete_run_drops_the_signal(handled):
    def body():
        with staging.held(discard=True):
            _kill_main(signal.SIGTERM)
            for _ in range(1000):
                pass
        staging.check_interrupt()  # dropped: not noted either
        return 0

    assert handled(body) == (0, [])


def test_a_signal_noted_in_another_thread_holds_while_held():
    """A signal taken by another thread while the main thread holds: noted without raising, raised
    when the hold ends (note_interrupt is what the handler calls, wherever it runs)."""
    with pytest.raises(KeyboardInterrupt):
        with staging.held():
            assert staging.note_interrupt(signal.SIGTERM) is False
    staging.clear_interrupts()
    assert staging.note_interrupt(signal.SIGTERM) is True
    with pytest.raises(KeyboardInterrupt):
        staging.check_interrupt()
    staging.clear_interrupts()


def test_shielded_calls_finish_and_note_the_interrupt():
    calls = []

    @staging.shielded
    def step(x):
        calls.append(x)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return x * 2

    try:
        assert step(3) == 6 and calls == [3, 3]
        with pytest.raises(KeyboardInterrupt):
            staging.check_interrupt()
    finally:
        staging.clear_interrupts()


def test_the_outputs_committed_are_reported(handled, tmp_path):
    target = tmp_path / "out.txt"

    def body():
        staged = staging.Staged(target, force=False)
        Path(staged.create()).write_text("x")
        staged.commit()
        return 0

    assert handled(body) == (0, [str(target)])
    assert target.read_text() == "x"


# --- the staging sequence --------------------------------------------------------------------------

def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_staged_commit_and_discard(tmp_path, directory):
    target = tmp_path / "out"
    staged = staging.Staged(target, force=False, directory=directory)
    path = Path(staged.create())
    assert path.parent == tmp_path and path.name.startswith(".out.") and path.name.endswith(".qbnorm-tmp")
    assert path.is_dir() == directory
    staged.commit()
    assert target.exists() and leftovers(tmp_path) == [] and staged.path is None
    mode = os.stat(target).st_mode & 0o777
    mask = os.umask(0)
    os.umask(mask)
    assert mode == (0o777 if directory else 0o666) & ~mask  # what open() / mkdir() would give
    again = staging.Staged(tmp_path / "other", force=False, directory=directory)
    again.create()
    again.discard()
    again.discard()  # twice: nothing left, nothing fails
    assert leftovers(tmp_path) == [] and not (tmp_path / "other").exists()


@pytest.mark.parametrize("directory", [False, True], ids=["file", "directory"])
def test_staged_never_replaces_without_force(tmp_path, directory):
    target = tmp_path / "out"
    staged = staging.Staged(target, force=False, directory=directory)
    staged.create()
    target.write_text("theirs")  # created by another process meanwhile
    with pytest.raises(UsageError, match="created by another process"):
        staged.commit()
    staged.discard()
    assert target.read_text() == "theirs" and leftovers(tmp_path) == []


def test_staged_directory_replaces_only_what_it_owns(tmp_path):
    target = tmp_path / "index"
    target.mkdir()
    (target / "mine.txt").write_text("theirs")
    staged = staging.Staged(target, force=True, directory=True, owned=lambda p: (p / "ours").exists())
    Path(staged.create(), "ours").write_text("new")
    with pytest.raises(UsageError, match="did not write"):
        staged.commit()
    assert (target / "mine.txt").read_text() == "theirs"
    (target / "ours").write_text("old")  # an earlier output: replaced
    staged.commit()
    assert (target / "ours").read_text() == "new" and not (target / "mine.txt").exists()
    assert leftovers(tmp_path) == []


def test_an_interrupt_before_the_commit_leaves_the_target_alone(tmp_path):
    target = tmp_path / "out"
    staged = staging.Staged(target, force=False)
    staged.create()
    staging.note_interrupt(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            staged.commit()
    finally:
        staging.clear_interrupts()
        staged.discard()
    assert not target.exists() and leftovers(tmp_path) == []


# --- the program's other phases ----------------------------------------------------------------------

def test_loading_guard_exits_130_at_once():
    """While the program loads: one line and exit 130 (nothing is open yet)."""
    code = ("import os, signal, time; from qbnorm_cli.io import staging; staging.guard_loading(); "
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED and proc.stderr == "qbnorm: interrupted\n"


def test_loading_guard_is_handed_back_and_leaves_ignored_signals_alone():
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        staging.guard_loading()
        assert signal.getsignal(signal.SIGTERM) is staging.exit_at_once
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup: stays ignored
        assert staging.end_loading() is True
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert staging.end_loading() is False  # not guarding: a library caller
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_children_inherit_ignored_signals():
    with hangup_at_default():
        with staging.children_ignore((signal.SIGHUP,)):
            code = "import signal; print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN)"
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert proc.stdout.strip() == "True"
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_signals_and_renames_are_written_in_io_staging_only():
    """One module owns the signal handlers and the temporary/rename/clean-up sequence."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name == "io/staging.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                    (node.value.id == "signal" and node.attr in ("signal", "pthread_sigmask", "sigpending"))
                    or (node.value.id == "tempfile" and node.attr in ("mkstemp", "mkdtemp"))
                    or (node.value.id == "os" and node.attr in ("rename", "replace", "link"))):
                found.append(f"{name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not found, found


def test_every_writer_says_the_same_when_its_temporary_file_cannot_be_made(tmp_path, monkeypatch):
    """One sequence: a JSON document (write_json, once a copy that said 'cannot write') fails as
    HDF5 outputs do, with the line docs/errors.md gives."""
    import tempfile

    from qbnorm_cli.errors import RuntimeFailure
    from qbnorm_cli.io.atomic import write_json

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(RuntimeFailure) as caught:
        write_json(tmp_path / "p.json", {"a": 1}, force=False)
    assert str(caught.value) == f"{tmp_path / 'p.json'}: cannot create a file in {str(tmp_path)!r}: Permission denied"
    assert leftovers(tmp_path) == [] and not (tmp_path / "p.json").exists()
