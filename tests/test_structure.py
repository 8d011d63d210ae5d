"""The package reads as the pipeline: no import cycle, and no import that runs back up a layer
(foundation < data < model < training < methods < evaluation < commands; `tools/structure.py`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[1] / "tools" / "structure.py"


def test_no_import_cycle_and_no_import_back_up():
    result = subprocess.run([sys.executable, str(TOOL), "--check"], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import cycles: none" in result.stdout and "imports that run back up: none" in result.stdout


def test_the_check_catches_an_import_that_runs_back_up(tmp_path, monkeypatch):
    sys.path.insert(0, str(TOOL.parent))
    try:
        import structure
    finally:
        sys.path.remove(str(TOOL.parent))
    package = tmp_path / "flythinker"
    for name, text in {"__init__.py": "", "model/__init__.py": "", "commands/__init__.py": "",
                       "commands/cli.py": "from flythinker.model.core import x\n",
                       "model/core.py": "def f():\n    from flythinker.commands.cli import main\nx = 1\n"}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    monkeypatch.setattr(structure, "PACKAGE", package)
    assert structure.main(["--check"]) == 1
