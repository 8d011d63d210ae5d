"""Several processes through the real entry point: `accelerate launch ... -m flythinker train|run`.

On CPU the shipped DDP config runs two processes over gloo, and the DeepSpeed ZeRO-3 config runs
real ZeRO-3 (parameters, gradients and optimizer state partitioned over the two processes) on
DeepSpeed's CPU accelerator. With the same global batch they must reach the weights a single
process reaches: the step plan deals the same examples and the loss is normalised by the labelled
tokens of the whole step, however it is split. FSDP needs GPUs (accelerate enables it only
there); its test runs where a GPU is present and skips cleanly elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import copy_examples

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
# One thread per process: two processes on a small machine stay fast and their floating-point
# reductions do not depend on how many cores the test machine has.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 6


def write_pairs(path: Path, n: int) -> Path:
    path.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "target": e.target}) + "\n"
            for e in copy_examples(n, seed=3)
        )
    )
    return path


def train_args(data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return [
        "-m",
        "flythinker",
        "train",
        "--data",
        str(data),
        "--training.output_dir",
        str(out),
        "--training.batch_size",
        str(batch_size),
        "--training.max_steps",
        str(STEPS),
        "--training.epochs",
        "3",
        "--training.lr",
        "2e-3",
        "--training.warmup_ratio",
        "0.2",
        "--training.mixed_precision",
        "no",
        "--model.reasoner",
        "tiny-small",
        *extra,
    ]


def launch(
    config: str, processes: int, args: list[str], timeout: int = 300
) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    command = [
        accelerate,
        "launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--num_processes",
        str(processes),
        *args,
    ]
    result = subprocess.run(
        command, check=False, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def run_single(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """The same entry point as `launch`, in one plain process: the reference run."""
    result = subprocess.run(
        [sys.executable, *args], check=False, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    found = {}
    for part in ("reasoner", "generator"):
        for name, tensor in load_file(checkpoint / part / "model.safetensors").items():
            found[f"{part}.{name}"] = tensor.float()
    return found


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """2 processes x 2 examples (gloo) vs 1 process x 4, both through `python -m flythinker`.

    16 examples of uneven target lengths, so a per-process mean loss would weigh tokens
    differently and fail this; the step-wide token normalisation makes the split irrelevant.
    """
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    one, two = tmp_path / "one", tmp_path / "two"
    run_single(train_args(data, one, 4))
    launch("ddp.yaml", 2, train_args(data, two, 2))

    before = weights(one / "checkpoint")  # sanity: training moved the weights
    difference = max_difference(weights(one / "checkpoint"), weights(two / "checkpoint"))
    print(f"max weight difference, 2 processes vs 1: {difference:.3g}")
    assert difference < 1e-4
    assert max_difference(before, weights_at_init(tmp_path)) > 1e-3
    log_one, log_two = log(one), log(two)
    assert [r["step"] for r in log_two] == list(range(1, STEPS + 1))
    for a, b in zip(log_one, log_two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["lr"] == pytest.approx(
            b["lr"]
        )  # the scheduler stepped once per step, not per process
    assert (two / "checkpoint" / "run_config.yaml").is_file()


def weights_at_init(tmp_path: Path) -> dict[str, torch.Tensor]:
    from flythinker.model.flythinker import FlyThinker
    from flythinker.model.sources import load_causal_lm

    model = FlyThinker.from_models(load_causal_lm("tiny-small"), load_causal_lm("tiny"), fusion="pad")
    model.save_pretrained(tmp_path / "init")
    return weights(tmp_path / "init")


def test_gradient_accumulation_under_two_processes_matches_one_big_batch(tmp_path):
    """2 processes x 1 example x 2 micro-batches == 1 process x 4 examples, one micro-batch."""
    data = write_pairs(tmp_path / "pairs.jsonl", 12)  # 3 steps per epoch, STEPS spans 2 epochs
    one, two = tmp_path / "one", tmp_path / "two"
    run_single(train_args(data, one, 4))
    launch("ddp.yaml", 2, train_args(data, two, 1, "--training.grad_accum", "2"))
    assert max_difference(weights(one / "checkpoint"), weights(two / "checkpoint")) < 1e-4


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (it is in the test extra)"
)


@needs_deepspeed
def test_zero3_on_two_cpu_processes_matches_one_and_resumes_from_its_shards(tmp_path):
    """ZeRO-3 over 2 CPU processes (gloo) against one plain process with the same global batch;
    then the run resumed from its sharded state at step 3 ends where the whole run ended."""
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    run_single(train_args(data, one, 4))
    args = train_args(data, sharded, 2, "--training.save_every", "3")
    launch("deepspeed_zero3.yaml", 2, args)

    state = sharded / "states" / "step-00000003"
    shards = sorted(p.name for p in (state / "pytorch_model").iterdir())
    assert shards == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    whole = weights(sharded / "checkpoint")
    difference = max_difference(weights(one / "checkpoint"), whole)
    print(f"ZeRO-3, 2 processes vs 1 plain: max weight difference {difference:.3g}")
    assert difference < 1e-4  # fp32 reduce-scatter sums in another order than one process

    shutil.rmtree(sharded / "states" / "step-00000006")
    shutil.rmtree(sharded / "checkpoint")
    launch("deepspeed_zero3.yaml", 2, args)
    assert [r["step"] for r in log(sharded)] == list(range(1, STEPS + 1))
    assert max_difference(whole, weights(sharded / "checkpoint")) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml"])
def test_sharded_engines_on_gpu_match_a_single_process(tmp_path, config):
    """One GPU process under FSDP against the same run without the engine.

    Run on a GPU machine with `pytest -m gpu tests/test_distributed.py`. bf16 is off so the
    comparison is fp32; the saved checkpoint must be the ordinary full-weight directory.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    processes = min(torch.cuda.device_count(), 2)
    data = write_pairs(tmp_path / "pairs.jsonl", 16)
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    run_single(train_args(data, plain, 4))
    launch(
        config,
        processes,
        train_args(
            data,
            sharded,
            4 // processes,
            "--training.gradient_checkpointing",
            "true",
            "--training.save_every",
            "3",
        ),
    )
    difference = max_difference(weights(plain / "checkpoint"), weights(sharded / "checkpoint"))
    print(f"{config}: max weight difference vs one plain process: {difference:.3g}")
    assert difference < 1e-3
    assert sorted(p.name for p in (sharded / "states").iterdir()) == [
        "step-00000003",
        "step-00000006",
    ]


# --------------------------------------------------------------------------- the runner


def run_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "flythinker", "run", "--config", str(ROOT / "configs" / "tiny.yaml"), "--out", str(out), *extra]


def predictions(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: r[k] for k in ("id", "prediction", "reference", "new_tokens")} for r in rows]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory) -> Path:
    """configs/tiny.yaml (every method) in one plain process: what every engine must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_single(run_args(out))
    return out


# Weight tolerances: two processes sum gradients in another order than one batch does. Measured
# under DDP: 1.0e-5 on one CPU model, less on another; a wrong loss normalisation or a missed
# all-reduce moves weights by about the learning rate (3e-3) per step.
@pytest.mark.parametrize(
    ("engine", "tolerance"), [("ddp.yaml", 5e-5), pytest.param("deepspeed_zero3.yaml", 1e-4, marks=needs_deepspeed)]
)
def test_the_runner_under_two_processes_matches_one(tmp_path, single_process_run, engine, tolerance):
    """`accelerate launch -m flythinker run` on configs/tiny.yaml (every method): each trained
    method trains once over both processes, decoding is dealt out batch by batch and gathered;
    predictions, metrics and the quality table equal a single process's with the same global
    batch, and the trained weights agree within the tolerance. Under ZeRO-3 the trained module is
    handed back whole (decoding, held-out loss and Coconut's next curriculum stage all use it)."""
    one, two = single_process_run, tmp_path / "two"
    # tiny.yaml has batch 8 in one process; the launcher config asks for bf16, which fp32 must override.
    launch(engine, 2, run_args(two, "--training.batch_size", "4", "--training.mixed_precision", "no"))
    for method in ("non_personalized", "rag", "sft", "cot", "coconut", "flythinker"):
        a, b = one / "product_review" / method, two / "product_review" / method
        assert predictions(a / "predictions.jsonl") == predictions(b / "predictions.jsonl"), method
        assert not list(b.glob("predictions.part-*")), "part files are gathered and removed"
        metrics_a, metrics_b = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert metrics_a["metrics"] == metrics_b["metrics"], method
        if "heldout_loss" in metrics_a:
            assert metrics_a["heldout_loss"]["per_token"] == pytest.approx(metrics_b["heldout_loss"]["per_token"], rel=1e-4)
    for method in ("sft", "flythinker"):
        a, b = (d / "product_review" / method / "checkpoint" for d in (one, two))
        parts = ("reasoner", "generator") if method == "flythinker" else ("",)
        for part in parts:
            wa, wb = load_file(a / part / "model.safetensors"), load_file(b / part / "model.safetensors")
            assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < tolerance, (method, part)
    table = [line for line in (two / "results.md").read_text().splitlines() if "product_review" not in line]
    assert table[:8] == [line for line in (one / "results.md").read_text().splitlines() if "product_review" not in line][:8]


def test_a_killed_two_process_run_resumes_with_one(tmp_path):
    """Killed during decoding (SIGKILL to the launcher and both workers), then relaunched as a
    single process: the run completes, every record is predicted exactly once, and the file
    equals an uninterrupted run's."""
    slow = ["--methods", json.dumps([{"method": "non_personalized"}]), "--generation.max_new_tokens", "300",
            "--decode_batch_size", "1"]  # tiny.yaml's 6 records, one per batch, long texts
    broken, whole = tmp_path / "broken", tmp_path / "whole"
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    process = subprocess.Popen(
        [accelerate, "launch", "--config_file", str(ACCELERATE_CONFIGS / "ddp.yaml"), "--num_processes", "2",
         *run_args(broken, *slow)],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    work = broken / "product_review" / "non_personalized"
    deadline = time.monotonic() + 240
    while not any(p.stat().st_size for p in work.glob("predictions.part-*.jsonl")):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "decoding never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    parts = sorted(work.glob("predictions.part-*.jsonl"))
    assert parts and not (work / "metrics.json").exists()
    partial = sum(len(p.read_text().splitlines()) for p in parts)

    run_single(run_args(broken, *slow))
    run_single(run_args(whole, *slow))
    resumed = predictions(work / "predictions.jsonl")
    expected = predictions(whole / "product_review" / "non_personalized" / "predictions.jsonl")
    assert 0 < partial < len(expected), f"killed with {partial} of {len(expected)} records decoded"
    assert len({r["id"] for r in resumed}) == len(resumed) == len(expected)
    assert resumed == expected  # every record once, in record order, as an uninterrupted run wrote them
    assert not list(work.glob("predictions.part-*"))

    finished = (work / "predictions.jsonl").read_bytes()
    run_single(run_args(broken, *slow))  # a finished run relaunched does nothing
    assert (work / "predictions.jsonl").read_bytes() == finished


def test_fsdp_on_a_machine_without_a_gpu_is_refused_not_replaced(monkeypatch):
    """accelerate enables FSDP only on accelerator devices: under an FSDP launch on CPUs it
    trains plain DDP without a word (measured); the trainer says so instead of pretending."""
    from flythinker.config import TrainConfig
    from flythinker.errors import FlyThinkerError
    from flythinker.training.engines import make_accelerator

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FlyThinkerError, match="FSDP through `accelerate launch` needs GPUs"):
        make_accelerator(TrainConfig())


def test_a_build_lock_left_by_a_killed_build_is_named_before_deepspeed_waits_on_it(tmp_path, monkeypatch, caplog):
    """torch's JIT build of DeepSpeed's op waits forever on a lock a killed build left (it hung CI):
    an old lock is named with what to do; a fresh one (a build running now) is left alone."""
    import logging

    from flythinker.training import engines

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    left = tmp_path / "deepspeed_shm_comm" / "lock"
    left.parent.mkdir()
    left.touch()
    building = tmp_path / "another_op" / "lock"
    building.parent.mkdir()
    building.touch()
    hour_ago = time.time() - 3600
    os.utime(left, (hour_ago, hour_ago))

    assert engines.stale_build_locks() == [left]
    with caplog.at_level(logging.WARNING, logger=engines.__name__):
        engines.warn_on_stale_build_locks()
    assert str(left) in caplog.text and "Delete it" in caplog.text
    assert str(building) not in caplog.text
