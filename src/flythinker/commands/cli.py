"""The `flythinker` command: typed functions as subcommands, their docstrings as `--help`.

Each subcommand is a plain function elsewhere in the package; this file only parses and reports.
Bad input (`FlyThinkerError`, or an option the parser rejects) is printed as one line with a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import inspect
import os
import sys
from argparse import ArgumentError
from collections.abc import Callable

from flythinker.errors import FlyThinkerError

# The first line of each command's docstring, for `flythinker --help` without importing torch
# (seconds on a small machine); a test keeps them equal to the docstrings.
SUMMARIES = {
    "bench": "Time SFT, FlyThinker and FlyThinker-shared side by side, as ratios to SFT.",
    "train": "Train a FlyThinker model (reasoner + generator, jointly) on prompt/target pairs.",
    "evaluate": "Score predictions with LongLaMP's metrics, whole text and per position span.",
    "run": "Run a comparison: train what needs training, decode, evaluate, write tables and plots.",
    "demo": "Train SFT and FlyThinker briefly on a real 135M model, generate for held-out users, evaluate.",
    "diagnose": "Measure, before training, why a reasoner's vectors disturb a generator (see docs/method.md).",
    "write": "Write one text in a user's voice with a trained FlyThinker checkpoint, streamed to the terminal.",
    "serve": "Serve a checkpoint over OpenAI's HTTP API, with a web page that streams its text and reasoning lens.",
}


def top_level_help() -> str:
    width = max(map(len, SUMMARIES))
    lines = [f"usage: flythinker [--version] {{{','.join(SUMMARIES)}}} ...", "",
             "Think-while-generating personalized long-form generation (FlyThinker, arXiv 2512.06690).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, summary in SUMMARIES.items()]
    lines += ["", "`flythinker COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def _commands() -> dict[str, Callable]:
    # Imported here so `flythinker --help` does not pay for torch until a command runs.
    from flythinker.commands.bench import bench_command
    from flythinker.commands.demo import demo_command
    from flythinker.commands.run import run_command
    from flythinker.commands.serve import serve_command
    from flythinker.commands.write import write_command
    from flythinker.evaluation.diagnose import diagnose_command
    from flythinker.evaluation.metrics import evaluate_command
    from flythinker.training.train import train_command

    return {
        "bench": bench_command,
        "train": train_command,
        "evaluate": evaluate_command,
        "run": run_command,
        "demo": demo_command,
        "diagnose": diagnose_command,
        "write": write_command,
        "serve": serve_command,
    }


def normalize_args(argv: list[str], commands: dict[str, Callable]) -> list[str]:
    """Accept ``--show-reasoning`` for ``--show_reasoning`` and a bare ``--quick`` for ``--quick true``.

    jsonargparse names options after Python parameters and wants a value for every bool; people
    type dashes and bare flags.
    """
    command = next((a for a in argv if a in commands), None)
    flags = set()
    if command is not None:
        flags = {
            name for name, p in inspect.signature(commands[command]).parameters.items()
            if p.annotation in (bool, "bool")
        }
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            name = name.replace("-", "_")
            arg = "--" + name + eq + value
            if name in flags and not eq and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out += [arg, "true"]
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import auto_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv in ([], ["-h"], ["--help"]):
        print(top_level_help())
        return 0
    if argv in (["--version"], ["-V"]):
        from importlib.metadata import version

        print(f"flythinker {version('flythinker')}")
        return 0
    commands = _commands()
    argv = normalize_args(argv, commands)
    if not os.environ.get("FLYTHINKER_VERBOSE"):
        # Weight loading and shard writing draw a bar per model: noise in a run's log. Our own
        # bars (training, decoding) stay.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        # exit_on_error=False: a bad option raises instead of printing the whole usage block, so
        # it gets the same one line as any other bad input.
        auto_cli(commands, args=argv, as_positional=False, exit_on_error=False, prog="flythinker")
    except (FlyThinkerError, ArgumentError) as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"flythinker: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flythinker: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
