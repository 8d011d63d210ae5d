"""From (prompt, target) text pairs to left-padded training batches.

This is the seam between data and training: any source (a JSONL of prompt/target pairs, LongLaMP
through `flythinker.data.prompts`) produces `Example`s; the trainer only sees the tensors made here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from flythinker.errors import FlyThinkerError


@dataclass(frozen=True)
class Example:
    """One training or evaluation example, prompt already rendered (chat template applied)."""

    id: str
    prompt: str
    target: str


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]  # prompt + target + EOS
    labels: list[int]  # -100 on the prompt, the token ids on target + EOS


def encode(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    max_prompt_tokens: int,
    max_target_tokens: int,
) -> Encoded:
    """Tokenize one example; an over-long prompt keeps its end (where the query is), a target its start."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"][:max_target_tokens]
    if not prompt:
        raise FlyThinkerError(f"example {example.id!r}: empty prompt")
    if not target:
        raise FlyThinkerError(f"example {example.id!r}: empty target")
    if tokenizer.eos_token_id is None:
        raise FlyThinkerError("the tokenizer has no EOS token; training needs one to end targets")
    target = target + [tokenizer.eos_token_id]
    return Encoded(input_ids=prompt + target, labels=[-100] * len(prompt) + target)


def collate(batch: Sequence[Encoded], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad to the longest sequence: the layout decoding uses, so train and test agree."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, width - n :] = torch.tensor(item.input_ids)
        labels[row, width - n :] = torch.tensor(item.labels)
        attention_mask[row, width - n :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_prompt_tokens: int
) -> dict[str, torch.Tensor]:
    """Left-padded prompt batch for generation, each prompt cut to its last ``max_prompt_tokens``.

    The prompts are used verbatim: already rendered text (`flythinker.data.prompts.encode_chat` renders chat messages).
    """
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise FlyThinkerError(f"empty prompt(s) at position(s) {empty}")
    pad = pad_id(tokenizer)
    return {
        k: v
        for k, v in collate([Encoded(row, [-100] * len(row)) for row in ids], pad).items()
        if k != "labels"
    }


def read_prompt_target_jsonl(path: str | Path) -> list[Example]:
    """Read ``{"prompt": ..., "target": ...[, "id": ...]}`` lines, naming the line of any bad record."""
    path = Path(path)
    examples: list[Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FlyThinkerError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise FlyThinkerError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FlyThinkerError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise FlyThinkerError(f"{path}:{number}: expected an object, got {type(record).__name__}")
        for field in ("prompt", "target"):
            value = record.get(field)
            if not isinstance(value, str) or not value.strip():
                raise FlyThinkerError(f"{path}:{number}: field {field!r} must be a non-empty string")
        examples.append(Example(str(record.get("id", number)), record["prompt"], record["target"]))
    if not examples:
        raise FlyThinkerError(f"{path}: no records")
    return examples


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """What batches are padded with: the pad token, else EOS (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
