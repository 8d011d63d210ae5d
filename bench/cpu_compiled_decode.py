"""Compiled decode steps on a CPU: static-cache steps eager vs through torch.compile, batch 1.

Times SFT, FlyThinker (a separate reasoner of the generator's shape) and FlyThinker-shared
(adapters on every linear layer) in three step modes: growing caches ("dynamic"), static caches
run eagerly ("static") and static caches through torch.compile ("compiled", inductor CPU). Every
model decodes the same random prompt; repeats are interleaved over all (model, mode) pairs so
drifting load hits each alike; per-token latency is the median interval between consecutive
tokens of a run, and each figure the median over repeats. The warm-up run's length is reported
as ``first_call_s``: for compiled steps it is the compilation. Weights are plain fp32: compile
refuses the oneDNN pre-packed weights `flythinker bench` uses on CPUs (inductor cannot lower them).

Usage: python bench/cpu_compiled_decode.py [--shape qwen2.5-0.5b] [--threads 2] [--repeats 5]
           [--json bench/results/cpu_compiled_decode.json]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from flythinker.commands.bench import build_lm
from flythinker.config import GenerationConfig
from flythinker.model.decoding import CausalLMDecoder, decode
from flythinker.model.flythinker import FlyThinker

NEVER = {"eos_token_id": -1, "pad_token_id": 0}
MODES = {"dynamic": ("dynamic", False), "static": ("static", False), "compiled": ("static", True)}


def per_token(decoder_for, ids, new_tokens: int) -> tuple[float, float]:
    """(median seconds between tokens, seconds for the whole call) of one decode."""
    stamps: list[float] = []
    start = time.perf_counter()
    with torch.no_grad():
        decode(decoder_for(), ids, None, GenerationConfig(max_new_tokens=new_tokens),
               on_token=lambda _: stamps.append(time.perf_counter()), **NEVER)
    return statistics.median(b - a for a, b in itertools.pairwise(stamps)), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b", help="a `flythinker bench` shape (random weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="write settings and results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = build_lm(args.shape, torch.float32, torch.device("cpu"))
    fly = FlyThinker.from_models(copy.deepcopy(g), copy.deepcopy(g), fusion="pad").eval()
    shared = FlyThinker.shared(copy.deepcopy(g), fusion="pad").eval()
    ids = torch.randint(3, g.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    makers = {
        "sft": lambda steps, compiled: lambda: CausalLMDecoder(g.eval(), steps, compiled),
        "flythinker": lambda steps, compiled: lambda: fly.step_decoder("none", steps, compiled),
        "shared": lambda steps, compiled: lambda: shared.step_decoder("none", steps, compiled),
    }
    runs = {(method, mode): make(*MODES[mode]) for method, make in makers.items() for mode in MODES}
    first_call = {}
    for key, decoder_for in runs.items():  # warm-up: compiles the compiled modes
        first_call[key] = per_token(decoder_for, ids, args.new_tokens)[1]
        print(f"warm-up {key}: {first_call[key]:.1f} s", flush=True)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.repeats):
        for key, decoder_for in runs.items():
            times[key].append(per_token(decoder_for, ids, args.new_tokens)[0])
    results = []
    for (method, mode), values in times.items():
        ms = statistics.median(values) * 1e3
        sft_ms = statistics.median(times[("sft", mode)]) * 1e3
        eager_ms = statistics.median(times[(method, "static")]) * 1e3
        results.append({"method": method, "steps": mode, "ms_per_token": round(ms, 2),
                        "ratio_to_sft_same_steps": round(ms / sft_ms, 3),
                        "ratio_to_own_static_eager": round(ms / eager_ms, 3),
                        "first_call_s": round(first_call[(method, mode)], 1)})
        print(f"{method:11s} {mode:9s} {ms:8.1f} ms/token  x SFT {ms / sft_ms:.3f}  x eager static {ms / eager_ms:.3f}  "
              f"first call {first_call[(method, mode)]:.1f} s")
    if args.json:
        payload = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                               "torch": torch.__version__},
                   "settings": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
