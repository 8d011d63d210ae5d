"""How sure each trained row of a run is of the reference tokens, teacher-forced on the evaluated
records: per target token, the mean loss (NLL), the entropy of the next-token distribution, the
probability of the model's top choice, and how often that top choice is the reference token.

A row can have a higher loss than SFT and still overlap the references more under greedy decoding
if it is more peaked: right more often at the top, with less probability left for the reference
when it is wrong. These four numbers tell that apart from a plainly worse model.

Usage: python tools/target_calibration.py RUN_DIR TASK LABEL [LABEL ...] [--limit N] [--out OUT.json]
  e.g. python tools/target_calibration.py runs/study-seed1 product_review sft flythinker-zero-linear-x10
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from flythinker.commands.run import TaskConfig, load_split
from flythinker.config import TrainConfig
from flythinker.data.collate import collate
from flythinker.data.prompts import PromptBudgets
from flythinker.methods import MethodConfig, RunContext, make_method
from flythinker.model.decoding import position_ids_from_mask


@torch.no_grad()
def calibration(model: torch.nn.Module, encoded: list, pad_token_id: int, batch_size: int) -> dict[str, float]:
    """Means over every labelled target token of ``encoded`` (see the module's docstring)."""
    sums = {"nll": 0.0, "entropy": 0.0, "top_probability": 0.0, "top_is_reference": 0.0}
    tokens = 0
    for start in range(0, len(encoded), batch_size):
        batch = collate(encoded[start : start + batch_size], pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"])).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        log_p = torch.log_softmax(logits[mask], dim=-1)
        reference = labels[mask]
        top_log_p, top = log_p.max(dim=-1)
        sums["nll"] += float(-log_p.gather(1, reference[:, None]).sum())
        sums["entropy"] += float(-(log_p.exp() * log_p).sum())
        sums["top_probability"] += float(top_log_p.exp().sum())
        sums["top_is_reference"] += float((top == reference).sum())
        tokens += int(mask.sum())
    return {**{k: v / tokens for k, v in sums.items()}, "tokens": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's directory (its `out`)")
    parser.add_argument("task", help="a LongLaMP task of the run, e.g. product_review")
    parser.add_argument("labels", nargs="+", help="the trained rows, by method label")
    parser.add_argument("--limit", type=int, default=0, help="the first N evaluated records (0: all)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args()
    run = yaml.safe_load((args.run_dir / "run_config.yaml").read_text())
    task = TaskConfig(**next(t for t in run["tasks"] if t["task"] == args.task))
    records = load_split(task, task.eval_split, args.limit or task.eval_limit)
    training, budgets = TrainConfig(**run["training"]), PromptBudgets(**run["budgets"])
    rows = {m.get("label") or m["method"]: m for m in run["methods"]}
    figures = {}
    for label in args.labels:
        work = args.run_dir / args.task / label
        if label not in rows or not (work / "checkpoint").is_dir():
            print(f"target_calibration: {work} holds no trained checkpoint", file=sys.stderr)
            return 2
        context = RunContext(task=args.task, budgets=budgets, dtype=run["dtype"], work_dir=work, seed=run["seed"])
        method = make_method(MethodConfig(**rows[label]), context)
        method.build(work / "checkpoint")
        encoded = list(method.encoded_targets(records, training).values())
        figures[label] = calibration(method.model().eval(), encoded, method.pad_token_id, run["decode_batch_size"])
        f = figures[label]
        print(f"{label:32} loss {f['nll']:.4f}  entropy {f['entropy']:.4f}  top-1 probability "
              f"{f['top_probability']:.4f}  top-1 is the reference {f['top_is_reference']:.4f}  ({f['tokens']} tokens)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "task": args.task, "records": len(records),
                                        "rows": figures}, indent=1) + "\n")
        print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
