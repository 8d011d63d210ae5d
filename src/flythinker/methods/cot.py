"""CoT baseline: think, then write. The model first analyses the user's profile, then the text.

LongLaMP has no rationale annotations, so the base generator writes its own before any training:
one batched greedy pass over the training records with a prompt that asks for a short analysis of
the user's preferences and style (profile and query only; the target is never shown, since at test
time the model has to produce the analysis without it). Rationales are cached as JSONL in the
method's work directory, one line per record, appended batch by batch, so a rerun or an
interrupted run regenerates nothing it already has. SFT then trains on

    target = rationale + ANSWER_MARKER + target

At inference the model decodes in two phases. It first writes its rationale, at most
``rationale_tokens`` tokens; a rationale that runs out of budget without writing the marker gets
the marker appended, and the answer is then decoded after it with the same budget every other
method has. Without that forcing a fine-tuned model that rambles past its budget never writes the
marker and its analysis is scored as its answer, which would make CoT look worse than it is.
`final_text` keeps what follows the marker, and the time to first token is the time of the first
answer token, so the rationale is paid for in latency. A row that ends (EOS) before any marker is
the answer as a whole, as the model chose to skip its analysis. Coconut
(`flythinker.methods.coconut`) reuses these rationales.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flythinker.config import GenerationConfig
from flythinker.data.collate import Encoded, Example, collate, encode_prompts, pad_id
from flythinker.data.longlamp import LongLaMPRecord
from flythinker.data.prompts import (
    PromptBudgets,
    apply_chat,
    profile_user_message,
    sentence_boundaries,
)
from flythinker.io import append_jsonl
from flythinker.methods.costs import (
    NEVER_STOP,
    STEP_OPTIONS,
    BenchEntry,
    BenchTrainer,
    module_bytes,
)
from flythinker.methods.lm import LMMethod
from flythinker.model.decoding import GenerationOutput, generate_plain

log = logging.getLogger(__name__)

# Plain text, not a new token: every checkpoint stays a stock causal LM with the stock tokenizer.
# A markdown heading is something instruction-tuned models already emit on their own line and
# that review or abstract text practically never contains.
ANSWER_MARKER = "\n\n### Answer:\n"
_MARKER_CORE = ANSWER_MARKER.strip()  # what `final_text` looks for, whatever whitespace surrounds it

RATIONALE_FILE = "rationales.jsonl"
RATIONALE_BATCH_SIZE = 8

RATIONALE_INSTRUCTION = (
    "Do not write it yet. First, in at most {tokens} tokens (about {words} words), analyse what "
    "this user's earlier writing shows about their preferences, opinions and writing style (tone, "
    "length, structure, vocabulary) that should shape the text. Write only the analysis."
)


# --------------------------------------------------------------------------- training layout


def rationale_room(method: LMMethod) -> int:
    """Target tokens a training target spends before the answer: a rationale of at most
    ``rationale_tokens``, decoded to text and tokenized again (a few tokens may not round-trip,
    so twice that), then the marker."""
    assert method.tokenizer is not None, "build() first"
    marker = method.tokenizer(ANSWER_MARKER, add_special_tokens=False)["input_ids"]
    return 2 * method.config.rationale_tokens + len(marker)


def cot_target(rationale: str, target: str) -> str:
    """The CoT training target: the analysis, the marker, then the text itself."""
    return f"{rationale.strip()}{ANSWER_MARKER}{target}".lstrip()


def split_answer(text: str) -> tuple[str, int]:
    """The answer after the last marker that has text after it, and the offset of its first
    non-blank character.

    The last, not the first: a fine-tuned model whose analysis runs out of budget may go on past
    the forced marker and write a marker of its own before answering (measured: 6 of 40 abstracts).
    What lies between the two markers is sometimes more analysis, sometimes already abstract-like
    text; the model's own last marker is the one it answers after, and taking the last is how
    answers are usually extracted. (On those 6 abstracts the first-marker rule scored higher: it
    was fixed before that was seen, and the study reports both.)
    Without a marker the whole text is the answer from offset 0: it is what gets scored, and its
    first token is then the first answer token (a CoT model that skipped its analysis pays none).
    """
    parts = text.split(_MARKER_CORE)
    if len(parts) == 1:
        return text, 0
    last = next((i for i in range(len(parts) - 1, 0, -1) if parts[i].strip()), len(parts) - 1)
    start = len(_MARKER_CORE.join(parts[:last])) + len(_MARKER_CORE)
    answer = parts[last]
    return answer, start + len(answer) - len(answer.lstrip())


def rationale_steps(rationale: str) -> list[str]:
    """The rationale's sentences (Coconut's reasoning steps), blank pieces dropped."""
    cuts = [0, *sentence_boundaries(rationale), len(rationale)]
    pieces = (rationale[a:b].strip() for a, b in itertools.pairwise(cuts))
    return [p for p in pieces if p]


# --------------------------------------------------------------------------- rationales


def rationale_prompt(
    record: LongLaMPRecord, tokenizer: PreTrainedTokenizerBase, budgets: PromptBudgets, max_tokens: int
) -> str:
    """The profile form's user turn (same budgets), followed by the request for an analysis."""
    message = profile_user_message(record, tokenizer, budgets)
    request = RATIONALE_INSTRUCTION.format(tokens=max_tokens, words=max(1, 3 * max_tokens // 4))
    return apply_chat(tokenizer, f"{message}\n\n{request}")


def clean_rationale(text: str, finished: bool) -> str:
    """Strip it, cut any marker the base model happened to write, and, if generation ran into the
    token limit, drop the unfinished last sentence (when a finished one precedes it)."""
    text = text.split(_MARKER_CORE)[0].strip()
    if not finished:
        ends = sentence_boundaries(text)
        if ends and ends[-1] < len(text):
            text = text[: ends[-1]].strip()
    return text


def rationale_key(generator: str, max_tokens: int, prompt: str) -> str:
    """Identifies what produced a cached rationale: a different model, length or prompt is a miss."""
    return hashlib.sha256(f"{generator}\0{max_tokens}\0{prompt}".encode()).hexdigest()[:16]


def read_rationale_cache(path: Path) -> dict[str, tuple[str, str]]:
    """``{id: (key, rationale)}``; a later line for an id wins, a torn line (a kill mid-write) is skipped."""
    if not path.is_file():
        return {}
    cache: dict[str, tuple[str, str]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
            cache[str(entry["id"])] = (str(entry["key"]), str(entry["rationale"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("%s:%d: unreadable rationale line skipped; it will be regenerated", path, number)
    return cache


def generate_rationales(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: dict[str, str],
    max_tokens: int,
    max_prompt_tokens: int,
    on_batch: Callable[[dict[str, str]], None],
    batch_size: int = RATIONALE_BATCH_SIZE,
) -> None:
    """Greedy rationales for ``{id: prompt}``, handed to ``on_batch`` as each batch finishes."""
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False)
    eos = tokenizer.eos_token_id
    # Similar lengths share a batch: less padding to compute.
    ids = sorted(prompts, key=lambda i: len(prompts[i]))
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        batch = encode_prompts(tokenizer, [prompts[i] for i in chunk], max_prompt_tokens=max_prompt_tokens)
        out = generate_plain(lm, batch["input_ids"], batch["attention_mask"], config, tokenizer=tokenizer)
        texts = {}
        for row, record_id in enumerate(chunk):
            tokens = out.sequences[row].tolist()
            finished = eos in tokens
            tokens = tokens[: tokens.index(eos)] if finished else tokens
            texts[record_id] = clean_rationale(tokenizer.decode(tokens, skip_special_tokens=True), finished)
        on_batch(texts)


def load_or_generate_rationales(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[LongLaMPRecord],
    *,
    generator: str,
    budgets: PromptBudgets,
    max_tokens: int,
    cache_path: Path,
) -> dict[str, str]:
    """``{record id: rationale}`` for ``records``, generating (and caching) only what is missing."""
    prompts = {r.id: rationale_prompt(r, tokenizer, budgets, max_tokens) for r in records}
    keys = {i: rationale_key(generator, max_tokens, p) for i, p in prompts.items()}
    cached = read_rationale_cache(cache_path)
    found = {i: cached[i][1] for i in prompts if i in cached and cached[i][0] == keys[i]}
    missing = {i: p for i, p in prompts.items() if i not in found}
    if missing:
        log.info("generating %d rationale(s) into %s (%d cached)", len(missing), cache_path, len(found))
        _end_last_line(cache_path)

        def store(batch: dict[str, str]) -> None:
            for record_id, text in batch.items():
                append_jsonl(cache_path, {"id": record_id, "key": keys[record_id], "rationale": text})
            found.update(batch)

        max_prompt_tokens = budgets.prompt_tokens
        generate_rationales(lm, tokenizer, missing, max_tokens, max_prompt_tokens, store)
    return {r.id: found[r.id] for r in records}


def method_rationales(method: LMMethod, records: Sequence[LongLaMPRecord]) -> dict[str, str]:
    """A method's rationales for ``records``: its generator's, cached in its work directory.

    Call before fine-tuning: a missing rationale is written by the model as it is now.
    """
    assert method.tokenizer is not None, "build() first"
    # One process writes the cache; under `accelerate launch` the others then read it whole.
    with method.context.processes.main_first():
        return load_or_generate_rationales(
            method.lm, method.tokenizer, records, generator=method.config.generator,
            budgets=method.context.budgets, max_tokens=method.config.rationale_tokens,
            cache_path=Path(method.context.work_dir) / RATIONALE_FILE,
        )


def _end_last_line(path: Path) -> None:
    """Terminate a torn last line, so that new entries start on lines of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


# --------------------------------------------------------------------------- the method


class CoT(LMMethod):
    name = "cot"
    style = "profile"
    trainable = True
    heldout_comparable = False  # its training targets put a rationale before the answer

    @property
    def target_extra_tokens(self) -> int:
        return rationale_room(self)

    @classmethod
    def bench_entries(cls, bench, floors):
        """Decoded as SFT is, ``rationale_tokens`` tokens before its first answer token (a fixed
        count: random weights cannot be trusted to write the answer marker); its time to first
        token is to that answer token."""
        g, rationale = bench.generator, bench.rationale_tokens

        def run(ids, mask, n, on_token, options):
            seen = [0]

            def answer_tokens_only(token):
                seen[0] += 1
                if seen[0] > rationale:
                    on_token(token)

            return generate_plain(g, ids, mask, max_new_tokens=rationale + n, on_token=answer_tokens_only,
                                  **options, **NEVER_STOP)

        return [
            BenchEntry(cls.name, None, [g], lambda ids, mask, n, cb, options=STEP_OPTIONS[steps]: run(ids, mask, n, cb, options),
                       floors.thinking(rationale, bench.prompt_tokens), steps, batched=False)
            for steps in bench.steps
        ]

    @classmethod
    def bench_trainers(cls, bench):
        """SFT on rationale + answer: SFT's step on longer sequences."""
        g = bench.generator
        return [BenchTrainer(cls.name, lambda: copy.deepcopy(g), module_bytes(g), extra_tokens=bench.rationale_tokens)]

    def examples(self, records: Sequence[LongLaMPRecord], for_training: bool) -> list[Example]:
        examples = super().examples(records, for_training)
        if not for_training:
            return examples
        rationales = method_rationales(self, records)
        return [dataclasses.replace(e, target=cot_target(rationales[e.id], e.target)) for e in examples]

    def decode(self, input_ids, attention_mask, generation, on_token) -> GenerationOutput:
        """Rationale first (at most ``rationale_tokens``), then the marker, forced where the model
        did not write it, then the answer with the shared ``max_new_tokens``."""
        assert self.tokenizer is not None, "build() first"
        tokenizer = self.tokenizer
        thinking = super().decode(
            input_ids, attention_mask,
            dataclasses.replace(generation, max_new_tokens=self.config.rationale_tokens), on_token,
        )
        rationale_steps = thinking.sequences.shape[1]
        marker = tokenizer(ANSWER_MARKER, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        pad = pad_id(tokenizer)
        heads: list[list[int]] = []  # per row: what precedes the answer in the output
        answering: list[int] = []  # rows that go on to the answer phase
        for row in range(len(input_ids)):
            ids = thinking.sequences[row].tolist()
            ended = eos in ids
            text = tokenizer.decode(ids[: ids.index(eos)] if ended else ids, skip_special_tokens=True)
            if ended and _MARKER_CORE not in text:
                heads.append(ids)  # skipped its analysis: this text is its whole answer
                continue
            rationale = text.split(_MARKER_CORE, 1)[0].rstrip()
            heads.append(tokenizer(rationale, add_special_tokens=False)["input_ids"] + marker)
            answering.append(row)
        answers: dict[int, list[int]] = {}
        if answering:
            prompts = [
                input_ids[row][attention_mask[row].bool()].tolist() + heads[row] for row in answering
            ]
            batch = collate([Encoded(p, [-100] * len(p)) for p in prompts], pad)
            out = super().decode(batch["input_ids"], batch["attention_mask"], generation, on_token)
            answers = {row: out.sequences[i].tolist() for i, row in enumerate(answering)}
        rows = [heads[row] + answers.get(row, []) for row in range(len(input_ids))]
        width = max(len(r) for r in rows)
        sequences = torch.full((len(rows), width), pad, dtype=torch.long)
        for row, ids in enumerate(rows):
            sequences[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        # Every answer's first token comes from the answer phase's first step; a row that skipped
        # its analysis answered from the first step.
        answer_steps = [rationale_steps if row in answers else 0 for row in range(len(rows))]
        return GenerationOutput(sequences=sequences, answer_steps=answer_steps)

    def final_text(self, text: str) -> tuple[str, int]:
        return split_answer(text)
