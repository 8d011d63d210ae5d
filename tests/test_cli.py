"""The command itself: its name, its version, the one-line summaries of its subcommands."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from flythinker.cli import main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"flythinker {version('flythinker')}"


def test_help_names_the_command_as_users_type_it():
    # `python -m flythinker` must not introduce itself as __main__.py.
    done = subprocess.run([sys.executable, "-m", "flythinker", "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("usage: flythinker ")


@pytest.mark.parametrize("command", ["bench", "train", "evaluate", "run", "demo", "diagnose", "write"])
def test_each_subcommand_summary_is_a_whole_sentence(command):
    from flythinker.cli import _commands

    first_line = (_commands()[command].__doc__ or "").strip().splitlines()[0]
    assert first_line.endswith("."), f"{command}: {first_line!r}"


def test_the_public_api_is_importable_from_the_top():
    import flythinker

    for name in flythinker.__all__:
        assert getattr(flythinker, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        flythinker.nothing  # noqa: B018
