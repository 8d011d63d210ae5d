"""Prompts: budgets cut at sentence boundaries, the chat template, LongLaMP's RAG templates."""

from __future__ import annotations

import pytest
from conftest import LONGLAMP_FIXTURES as FIXTURES

from flythinker.data.collate import Example
from flythinker.data.longlamp import load_longlamp
from flythinker.data.prompts import (
    PromptBudgets,
    build_prompt,
    count_tokens,
    profile_user_message,
    rag_user_message,
    records_to_examples,
    render_profile,
    sentence_boundaries,
    truncate_to_tokens,
)
from flythinker.data.retrieval import BM25Retriever, RecencyRetriever
from flythinker.errors import FlyThinkerError
from flythinker.model.sources import load_tokenizer


@pytest.fixture(scope="module")
def abstracts():
    return load_longlamp("abstract_generation", "test", FIXTURES / "abstract_generation.jsonl")


@pytest.fixture(scope="module")
def reviews():
    return load_longlamp("product_review", "test", FIXTURES / "product_review.json")


@pytest.fixture(scope="module")
def topics():
    return load_longlamp("topic_writing", "test", FIXTURES)


def test_sentence_boundaries():
    text = 'One. "Two!" Three? Four\n\nFive (six.) e.g. x'
    ends = [text[:b] for b in sentence_boundaries(text)]
    assert ends == [
        "One.",
        'One. "Two!"',
        'One. "Two!" Three?',
        'One. "Two!" Three? Four',
        'One. "Two!" Three? Four\n\nFive (six.)',
        'One. "Two!" Three? Four\n\nFive (six.) e.g.',
    ]


def test_text_within_budget_is_untouched(tokenizer):
    assert truncate_to_tokens("Short. Text.", tokenizer, 1000) == "Short. Text."


@pytest.mark.parametrize("budget", [30, 80, 120, 200])
def test_truncated_profile_fits_and_ends_at_a_sentence_boundary(tokenizer, abstracts, budget):
    profile = render_profile("abstract_generation", abstracts[0].profile)
    cut = truncate_to_tokens(profile, tokenizer, budget)
    assert count_tokens(tokenizer, profile) > budget
    assert count_tokens(tokenizer, cut) <= budget
    assert profile.startswith(cut)
    assert len(cut) in sentence_boundaries(profile)
    # Maximal: the next boundary would not fit.
    later = [b for b in sentence_boundaries(profile) if b > len(cut)]
    assert not later or count_tokens(tokenizer, profile[: later[0]]) > budget


def test_a_sentence_longer_than_the_budget_is_cut_at_a_word(tokenizer):
    text = "word " * 50 + "end."
    cut = truncate_to_tokens(text, tokenizer, 10)
    assert cut and count_tokens(tokenizer, cut) <= 10 and text.startswith(cut)
    assert cut.split(" ") == ["word"] * len(cut.split(" "))  # whole words only


def test_profile_message_budgets(tokenizer, abstracts):
    record = abstracts[0]
    message = profile_user_message(
        record, tokenizer, PromptBudgets(profile_tokens=80, query_tokens=300)
    )
    profile, query = message.rsplit("\n\n", 1)
    assert query == record.query
    assert count_tokens(tokenizer, profile) <= 80
    assert profile.startswith(
        "Earlier papers written by this author:\n\nTitle: Robust dialogue systems"
    )
    assert profile.endswith(".")
    # A budget with no room past the header leaves the query alone, not a bare header.
    header_tokens = count_tokens(tokenizer, "Earlier papers written by this author:\n\n")
    bare = PromptBudgets(profile_tokens=header_tokens)
    assert profile_user_message(record, tokenizer, bare) == record.query


def test_query_budget(tokenizer, abstracts):
    message = profile_user_message(abstracts[0], tokenizer, PromptBudgets(query_tokens=5))
    query = message.rsplit("\n\n", 1)[1]
    assert count_tokens(tokenizer, query) <= 5 and abstracts[0].query.startswith(query)


def test_profile_prompt_with_chat_template(tokenizer, reviews):
    prompt = build_prompt(reviews[0], tokenizer, "profile")
    assert prompt.startswith(
        "<|im_start|>user\nEarlier reviews written by this user:\n\nRating: 3.0\n"
    )
    assert prompt.endswith(reviews[0].query + "<|im_end|>\n<|im_start|>assistant\n")
    assert "<|im_start|>system" not in prompt  # left to the template (Qwen adds its default)
    with_system = build_prompt(reviews[0], tokenizer, "profile", system_prompt="Be brief.")
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_without_a_chat_template_the_turn_is_plain_text(abstracts):
    tokenizer = load_tokenizer("tiny")
    tokenizer.chat_template = None
    prompt = build_prompt(abstracts[2], tokenizer, "query", system_prompt="Sys.")
    assert prompt == f"Sys.\n\n{abstracts[2].query}\n\n"


def test_retriever_orders_the_profile_so_the_best_items_survive(tokenizer, abstracts):
    record = abstracts[0]
    ranked = profile_user_message(
        record, tokenizer, items=[record.profile[i] for i in RecencyRetriever().rank(record)]
    )
    assert (
        ranked.index("Streaming speech")
        < ranked.index("Parsing with")
        < ranked.index("Robust dialogue")
    )
    prompt = build_prompt(record, tokenizer, "profile", retriever=BM25Retriever(), k=1)
    assert "Streaming speech recognition" in prompt and "Robust dialogue" not in prompt


def test_rag_templates_follow_longlamp(abstracts, reviews, topics):
    a = abstracts[1]
    assert rag_user_message(a, a.profile) == (
        '"We study random graphs and their chromatic number." is the abstract for the title '
        '"Random graphs", and "Greedy algorithms are simple! They are often good enough?" is the '
        'abstract for the title "Greedy algorithms". Use the above abstracts as context to '
        "understand the style and language of the user and, " + a.query
    )
    r = reviews[0]
    assert rag_user_message(r, r.profile[:1]) == (
        '"3.0" is a rating for the product with description "USB cable". "Okay cable" is summary '
        'for "The cable works but it is short." . Following the given patterns ' + r.query
    )
    t = topics[0]
    assert rag_user_message(t, t.profile[1:]) == (
        '"My dog learned a trick" is a summary for "My dog learned to sit after two weeks of '
        'training. Treats helped a lot." . Following the given patterns, ' + t.query
    )
    assert rag_user_message(reviews[1], ()) == reviews[1].query


def test_rag_abstracts_keep_their_first_750_words(abstracts):
    from dataclasses import replace

    record = abstracts[2]
    long_item = replace(record.profile[0], abstract=" ".join(f"w{i}" for i in range(800)))
    message = rag_user_message(record, [long_item])
    assert "w749" in message and "w750" not in message


def test_rag_prompt_uses_bm25_top_k(tokenizer, abstracts):
    prompt = build_prompt(abstracts[0], tokenizer, "rag", k=1)
    assert '"Streaming speech recognition"' in prompt and "Robust dialogue" not in prompt


def test_records_to_examples(tokenizer, abstracts):
    budgets = PromptBudgets(target_tokens=40)
    examples = records_to_examples(abstracts, tokenizer, "profile", budgets=budgets)
    assert all(isinstance(e, Example) for e in examples)
    assert [e.id for e in examples] == ["test-0", "test-1", "test-2"]
    first = examples[0]
    assert count_tokens(tokenizer, first.target) <= 40 and abstracts[0].target.startswith(
        first.target
    )
    assert first.target == "We present a decoder for speech recognition that halves latency."
    full = records_to_examples(
        abstracts, tokenizer, "query", budgets=budgets, truncate_target=False
    )
    assert full[0].target == abstracts[0].target
    assert (
        full[0].prompt
        == f"<|im_start|>user\n{abstracts[0].query}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_style_and_budgets(tokenizer, abstracts):
    with pytest.raises(FlyThinkerError, match="unknown prompt style"):
        build_prompt(abstracts[0], tokenizer, "cot")  # type: ignore[arg-type]
    with pytest.raises(FlyThinkerError, match="profile_tokens must be at least 1"):
        PromptBudgets(profile_tokens=0)
