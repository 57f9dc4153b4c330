"""What a command tells the user: one JSON document on stdout (--json), everything human on
stderr, progress bars only when stderr is a terminal, nothing at all on success with --quiet.
Warnings are printed unless --quiet; either way they are recorded: in the --json document
("warnings") and, by the library, in the output file (its `warnings` attribute).

rich is imported on first use: a command that prints nothing (--quiet, --json, a pipe) does
not pay the 40 ms its import takes."""

from __future__ import annotations

import json
import sys
import time
import warnings
from contextlib import contextmanager

from qbnorm_cli import methods
from qbnorm_cli.cli.options import FLAG_NAMES
from qbnorm_cli.errors import QbnormWarning
from qbnorm_cli.io.atomic import jsonable


class Reporter:
    def __init__(self, json_output: bool = False, quiet: bool = False):
        self.json_output = json_output
        self.quiet = quiet
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

    @contextmanager
    def progress(self, description: str, total: int, unit: str = "rows", per: int = 1):
        """Yields advance(n) for n work items, `per` of which make one `unit` (probe and normalise
        count scores, `per` = gallery size, and show bank or query rows). The bar, with the rate in
        units per second, is drawn only on an interactive stderr."""
        if self.quiet or not sys.stderr.isatty():
            yield lambda n: None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"), BarColumn(),
            TextColumn("{task.percentage:>3.0f}%"),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total / per, rate="")
            start = time.perf_counter()
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                elapsed = time.perf_counter() - start
                rate = f"{done / per / elapsed:,.0f} {unit}/s" if elapsed > 0 else ""
                bar.update(task, completed=done / per, rate=rate)

            yield advance
