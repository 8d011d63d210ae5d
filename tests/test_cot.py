"""CoT: rationales generated once and cached, the training target's layout, the answer split and
where the time to first token is taken."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.collate import Encoded, collate, encode
from flythinker.data.longlamp import AbstractItem, LongLaMPRecord
from flythinker.data.prompts import PromptBudgets, records_to_examples
from flythinker.methods import base, cot
from flythinker.methods.base import MethodConfig, RunContext
from flythinker.methods.cot import (
    ANSWER_MARKER,
    RATIONALE_FILE,
    CoT,
    clean_rationale,
    rationale_key,
    rationale_prompt,
    rationale_steps,
    split_answer,
)
from flythinker.model.decoding import GenerationOutput

BUDGETS = PromptBudgets(profile_tokens=120, query_tokens=40, target_tokens=60)
RATIONALE_TOKENS = 10


def make_records(n: int = 3) -> list[LongLaMPRecord]:
    return [
        LongLaMPRecord(
            id=f"r{i}", task="abstract_generation", user_id=f"u{i}",
            query=f"Generate an abstract for the title: Sparse arrays, part {i}.",
            target=f"We study sparse arrays of kind {i}. Results are strong.",
            profile=(AbstractItem(title=f"Old paper {i}", abstract="We estimate directions. It works."),),
        )
        for i in range(n)
    ]


def make_cot(work_dir, rationale_tokens: int = RATIONALE_TOKENS) -> CoT:
    method = CoT(
        MethodConfig(method="cot", generator="tiny", rationale_tokens=rationale_tokens),
        RunContext(task="abstract_generation", budgets=BUDGETS, dtype="float32", work_dir=work_dir),
    )
    method.build()
    return method


@pytest.fixture
def generated_rows(monkeypatch):
    """Counts the prompts that go through rationale generation."""
    rows: list[int] = []
    real = cot.generate_plain

    def counting(lm, input_ids, *args, **kwargs):
        rows.append(input_ids.shape[0])
        return real(lm, input_ids, *args, **kwargs)

    monkeypatch.setattr(cot, "generate_plain", counting)
    return rows


def test_rationales_are_generated_once_then_read_from_the_cache(tmp_path, generated_rows):
    records = make_records(3)
    first = make_cot(tmp_path).examples(records, for_training=True)
    assert sum(generated_rows) == 3
    cache = tmp_path / RATIONALE_FILE
    assert len(cache.read_text().splitlines()) == 3

    generated_rows.clear()
    again = make_cot(tmp_path).examples(records, for_training=True)  # a rerun: a new process
    assert generated_rows == []
    assert again == first

    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:2]) + '\n{"id": "r2", "key"')  # r2 torn by a kill mid-write
    make_cot(tmp_path).examples(records, for_training=True)
    assert generated_rows == [1]  # only r2 again
    generated_rows.clear()
    assert make_cot(tmp_path).examples(records, for_training=True) == first  # the torn line was mended
    assert generated_rows == []

    generated_rows.clear()
    make_cot(tmp_path, rationale_tokens=RATIONALE_TOKENS + 1).examples(records, for_training=True)
    assert sum(generated_rows) == 3  # other settings: the cached rationales do not apply


def test_the_rationale_prompt_asks_for_an_analysis_of_bounded_length(tokenizer):
    record = make_records(1)[0]
    prompt = rationale_prompt(record, tokenizer, BUDGETS, 48)
    assert "at most 48 tokens" in prompt
    assert record.query in prompt and "Old paper 0" in prompt
    assert record.target not in prompt  # the analysis must be possible without the answer


def test_training_target_is_rationale_marker_target(tmp_path, tokenizer):
    records = make_records(2)
    method = make_cot(tmp_path)
    rationales = {"r0": "Formal tone. Likes numbers.", "r1": ""}
    with (tmp_path / RATIONALE_FILE).open("w") as f:
        for r in records:
            key = rationale_key("tiny", RATIONALE_TOKENS, rationale_prompt(r, tokenizer, BUDGETS, RATIONALE_TOKENS))
            f.write(json.dumps({"id": r.id, "key": key, "rationale": rationales[r.id]}) + "\n")
    examples = method.examples(records, for_training=True)
    sft = records_to_examples(records, tokenizer, "profile", budgets=BUDGETS)
    assert [e.prompt for e in examples] == [e.prompt for e in sft]  # only the target differs from SFT
    assert examples[0].target == f"Formal tone. Likes numbers.{ANSWER_MARKER}{sft[0].target}"
    assert examples[1].target == f"{ANSWER_MARKER.lstrip()}{sft[1].target}"
    # The loss covers rationale, marker, target and EOS; the prompt is masked.
    item = encode(tokenizer, examples[0], 10_000, 10_000)
    supervised = [t for t in item.labels if t != -100]
    assert tokenizer.decode(supervised[:-1]) == examples[0].target
    assert supervised[-1] == tokenizer.eos_token_id
    assert method.examples(records, for_training=False) == records_to_examples(
        records, tokenizer, "profile", budgets=BUDGETS, truncate_target=False
    )


def test_training_caps_at_the_budgets_cut_neither_the_prompt_nor_the_answer(tmp_path, tokenizer):
    # The published shape: the target cap equals the target budget, so a rationale in front of a
    # full-length answer would push the answer's end past it; the method raises its caps instead.
    records = [replace(make_records(1)[0], target="We study sparse arrays. " * 30)]
    method = make_cot(tmp_path)
    key = rationale_key("tiny", RATIONALE_TOKENS, rationale_prompt(records[0], tokenizer, BUDGETS, RATIONALE_TOKENS))
    (tmp_path / RATIONALE_FILE).write_text(json.dumps({"id": "r0", "key": key, "rationale": "Formal tone. Likes numbers."}) + "\n")
    [example] = method.examples(records, for_training=True)
    caps = TrainConfig(max_prompt_tokens=20, max_target_tokens=BUDGETS.target_tokens)
    assert len(tokenizer(example.target)["input_ids"]) > caps.max_target_tokens  # the caps alone would cut
    item = method.encoded_targets(records, caps)["r0"]
    assert item.input_ids == encode(tokenizer, example, 10_000, 10_000).input_ids


def test_clean_rationale_cuts_a_marker_and_an_unfinished_sentence():
    assert clean_rationale("  Short. Formal.  ", finished=True) == "Short. Formal."
    assert clean_rationale("Short. Then it got cut", finished=False) == "Short."
    assert clean_rationale("Only an unfinished one", finished=False) == "Only an unfinished one"
    assert clean_rationale("Formal.\n\n### Answer:\nWe study", finished=True) == "Formal."
    assert rationale_steps("Formal tone. Likes data!  Short texts?\n\nNo lists") == [
        "Formal tone.", "Likes data!", "Short texts?", "No lists",
    ]


def test_final_text_is_what_follows_the_marker():
    text = f"Formal tone.{ANSWER_MARKER}We study arrays."
    answer, offset = split_answer(text)
    assert answer.strip() == "We study arrays."
    assert text[offset:] == "We study arrays."  # the offset points at the first answer character
    assert split_answer("No marker at all.") == ("No marker at all.", 0)
    answer, offset = split_answer(f"Rationale only{ANSWER_MARKER}")
    assert answer.strip() == "" and offset == len(f"Rationale only{ANSWER_MARKER}")
    # A model that went on with its analysis past the forced marker answers after its own marker;
    # a marker after the answer with nothing behind it does not empty the answer.
    text = f"Formal tone.{ANSWER_MARKER}Likes data.{ANSWER_MARKER}We study arrays.{ANSWER_MARKER}"
    answer, offset = split_answer(text)
    assert answer.strip() == "We study arrays."
    assert text[offset:].startswith("We study arrays.")


def test_time_to_first_token_is_taken_at_the_first_answer_token(tmp_path, tokenizer, monkeypatch):
    """The clock ticks once per decoded token; TTFT must land on the first token after the marker."""
    method = make_cot(tmp_path)
    prefix = tokenizer(f"Formal tone. Likes data.{ANSWER_MARKER}", add_special_tokens=False).input_ids
    answer = tokenizer("We propose arrays.", add_special_tokens=False).input_ids
    sequence = torch.tensor([prefix + answer + [tokenizer.eos_token_id]])

    def scripted_decode(input_ids, attention_mask, generation, on_token):
        for token in sequence.T:
            on_token(token)
        return GenerationOutput(sequence.expand(input_ids.shape[0], -1))

    ticks = iter(range(10_000))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(method, "decode", scripted_decode)
    [[row]] = list(method.predict(make_records(1), GenerationConfig(max_new_tokens=64), batch_size=1))
    assert row.prediction == "We propose arrays."
    assert row.generated_tokens == len(prefix) + len(answer)
    assert row.new_tokens == len(answer)
    # start is tick 0 and token i is stamped at tick i + 1: the first answer token is token len(prefix).
    assert row.ttft_s == len(prefix) + 1


class ScriptedPhases:
    """Stands in for the plain decode: phase 1 replies with ``rationales``, phase 2 with ``answer``."""

    def __init__(self, tokenizer, rationales: list[list[int]], answer: list[int]):
        self.tokenizer, self.rationales, self.answer = tokenizer, rationales, answer
        self.calls: list[tuple[torch.Tensor, torch.Tensor, int]] = []

    def __call__(self, input_ids, attention_mask, generation, on_token):  # set on the class: no self binding
        self.calls.append((input_ids, attention_mask, generation.max_new_tokens))
        # Calls alternate (predict's warm-up decode runs both phases too).
        rows = self.rationales if len(self.calls) % 2 else [self.answer] * len(input_ids)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.eos_token_id
        sequences = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        for token in sequences.T:
            on_token(token)
        return GenerationOutput(sequences)


def test_the_marker_is_forced_when_the_rationale_budget_runs_out(tmp_path, tokenizer, monkeypatch):
    """A model that rambles past its rationale budget still gets an answer of its own, after the marker;
    one that wrote the marker keeps its rationale and gets no second marker; one that ended without
    any marker chose to skip its analysis, and its text is its answer."""
    budget = 48
    method = make_cot(tmp_path, rationale_tokens=budget)
    encode_text = lambda text: tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    rambling = encode_text("Formal tone and many many words that never end. " * 10)[:budget]
    wrote_marker = encode_text(f"Short.{ANSWER_MARKER}Some early answer")
    skipped = encode_text("Just the answer.") + [eos]
    answer = encode_text("We propose arrays.") + [eos]
    # Phase 1 stops at the budget: the rambling row uses it all, the others end or stop earlier.
    assert len(rambling) == budget and len(wrote_marker) < budget and len(skipped) < budget
    script = ScriptedPhases(tokenizer, [rambling, wrote_marker, skipped], answer)
    monkeypatch.setattr(cot.LMMethod, "decode", script)
    prompts = [encode_text(f"Prompt {i}") for i in range(3)]
    batch = collate([Encoded(p, [-100] * len(p)) for p in prompts], eos)
    out = method.decode(batch["input_ids"], batch["attention_mask"], GenerationConfig(max_new_tokens=20),
                        lambda _: None)

    assert [max_new for *_, max_new in script.calls] == [budget, 20]
    phase2_inputs, phase2_mask, _ = script.calls[1]
    assert len(phase2_inputs) == 2  # the row that skipped its analysis is done after phase 1
    marker = encode_text(ANSWER_MARKER)
    for row in range(2):
        assert phase2_inputs[row][phase2_mask[row].bool()].tolist()[-len(marker):] == marker
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in out.sequences.tolist()]
    assert [split_answer(t)[0].strip() for t in texts] == ["We propose arrays."] * 2 + ["Just the answer."]
    assert texts[1].count(ANSWER_MARKER.strip()) == 1 and texts[1].startswith("Short.")
    assert out.answer_steps == [budget, budget, 0]


def test_time_to_first_token_includes_the_whole_rationale_phase(tmp_path, tokenizer, monkeypatch):
    method = make_cot(tmp_path)
    rationale = tokenizer("Formal tone and many many words that never end", add_special_tokens=False).input_ids
    answer = tokenizer("We propose arrays.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    monkeypatch.setattr(cot.LMMethod, "decode", ScriptedPhases(tokenizer, [rationale[:RATIONALE_TOKENS]], answer))
    ticks = iter(range(10_000))
    monkeypatch.setattr(base, "time", SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    [[row]] = list(method.predict(make_records(1), GenerationConfig(max_new_tokens=64), batch_size=1))
    assert row.prediction == "We propose arrays."
    assert row.new_tokens == len(answer) - 1
    # start is tick 0; the rationale phase stamps ticks 1..R, the first answer token tick R + 1.
    assert row.ttft_s == RATIONALE_TOKENS + 1


def test_cot_trains_and_predicts_end_to_end(tmp_path):
    records = make_records(4)
    method = make_cot(tmp_path)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=2, lr=1e-3)
    result = method.train(records, config, run_config=None)
    assert result.steps == 2 and (tmp_path / "checkpoint").is_dir()
    rows = [row for batch in method.predict(records[:2], GenerationConfig(max_new_tokens=4), 2) for row in batch]
    assert [r.id for r in rows] == ["r0", "r1"]
    assert all(r.generated_tokens <= 4 + RATIONALE_TOKENS + 12 for r in rows)
