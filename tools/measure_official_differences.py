"""Measure how flythinker's metrics differ from LongLaMP's `evaluate`-based script.

Usage: .venv/bin/python tools/measure_official_differences.py [DATA_DIR]

DATA_DIR holds LongLaMP files with test splits (default ../shared/data). Predictions are a simple
realistic baseline, the top BM25 profile item's text, so that scores are neither 0 nor 1. Prints
a markdown table for docs/evaluation.md:

- ROUGE: plain mean over samples (ours) vs rouge_score's BootstrapAggregator "mid" (what
  `evaluate.load("rouge")` reports by default), over several numpy seeds;
- METEOR: nltk.word_tokenize tokens (ours, as the script) vs whitespace tokens and vs the
  Treebank tokenizer without Punkt sentence splitting (what one gets with no punkt data);
- empty predictions: kept as zeros (ours) vs dropped (the script), with 10% blanked out.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from nltk.tokenize import NLTKWordTokenizer
from nltk.translate.meteor_score import single_meteor_score
from rouge_score import rouge_scorer, scoring

from flythinker.data.longlamp import AbstractItem, ReviewItem, load_longlamp
from flythinker.data.retrieval import BM25Retriever, retrieve
from flythinker.evaluation.metrics import compute_metrics, load_wordnet, rouge_per_sample

SEEDS = range(5)


def top_item_text(record) -> str:
    item = retrieve(record, BM25Retriever(), 1)[0]
    if isinstance(item, AbstractItem):
        return item.abstract
    if isinstance(item, ReviewItem):
        return item.review_text
    return item.content


def bootstrap_mid(preds, refs, key: str, seed: int) -> float:
    scorer = rouge_scorer.RougeScorer([key], use_stemmer=False)
    np.random.seed(seed)
    aggregator = scoring.BootstrapAggregator()
    for p, r in zip(preds, refs):
        aggregator.add_scores(scorer.score(r, p))
    return aggregator.aggregate()[key].mid.fmeasure


def meteor_with(tokenize, preds, refs) -> float:
    wordnet = load_wordnet().reader
    return float(
        np.mean(
            [
                single_meteor_score(tokenize(r), tokenize(p), wordnet=wordnet)
                for p, r in zip(preds, refs)
            ]
        )
    )


def main(data_dir: Path) -> None:
    treebank = NLTKWordTokenizer()
    print("| task | n | quantity | flythinker | LongLaMP script / variant | difference |")
    print("|---|---|---|---|---|---|")
    for task in ("abstract_generation", "product_review"):
        records = load_longlamp(task, "test", data_dir)
        refs = [r.target for r in records]
        preds = [top_item_text(r) for r in records]
        ours = compute_metrics(preds, refs)
        n = len(records)
        for key in ("rouge1", "rougeL"):
            mids = [bootstrap_mid(preds, refs, key, s) for s in SEEDS]
            diffs = [m - ours[key] for m in mids]
            print(
                f"| {task} | {n} | {key}: mean vs bootstrap mid ({len(SEEDS)} seeds) | {ours[key]:.4f} "
                f"| {min(mids):.4f} to {max(mids):.4f} | {min(diffs):+.4f} to {max(diffs):+.4f} |"
            )
        for name, tokenize in (
            ("whitespace tokens", str.split),
            ("Treebank, no Punkt", treebank.tokenize),
        ):
            other = meteor_with(tokenize, preds, refs)
            print(
                f"| {task} | {n} | METEOR: word_tokenize vs {name} | {ours['meteor']:.4f} | {other:.4f} "
                f"| {other - ours['meteor']:+.4f} |"
            )
        blank = set(range(0, n, 10))  # every tenth prediction empty
        with_empty = ["" if i in blank else p for i, p in enumerate(preds)]
        kept = compute_metrics(with_empty, refs)
        dropped = compute_metrics(
            [p for p in with_empty if p], [r for i, r in enumerate(refs) if i not in blank]
        )
        for key in ("rouge1", "meteor", "bleu"):
            print(
                f"| {task} | {n} ({len(blank)} empty) | {key}: empties kept as 0 vs dropped | {kept[key]:.4f} "
                f"| {dropped[key]:.4f} | {dropped[key] - kept[key]:+.4f} |"
            )
        per_sample = rouge_per_sample(preds, refs)["rouge1"]
        assert abs(np.mean(per_sample) - ours["rouge1"]) < 1e-12


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[2] / "shared" / "data"
    )
