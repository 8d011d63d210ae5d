"""Collect finished rows of one task of a `flythinker run` study into one JSON file: each row's
metrics, held-out and validation loss, third-epoch training loss, validation curve, the
held-out loss at its lowest point (rows trained with ``eval_every`` and ``keep_best``) and mean
prediction length; every row minus SFT on the same records (paired-bootstrap 95% intervals,
`flythinker.evaluation.report.paired_rows`) and where its ROUGE-L difference comes from
(precision, recall, length); the curves are drawn next to it (validation_curves.png).

The runner writes its own report only when a whole invocation ends; this reads the row
directories as they finish, so a study that spans sessions can publish each stage.

Usage: python tools/study_rows.py RUN_DIR TASK OUT.json LABEL [LABEL ...]
  e.g. python tools/study_rows.py runs/study-start-at-sft product_review \\
           docs/results/start_at_sft/product_review/results.json sft flythinker-zero-linear-x10
The first row run by the SFT method is the baseline (it must be among the labels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from flythinker.commands.run import read_predictions, validation_curve
from flythinker.evaluation.report import paired_rows, plot_validation_curves

TEXT_METRICS = ("rouge1", "rougeL", "meteor", "bleu")


def third_epoch_loss(log: Path) -> float | None:
    """Mean training loss over the last third of the logged steps (the third of three epochs);
    None for a row without a log (decoded from another run's checkpoint: `checkpoints_from`)."""
    if not log.is_file():
        return None
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines() if line.strip()]
    last = losses[len(losses) * 2 // 3:]
    return sum(last) / len(last) if last else None


def rouge_l_split(references: Sequence[str], baseline: Sequence[str], method: Sequence[str]) -> dict[str, float]:
    """Where a ROUGE-L difference from the baseline comes from: the mean per-record difference
    of ROUGE-L precision, recall and F (the reported metric), of prediction length in words, and
    the correlation of the F and length differences over records. Predictions far shorter than
    their references gain recall, and so F, by being longer; this tells a length effect apart
    from better overlap. Descriptive only (no interval)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)  # as the reported metric
    diffs = []
    for reference, before, after in zip(references, baseline, method, strict=True):
        a = scorer.score(reference, before)["rougeL"]
        b = scorer.score(reference, after)["rougeL"]
        words = len(after.split()) - len(before.split())
        diffs.append((b.precision - a.precision, b.recall - a.recall, b.fmeasure - a.fmeasure, words))
    columns = list(zip(*diffs))
    f, words = columns[2], columns[3]
    spread = statistics.pstdev(f) * statistics.pstdev(words)
    correlation = statistics.correlation(f, words) if spread > 0 else 0.0
    return {"precision": statistics.fmean(columns[0]), "recall": statistics.fmean(columns[1]),
            "f": statistics.fmean(f), "words": statistics.fmean(words), "f_words_correlation": correlation}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the run's directory (its `out`)")
    parser.add_argument("task", help="a LongLaMP task of the run, e.g. product_review")
    parser.add_argument("out", type=Path, help="the JSON file to write (the plot goes beside it)")
    parser.add_argument("labels", nargs="+", help="the rows, by method label; SFT's among them")
    args = parser.parse_args()
    methods, rows, predictions = {}, {}, {}
    for label in args.labels:
        work = args.run_dir / args.task / label
        if not (work / "metrics.json").is_file():
            print(f"study_rows: {work} has no metrics.json (not finished yet?)", file=sys.stderr)
            return 2
        metrics = json.loads((work / "metrics.json").read_text())
        methods[label] = metrics
        predictions[label] = read_predictions(work)
        rows[label] = {
            "metrics": {k: metrics["metrics"][k] for k in TEXT_METRICS},
            "heldout_loss": metrics.get("heldout_loss", {}).get("per_token"),
            "validation_loss": metrics.get("validation_loss", {}).get("per_token"),
            "train_loss_third_epoch_mean": third_epoch_loss(work / "train_log.jsonl"),
            "validation_curve": validation_curve(work / "eval_log.jsonl") or None,
            "heldout_loss_at_best": metrics.get("heldout_loss_at_best", {}).get("per_token"),
            "best_step": metrics.get("heldout_loss_at_best", {}).get("step"),
            "n": metrics["n_samples"],
            "prediction_words": statistics.fmean(len(row.prediction.split()) for row in predictions[label].values()),
        }
    paired = paired_rows({args.task: methods})
    if not paired:
        print("study_rows: no row to compare: the labels need an SFT row and one other", file=sys.stderr)
        return 2
    baseline = paired[0]["baseline"]
    ids = list(predictions[baseline])
    references = [predictions[baseline][i].reference for i in ids]
    texts = {label: [by_id[i].prediction for i in ids] for label, by_id in predictions.items()}
    split = {label: rouge_l_split(references, texts[baseline], texts[label]) for label in rows if label != baseline}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run_dir": str(args.run_dir), "task": args.task, "rows": rows,
                                    "paired_vs_sft": paired, "rouge_l_split_vs_sft": split}, indent=1) + "\n")
    if any(row["validation_curve"] for row in rows.values()):
        curves = {label: {"validation_curve": row["validation_curve"]} for label, row in rows.items()}
        plot_validation_curves({args.task: curves}, args.out.with_name("validation_curves.png"))
        print(f"written: {args.out.with_name('validation_curves.png')}")
    for p in paired:
        print(f"{p['method']:32} {p['metric']:13} {p['difference']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}]")
    for label, d in split.items():
        print(f"{label:32} ROUGE-L minus SFT: precision {d['precision']:+.4f}, recall {d['recall']:+.4f}, "
              f"F {d['f']:+.4f}; {d['words']:+.1f} words; correlation of F and length differences {d['f_words_correlation']:+.2f}")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
