"""The `qbnorm` command: a thin typer layer over the numpy core.

Each subcommand lives in qbnorm_cli/commands/ and only parses, opens, calls the core and reports.
Errors become one line on stderr and a documented exit code (errors.py); set QBNORM_DEBUG=1 for
the traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import typer

from qbnorm_cli import __version__, files
from qbnorm_cli.commands import build_bank, evaluate, hubness, normalise, probe
from qbnorm_cli.errors import EXIT_INTERRUPTED, EXIT_RUNTIME, QbnormError

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
        print(f"qbnorm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Measure and remove hubness in cross-modal retrieval."""


def _terminate(signum, frame):
    raise KeyboardInterrupt


def _one_line_errors(func):
    """Turn every failure inside a command into one stderr line and its documented exit code."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        debug = os.environ.get("QBNORM_DEBUG") == "1"
        try:
            return func(*args, **kwargs)
        except KeyboardInterrupt:
            print("qbnorm: interrupted; no output was written", file=sys.stderr)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except QbnormError as exc:
            if debug:
                raise
            print(f"qbnorm: error: {exc}", file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
        except MemoryError:
            print("qbnorm: error: out of memory; lower --memory", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME) from None
        except Exception as exc:
            if debug:
                raise
            print(f"qbnorm: error: internal error: {type(exc).__name__}: {exc} "
                  "(rerun with QBNORM_DEBUG=1 for details)", file=sys.stderr)
            raise typer.Exit(EXIT_RUNTIME) from None

    return run


COMMANDS = {
    "build-bank": build_bank.command,
    "probe": probe.command,
    "normalise": normalise.command,
    "evaluate": evaluate.command,
    "hubness": hubness.command,
}
for _name, _func in COMMANDS.items():
    app.command(_name, no_args_is_help=True)(_one_line_errors(_func))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code (tests call this directly)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    files.COMMAND_LINE[:] = argv
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        app(args=argv, prog_name="qbnorm", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else EXIT_RUNTIME)
    except KeyboardInterrupt:
        print("qbnorm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def console_main() -> None:
    sys.exit(main())
