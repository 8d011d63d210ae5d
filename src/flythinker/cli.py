"""The `flythinker` command: typed functions as subcommands, their docstrings as `--help`.

Each subcommand is a plain function elsewhere in the package; this file only parses and reports.
Bad input (`FlyThinkerError`) is printed as one line with a non-zero exit; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flythinker.errors import FlyThinkerError


def _commands() -> dict[str, Callable]:
    # Imported here so `flythinker --help` does not pay for torch until a command runs.
    from flythinker.train import train_command

    return {
        "train": train_command,
    }


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    try:
        auto_cli(_commands(), args=argv, as_positional=False)
    except FlyThinkerError as exc:
        print(f"flythinker: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flythinker: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
