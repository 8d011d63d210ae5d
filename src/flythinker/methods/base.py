"""One small interface every method implements, so the runner never asks which method it holds.

A method knows three things: how to build its model (fresh, or from its own checkpoint), how to
turn a LongLaMP record into a prompt (and a training target), and how to decode a batch. The
shared parts — batching, timing, prediction rows, training through `flythinker.training.train.train` —
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
    FlyThinkerSettings,
    GenerationConfig,
    TrainConfig,
    require,
)
from flythinker.data.collate import Encoded, Example, encode, encode_prompts, pad_id
from flythinker.data.longlamp import LongLaMPRecord
from flythinker.data.prompts import PromptBudgets, PromptStyle, records_to_examples
from flythinker.data.retrieval import RETRIEVERS, make_retriever
from flythinker.errors import FlyThinkerError
from flythinker.methods.costs import BenchContext, BenchEntry, BenchTrainer, Floors
from flythinker.model.decoding import GenerationOutput
from flythinker.training.engines import Processes
from flythinker.training.train import TrainResult, teacher_forced_losses, train


@dataclass
class MethodConfig(FlyThinkerSettings):
    """One row of the comparison: a method and its settings.

    FlyThinker's knobs (lam, fusion, rescale, lam_warmup, gate, gate_scale, projection_init,
    projection_scale, lora_rank, lora_alpha, lora_targets) are inherited from
    `flythinker.config.FlyThinkerSettings`, with its defaults (the published method, so the
    paper's config reproduces it; a model built directly defaults to the start-at-SFT projection
    instead) and its checks, so a bad value in any row fails when the run config is loaded,
    before the first row trains. Rows of other methods leave them at their defaults.

    Attributes:
        method: non_personalized, rag, sft, cot, coconut or flythinker.
        label: Name of the row in results (default: the method name); set it to tell ablations
            apart, e.g. "flythinker-lam2".
        generator: The generator (every method has one): local dir, built-in alias or hub id.
        reasoner: FlyThinker's reasoner, resolved the same way ("shared": the generator plus a
            LoRA adapter).
        retriever: How rag ranks profile items for its prompt: bm25, recency, random or dense.
        k: Profile items in the rag prompt.
        latent_thoughts: Coconut's number of latent thoughts at inference (its last stage).
        rationale_tokens: CoT/Coconut: longest rationale generated per training record.
    """

    # Keyword-only: they follow the inherited fields, which all have defaults.
    method: str = field(kw_only=True)
    label: str | None = field(default=None, kw_only=True)
    generator: str = field(default="tiny", kw_only=True)
    reasoner: str = field(default="tiny-small", kw_only=True)
    retriever: str = field(default="bm25", kw_only=True)
    k: int = field(default=4, kw_only=True)
    latent_thoughts: int = field(default=2, kw_only=True)
    rationale_tokens: int = field(default=64, kw_only=True)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
            require(self.retriever in RETRIEVERS, f"unknown retriever {self.retriever!r}; choose one of {', '.join(RETRIEVERS)}")
            for name in ("k", "latent_thoughts", "rationale_tokens"):
                value = getattr(self, name)
                require(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        except FlyThinkerError as exc:
            raise FlyThinkerError(f"method row {self.name!r}: {exc}") from None

    @property
    def name(self) -> str:
        return self.label or self.method

    def flythinker_config(self, dtype: str) -> FlyThinkerConfig:
        """The FlyThinkerConfig of this row: its models, dtype and every inherited knob."""
        knobs = {f.name: getattr(self, f.name) for f in fields(FlyThinkerSettings)}
        return FlyThinkerConfig(**knobs, reasoner=self.reasoner, generator=self.generator, dtype=dtype)  # type: ignore[arg-type]


@dataclass
class RunContext:
    """What the runner hands every method: the task, shared settings and its working directory."""

    task: str
    budgets: PromptBudgets
    dtype: str
    work_dir: Path  # this method's directory for this task (checkpoint, caches)
    seed: int = 0
    processes: Processes = field(default_factory=Processes)  # under `accelerate launch`: which one this is


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
    baseline: ClassVar[bool] = False  # the method every other row is compared with (SFT, as in the paper)

    def __init__(self, config: MethodConfig, context: RunContext) -> None:
        self.config = config
        self.context = context
        self.tokenizer: PreTrainedTokenizerBase | None = None

    # --- benchmark -----------------------------------------------------------------------
    @classmethod
    def bench_entries(cls, bench: BenchContext, floors: Floors) -> list[BenchEntry]:
        """The ways this method decodes, for `flythinker bench`: one entry per mode it has.
        None by default: a method that decodes as another one does (a prompt-only baseline
        decodes as SFT) adds nothing to time."""
        return []

    @classmethod
    def bench_trainers(cls, bench: BenchContext) -> list[BenchTrainer]:
        """What this method's training step runs, for `flythinker bench` (none: not timed)."""
        return []

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
    def train(self, records: Sequence[LongLaMPRecord], config: TrainConfig, run_config: Any,
              eval_records: Sequence[LongLaMPRecord] = ()) -> TrainResult:
        """Fine-tune on ``records``; with ``config.eval_every``, log the loss on ``eval_records``
        (encoded as training encodes them) as training goes."""
        if not self.trainable:
            raise FlyThinkerError(f"method {self.config.name!r} is zero-shot and does not train")
        assert self.tokenizer is not None, "build() first"
        return train(self.model(), self.tokenizer, self.examples(records, for_training=True), self.training_limits(config),
                     run_config=run_config, show_progress=True,
                     eval_examples=self.examples(eval_records, for_training=True) if config.eval_every else ())

    # --- held-out loss -------------------------------------------------------------------
    # Teacher-forced loss of the reference target given this method's prompt: the cheap,
    # low-noise first measure of a trained method, a forward pass per record.
    heldout_comparable: ClassVar[bool] = True  # False where training targets hold more than the answer

    @torch.no_grad()
    def target_losses(self, records: Sequence[LongLaMPRecord], config: TrainConfig,
                      batch_size: int) -> dict[str, tuple[float, int]]:
        """``{id: (summed cross-entropy, target tokens)}`` over target + EOS, each record's prompt
        and target encoded exactly as training encodes them."""
        model = self.model()
        was_training = model.training
        model.eval()
        encoded = self.encoded_targets(records, config)
        try:
            pairs = teacher_forced_losses(model, list(encoded.values()), self.pad_token_id, batch_size,
                                          next(model.parameters()).device)
        finally:
            model.train(was_training)
        return dict(zip(encoded, pairs, strict=True))

    def encoded_targets(self, records: Sequence[LongLaMPRecord], config: TrainConfig) -> dict[str, Encoded]:
        """``{id: prompt + target + EOS}`` of each record, encoded exactly as training encodes them."""
        assert self.tokenizer is not None, "build() first"
        limits = self.training_limits(config)
        return {e.id: encode(self.tokenizer, e, limits.max_prompt_tokens, limits.max_target_tokens)
                for e in self.examples(records, for_training=True)}

    # Tokens a training target holds beyond the record's own text (CoT: its rationale and marker).
    target_extra_tokens = 0

    def training_limits(self, config: TrainConfig) -> TrainConfig:
        """``config`` with its token caps raised, where lower, to what this method's prompts and
        targets hold under the run's budgets. The caps guard `flythinker train` against runaway
        inputs; here the budgets already bound the texts, and a lower cap would cut in training
        what decoding keeps (the start of a long prompt, CoT's answer behind its rationale)."""
        budgets = self.context.budgets
        return replace(config, max_prompt_tokens=max(config.max_prompt_tokens, budgets.prompt_tokens),
                       max_target_tokens=max(config.max_target_tokens, budgets.target_tokens + self.target_extra_tokens))

    @property
    def pad_token_id(self) -> int:
        """What batches of this method's prompts are padded with (EOS where the tokenizer has no pad)."""
        assert self.tokenizer is not None, "build() first"
        return pad_id(self.tokenizer)

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
