"""Pool the same rows trained with several seeds: each method minus SFT, averaged over seeds per
record, with a paired-bootstrap 95% interval over records.

One seed's interval says how much a difference depends on which records were drawn; it says
nothing about the training seed. Averaging each record's score over seeds first, then resampling
records, puts both sources of noise into one interval: a difference that holds for one seed only
shrinks towards zero. The runs must hold the same labels, evaluated on the same records.

Usage: python tools/pool_seeds.py TASK OUT.json --runs RUN_DIR [RUN_DIR ...] --labels LABEL [LABEL ...]
  e.g. python tools/pool_seeds.py product_review docs/results/start_at_sft/seeds_pooled/results.json \\
           --runs runs/study-start-at-sft runs/study-seed1 --labels sft flythinker-zero-linear-x10
The first label run by the SFT method is the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from flythinker.evaluation.report import LOSSES, PAIRED, paired_rows


def pooled_row(rows: list[dict]) -> dict:
    """One row whose per-record scores (and summed losses) are the mean over ``rows`` (one per seed)."""
    ids = rows[0]["per_sample"]["id"]
    if any(r["per_sample"]["id"] != ids for r in rows):
        raise ValueError("the seeds' rows were evaluated on different records")
    per_sample = {"id": ids, **{k: [statistics.fmean(v) for v in zip(*(r["per_sample"][k] for r in rows))] for k in PAIRED}}
    pooled = {"method": rows[0]["method"], "per_sample": per_sample,
              "metrics": {k: statistics.fmean(r["metrics"][k] for r in rows) for k in PAIRED}}
    for key in LOSSES:
        if all(key in r for r in rows):
            losses = [r[key]["per_sample"] for r in rows]
            loss_sum = [statistics.fmean(v) for v in zip(*(s["loss_sum"] for s in losses))]
            tokens = losses[0]["tokens"]
            pooled[key] = {"per_token": sum(loss_sum) / sum(tokens),
                           "per_sample": {"id": losses[0]["id"], "loss_sum": loss_sum, "tokens": tokens}}
    return pooled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", help="a LongLaMP task the runs share, e.g. product_review")
    parser.add_argument("out", type=Path, help="the JSON file to write")
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="run directories, one per seed")
    parser.add_argument("--labels", nargs="+", required=True, help="the rows to pool; SFT's among them")
    args = parser.parse_args()
    methods = {}
    for label in args.labels:
        rows = []
        for run in args.runs:
            path = run / args.task / label / "metrics.json"
            if not path.is_file():
                print(f"pool_seeds: {path} is missing (not finished yet?)", file=sys.stderr)
                return 2
            rows.append(json.loads(path.read_text()))
        try:
            methods[label] = pooled_row(rows)
        except ValueError as exc:
            print(f"pool_seeds: {label}: {exc}", file=sys.stderr)
            return 2
    paired = paired_rows({args.task: methods})
    if not paired:
        print("pool_seeds: no row to compare: the labels need an SFT row and one other", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"task": args.task, "runs": [str(r) for r in args.runs],
                                    "paired_vs_sft_pooled_over_seeds": paired}, indent=1) + "\n")
    for p in paired:
        print(f"{p['method']:32} {p['metric']:13} {p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
