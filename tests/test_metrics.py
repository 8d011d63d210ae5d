"""Metric values on hand-checkable pairs, equality with the official settings, position spans."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flythinker.errors import FlyThinkerError
from flythinker.evaluation import metrics as evaluate
from flythinker.evaluation.metrics import (
    compute_metrics,
    corpus_bleu,
    load_wordnet,
    meteor_per_sample,
    rouge_per_sample,
    span_metrics,
    split_spans,
    word_tokenize,
)

# Realistic-ish pairs for the equality and aggregation checks.
PAIRS = [
    (
        "We propose a fast decoder for speech recognition. It halves latency.",
        "We present a decoder for speech recognition that halves latency on two corpora.",
    ),
    (
        "The phone charger broke after one month and got very hot.",
        "The charger stopped working after a month. It also got very hot while charging.",
    ),
    (
        "Our cat hid under the bed for a week before she trusted us.",
        "We adopted a cat last spring. She hid under the bed for a week.",
    ),
    (
        "Graph coloring heuristics are compared on random graphs.",
        "We compare five greedy heuristics for graph coloring on random graphs.",
    ),
    ("A lamp.", "Bright, warm light and a sturdy base. Perfect for reading at night."),
]


def test_identical_texts_score_perfectly():
    text = "the quick brown fox jumps over the lazy dog near the quiet river bank today"
    scores = compute_metrics([text], [text])
    assert scores["rouge1"] == scores["rougeL"] == 1.0
    assert scores["bleu"] == pytest.approx(100.0)
    # METEOR's fragmentation penalty never quite vanishes: 0.5 * (1 chunk / 15 matches)^3.
    assert scores["meteor"] == pytest.approx(1 - 0.5 / 15**3, abs=1e-3)


def test_disjoint_texts_score_zero():
    scores = compute_metrics(["alpha beta gamma delta"], ["epsilon zeta eta theta"])
    assert scores == {"rouge1": 0.0, "rougeL": 0.0, "meteor": 0.0, "bleu": 0.0}


def test_short_pair_worked_by_hand():
    # prediction "the cat sat on the mat", reference "the cat is on the mat" (6 tokens each).
    # ROUGE-1: shared unigrams the x2, cat, on, mat = 5; P = R = 5/6, so F = 5/6.
    # ROUGE-L: the LCS "the cat on the mat" has 5 tokens, so F = 5/6 as well.
    # BLEU: n-gram precisions 5/6, 3/5 (the cat, on the, the mat), 1/4 (on the mat) and 0/3;
    # sacrebleu's "exp" smoothing turns the zero 4-gram count into 1/(2*3). Equal lengths, so no
    # brevity penalty: 100 * (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = 37.99.
    scores = compute_metrics(["the cat sat on the mat"], ["the cat is on the mat"])
    assert scores["rouge1"] == pytest.approx(5 / 6)
    assert scores["rougeL"] == pytest.approx(5 / 6)
    assert scores["bleu"] == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25)
    assert scores["bleu"] == pytest.approx(37.99, abs=0.01)


class _NoSynonyms:
    """A WordNet stand-in that knows no synonyms: METEOR with exact and stem matches only."""

    def synsets(self, *args, **kwargs):
        return []


def test_meteor_uses_wordnet_synonyms():
    from nltk.translate.meteor_score import single_meteor_score

    reference, prediction = "the automobile is quick", "the car is fast"
    with_wordnet = meteor_per_sample([prediction], [reference])[0]
    exact_only = single_meteor_score(
        word_tokenize(reference), word_tokenize(prediction), wordnet=_NoSynonyms()
    )
    assert exact_only == pytest.approx(0.25)  # "the" and "is" only
    assert with_wordnet > exact_only + 0.3  # car~automobile and fast~quick are WordNet synonyms
    wordnet = load_wordnet()
    assert wordnet.version == "3.0"
    assert wordnet.reader.synsets("car")[0].lexname() == "noun.artifact"  # lexnames table intact


def test_empty_predictions_count_as_zero():
    scores = compute_metrics(["", "the cat sat"], ["a dog ran", "the cat sat"])
    assert scores["rouge1"] == pytest.approx(0.5)
    assert meteor_per_sample(["  "], ["a dog ran"]) == [0.0]
    assert scores["bleu"] < 100.0  # the empty hypothesis stays in the corpus (brevity penalty)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(FlyThinkerError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(FlyThinkerError, match="no predictions"):
        compute_metrics([], [])


# --------------------------------------------------------------------------- official settings


def test_rouge_is_rouge_score_without_stemmer_mean_over_samples():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    preds, refs = zip(*PAIRS)
    expected = [scorer.score(r, p) for p, r in PAIRS]
    ours = rouge_per_sample(preds, refs)
    assert ours["rouge1"] == [s["rouge1"].fmeasure for s in expected]
    assert compute_metrics(preds, refs)["rougeL"] == pytest.approx(
        np.mean([s["rougeL"].fmeasure for s in expected])
    )


def test_bootstrap_mid_of_the_official_script_is_close_to_the_mean():
    """LongLaMP's `evaluate` ROUGE reports BootstrapAggregator's mid; we report the plain mean."""
    from rouge_score import rouge_scorer, scoring

    scorer = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    preds, refs = zip(*(PAIRS * 8))
    np.random.seed(0)  # the aggregator resamples with numpy's global generator
    aggregator = scoring.BootstrapAggregator()
    for p, r in zip(preds, refs):
        aggregator.add_scores(scorer.score(r, p))
    mid = aggregator.aggregate()["rouge1"].mid.fmeasure
    mean = compute_metrics(preds, refs)["rouge1"]
    assert abs(mid - mean) < 0.01


def test_meteor_equals_nltk_on_word_tokenize_tokens():
    from nltk.translate.meteor_score import single_meteor_score

    wordnet = load_wordnet().reader
    preds, refs = zip(*PAIRS)
    expected = [
        single_meteor_score(
            word_tokenize(r), word_tokenize(p), alpha=0.9, beta=3.0, gamma=0.5, wordnet=wordnet
        )
        for p, r in PAIRS
    ]
    assert meteor_per_sample(preds, refs) == expected


def test_word_tokenize_matches_nltk():
    # Punkt keeps known abbreviations ("Dr.", "p.m.") whole and splits sentences; the Treebank
    # tokenizer then splits contractions and each sentence's final period.
    assert word_tokenize("Dr. Smith went home. He wasn't tired at 5 p.m. today.") == [
        "Dr.",
        "Smith",
        "went",
        "home",
        ".",
        "He",
        "was",
        "n't",
        "tired",
        "at",
        "5",
        "p.m.",
        "today",
        ".",
    ]
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        pytest.skip("NLTK's own punkt_tab data is not installed to compare against")
    for _, reference in PAIRS:
        assert word_tokenize(reference) == nltk.word_tokenize(reference)


def test_bleu_is_sacrebleu_corpus_default():
    import sacrebleu

    preds, refs = zip(*PAIRS)
    assert corpus_bleu(preds, refs) == sacrebleu.corpus_bleu(list(preds), [list(refs)]).score
    signature = evaluate.metric_settings()["bleu"]["signature"]
    assert "tok:13a" in signature and "smooth:exp" in signature and "case:mixed" in signature


def test_missing_wordnet_is_a_clear_error(monkeypatch, tmp_path):
    import nltk

    try:
        nltk.data.find("corpora/wordnet")
        pytest.skip("NLTK's WordNet data is installed; it would be found first")
    except LookupError:
        pass
    monkeypatch.delenv(evaluate.WORDNET_ENV, raising=False)
    monkeypatch.setattr(evaluate, "DEBIAN_WORDNET", tmp_path)
    evaluate.load_wordnet.cache_clear()
    try:
        with pytest.raises(
            FlyThinkerError, match="apt-get install --no-install-recommends wordnet-base"
        ):
            evaluate.load_wordnet()
        monkeypatch.setenv(evaluate.WORDNET_ENV, str(tmp_path))
        with pytest.raises(FlyThinkerError, match="no WordNet database"):
            evaluate.load_wordnet()
    finally:
        evaluate.load_wordnet.cache_clear()


# --------------------------------------------------------------------------- spans


def test_split_spans():
    assert split_spans("a b  c\nd e", 2) == ["a b", "c d", "e"]
    assert split_spans("", 100) == []
    assert split_spans(" ".join(map(str, range(250))), 100)[2] == " ".join(
        map(str, range(200, 250))
    )
    with pytest.raises(FlyThinkerError, match="span_tokens must be at least 1"):
        split_spans("a", 0)


def test_span_metrics_score_aligned_spans_and_count_samples():
    long = " ".join(f"w{i}" for i in range(25))
    predictions = [long, "w0 w1 w2", long]
    references = [long, "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11", "x " * 12]
    rows = span_metrics(predictions, references, span_tokens=10)
    assert [r["tokens"] for r in rows] == [[0, 10], [10, 20], [20, 30]]
    assert [r["n_predictions"] for r in rows] == [3, 2, 2]
    assert [r["n_references"] for r in rows] == [3, 3, 1]
    assert [r["n"] for r in rows] == [3, 2, 1]
    # Span 2 (tokens 20-30) is scored on the first sample only, an identical pair.
    assert rows[2]["rouge1"] == 1.0 and rows[2]["bleu"] == pytest.approx(100.0)
    # Span 1: sample 0 identical (1.0), sample 2 disjoint (0.0).
    assert rows[1]["rouge1"] == pytest.approx(0.5)
    assert math.isclose(rows[0]["rouge1"], (1.0 + 2 * 3 / 13 + 0.0) / 3)
