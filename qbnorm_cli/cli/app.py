"""The `qbnorm` program: a typer app whose commands (one module each in cli/) parse their
options, call the library (qbnorm_cli.api) and report. Errors become one line on stderr and a
documented exit code (errors.py), parameters spelled as options (options.flag); set
QBNORM_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from collections.abc import MutableMapping

import typer
import typer.core

from qbnorm_cli.cli import build_bank, convert, evaluate, export, hubness, hubs, normalise, probe, search, tune
from qbnorm_cli.cli.options import FLAG_NAMES, check_whole_numbers, flag
from qbnorm_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, QbnormError
from qbnorm_cli.io import atomic, remote, staging
from qbnorm_cli.version import VERSION

try:  # typer ≥ 0.2x vendors click; older typer uses click itself
    from typer import TyperException as _ParseError
except ImportError:  # pragma: no cover
    from click import ClickException as _ParseError

app = typer.Typer(
    name="qbnorm",
    help="Measure and remove hubness in cross-modal retrieval with querybank normalisation.\n\n"
    "Pipeline: build-bank → probe → normalise → evaluate / hubness. Exit codes: 0 ok, 1 runtime/I/O, "
    "2 usage, 3 bad input data, 4 quality gate failed, 130 interrupted.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"qbnorm {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Measure and remove hubness in cross-modal retrieval."""


def _line(text: object) -> str:
    """Messages are one line, whatever a library put into an exception, and printable whatever a
    damaged file put into it (text that is not UTF-8 is shown escaped)."""
    text = " ".join(str(text).split())
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _one_line_errors(func):
    """Turn every failure inside a command into one stderr line and its documented exit code (the
    command runs under the limits of its --memory, --allow-external and --max-output: cli/shared.py)."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        debug = os.environ.get("QBNORM_DEBUG") == "1"
        try:
            _check_outputs(kwargs)
            check_whole_numbers(kwargs)
            return func(*args, **kwargs)
        except KeyboardInterrupt:  # main() says so (typer also turns stray interrupts into 130)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except QbnormError as exc:
            if debug:
                raise
            print(f"qbnorm: error: {_line(exc.render(FLAG_NAMES))}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            print("qbnorm: error: out of memory; lower --memory", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME) from None
        except typer.Exit:  # a command's own exit code
            raise
        except Exception as exc:
            if debug:
                raise
            print(f"qbnorm: error: internal error: {type(exc).__name__}: {_line(exc)} "
                  "(rerun with QBNORM_DEBUG=1 for details)", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME) from None

    return run


OUTPUTS = ("output", "plot")  # the options that name what a command writes; every other path is read


def _check_outputs(arguments: dict) -> None:
    """Every command, before it starts: no output may overwrite a file the command reads (an input
    file, --gt, --query-mask, --params, --probe, an --index directory, …: every other option that
    names an existing path), nor another output."""
    outputs = [arguments.get(name) for name in OUTPUTS]
    read, names = [], []
    for name, value in arguments.items():
        if name in OUTPUTS:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, str) and item:
                read.append(item)
                names.append(flag(name))
    atomic.check_outputs(outputs, read, names)


COMMANDS = {
    "build-bank": build_bank.command,
    "probe": probe.command,
    "normalise": normalise.command,
    "evaluate": evaluate.command,
    "hubness": hubness.command,
    "hubs": hubs.command,
    "convert": convert.command,
    "tune": tune.command,
    "export": export.command,
    "search": search.command,
}
for _name, _func in COMMANDS.items():
    app.command(_name, no_args_is_help=True)(_one_line_errors(_func))


def _unraisable(hook):
    """Python drops exceptions raised in weakref callbacks and __del__ with a traceback on stderr;
    an interrupt that lands there is noted by the signal handler (io/staging.py), so say nothing;
    others in one line."""

    def handle(info) -> None:
        if info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt):
            return
        if os.environ.get("QBNORM_DEBUG") == "1":
            hook(info)
            return
        print(f"qbnorm: warning: ignored {_line(info.exc_type.__name__)}: {_line(info.exc_value)}", file=sys.stderr)

    return handle


def _usage_error(exc: _ParseError) -> int:
    """Click's parse errors (bad option values, missing options, unknown commands) as one line."""
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `qbnorm CMD`: the help, as before
        exc.show()
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path.partition(" ")[2] if ctx is not None else ""
    where = f"{command}: " if command else ""
    hint = f" (see {ctx.command_path} --help)" if ctx is not None and exc.exit_code == 2 else ""
    print(f"qbnorm: error: {_line(where + exc.format_message())}{hint}", file=sys.stderr)
    return exc.exit_code


def _given_once(command) -> None:
    """One rule for every option that takes one value: given twice, it is a usage error (click lets
    the last one win silently: `--k 1 --k 5` ran with k = 5). Repeatable options say so in their help."""
    parse_args = command.parse_args

    def checked(ctx, args):
        _, _, order = command.make_parser(ctx).parse_args(args=list(args))
        counts = Counter(p for p in order if isinstance(p, typer.core.TyperOption) and not p.multiple
                         and not p.is_flag and not p.count)
        for option, times in counts.items():
            if times > 1:
                raise typer.BadParameter(f"given {times} times; it takes one value: give it once",
                                         ctx=ctx, param=option)
        return parse_args(ctx, args)

    command.parse_args = checked


class _Commands(MutableMapping):
    """The program's click commands by name, each built from its typer signature when first looked
    up: a run builds the one it runs (building all ten took 28 ms of every run); listing them (the
    help) builds them all."""

    def __init__(self, infos) -> None:
        self._infos = {info.name: info for info in infos}
        self._built: dict = {}

    def __getitem__(self, name: str):
        if name not in self._built:
            command = typer.main.get_command_from_info(self._infos[name], pretty_exceptions_short=True,
                                                       rich_markup_mode=app.rich_markup_mode)
            _given_once(command)
            self._built[name] = command
        return self._built[name]

    def __setitem__(self, name: str, command) -> None:
        self._infos.setdefault(name, None)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._infos[name]
        self._built.pop(name, None)

    def __iter__(self):
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


_COMMAND: list = []


def _click_command():
    """The app as a click group, built once (typer rebuilds it from the signatures on every call,
    which tests and notebooks calling main() many times would pay each time), its commands as they
    are looked up (_Commands)."""
    if not _COMMAND:
        infos, app.registered_commands = app.registered_commands, []
        try:
            group = typer.main.get_command(app)  # the root options (its callback) only
        finally:
            app.registered_commands = infos
        group.commands = _Commands(infos)
        _COMMAND.append(group)
    return _COMMAND[0]


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this directly). SIGINT, SIGTERM (kill,
    timeout, cron/systemd stopping a job) and SIGHUP (lost terminal) end a run like Ctrl-C: the
    temporary output is removed and the exit code is 130 (io/staging.py)."""
    argv = [str(arg) for arg in (sys.argv[1:] if argv is None else argv)]
    program = staging.end_loading()
    unraisable_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        code, written = staging.run_interruptibly(lambda: _dispatch(argv), program=program)
    finally:
        sys.unraisablehook = unraisable_hook
    if code == EXIT_INTERRUPTED:  # the rename is the commit point: say what was committed before the signal
        verb = "was" if len(written) == 1 else "were"
        done = f"{', '.join(written)} {verb} written, nothing else" if written else "no output was written"
        print(f"qbnorm: interrupted; {done}", file=sys.stderr)
    return code


def _dispatch(argv: list[str]) -> int:
    """The exit code of the command `argv` names."""
    try:
        code = _click_command().main(args=argv, prog_name="qbnorm", standalone_mode=False,
                                     obj={"provenance": remote.redact_text(" ".join(["qbnorm", *argv]))})
        return code if isinstance(code, int) else 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_RUNTIME)
    except _ParseError as exc:
        return _usage_error(exc)
    except typer.Abort:
        print("qbnorm: aborted", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def console_main() -> None:
    sys.exit(main())
