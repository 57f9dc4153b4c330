"""The CLI's spelling of the library's parameters, and its defaults agreeing with the library's."""

from __future__ import annotations

import pytest

from qbnorm_cli.cli import options
from qbnorm_cli.errors import UsageError, param
from qbnorm_cli.streaming.budget import DEFAULT_MEMORY, parse_memory


def test_default_memory_agrees_with_the_library():
    assert parse_memory(options.DEFAULT_MEMORY_TEXT) == DEFAULT_MEMORY


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
