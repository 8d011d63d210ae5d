"""What a second row costs a oneDNN pre-packed fp32 GEMM on this CPU, per packing layout.

FlyThinker-shared decodes two rows (generator and reasoner) through the same weights; a
memory-bound step should cost about one row. Times the 48 MLP matrices of the Qwen2.5-0.5B shape
at 1 and 2 rows, for layouts tuned for 1, 2 and 4 rows, and plain `F.linear` for reference.

Usage: python bench/gemm_rows.py [threads=2]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timed(fn, repeats: int = 7) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    torch.set_num_threads(threads)
    weights = [torch.randn(4864, 896) for _ in range(24)] + [torch.randn(896, 4864) for _ in range(24)]
    inputs = {rows: [torch.randn(rows, w.shape[1]) for w in weights] for rows in (1, 2)}
    for layout in (1, 2, 4):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, layout) for w in weights]
        ms = {rows: timed(lambda rows=rows, packed=packed: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                                            for x, p in zip(inputs[rows], packed)]) for rows in (1, 2)}
        print(f"threads {threads}, layout for {layout} row(s): 1 row {ms[1]:.1f} ms, 2 rows {ms[2]:.1f} ms "
              f"({ms[2] / ms[1]:.3f}x)")
    plain = {rows: timed(lambda rows=rows: [F.linear(x, w) for x, w in zip(inputs[rows], weights)]) for rows in (1, 2)}
    print(f"threads {threads}, plain F.linear: 1 row {plain[1]:.1f} ms, 2 rows {plain[2]:.1f} ms ({plain[2] / plain[1]:.3f}x)")


if __name__ == "__main__":
    main()
