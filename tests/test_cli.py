"""The command itself: its name, its version, the one-line summaries of its subcommands."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from flythinker.commands.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flythinker {version('flythinker')}"


def test_help_names_the_command_as_users_type_it():
    # `python -m flythinker` must not introduce itself as __main__.py.
    done = subprocess.run([sys.executable, "-m", "flythinker", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("usage: flythinker ")


def test_each_subcommand_summary_is_a_whole_sentence_and_listed_as_it_is():
    from flythinker.commands.cli import SUMMARIES, _commands

    commands = _commands()
    assert list(SUMMARIES) == list(commands)
    for name, function in commands.items():
        first_line = (function.__doc__ or "").strip().splitlines()[0]
        assert first_line.endswith("."), f"{name}: {first_line!r}"
        assert SUMMARIES[name] == first_line, f"cli.SUMMARIES[{name!r}] is out of date"


def test_top_level_help_does_not_load_torch():
    code = ("import sys; from flythinker.commands.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "diagnose" in done.stdout


def test_the_public_api_is_importable_from_the_top():
    import flythinker

    for name in flythinker.__all__:
        assert getattr(flythinker, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        flythinker.nothing  # noqa: B018
