"""What a command tells the user: one JSON document on stdout (--json), everything human on
stderr, progress as --progress says (auto: a bar only when stderr is a terminal; lines: a plain
line every few seconds, for logs), nothing at all on success with --quiet.
Warnings are printed unless --quiet; either way they are recorded: in the --json document
("warnings") and, by the library, in the output file (its `warnings` attribute).

rich is imported on first use: a command that prints nothing (--quiet, --json, a pipe) does
not pay the 40 ms its import takes."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import contextmanager

from qbnorm_cli import methods
from qbnorm_cli.cli.options import FLAG_NAMES
from qbnorm_cli.errors import QbnormWarning, UsageError
from qbnorm_cli.io.atomic import jsonable

PROGRESS_OFF = "none"  # --progress none: the word of the option, not the method of that name
PROGRESS_MODES = ("auto", "bar", "lines", PROGRESS_OFF)
LINES_SECONDS = 10.0  # --progress lines: a cron log shows a sign of life this often, not a line per block
LINES_SECONDS_ENV = "QBNORM_PROGRESS_SECONDS"


def _lines_interval() -> float:
    text = os.environ.get(LINES_SECONDS_ENV)
    try:
        value = float(text) if text else LINES_SECONDS
    except ValueError:
        raise UsageError(f"{LINES_SECONDS_ENV}={text!r}: expected a number of seconds") from None
    if not value >= 0:
        raise UsageError(f"{LINES_SECONDS_ENV}={text!r}: expected a number of seconds ≥ 0")
    return value


class Reporter:
    def __init__(self, json_output: bool = False, quiet: bool = False, progress: str = "auto"):
        if progress not in PROGRESS_MODES:
            raise UsageError(f"--progress {progress!r}: choose one of {', '.join(PROGRESS_MODES)}")
        self.json_output = json_output
        self.quiet = quiet
        self.progress_mode = progress
        self.lines_interval = _lines_interval() if progress == "lines" and not quiet else LINES_SECONDS
        self._console = None
        self.warnings: list[str] = []

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            # Logs and pipes have no width: do not squeeze tables into rich's 80-column default there.
            width = None if sys.stderr.isatty() else 160
            self._console = Console(file=sys.stderr, highlight=False, soft_wrap=True, width=width)
        return self._console

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message)

    def warn(self, message: str) -> None:
        """Record a warning for the --json document; print it unless --quiet (which promises
        silence on success: a cron job's owner reads the warnings from the output or the JSON)."""
        self.warnings.append(message)
        if not self.quiet:
            text = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a damaged file's bytes
            print(f"qbnorm: warning: {text}", file=sys.stderr)

    @contextmanager
    def capture(self):
        """The library's QbnormWarnings raised inside, reported with the options' spelling; first,
        the plug-ins the registry left out (each run says so, as the library does once)."""
        for problem in methods.PLUGIN_PROBLEMS:
            self.warn(problem)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", QbnormWarning)
            yield
        for item in caught:
            if isinstance(item.message, QbnormWarning):
                self.warn(item.message.render(FLAG_NAMES))
            else:
                warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)

    def cluster(self, stats: dict | None) -> None:
        """One line on what a run on a dask cluster did."""
        if stats:
            self.info(f"cluster {stats['address']}: {stats['workers']} workers, {stats['tasks']} tasks; "
                      f"{stats['bytes_read'] / 1e6:,.1f} MB read by the workers, {stats['bytes_sent'] / 1e6:,.1f} MB sent "
                      f"to them, {stats['bytes_returned'] / 1e6:,.1f} MB returned")

    def table(self, table) -> None:
        if not self.quiet:
            self.console.print(table)

    def result(self, document: dict) -> None:
        """The --json document, with the run's warnings (a list, empty when there were none)."""
        if self.json_output:
            document = {**document, "warnings": list(self.warnings)}
            sys.stdout.write(json.dumps(jsonable(document), indent=2, sort_keys=False) + "\n")
            sys.stdout.flush()

    def _progress_style(self) -> str | None:
        if self.quiet or self.progress_mode == PROGRESS_OFF:
            return None
        if self.progress_mode == "auto":
            return "bar" if sys.stderr.isatty() else None
        return self.progress_mode

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "rows", per: int = 1):
        """Yields advance(n, note=None) for n work items, `per` of which make one `unit` (probe and
        normalise count scores, `per` = gallery size, and show bank or query rows); `note` says where
        the work stands when a count cannot (Sinkhorn's error against its tolerance). total None: no
        known end, so no percentage and no ETA. --progress decides the form (`_progress_style`)."""
        style = self._progress_style()
        if style is None:
            yield lambda n, note=None: None
        elif style == "lines":
            with self._lines(description, total, unit, per) as advance:
                yield advance
        else:
            with self._bar(description, total, unit, per) as advance:
                yield advance

    @contextmanager
    def _lines(self, description: str, total: int | None, unit: str, per: int):
        """A plain line on stderr at the start, at most every `lines_interval` seconds, and at the end."""
        start = last = time.perf_counter()
        done, latest = 0, None
        whole = f" of {total / per:,.0f} {unit}" if total is not None else ""
        self._line(f"{description}: started" + (f", {total / per:,.0f} {unit}" if total is not None else ""))

        def state(now: float) -> str:
            elapsed = now - start
            if latest is not None:
                return f"{description}: {latest} ({elapsed:,.0f} s)"
            share = f" ({100 * done / total:.0f} %)" if total else ""
            rate = f", {done / per / elapsed:,.0f} {unit}/s" if elapsed > 0 else ""
            return f"{description}: {done / per:,.0f}{whole}{share}{rate} ({elapsed:,.0f} s)"

        def advance(n: int, note: str | None = None) -> None:
            nonlocal done, latest, last
            done += n
            latest = note if note is not None else latest
            now = time.perf_counter()
            if now - last >= self.lines_interval:
                last = now
                self._line(state(now))

        yield advance
        self._line(state(time.perf_counter()).replace(f"{description}: ", f"{description}: done, ", 1))

    def _line(self, text: str) -> None:
        print(f"qbnorm: {text}", file=sys.stderr, flush=True)

    @contextmanager
    def _bar(self, description: str, total: int | None, unit: str, per: int):
        """rich's bar with the rate in units per second and an ETA; with no known end, the note
        (what converges, against what) and the time elapsed instead."""
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if total is None:
            columns = (TextColumn("[bold]{task.description}"), TextColumn("{task.fields[note]}"), TimeElapsedColumn())
        else:
            columns = (
                TextColumn("[bold]{task.description}"), BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            )
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=None if total is None else total / per, rate="", note="")
            start = time.perf_counter()
            done = 0

            def advance(n: int, note: str | None = None) -> None:
                nonlocal done
                done += n
                elapsed = time.perf_counter() - start
                rate = f"{done / per / elapsed:,.0f} {unit}/s" if elapsed > 0 else ""
                fields = {"rate": rate} if note is None else {"rate": rate, "note": note}
                bar.update(task, completed=done / per, **fields)

            yield advance
