"""Resumable training: a run killed with SIGKILL and restarted ends where an unbroken run ends.

States are saved every few steps under ``<output_dir>/states``; rerunning the same command
resumes from the newest complete one (resume is the default), skipping exactly the examples
already trained on, so the weights and the loss curve equal those of a run never interrupted.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_distributed import ENV, log, max_difference, weights, write_pairs

from flythinker.commands.cli import main

STATE_EVERY = 3
KILL_AFTER = "step-00000006"


def args(data: Path, out: Path, *extra: str) -> list[str]:
    # 24 examples, batch 4, 10 epochs: 60 steps. The kill lands once step 6 is saved, leaving
    # some 50 steps still to run, so the process is always killed mid-run.
    return [
        "train",
        "--data",
        str(data),
        "--training.output_dir",
        str(out),
        "--training.batch_size",
        "4",
        "--training.epochs",
        "10",
        "--training.lr",
        "2e-3",
        "--training.warmup_ratio",
        "0.1",
        "--training.save_every",
        str(STATE_EVERY),
        "--training.keep_last",
        "2",
        "--training.mixed_precision",
        "no",
        *extra,
    ]


def run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "flythinker", *arguments],
        check=False,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def states(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "states").iterdir())


def comparable(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r["epoch"], r["loss"], r["lr"], r["grad_norm"]) for r in rows]


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", 24)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_cli(args(data, whole))

    process = subprocess.Popen(
        [sys.executable, "-m", "flythinker", *args(data, broken)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    marker = broken / "states" / KILL_AFTER
    while not marker.exists() and process.poll() is None:
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (broken / "checkpoint").exists()
    killed_at = len(log(broken))

    resumed = run_cli(args(data, broken))
    newest = states(broken)[-1] if states(broken) else None
    assert "resumed from the state at step" in resumed.stdout, resumed.stdout
    difference = max_difference(weights(whole / "checkpoint"), weights(broken / "checkpoint"))
    print(
        f"killed after {killed_at} logged steps; max weight difference vs uninterrupted: {difference:.3g}"
    )
    assert difference <= 1e-6
    assert len(log(broken)) == len(log(whole)) == 60
    for resumed_row, whole_row in zip(comparable(log(broken)), comparable(log(whole))):
        assert resumed_row == pytest.approx(whole_row, abs=1e-6)
    assert states(broken) == states(whole) == ["step-00000057", "step-00000060"] and newest


def test_keeps_the_last_states_and_ignores_a_torn_save(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    common = args(data, out, "--training.max_steps", "8", "--training.save_every", "2")
    assert main(common) == 0
    assert states(out) == ["step-00000006", "step-00000008"]
    manifest = json.loads((out / "states" / "step-00000008" / "trainer_state.json").read_text())
    assert manifest["step"] == 8 and len(manifest["losses"]) == 8 and manifest["files"]

    # What a kill during a save leaves: a partial directory and a torn last line in the log.
    (out / "states" / ".step-00000010.partial").mkdir()
    (out / "states" / ".step-00000010.partial" / "optimizer.bin").write_bytes(b"\0" * 10)
    with (out / "train_log.jsonl").open("a") as f:
        f.write('{"step": 9, "lo')
    before = load_file(out / "checkpoint" / "generator" / "model.safetensors")
    assert main(common) == 0  # resumes at step 8 of 8: nothing left to train, the export is redone
    assert "resumed from the state at step 8" in capsys.readouterr().out
    assert [r["step"] for r in log(out)] == list(range(1, 9))
    after = load_file(out / "checkpoint" / "generator" / "model.safetensors")
    assert all((before[k] == after[k]).all() for k in before)


def test_resumed_with_another_split_of_the_same_step_ends_at_the_same_weights(tmp_path, capsys):
    """batch_size and grad_accum may change on resume when their product does: 3 steps of 2x2,
    then 3 of 1x4, equal 6 of 2x2. A restored micro-batch count (6, not a multiple of 4) would
    sync half-way through the first resumed step."""
    data = write_pairs(tmp_path / "pairs.jsonl", 12)
    out = tmp_path / "run"
    common = ("--training.max_steps", "6", "--training.save_every", "3", "--training.keep_last", "3")
    assert main(args(data, out, *common, "--training.batch_size", "2", "--training.grad_accum", "2")) == 0
    whole = weights(out / "checkpoint")
    shutil.rmtree(out / "states" / "step-00000006")
    shutil.rmtree(out / "checkpoint")
    capsys.readouterr()
    assert main(args(data, out, *common, "--training.batch_size", "1", "--training.grad_accum", "4")) == 0
    assert "resumed from the state at step 3" in capsys.readouterr().out
    assert [r["step"] for r in log(out)] == list(range(1, 7))
    assert max_difference(whole, weights(out / "checkpoint")) <= 1e-5


def test_resume_false_starts_over(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    assert main(args(data, out, "--training.max_steps", "4", "--training.save_every", "2")) == 0
    assert (
        main(
            args(
                data,
                out,
                "--training.max_steps",
                "2",
                "--training.save_every",
                "2",
                "--training.resume",
                "false",
            )
        )
        == 0
    )
    assert "resumed" not in capsys.readouterr().out
    assert states(out) == ["step-00000002"]
    assert [r["step"] for r in log(out)] == [1, 2]


def test_resume_refuses_other_settings_and_keeps_the_run(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    assert main(args(data, out, "--training.max_steps", "4", "--training.save_every", "2")) == 0
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(
        args(
            data,
            out,
            "--training.max_steps",
            "4",
            "--training.save_every",
            "2",
            "--training.lr",
            "1e-3",
        )
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "holds a run with other data or settings (settings.lr: 0.002 -> 0.001)" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot


def test_state_plan_is_a_function_of_the_step():
    from flythinker.training.steps import StepPlan

    plan = StepPlan(
        examples=10, batch_size=2, processes=2, grad_accum=2, epochs=2, max_steps=0, seed=0
    )
    assert plan.global_batch == 8 and plan.steps_per_epoch == 2 and plan.total_steps == 4
    first_epoch = plan.step_examples(0) + plan.step_examples(1)
    assert sorted(first_epoch) == list(range(10))  # every example once per epoch
    assert plan.step_examples(2) != plan.step_examples(0)  # a new order each epoch
    # The short last step (2 examples) still gives each process grad_accum micro-batches.
    short = [plan.micro_batches(1, p) for p in range(2)]
    assert [len(m) for m in short] == [2, 2]
    assert sorted(i for p in short for m in p for i in m) == sorted(plan.step_examples(1))
