"""Where a batch-1 GPU decode step's time goes: kernels per token and GPU-busy time per token.

If the GPU is busy for much less of a step than the step takes, the step is bound by launching
kernels (host time), not by reading the weights; a CUDA graph then helps and extra kernels (two
models, LoRA layers) cost launches. Wall times here carry the profiler's own overhead; `flythinker
bench` has the clean timings. Each method decodes ``1`` and then ``1 + steps`` tokens under
torch.profiler; per-step figures are the difference divided by ``steps``, so the prefill cancels.

Usage (CUDA machine, nothing downloaded): python bench/kernel_profile.py OUT.json [shape] [reasoner_shape]
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flythinker.commands.bench import build_lm
from flythinker.model.decoding import generate_plain
from flythinker.model.flythinker import FlyThinker

STEPS = 16
PROMPT = 128
NEVER = {"eos_token_id": -1, "pad_token_id": 0}  # no EOS: every call decodes all its tokens


def gpu_work(run, new_tokens: int) -> tuple[int, float, float]:
    """(kernels, GPU-busy ms, wall ms) of one generate call."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run(new_tokens)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return len(kernels), sum(e.device_time_total for e in kernels) / 1e3, wall


def main() -> None:
    out = sys.argv[1]
    shape = sys.argv[2] if len(sys.argv) > 2 else "qwen2.5-3b"
    r_shape = sys.argv[3] if len(sys.argv) > 3 else "qwen2.5-1.5b"
    device, dtype = torch.device("cuda"), torch.bfloat16
    g = build_lm(shape, dtype, device)
    ids = torch.randint(3, g.config.vocab_size, (1, PROMPT), device=device)
    rows = profile_separate(g, build_lm(r_shape, dtype, device, seed=1), ids)
    shared = FlyThinker.shared(g, fusion="pad").eval()  # wraps g's linears in place: after the others
    for graphs in (False, True):
        rows.append(profile_method(
            "flythinker-shared",
            lambda n, graphs=graphs: shared.generate(ids, max_new_tokens=n, cuda_graphs=graphs, **NEVER), graphs))
    with open(out, "w") as f:
        json.dump({"shape": shape, "reasoner_shape": r_shape, "prompt_tokens": PROMPT, "steps": STEPS,
                   "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


def profile_separate(g, r, ids) -> list[dict]:
    """SFT on ``g`` and FlyThinker on ``r`` + ``g``, eager then with graphs."""
    fly = FlyThinker.from_models(r, g, fusion="pad").eval()
    runs = {
        "sft": lambda n, graphs: generate_plain(g, ids, max_new_tokens=n, cuda_graphs=graphs, **NEVER),
        "flythinker": lambda n, graphs: fly.generate(ids, max_new_tokens=n, cuda_graphs=graphs, **NEVER),
    }
    return [profile_method(method, lambda n, run=run, graphs=graphs: run(n, graphs), graphs)
            for graphs in (False, True) for method, run in runs.items()]


def profile_method(method: str, run, graphs: bool) -> dict:
    try:
        return _profile(method, run, graphs)
    except Exception as exc:  # noqa: BLE001 - one method's failure must not lose the others' rows
        row = {"method": method, "steps": "graph" if graphs else "dynamic", "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(row), flush=True)
        return row


def _profile(method: str, run, graphs: bool) -> dict:
    run(STEPS + 1)  # warm-up: allocator, cuBLAS handles, graph pools
    samples = []
    for _ in range(1):  # one sample: the counts are exact, the times only indicative
        one, many = gpu_work(run, 1), gpu_work(run, STEPS + 1)
        samples.append([(b - a) / STEPS for a, b in zip(one, many)])
    kernels, busy, wall = (statistics.median(s[i] for s in samples) for i in range(3))
    row = {"method": method, "steps": "graph" if graphs else "dynamic", "kernels_per_token": round(kernels, 1),
           "gpu_busy_ms_per_token": round(busy, 3), "wall_ms_per_token": round(wall, 3),
           "gpu_busy_fraction": round(busy / wall, 3) if wall else None}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    main()
