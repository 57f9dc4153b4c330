"""The `qbnorm` command: a thin typer layer over the library (qbnorm_cli)."""

from qbnorm_cli.cli.app import app, console_main, main

__all__ = ["app", "console_main", "main"]
