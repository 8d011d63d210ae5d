"""Coconut: where latent thoughts go, cached batched decoding against re-running the prefix, the
curriculum, and training through the latent passes.

The reference here is Coconut's own semantics, written the slow way: one row, no cache, and the
whole prefix re-run for every latent thought and every decoded token.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import PROMPTS

from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.collate import Encoded, Example, collate
from flythinker.data.longlamp import LongLaMPRecord, ReviewItem
from flythinker.data.prompts import PromptBudgets
from flythinker.errors import FlyThinkerError
from flythinker.methods.base import MethodConfig, RunContext
from flythinker.methods.coconut import (
    LATENT_SLOT,
    STAGES_DIR,
    Coconut,
    LatentLM,
    ThoughtMarkers,
    align_latent_slots,
    curriculum,
    encode_stage_example,
    generate_latent,
)
from flythinker.methods.cot import ANSWER_MARKER, RATIONALE_FILE, rationale_key, rationale_prompt
from flythinker.model.sources import build_tiny
from flythinker.training.engines import enable_gradient_checkpointing
from flythinker.training.train import train

LATENTS = 2
NEW_TOKENS = 8


@pytest.fixture
def lm():
    return build_tiny(64, seed=2)


@pytest.fixture
def markers(tokenizer):
    return ThoughtMarkers.of(tokenizer)


def reference_logits(lm, markers, prompt: list[int], latents: int, answer: list[int], detach: bool = False):
    """Logits after END_THOUGHT and after each answer token: (len(answer) + 1, vocab)."""
    embed = lm.get_input_embeddings()
    embeds = embed(torch.tensor([prompt + list(markers.begin)]))
    for _ in range(latents):
        thought = lm.base_model(inputs_embeds=embeds).last_hidden_state[:, -1:]
        embeds = torch.cat([embeds, thought.detach() if detach else thought], dim=1)
    embeds = torch.cat([embeds, embed(torch.tensor([list(markers.end) + answer]))], dim=1)
    return lm(inputs_embeds=embeds).logits[0, -(len(answer) + 1) :]


@torch.no_grad()
def reference_greedy(lm, markers, prompt: list[int], latents: int, steps: int):
    tokens: list[int] = []
    scores = []
    for _ in range(steps):
        logits = reference_logits(lm, markers, prompt, latents, tokens)[-1]
        scores.append(logits)
        tokens.append(int(logits.argmax()))
    return tokens, torch.stack(scores)


def stage_item(prompt: list[int], markers, latents: int, answer: list[int]) -> Encoded:
    ids = prompt + list(markers.begin) + [LATENT_SLOT] * latents + list(markers.end) + answer
    return Encoded(ids, [-100] * (len(ids) - len(answer)) + answer)


def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]


# --------------------------------------------------------------------------- positions


def test_alignment_puts_every_rows_latent_slots_in_the_same_columns(tokenizer, markers):
    prompts = prompt_ids(tokenizer)
    answers = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]  # different lengths on both sides of the slots
    batch = collate([stage_item(p, markers, LATENTS, a) for p, a in zip(prompts, answers)], pad_token_id=0)
    aligned = align_latent_slots(batch["input_ids"], batch["attention_mask"])
    start = aligned.start
    assert min(aligned.shifts) == 0  # the row whose slots come last stays put
    assert aligned.input_ids.shape[1] == batch["input_ids"].shape[1] + max(aligned.shifts)
    assert (aligned.input_ids[:, start : start + LATENTS] == LATENT_SLOT).all()
    assert (aligned.attention_mask[:, start : start + LATENTS] == 1).all()
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        shift, width = aligned.shifts[row], batch["input_ids"].shape[1]
        # Each row moved as a whole: same tokens, same mask, just further right.
        assert torch.equal(aligned.input_ids[row, shift : shift + width], batch["input_ids"][row])
        assert torch.equal(aligned.attention_mask[row, shift : shift + width], batch["attention_mask"][row])
        # Prompt and BEGIN_THOUGHT end right before the slots; END_THOUGHT and the answer follow them.
        before = aligned.input_ids[row, start - len(prompt) - len(markers.begin) : start].tolist()
        assert before == prompt + list(markers.begin)
        after = aligned.input_ids[row, aligned.answer_start :][: len(markers.end) + len(answer)].tolist()
        assert after == list(markers.end) + answer


def test_slots_must_match_across_rows(tokenizer, markers):
    prompts = prompt_ids(tokenizer)[:2]
    batch = collate([stage_item(prompts[0], markers, 2, [5]), stage_item(prompts[1], markers, 1, [5])], 0)
    with pytest.raises(FlyThinkerError, match="same number of latent slots"):
        align_latent_slots(batch["input_ids"], batch["attention_mask"])


def test_training_forward_feeds_each_rows_hidden_states_into_its_slots(lm, tokenizer, markers):
    """Left-padded rows of different lengths: each row's answer logits equal the slow reference's."""
    prompts = prompt_ids(tokenizer)
    answers = [[40, 41, 42], [43], [44, 45, 46, 47, 48]]
    batch = collate([stage_item(p, markers, LATENTS, a) for p, a in zip(prompts, answers)], pad_token_id=0)
    with torch.no_grad():
        out = LatentLM(lm)(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        for row, (prompt, answer) in enumerate(zip(prompts, answers)):
            expected = reference_logits(lm, markers, prompt, LATENTS, answer)
            got = out.logits[row, -(len(answer) + 1) :]
            assert (got - expected).abs().max() <= 1e-4
    # The mean token loss is that of the reference logits.
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(
                reference_logits(lm, markers, p, LATENTS, a)[:-1], torch.tensor(a), reduction="sum"
            )
            for p, a in zip(prompts, answers)
        ]
    # Every answer token is supervised, the first one predicted from END_THOUGHT's last token.
    expected_loss = sum(losses) / sum(len(a) for a in answers)
    assert out.loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)


def test_labels_inside_the_thought_block_are_refused(lm, tokenizer, markers):
    item = stage_item(prompt_ids(tokenizer)[0], markers, 1, [5, 6])
    labels = list(item.labels)
    labels[len(labels) - 2 - len(markers.end)] = 7  # END_THOUGHT's first token: a thought predicts it
    batch = collate([Encoded(item.input_ids, labels)], 0)
    with pytest.raises(FlyThinkerError, match="thought block"):
        LatentLM(lm)(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])


# --------------------------------------------------------------------------- decoding


def test_kv_cache_decoding_equals_rerunning_the_prefix(lm, tokenizer, markers, prompt_batch):
    out = generate_latent(lm, tokenizer, prompt_batch.input_ids, prompt_batch.attention_mask,
                          GenerationConfig(max_new_tokens=NEW_TOKENS), latents=LATENTS, eos_token_id=-1,
                          output_scores=True)
    scores = torch.stack(out.scores, dim=1)
    for row, prompt in enumerate(prompt_ids(tokenizer)):
        tokens, expected = reference_greedy(lm, markers, prompt, LATENTS, NEW_TOKENS)
        assert out.sequences[row].tolist() == tokens
        assert (scores[row] - expected).abs().max() <= 1e-4


def test_batched_decoding_equals_each_row_alone(lm, tokenizer, prompt_batch):
    def run(ids, mask=None):
        return generate_latent(lm, tokenizer, ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS),
                               latents=LATENTS, eos_token_id=-1, output_scores=True)

    batched = run(prompt_batch.input_ids, prompt_batch.attention_mask)
    for row, prompt in enumerate(PROMPTS):
        alone = run(tokenizer([prompt], return_tensors="pt").input_ids)
        assert torch.equal(batched.sequences[row], alone.sequences[0])
        diff = max((b[row] - a[0]).abs().max().item() for b, a in zip(batched.scores, alone.scores))
        assert diff <= 1e-4


def test_training_logits_equal_decoding_scores(lm, tokenizer, markers, prompt_batch):
    """Teacher-forcing the decoded tokens through the training forward gives the decode's logits."""
    out = generate_latent(lm, tokenizer, prompt_batch.input_ids, prompt_batch.attention_mask,
                          GenerationConfig(max_new_tokens=NEW_TOKENS), latents=LATENTS, eos_token_id=-1,
                          output_scores=True)
    items = [stage_item(p, markers, LATENTS, out.sequences[row].tolist()) for row, p in enumerate(prompt_ids(tokenizer))]
    batch = collate(items, 0)
    with torch.no_grad():
        logits = LatentLM(lm)(batch["input_ids"], batch["attention_mask"]).logits
    forced = logits[:, -(NEW_TOKENS + 1) : -1]
    assert (forced - torch.stack(out.scores, dim=1)).abs().max() <= 1e-4


def test_zero_latents_decode_like_the_plain_lm_with_markers(lm, tokenizer, markers):
    prompt = prompt_ids(tokenizer)[0]
    out = generate_latent(lm, tokenizer, torch.tensor([prompt]), None, GenerationConfig(max_new_tokens=4),
                          latents=0, eos_token_id=-1)
    tokens, _ = reference_greedy(lm, markers, prompt, 0, 4)
    assert out.sequences[0].tolist() == tokens


# --------------------------------------------------------------------------- curriculum


def test_curriculum_splits_the_epochs_evenly_over_stages_zero_to_k(tmp_path):
    stages = curriculum(TrainConfig(output_dir=str(tmp_path), epochs=6), latent_thoughts=2)
    assert [s.latents for s in stages] == [0, 1, 2]
    assert [s.training.epochs for s in stages] == [2, 2, 2]
    assert [s.keeps_rationale for s in stages] == [True, True, False]  # the last stage is inference's layout
    assert [s.training.output_dir for s in stages] == [str(tmp_path / STAGES_DIR / f"stage-{i}") for i in range(3)]
    steps = curriculum(TrainConfig(output_dir=str(tmp_path), max_steps=10), latent_thoughts=2)
    assert [s.training.max_steps for s in steps] == [3, 3, 4]  # the remainder goes to later stages
    assert [s.training.max_steps for s in curriculum(TrainConfig(max_steps=0), 1)] == [0, 0]
    with pytest.raises(FlyThinkerError, match="latent_thoughts"):
        curriculum(TrainConfig(), -1)


def test_stage_s_replaces_the_first_s_rationale_steps_by_latent_slots(tokenizer, markers):
    example = Example("x", "Prompt:", "The target.")
    rationale = "Step one. Step two. Step three."

    def layout(latents: int, keeps: bool) -> tuple[int, str]:
        item = encode_stage_example(tokenizer, example, rationale, latents, keeps, markers, 100, 100)
        slots = item.input_ids.count(LATENT_SLOT)
        supervised = [t for t in item.labels if t != -100]
        thought_end = len(item.input_ids) - len(supervised)
        assert item.input_ids[thought_end - len(markers.end) : thought_end] == list(markers.end)
        assert supervised[-1] == tokenizer.eos_token_id
        return slots, tokenizer.decode(supervised[:-1])

    assert layout(0, True) == (0, f"Step one. Step two. Step three.{ANSWER_MARKER}The target.")
    assert layout(1, True) == (1, f"Step two. Step three.{ANSWER_MARKER}The target.")
    assert layout(2, True) == (2, f"Step three.{ANSWER_MARKER}The target.")
    assert layout(3, True) == (3, "The target.")  # nothing left to say: no marker either
    assert layout(2, False) == (2, "The target.")  # the last stage drops what is left


# --------------------------------------------------------------------------- training


WORDS = ["apple", "river", "stone", "cloud", "light", "music", "paper", "garden", "window", "silver"]


def copy_items(tokenizer, markers, n: int, latents: int) -> list[Encoded]:
    rng = random.Random(0)
    items = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(4))
        example = Example(str(i), f"Repeat: {words}\nAnswer:", f" {words}")
        items.append(encode_stage_example(tokenizer, example, "", latents, False, markers, 100, 100))
    return items


def test_gradients_flow_through_the_latent_passes(lm, tokenizer, markers):
    prompt, answer = prompt_ids(tokenizer)[0], [40, 41, 42]
    batch = collate([stage_item(prompt, markers, LATENTS, answer)], 0)
    norm = lm.model.norm.weight  # shapes the fed-back thoughts and the answer logits alike

    def grad(loss):
        lm.zero_grad()
        loss.backward()
        return norm.grad.clone()

    ours = grad(LatentLM(lm)(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss)

    def reference_loss(detach: bool) -> torch.Tensor:
        logits = reference_logits(lm, markers, prompt, LATENTS, answer, detach=detach)
        return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(answer))

    through, detached = grad(reference_loss(detach=False)), grad(reference_loss(detach=True))
    assert (ours - through).abs().max() <= 1e-5
    assert (ours - detached).abs().max() > 1e-4  # the thoughts' own graph carries gradient


def test_a_training_step_changes_every_weight_and_the_loss_falls(lm, tokenizer, markers, tmp_path):
    model = LatentLM(lm)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(output_dir=str(tmp_path / "one"), max_steps=1, batch_size=4, lr=1e-2, weight_decay=0.0)
    train(model, tokenizer, copy_items(tokenizer, markers, 4, LATENTS), config, save=False, show_progress=False)
    assert [name for name, p in model.named_parameters() if torch.equal(before[name], p)] == []

    config = TrainConfig(output_dir=str(tmp_path / "copy"), epochs=10, batch_size=8, lr=1e-2, warmup_ratio=0.1)
    result = train(LatentLM(build_tiny(64, seed=3)), tokenizer, copy_items(tokenizer, markers, 16, 1), config,
                   save=False, show_progress=False)
    first, last = result.losses[0], sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, f"loss fell only from {first:.3f} to {last:.3f}"


def test_gradient_checkpointing_is_refused(lm, tokenizer, markers):
    enable_gradient_checkpointing(lm)  # as `TrainConfig.gradient_checkpointing` does
    batch = collate(copy_items(tokenizer, markers, 2, 1), 0)
    with pytest.raises(FlyThinkerError, match="gradient_checkpointing"):
        LatentLM(lm).train()(batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------------- the method


def test_coconut_trains_stage_by_stage_then_decodes(tmp_path, tokenizer):
    budgets = PromptBudgets(profile_tokens=80, query_tokens=30, target_tokens=40)
    records = [
        LongLaMPRecord(f"r{i}", "product_review", f"u{i}", f"Review the kettle model {i}.",
                       f"Great kettle {i}. Boils fast.", (ReviewItem(5.0, "Nice", "A mug", "Loved it. Sturdy."),))
        for i in range(4)
    ]
    method = Coconut(MethodConfig(method="coconut", generator="tiny", latent_thoughts=2, rationale_tokens=16),
                     RunContext(task="product_review", budgets=budgets, dtype="float32", work_dir=tmp_path))
    method.build()
    with (tmp_path / RATIONALE_FILE).open("w") as f:  # rationales as the CoT pass would cache them
        for r in records:
            key = rationale_key("tiny", 16, rationale_prompt(r, tokenizer, budgets, 16))
            f.write(json.dumps({"id": r.id, "key": key, "rationale": "Short. Warm. Practical."}) + "\n")
    config = TrainConfig(output_dir=str(tmp_path), epochs=3, batch_size=2, lr=1e-3)
    result = method.train(records, config)
    assert [s["steps"] for s in result.extra["stages"]] == [2, 2, 2]  # 4 records, batch 2, 1 epoch each
    assert result.steps == 6 and len(result.losses) == 6
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [(row["stage"], row["step"]) for row in log] == [(s, 2 * s + i) for s in range(3) for i in (1, 2)]
    assert (tmp_path / "checkpoint" / "config.json").is_file()

    rows = [row for batch in method.predict(records[:3], GenerationConfig(max_new_tokens=4), 2) for row in batch]
    assert [r.id for r in rows] == ["r0", "r1", "r2"]
    reloaded = Coconut(method.config, method.context)
    reloaded.build(tmp_path / "checkpoint")
    again = [row for batch in reloaded.predict(records[:3], GenerationConfig(max_new_tokens=4), 2) for row in batch]
    assert [r.prediction for r in again] == [r.prediction for r in rows]
