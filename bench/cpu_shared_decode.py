"""Issue 7's CPU target measured with many interleaved repeats: FlyThinker-shared vs SFT, batch 1.

A full `flythinker bench` run times each method a few times; on a shared VM its batch-1 ratio
swings by 0.3 from run to run. This times only the two, alternating, and reports the median of
the per-repeat ratios with its quartiles. Weights are packed as the benchmark packs them.

Usage: python bench/cpu_shared_decode.py [threads=2] [repeats=15]
"""

from __future__ import annotations

import copy
import itertools
import statistics
import sys
import time

import torch

from flythinker.commands.bench import build_lm
from flythinker.model.decoding import generate_plain
from flythinker.model.flythinker import FlyThinker
from flythinker.model.prepack import prepack_linears

NEVER = {"eos_token_id": -1, "pad_token_id": 0}


def per_token(run) -> float:
    stamps: list[float] = []
    run(lambda _: stamps.append(time.perf_counter()))
    return statistics.median(b - a for a, b in itertools.pairwise(stamps))


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    torch.set_num_threads(threads)
    g = build_lm("qwen2.5-0.5b", torch.float32, torch.device("cpu"))
    shared = FlyThinker.shared(copy.deepcopy(g), fusion="pad").eval()
    prepack_linears(shared.generator.get_decoder(), rows=2)
    prepack_linears(shared.generator)
    prepack_linears(g)
    ids = torch.randint(3, g.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def sft(cb):
        return generate_plain(g, ids, max_new_tokens=16, on_token=cb, **NEVER)

    def both_roles(cb):
        return shared.generate(ids, max_new_tokens=16, on_token=cb, **NEVER)

    per_token(sft), per_token(both_roles)  # warm-up
    a, b = [], []
    for _ in range(repeats):
        a.append(per_token(sft))
        b.append(per_token(both_roles))
    ratios = sorted(y / x for x, y in zip(a, b))
    low, _, high = statistics.quantiles(ratios, n=4)
    print(f"threads {threads}, {repeats} interleaved repeats: SFT {statistics.median(a) * 1e3:.1f} ms/token, "
          f"shared {statistics.median(b) * 1e3:.1f} ms/token; per-repeat ratio median "
          f"{statistics.median(ratios):.3f} (quartiles {low:.3f}-{high:.3f})")


if __name__ == "__main__":
    main()
