"""One small interface every method implements, so the runner never asks which method it holds.

A method knows three things: how to build its model (fresh, or from its own checkpoint), how to
turn a LongLaMP record into a prompt (and a training target), and how to decode a batch. The
shared parts — batching, timing, prediction rows, training through `flythinker.train.train` —
live here once.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from transformers import PreTrainedTokenizerBase

from flythinker.config import (
    FlyThinkerConfig,
    Fusion,
    Gate,
    GenerationConfig,
    ProjectionInit,
    TrainConfig,
)
from flythinker.data.collate import Example, collate, encode, encode_prompts
from flythinker.data.longlamp import LongLaMPRecord
from flythinker.data.prompts import PromptBudgets, PromptStyle, records_to_examples
from flythinker.data.retrieval import make_retriever
from flythinker.decoding import GenerationOutput
from flythinker.errors import FlyThinkerError
from flythinker.model import position_ids_from_mask
from flythinker.train import TrainResult, token_cross_entropy_sum, train


@dataclass
class MethodConfig:
    """One row of the comparison: a method and its settings.

    Attributes:
        method: non_personalized, rag, sft, cot, coconut or flythinker.
        label: Name of the row in results (default: the method name); set it to tell ablations
            apart, e.g. "flythinker-lam2".
        generator: The generator (every method has one): local dir, built-in alias or hub id.
        reasoner: FlyThinker's reasoner, resolved the same way.
        lam, fusion, rescale, lam_warmup, gate, gate_scale, projection_init, projection_scale, lora_rank,
            lora_alpha, lora_targets: FlyThinker's settings, as documented on
            `flythinker.config.FlyThinkerConfig` (whose defaults these are).
        retriever: How rag (and the profile form, if set for it) ranks profile items: bm25,
            recency, random or dense.
        k: Profile items in the rag prompt.
        latent_thoughts: Coconut's number of latent thoughts at inference (its last stage).
        rationale_tokens: CoT/Coconut: longest rationale generated per training record.
    """

    method: str
    label: str | None = None
    generator: str = "tiny"
    reasoner: str = "tiny-small"
    lam: float = FlyThinkerConfig.lam
    fusion: Fusion = FlyThinkerConfig.fusion
    rescale: bool = FlyThinkerConfig.rescale
    lam_warmup: float = FlyThinkerConfig.lam_warmup
    gate: Gate = FlyThinkerConfig.gate
    gate_scale: float = FlyThinkerConfig.gate_scale
    projection_scale: float = FlyThinkerConfig.projection_scale
    projection_init: ProjectionInit = FlyThinkerConfig.projection_init
    lora_rank: int = FlyThinkerConfig.lora_rank
    lora_alpha: float = FlyThinkerConfig.lora_alpha
    lora_targets: list[str] = field(default_factory=list)
    retriever: str = "bm25"
    k: int = 4
    latent_thoughts: int = 2
    rationale_tokens: int = 64

    @property
    def name(self) -> str:
        return self.label or self.method

    def flythinker_config(self, dtype: str) -> FlyThinkerConfig:
        """The FlyThinkerConfig of this row: every field the two share, validated there."""
        shared = {f.name for f in fields(FlyThinkerConfig)} & {f.name for f in fields(self)}
        return FlyThinkerConfig(**{name: getattr(self, name) for name in shared}, dtype=dtype)  # type: ignore[arg-type]


@dataclass
class RunContext:
    """What the runner hands every method: the task, shared settings and its working directory."""

    task: str
    budgets: PromptBudgets
    dtype: str
    work_dir: Path  # this method's directory for this task (checkpoint, caches)
    seed: int = 0


@dataclass
class PredictionRow:
    id: str
    prediction: str
    reference: str
    new_tokens: int  # tokens of the final text (CoT: excluding its rationale)
    generated_tokens: int  # every token decoded for this row
    ttft_s: float  # prompt in to first token of the final text out, for this row's batch
    decode_s: float  # the whole batch's decode time
    batch_steps: int  # decode steps the batch ran (its longest row)
    batch_size: int


class Method(ABC):
    """Base class: subclasses set ``name``, ``style``, ``trainable`` and implement the model parts."""

    name: ClassVar[str]
    style: ClassVar[PromptStyle] = "profile"
    trainable: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, context: RunContext) -> None:
        self.config = config
        self.context = context
        self.tokenizer: PreTrainedTokenizerBase | None = None

    @classmethod
    def check(cls, config: MethodConfig) -> None:
        """Raise FlyThinkerError for settings this method cannot run, before any row trains:
        a typo in the fifth row of a study must not surface an hour into it."""

    # --- model ---------------------------------------------------------------------------
    @abstractmethod
    def build(self, checkpoint: Path | None = None) -> None:
        """Load the model(s): from ``checkpoint`` when given, else fresh from the config."""

    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The module that training optimises (its forward returns ``.loss``) and that is saved."""

    @abstractmethod
    def decode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, generation: GenerationConfig,
        on_token: Callable[[torch.Tensor], None],
    ) -> GenerationOutput:
        """Decode one left-padded batch of prompts."""

    # --- prompts -------------------------------------------------------------------------
    def examples(self, records: Sequence[LongLaMPRecord], for_training: bool) -> list[Example]:
        """Prompt (and target) texts of ``records`` in this method's prompt style."""
        assert self.tokenizer is not None, "build() first"
        retriever = None
        if self.style == "rag":
            retriever = make_retriever(self.config.retriever, seed=self.context.seed)
        return records_to_examples(
            records, self.tokenizer, self.style, budgets=self.context.budgets, retriever=retriever,
            k=self.config.k if self.style == "rag" else None, truncate_target=for_training,
        )

    def final_text(self, text: str) -> tuple[str, int]:
        """The part of a decoded text that is the answer, and the character offset where it starts."""
        return text, 0

    # --- training ------------------------------------------------------------------------
    def train(self, records: Sequence[LongLaMPRecord], config: TrainConfig, run_config: Any) -> TrainResult:
        if not self.trainable:
            raise FlyThinkerError(f"method {self.config.name!r} is zero-shot and does not train")
        assert self.tokenizer is not None, "build() first"
        return train(self.model(), self.tokenizer, self.examples(records, for_training=True), config,
                     run_config=run_config, show_progress=True)

    # --- held-out loss -------------------------------------------------------------------
    # Teacher-forced loss of the reference target given this method's prompt: the cheap,
    # low-noise first measure of a trained method, a forward pass per record.
    heldout_comparable: ClassVar[bool] = True  # False where training targets hold more than the answer

    @torch.no_grad()
    def target_losses(self, records: Sequence[LongLaMPRecord], config: TrainConfig,
                      batch_size: int) -> dict[str, tuple[float, int]]:
        """``{id: (summed cross-entropy, target tokens)}`` over target + EOS, each record's prompt
        and target encoded exactly as training encodes them."""
        assert self.tokenizer is not None, "build() first"
        model = self.model()
        was_training = model.training
        model.eval()
        examples = self.examples(records, for_training=True)
        encoded = [encode(self.tokenizer, e, config.max_prompt_tokens, config.max_target_tokens) for e in examples]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        device = next(model.parameters()).device
        losses: dict[str, tuple[float, int]] = {}
        try:
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = {k: v.to(device) for k, v in collate(chunk, pad).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=position_ids_from_mask(batch["attention_mask"])).logits
                for row, example in enumerate(examples[start : start + batch_size]):
                    labels = batch["labels"][row : row + 1]
                    total = token_cross_entropy_sum(logits[row : row + 1], labels)
                    losses[example.id] = (float(total), int((labels[:, 1:] != -100).sum()))
        finally:
            model.train(was_training)
        return losses

    # --- prediction ----------------------------------------------------------------------
    def predict(
        self, records: Sequence[LongLaMPRecord], generation: GenerationConfig, batch_size: int
    ) -> Iterator[list[PredictionRow]]:
        """Yield one list of rows per decoded batch, so callers can write them as they come."""
        assert self.tokenizer is not None, "build() first"
        examples = self.examples(records, for_training=False)
        references = {r.id: r.target for r in records}
        budget = self.context.budgets.prompt_tokens
        # One untimed short decode first: lazy initialisation (kernels, allocator, caches) would
        # otherwise land on whichever method happens to run first and skew its latency.
        warm = encode_prompts(self.tokenizer, [examples[0].prompt], max_prompt_tokens=budget)
        self.decode(warm["input_ids"], warm["attention_mask"], replace(generation, max_new_tokens=2), lambda _: None)
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = encode_prompts(self.tokenizer, [e.prompt for e in chunk], max_prompt_tokens=budget)
            yield self._decode_timed(chunk, batch, generation, references)

    def _decode_timed(self, chunk, batch, generation, references) -> list[PredictionRow]:
        stamps: list[float] = []
        start = time.perf_counter()
        out = self.decode(batch["input_ids"], batch["attention_mask"], generation,
                          on_token=lambda _: stamps.append(time.perf_counter()))
        total = time.perf_counter() - start
        rows = []
        for row, example in enumerate(chunk):
            ids = _until_eos(out.sequences[row].tolist(), self.tokenizer)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            answer, offset = self.final_text(text)
            first_answer_step = _step_of_char(ids, offset, self.tokenizer) if offset else 0
            # The clock reads the step that produced the first answer token: the same as its
            # index, unless the decoder wrote the answer in a later phase of its own.
            clock_step = out.answer_steps[row] if out.answer_steps is not None else first_answer_step
            ttft = stamps[min(clock_step, len(stamps) - 1)] - start
            rows.append(PredictionRow(
                id=example.id, prediction=answer.strip(), reference=references[example.id],
                new_tokens=len(ids) - first_answer_step, generated_tokens=len(ids),
                ttft_s=ttft, decode_s=total, batch_steps=out.sequences.shape[1], batch_size=len(chunk),
            ))
        return rows


def _until_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos)] if eos in ids else ids


def _step_of_char(ids: list[int], offset: int, tokenizer: PreTrainedTokenizerBase) -> int:
    """Index of the first token whose decoded prefix reaches character ``offset`` (binary search)."""
    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[: mid + 1], skip_special_tokens=True)) > offset:
            hi = mid
        else:
            lo = mid + 1
    return lo
