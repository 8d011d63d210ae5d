"""Several processes through the real entry point: `accelerate launch ... -m flythinker train`.

On CPU the shipped DDP config runs two processes over gloo. With the same global batch they must
reach the weights a single process reaches: the step plan deals the same examples and the loss
is normalised by the labelled tokens of the whole step, however it is split. FSDP and DeepSpeed
need GPUs; their test runs where a GPU is present and skips cleanly elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
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

    model = FlyThinker.from_models(load_causal_lm("tiny-small"), load_causal_lm("tiny"))
    model.save_pretrained(tmp_path / "init")
    return weights(tmp_path / "init")


def test_gradient_accumulation_under_two_processes_matches_one_big_batch(tmp_path):
    """2 processes x 1 example x 2 micro-batches == 1 process x 4 examples, one micro-batch."""
    data = write_pairs(tmp_path / "pairs.jsonl", 12)  # 3 steps per epoch, STEPS spans 2 epochs
    one, two = tmp_path / "one", tmp_path / "two"
    run_single(train_args(data, one, 4))
    launch("ddp.yaml", 2, train_args(data, two, 1, "--training.grad_accum", "2"))
    assert max_difference(weights(one / "checkpoint"), weights(two / "checkpoint")) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["fsdp.yaml", "deepspeed_zero3.yaml"])
def test_sharded_engines_on_gpu_match_a_single_process(tmp_path, config):
    """One GPU process under FSDP or ZeRO-3 against the same run without the engine.

    Run on a GPU machine with `pytest -m gpu tests/test_distributed.py`. bf16 is off so the
    comparison is fp32; the saved checkpoint must be the ordinary full-weight directory.
    """
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed)")
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
