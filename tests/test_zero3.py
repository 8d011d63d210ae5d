"""A real DeepSpeed ZeRO-3 run on CPU (tools/zero3_norm_check.py): the rescale norm on every call path.

deepspeed is in the test extra; without it (a bare install) this test is skipped and the
simulated released parameter in test_fusion.py covers the error path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "zero3_norm_check.py"


def test_rescale_norm_is_the_full_tables_on_every_zero3_call_path():
    # Its own process: DeepSpeed sets up a process group and environment this suite must not keep.
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    report = json.loads(done.stdout[done.stdout.index("{"):])
    assert report["placeholder_numel_outside_forward"] == 0  # the engine really did shard the table
    assert all(report["passed"].values()), report["passed"]
    assert done.returncode == 0
