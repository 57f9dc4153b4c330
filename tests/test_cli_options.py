"""The CLI's spelling of the library's parameters, and its defaults agreeing with the library's."""

from __future__ import annotations

import pytest

from qbnorm_cli.cli import options
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, parse_memory


def test_default_memory_agrees_with_the_library():
    assert parse_memory(options.DEFAULT_MEMORY_TEXT) == DEFAULT_MEMORY


def test_default_max_output_agrees_with_the_library():
    from qbnorm_cli.io.limits import DEFAULT_MAX_OUTPUT, parse_size
    assert parse_size(options.DEFAULT_MAX_OUTPUT_TEXT, "max_output") == DEFAULT_MAX_OUTPUT


@pytest.mark.parametrize(("spelling", "flag"), [
    ("beta", "--beta"), ("gallery_beta", "--gallery-beta"), ("betas", "--beta"), ("topk_means", "--topk-mean"),
    ("force=True", "--force"), ("accept_mismatch=True", "--accept-mismatch"), ("similarity='dot'", "--similarity dot"),
    ("method='dis'", "--method dis"), ("keep_sorted=True", "--keep-sorted"), ("scores", "SCORES"),
])
def test_flags(spelling, flag):
    assert options.flag(spelling) == flag


def test_one_message_two_spellings():
    error = UsageError(f"{param('beta')} 7: probe again with {param('betas')} 7 or pass {param('force=True')}")
    assert str(error) == "beta 7: probe again with betas 7 or pass force=True"
    assert error.render(options.FLAG_NAMES) == "--beta 7: probe again with --beta 7 or pass --force"


# --- a parameter is declared once: its options and keywords come from the declaration -------------

def _command(name):
    import typer

    from qbnorm_cli.cli.app import app
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("command", ["normalise", "export"])
def test_every_declared_parameter_is_an_option_with_its_declared_help(command):
    from qbnorm_cli import methods
    options_of = {opt: p for p in _command(command).params for opt in p.opts}
    for parameter in methods.PARAMETERS.values():
        option = options_of[parameter.option]
        assert option.help == parameter.option_help and option.default is None, parameter.name
    assert options_of["--lambda"].name == "lam" and options_of["--min-count"].metavar == "θ"


def test_tune_and_probe_take_the_declared_grids_and_statistics():
    from qbnorm_cli import methods
    tune = {opt: p for p in _command("tune").params for opt in p.opts}
    probe = {opt: p for p in _command("probe").params for opt in p.opts}
    for parameter in methods.PARAMETERS.values():
        assert (parameter.option in tune) == parameter.scaled, parameter.name
        assert (parameter.option in probe) == bool(parameter.probed), parameter.name
        if parameter.scaled:
            assert tune[parameter.option].multiple and tune[parameter.option].name == parameter.many
        if parameter.probed:
            assert probe[parameter.option].multiple == bool(parameter.many)
    assert "default 10 and 128" in probe["--topk-mean"].help


def test_every_command_takes_the_common_options_once():
    import typer

    from qbnorm_cli.cli.app import app
    for name, command in typer.main.get_command(app).commands.items():
        spelled = [opt for p in command.params for opt in p.opts]
        assert len(spelled) == len(set(spelled)), name
        for option in ("--memory", "--block-rows", "--allow-external", "--max-output", "--force", "--json", "--quiet"):
            assert option in spelled, (name, option)


@pytest.mark.parametrize("entry", ["normalise", "export"])
def test_the_library_takes_every_declared_parameter_as_a_keyword(entry):
    import inspect

    import qbnorm_cli
    from qbnorm_cli import methods
    function = getattr(qbnorm_cli, entry)
    signature = inspect.signature(function)
    for name in methods.PARAMETERS:
        keyword = signature.parameters[name]
        assert keyword.kind is keyword.KEYWORD_ONLY and keyword.default is None, name
    with pytest.raises(TypeError, match="unexpected keyword argument 'min_counts'"):
        function(None, None, min_counts=3)


def test_a_bad_memory_size_is_one_usage_line_through_the_shared_option(tmp_path):
    """The limits of --memory apply through the shared option (cli/shared.budget): a bad size is one line."""
    from qbnorm_cli.cli.app import main
    assert main(["normalise", "--probe", str(tmp_path / "p.h5"), "--sims", "s.h5", "-o", str(tmp_path / "o.h5"),
                 "--memory", "12xb"]) == 2
