"""Prompts for LongLaMP records, in the three forms the methods use.

- ``profile`` (FlyThinker, SFT, CoT, Coconut): the user's profile rendered as text, then the query,
  as the published FlyThinker code builds it, with its token budgets: profile <= 1250,
  query <= 300 and target <= 1000 tokens, each cut at a sentence boundary (dropping trailing
  sentences) and counted by the model's own tokenizer.
- ``rag``: LongLaMP's per-task templates around the k profile items a retriever picks.
- ``query``: the query alone, the non-personalized baseline.

Each is one user turn. When the tokenizer has a chat template the turn goes through it with the
generation prompt added; with no ``system_prompt`` none is passed, so Qwen2.5's template inserts
its own default system message, which is exactly the one the published code sets. A tokenizer
without a template gets the plain text followed by a blank line.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from transformers import PreTrainedTokenizerBase

from flythinker.data.collate import Example, encode_prompts
from flythinker.data.longlamp import (
    AbstractItem,
    LongLaMPRecord,
    ProfileItem,
    ReviewItem,
    TopicItem,
)
from flythinker.data.retrieval import BM25Retriever, Retriever, retrieve
from flythinker.errors import FlyThinkerError

if TYPE_CHECKING:
    import torch

PromptStyle = Literal["profile", "rag", "query"]
STYLES: tuple[str, ...] = ("profile", "rag", "query")
DEFAULT_RAG_K = 4


@dataclass(frozen=True)
class PromptBudgets:
    """Token budgets of the profile form (published FlyThinker values by default)."""

    profile_tokens: int = 1250
    query_tokens: int = 300
    target_tokens: int = 1000

    def __post_init__(self) -> None:
        for name in ("profile_tokens", "query_tokens", "target_tokens"):
            if getattr(self, name) < 1:
                raise FlyThinkerError(f"prompt budget {name} must be at least 1")

    @property
    def prompt_tokens(self) -> int:
        """Cap on a whole rendered prompt: profile + query + room for the template's own text
        (system message, headers). It only guards against runaway inputs; the budgets above
        already bound what goes in."""
        return self.profile_tokens + self.query_tokens + 256


# --------------------------------------------------------------------------- truncation

# A sentence ends at . ! or ? (plus any closing quotes or brackets) followed by whitespace or the
# end of the text; a blank line (between profile items) is a boundary too.
_SENTENCE_END = re.compile(r"[.!?][\"'\u201d\u2019)\]]*(?=\s|$)")
_PARAGRAPH = re.compile(r"\n\s*\n")
_WORD = re.compile(r"\S+")


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sentence_boundaries(text: str) -> list[int]:
    """Offsets where ``text[:offset]`` ends a sentence or a paragraph, ascending."""
    ends = {m.end() for m in _SENTENCE_END.finditer(text)}
    ends |= {m.start() for m in _PARAGRAPH.finditer(text)}
    return sorted(e for e in ends if text[:e].strip())


def _longest_fitting_prefix(
    text: str, ends: list[int], tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> str:
    """The longest ``text[:end]`` (``end`` from ascending ``ends``) within ``max_tokens``."""
    lo, hi = 0, len(ends)  # ends[:lo] fit: binary search on the prefix's token count
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(tokenizer, text[: ends[mid]]) <= max_tokens:
            lo = mid + 1
        else:
            hi = mid
    # Token counts of prefixes are monotone for BPE in practice; step back if one is not.
    for end in reversed(ends[:lo]):
        prefix = text[:end].rstrip()
        if count_tokens(tokenizer, prefix) <= max_tokens:
            return prefix
    return ""


def truncate_to_tokens(text: str, tokenizer: PreTrainedTokenizerBase, max_tokens: int) -> str:
    """``text`` itself if it fits ``max_tokens``, else its longest prefix that fits and ends at a
    sentence boundary; when not even the first sentence fits, the whole words that do."""
    if count_tokens(tokenizer, text) <= max_tokens:
        return text
    return _longest_fitting_prefix(
        text, sentence_boundaries(text), tokenizer, max_tokens
    ) or _longest_fitting_prefix(
        text, [m.end() for m in _WORD.finditer(text)], tokenizer, max_tokens
    )


# --------------------------------------------------------------------------- profile form

_PROFILE_HEADERS = {
    "product_review": "Earlier reviews written by this user:",
    "abstract_generation": "Earlier papers written by this author:",
    "topic_writing": "Earlier posts written by this user:",
}


def render_item(item: ProfileItem) -> str:
    """One profile item as labelled lines (the profile form)."""
    if isinstance(item, ReviewItem):
        fields = [
            ("Rating", item.rating_text()),
            ("Product", item.description),
            ("Summary", item.summary),
            ("Review", item.review_text),
        ]
    elif isinstance(item, AbstractItem):
        fields = [("Title", item.title), ("Abstract", item.abstract)]
    elif isinstance(item, TopicItem):
        fields = [("Summary", item.summary), ("Post", item.content)]
    else:
        raise TypeError(f"not a profile item: {type(item).__name__}")
    return "\n".join(f"{label}: {value.strip()}" for label, value in fields if value.strip())


def render_profile(task: str, items: Iterable[ProfileItem]) -> str:
    """The whole profile as one text, a header then one block per item; empty without items."""
    body = _render_items(items)
    return f"{_PROFILE_HEADERS[task]}\n\n{body}" if body else ""


def _render_items(items: Iterable[ProfileItem]) -> str:
    return "\n\n".join(block for block in map(render_item, items) if block)


def truncate_profile(
    task: str, items: Iterable[ProfileItem], tokenizer: PreTrainedTokenizerBase, max_tokens: int
) -> str:
    """`render_profile` within ``max_tokens``, dropping trailing sentences of the items (never
    the header alone: no profile at all when not one sentence fits)."""
    header = f"{_PROFILE_HEADERS[task]}\n\n"
    body = _render_items(items)
    room = max_tokens - count_tokens(tokenizer, header)
    while body and room > 0:
        body = truncate_to_tokens(body, tokenizer, room)
        # Tokens may merge across the join; shrink until header and body fit together.
        if count_tokens(tokenizer, header + body) <= max_tokens:
            return header + body if body else ""
        room -= 1
    return ""


def profile_user_message(
    record: LongLaMPRecord,
    tokenizer: PreTrainedTokenizerBase,
    budgets: PromptBudgets = PromptBudgets(),
    items: Sequence[ProfileItem] | None = None,
) -> str:
    """Profile (cut to its budget) then query (cut to its budget), the published layout."""
    profile = truncate_profile(
        record.task, record.profile if items is None else items, tokenizer, budgets.profile_tokens
    )
    query = truncate_to_tokens(record.query.strip(), tokenizer, budgets.query_tokens)
    return f"{profile}\n\n{query}" if profile else query


# --------------------------------------------------------------------------- LongLaMP RAG form

_MAX_ABSTRACT_WORDS = 750  # LongLaMP keeps the first 750 words of each retrieved abstract


def _rag_review(item: ReviewItem) -> str:
    return (
        f'"{item.rating_text()}" is a rating for the product with description '
        f'"{item.description}". "{item.summary}" is summary for "{item.review_text}" '
    )


def _rag_abstract(item: AbstractItem) -> str:
    abstract = " ".join(item.abstract.split()[:_MAX_ABSTRACT_WORDS])
    return f'"{abstract}" is the abstract for the title "{item.title}"'


def _rag_topic(item: TopicItem) -> str:
    return f'"{item.summary}" is a summary for "{item.content}" '


# Per task: how one retrieved item reads, and the sentence that leads into the query.
_RAG_TEMPLATES: dict[str, tuple[Callable, str]] = {
    "product_review": (_rag_review, ". Following the given patterns "),
    "abstract_generation": (
        _rag_abstract,
        ". Use the above abstracts as context to understand the style and language of the user and, ",
    ),
    "topic_writing": (_rag_topic, ". Following the given patterns, "),
}


def rag_user_message(record: LongLaMPRecord, items: Sequence[ProfileItem]) -> str:
    """LongLaMP's prompt: the retrieved items joined by ``", and "``, then the query."""
    if not items:
        return record.query
    render, lead_in = _RAG_TEMPLATES[record.task]
    return ", and ".join(render(item) for item in items) + lead_in + record.query


# --------------------------------------------------------------------------- assembly


def apply_chat(
    tokenizer: PreTrainedTokenizerBase, user_message: str, system_prompt: str | None = None
) -> str:
    """The full prompt text for one user turn, ready for generation."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": user_message})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [system_prompt, user_message] if system_prompt else [user_message]
    return "\n\n".join(parts) + "\n\n"


def build_prompt(
    record: LongLaMPRecord,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle = "profile",
    *,
    budgets: PromptBudgets = PromptBudgets(),
    retriever: Retriever | None = None,
    k: int | None = None,
    system_prompt: str | None = None,
) -> str:
    """The rendered prompt of one record.

    Args:
        record: the LongLaMP record.
        tokenizer: the generator's tokenizer (counts the budgets, applies the chat template).
        style: ``profile``, ``rag`` or ``query`` (see the module docstring).
        budgets: token budgets of the profile and query (profile and query styles).
        retriever: orders the profile; ``rag`` defaults to BM25, ``profile`` keeps the file's
            order unless given one (then the most relevant items survive truncation).
        k: how many ranked items to keep; ``rag`` defaults to 4, ``profile`` to all of them.
        system_prompt: an explicit system message; ``None`` leaves it to the chat template.
    """
    if style == "query":
        message = truncate_to_tokens(record.query.strip(), tokenizer, budgets.query_tokens)
    elif style == "profile":
        items = _ranked_items(record, retriever, k)
        message = profile_user_message(record, tokenizer, budgets, items)
    elif style == "rag":
        items = _ranked_items(record, retriever or BM25Retriever(), k or DEFAULT_RAG_K)
        message = rag_user_message(record, items)
    else:
        raise FlyThinkerError(f"unknown prompt style {style!r}; choose one of {', '.join(STYLES)}")
    return apply_chat(tokenizer, message, system_prompt)


def _ranked_items(
    record: LongLaMPRecord, retriever: Retriever | None, k: int | None
) -> Sequence[ProfileItem]:
    items: Sequence[ProfileItem] = (
        record.profile
        if retriever is None
        else retrieve(record, retriever, len(record.profile) or 1)
    )
    if k is not None:
        if k < 1:
            raise FlyThinkerError(f"k must be at least 1, got {k}")
        items = items[:k]
    return items


def records_to_examples(
    records: Iterable[LongLaMPRecord],
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle = "profile",
    *,
    budgets: PromptBudgets = PromptBudgets(),
    retriever: Retriever | None = None,
    k: int | None = None,
    system_prompt: str | None = None,
    truncate_target: bool = True,
) -> list[Example]:
    """Training/evaluation examples: each record's rendered prompt and its target.

    With ``truncate_target`` (for training) the target is cut to ``budgets.target_tokens`` at a
    sentence boundary; evaluation should score against the full ``record.target``.
    Other arguments are those of `build_prompt`.
    """
    examples = []
    for record in records:
        prompt = build_prompt(
            record,
            tokenizer,
            style,
            budgets=budgets,
            retriever=retriever,
            k=k,
            system_prompt=system_prompt,
        )
        target = record.target.strip()
        if truncate_target:
            target = truncate_to_tokens(target, tokenizer, budgets.target_tokens)
        examples.append(Example(id=record.id, prompt=prompt, target=target))
    return examples


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[str], max_prompt_tokens: int,
    system_prompt: str | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded batch of user messages rendered the way the runner and the demo render their
    training prompts: the tokenizer's chat template with the assistant turn opened. Use this, not
    `encode_prompts` on the bare text, to prompt a chat model: without the template an
    instruction-tuned model often ends its turn at once."""
    return encode_prompts(tokenizer, [apply_chat(tokenizer, m, system_prompt) for m in messages], max_prompt_tokens)
