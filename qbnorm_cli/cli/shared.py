"""The options several commands take, each written once: decorators that add them to a command
(as sqlite-utils shares `output_options` among its click commands) and hand the command what it
needs of them.

Typer reads a command's options from its signature, so each decorator gives the command a
signature with its options in place of the keywords it hands over (the command names those,
keyword-only, where the options are to be listed), as click's decorators add parameters:

- `method_parameters`: one option per method parameter of the registry (methods.PARAMETERS:
  --beta, --k, --min-count, --lambda …), handed over as `params` (name → value, None when not given);
- `tried_parameters`: tune's values instead of the grids that follow the score scale (--beta,
  --gallery-beta, repeatable), handed over as `tried` (plural keyword → values, None when not given);
- `probed_parameters`: what probe precomputes (--beta, --gallery-beta, --topk-mean repeatable;
  --k), handed over as `probed` (the library's keyword → value, None when not given);
- `reporting`: --json, --quiet, --progress, handed over as `report` (cli/report.py's Reporter);
  `reporting_without_progress`: --json and --quiet;
- `budget`: --memory and --block-rows, handed over as themselves, with --allow-external and
  --max-output: the command runs under the limits of all four (io.limits);
- `clustered`: --cluster and --cluster-security, handed over as the library's `cluster`;
- `overwriting`: --force, handed over as itself.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Annotated

import typer

from qbnorm_cli import methods
from qbnorm_cli.cli import options
from qbnorm_cli.cli.report import Reporter
from qbnorm_cli.io import limits


def _option(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _adding(added: list[inspect.Parameter], hands: tuple[str, ...], hand: Callable[[dict], Mapping],
            around: Callable[[dict], object] | None = None):
    """A decorator giving a command the options `added`: the command receives `hand(their values)`
    (the keywords `hands`, which its signature names keyword-only: the options take the place of
    the first), inside `around(their values)` when given."""
    names = tuple(option.name for option in added)

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        missing = [name for name in hands if name not in signature.parameters]
        if missing:
            raise TypeError(f"{command.__qualname__} must take {', '.join(missing)}")

        @functools.wraps(command)
        def run(*args, **kwargs):
            values = {name: kwargs.pop(name) for name in names}
            with around(values) if around is not None else nullcontext():
                return command(*args, **kwargs, **hand(values))

        parameters = []
        for parameter in signature.parameters.values():  # the options where the first keyword handed was
            if parameter.name == hands[0]:
                parameters += added
            if parameter.name not in hands:
                parameters.append(parameter)
        run.__signature__ = signature.replace(parameters=parameters)
        return run

    return decorate


method_parameters = _adding(
    [_option(p.name, Annotated[p.kind | None, typer.Option(p.option, metavar=p.shown_value or None,
                                                            help=p.option_help)], None)
     for p in methods.PARAMETERS.values()],
    ("params",), lambda values: {"params": values})


tried_parameters = _adding(
    [_option(p.many, Annotated[list[p.kind] | None, typer.Option(p.option, help=p.tried_help)], None)
     for p in methods.PARAMETERS.values() if p.scaled],
    ("tried",), lambda values: {"tried": values})

probed_parameters = _adding(
    [_option(p.many or p.name, Annotated[list[p.kind] | None if p.many else p.kind | None,
                                         typer.Option(p.option, help=p.probed_help(methods.probed_default(p)))], None)
     for p in methods.PARAMETERS.values() if p.probed],
    ("probed",), lambda values: {"probed": values})


def _reporting(progress: bool):
    added = [_option("json_output", options.Json, False), _option("quiet", options.Quiet, False)]
    if progress:
        added.append(_option("progress_mode", options.Progress, options.DEFAULT_PROGRESS))
    return _adding(added, ("report",), lambda values: {"report": Reporter(
        values["json_output"], values["quiet"], values.get("progress_mode", options.DEFAULT_PROGRESS))})


reporting = _reporting(progress=True)
reporting_without_progress = _reporting(progress=False)


def _limits(values: dict):
    return limits.applied(memory=limits.parse_size(values["memory"], "memory"),
                          allow_external=values["allow_external"],
                          max_output=limits.parse_size(values["max_output"], "max_output"))


budget = _adding(
    [_option("memory", options.Memory, options.DEFAULT_MEMORY_TEXT), _option("block_rows", options.BlockRows, None),
     _option("allow_external", options.AllowExternal, False),
     _option("max_output", options.MaxOutput, options.DEFAULT_MAX_OUTPUT_TEXT)],
    ("memory", "block_rows"), lambda values: {"memory": values["memory"], "block_rows": values["block_rows"]},
    around=_limits)

clustered = _adding(
    [_option("cluster", options.Cluster, None), _option("cluster_security", options.ClusterSecurity, None)],
    ("cluster",), lambda values: {"cluster": options.on_cluster(values["cluster"], values["cluster_security"])})

overwriting = _adding([_option("force", options.Force, False)], ("force",), dict)
