"""Coconut baseline: k latent thoughts between the prompt and the answer (Hao et al., 2024).

A latent thought is the model's own last hidden state (after the final norm) fed back as the next
input embedding, so thoughts depend on each other and run one forward pass each. The layout is

    prompt  BEGIN_THOUGHT  t_1 ... t_k  END_THOUGHT  answer

Markers are plain text, not new tokens: the checkpoint stays a stock causal LM that loads with the
stock tokenizer, and the markers' embeddings already exist (Coconut adds three tokens and copies an
existing token's embedding into them, which buys nothing here). They are tokenized on their own and
spliced in as ids, so the tokens at training and at inference are the same whatever the prompt ends
with. The answer follows END_THOUGHT directly; nothing is decoded between the thoughts.

Training follows Coconut's curriculum on the CoT rationales (`flythinker.methods.cot`, same cache
and generation): a rationale's sentences are its reasoning steps, and stage s replaces the first s
of them with s latent thoughts (one thought per step; Coconut's c = 1). The loss covers what
remains: the rest of the language rationale, the answer marker, the answer. Stages run 0..k with
k = ``latent_thoughts``; stage 0 is CoT plus empty thought markers, and the last stage k also
drops whatever language rationale is left (Coconut's final stage, folded into stage k to keep k + 1
stages), so the last stage trains exactly the layout decoding uses (with k = 0, the one stage is
SFT plus markers). Every row of a stage gets s thoughts, even a rationale shorter than s
sentences (Coconut's ``pad_latent_to_max``), which keeps the thought block the same width in every
row, as decoding needs. The training epochs (and ``max_steps``, if set) are split evenly across the
k + 1 stages; each stage is one call of the shared training loop on that stage's encodings, with a
fresh optimizer and schedule (Coconut resets its optimizer at every stage). The loop sees
`LatentLM`, whose forward takes the loop's left-padded batch, marks latent slots with LATENT_SLOT,
and runs prefix pass, k latent passes (KV cache, gradients through all of them) and answer pass.

Decoding is batched with one KV cache: the prefill runs the left-padded prompts plus BEGIN_THOUGHT,
then k one-position passes of latent thoughts, then END_THOUGHT, and every decode step reuses the
cache. (Coconut's reference decoder re-runs the whole prefix for each token at batch size 1.)
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutput

from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.collate import Encoded, Example, pad_id
from flythinker.data.longlamp import LongLaMPRecord
from flythinker.errors import FlyThinkerError
from flythinker.io import append_jsonl
from flythinker.methods.costs import NEVER_STOP, BenchEntry
from flythinker.methods.cot import cot_target, method_rationales, rationale_room, rationale_steps
from flythinker.methods.lm import LMMethod
from flythinker.model.decoding import (
    GenerationOutput,
    StepDecoder,
    cache_kwargs,
    decode,
    eval_mode,
    position_ids_from_mask,
)
from flythinker.model.sources import trains_checkpointed
from flythinker.training.train import LOG_NAME, TrainResult, save_checkpoint, train

log = logging.getLogger(__name__)

BEGIN_THOUGHT = "<thought>"
END_THOUGHT = "</thought>\n"
# Marks a latent slot in training ids. Negative, so it can never be a real token; the slot's
# embedding is the previous position's hidden state, never a lookup.
LATENT_SLOT = -1
STAGES_DIR = "stages"


@dataclass(frozen=True)
class ThoughtMarkers:
    begin: tuple[int, ...]
    end: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase) -> ThoughtMarkers:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

        return cls(ids(BEGIN_THOUGHT), ids(END_THOUGHT))


# --------------------------------------------------------------------------- curriculum


@dataclass(frozen=True)
class Stage:
    latents: int  # the stage number: thoughts standing in for the first `latents` rationale steps
    keeps_rationale: bool  # whether the rest of the language rationale stays in the target
    training: TrainConfig  # this stage's share of the run's epochs / steps, its own log dir


def curriculum(config: TrainConfig, latent_thoughts: int) -> list[Stage]:
    """Stages 0..k with k = ``latent_thoughts``; the epochs (and max_steps) split evenly."""
    if latent_thoughts < 0:
        raise FlyThinkerError(f"latent_thoughts must be >= 0, got {latent_thoughts}")
    n = latent_thoughts + 1
    steps = _split_evenly(config.max_steps, n) if config.max_steps else [0] * n
    return [
        Stage(
            latents=s, keeps_rationale=s < latent_thoughts,
            training=replace(config, epochs=config.epochs / n, max_steps=steps[s],
                             output_dir=str(Path(config.output_dir) / STAGES_DIR / f"stage-{s}")),
        )
        for s in range(n)
    ]


def _split_evenly(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal shares, the remainder to the later (harder) stages; each
    stage gets at least one step."""
    share, extra = divmod(total, parts)
    return [max(1, share + (1 if i >= parts - extra else 0)) for i in range(parts)]


def encode_stage_example(
    tokenizer: PreTrainedTokenizerBase,
    example: Example,
    rationale: str,
    latents: int,
    keeps_rationale: bool,
    markers: ThoughtMarkers,
    max_prompt_tokens: int,
    max_target_tokens: int,
) -> Encoded:
    """prompt BEGIN [slot]*latents END rest-of-rationale MARKER target EOS; loss on what follows END.

    The thought block carries no labels: decoding inserts it, the model never has to write it.
    """
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"][-max_prompt_tokens:]
    if not prompt:
        raise FlyThinkerError(f"example {example.id!r}: empty prompt")
    rest = " ".join(rationale_steps(rationale)[latents:]) if keeps_rationale else ""
    text = cot_target(rest, example.target) if rest else example.target
    answer = tokenizer(text, add_special_tokens=False)["input_ids"][:max_target_tokens]
    answer.append(tokenizer.eos_token_id)
    thought = [*markers.begin, *[LATENT_SLOT] * latents, *markers.end]
    return Encoded(prompt + thought + answer, [-100] * (len(prompt) + len(thought)) + answer)


# --------------------------------------------------------------------------- latent passes


@dataclass
class LatentBatch:
    """A training batch shifted so that every row's latent slots share the same columns."""

    input_ids: torch.Tensor  # slots still hold LATENT_SLOT
    attention_mask: torch.Tensor
    shifts: list[int]  # how far each row moved right: aligned column = original column + shift
    start: int  # column of the first slot: prompt and BEGIN_THOUGHT fill the columns before it
    count: int  # slots per row

    @property
    def answer_start(self) -> int:
        """First column after the slots (END_THOUGHT, then the supervised text)."""
        return self.start + self.count


def align_latent_slots(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LatentBatch:
    """Shift each row of a left-padded batch right until its slots start where the latest row's do.

    Rows whose prompts are shorter get more left padding and, at the end, right padding (masked,
    and after every real token, so a causal model is unaffected). Then one pass runs every row's
    prefix, and each latent pass is one column wide for the whole batch.
    """
    slots = input_ids == LATENT_SLOT
    counts = slots.sum(-1)
    count = int(counts[0])
    if count == 0 or bool((counts != count).any()):
        raise FlyThinkerError(f"every row needs the same number of latent slots, got {counts.tolist()}")
    starts = slots.int().argmax(-1)
    for row, first in enumerate(starts.tolist()):
        if not bool(slots[row, first : first + count].all()):
            raise FlyThinkerError(f"row {row}: latent slots are not contiguous")
    if int(starts.min()) < 1:
        raise FlyThinkerError("latent slots need a prompt (and BEGIN_THOUGHT) before them")
    shifts = (starts.max() - starts).tolist()
    width = input_ids.shape[1] + max(shifts)

    def shifted(x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros((x.shape[0], width))
        for row, shift in enumerate(shifts):
            out[row, shift : shift + x.shape[1]] = x[row]
        return out

    return LatentBatch(shifted(input_ids), shifted(attention_mask), shifts, int(starts.max()), count)


def unalign_answer_logits(answer: torch.Tensor, batch: LatentBatch, width: int) -> torch.Tensor:
    """(batch, width, vocab) logits in the caller's column layout from those of the aligned columns
    ``answer_start`` on. The columns before (prompt, BEGIN_THOUGHT, slots) hold zeros: the tokens
    they predict, up to END_THOUGHT's first, are never labels, and the prefix pass skips the LM head."""
    out = answer.new_zeros(answer.shape[0], width, answer.shape[-1])
    for row, shift in enumerate(batch.shifts):
        first = batch.answer_start - shift  # the answer block's first column, unshifted
        out[row, first:] = answer[row, : width - first]
    return out


def _caches(lm: PreTrainedModel) -> tuple[dict, dict]:
    """One KV cache, as keyword arguments for the base model and for the LM (the name may differ)."""
    cache = DynamicCache(config=lm.config)
    return cache_kwargs(lm.base_model, cache), cache_kwargs(lm, cache)


def _grow(attention_mask: torch.Tensor, last_position: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask with ``n`` more real columns, and the (batch, n) positions of those columns."""
    mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], n)], dim=1)
    return mask, last_position + torch.arange(1, n + 1, device=last_position.device)


def think(
    lm: PreTrainedModel,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    last_position: torch.Tensor,
    count: int,
    base_cache: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` latent thoughts after what the cache holds, the first fed ``hidden`` (batch, d).

    Training and decoding both call this, so they compute the thoughts identically. Gradients flow
    through every pass (the cache keeps the graph). Returns the grown mask and last position.
    """
    dtype = lm.get_input_embeddings().weight.dtype
    for _ in range(count):
        attention_mask, last_position = _grow(attention_mask, last_position, 1)
        hidden = lm.base_model(
            inputs_embeds=hidden[:, None].to(dtype), attention_mask=attention_mask,
            position_ids=last_position, use_cache=True, **base_cache,
        ).last_hidden_state[:, -1]
    return attention_mask, last_position


def latent_forward(lm: PreTrainedModel, batch: LatentBatch) -> torch.Tensor:
    """Logits of the columns from ``batch.answer_start`` on: prefix pass, latent passes, one pass
    over the rest. ``logits[:, j]`` predicts column ``answer_start + j + 1``."""
    mask = batch.attention_mask
    positions = position_ids_from_mask(mask)
    embeds = lm.get_input_embeddings()(batch.input_ids.clamp(min=0))  # slot columns are never read
    base_cache, lm_cache = _caches(lm)
    start, rest = batch.start, batch.answer_start
    prefix = lm.base_model(
        inputs_embeds=embeds[:, :start], attention_mask=mask[:, :start],
        position_ids=positions[:, :start], use_cache=True, **base_cache,
    ).last_hidden_state[:, -1]
    think(lm, prefix, mask[:, :start], positions[:, start - 1 : start], batch.count, base_cache)
    return lm(
        inputs_embeds=embeds[:, rest:], attention_mask=mask, position_ids=positions[:, rest:],
        use_cache=True, **lm_cache,
    ).logits


class LatentLM(torch.nn.Module):
    """The module Coconut trains: a causal LM whose LATENT_SLOT positions take its own hidden states.

    Its forward has the training loop's signature and returns logits in the batch's own column
    layout (plus the mean token loss when given labels). A batch without slots (stage 0) is a plain
    LM forward; with slots, the rows are aligned (`align_latent_slots`) and positions recomputed
    from the aligned mask by the rule the loop uses, so ``position_ids`` is not needed.
    """

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self):
        return self.lm.config

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        if not bool((input_ids == LATENT_SLOT).any()):
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
            return CausalLMOutput(loss=out.loss, logits=out.logits)
        if self.training and trains_checkpointed(self.lm):
            # Checkpointed layers drop the KV cache, and the latent passes read nothing else.
            raise FlyThinkerError("coconut cannot train with gradient_checkpointing: latent thoughts need the KV cache")
        batch = align_latent_slots(input_ids, attention_mask)
        logits = unalign_answer_logits(latent_forward(self.lm, batch), batch, input_ids.shape[1])
        loss = None
        if labels is not None:
            _check_no_labels_before_answer(labels, batch)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def save_pretrained(self, path: str | Path, state_dict: dict | None = None, **kwargs: object) -> None:
        """The checkpoint is the plain LM: latent thoughts are a way of running it, not weights."""
        if state_dict is not None:  # gathered from this wrapper: its keys carry our "lm." prefix
            kwargs["state_dict"] = {k.removeprefix("lm."): v for k, v in state_dict.items()}
        self.lm.save_pretrained(path, **kwargs)


def _check_no_labels_before_answer(labels: torch.Tensor, batch: LatentBatch) -> None:
    for row, shift in enumerate(batch.shifts):
        if bool((labels[row, : batch.answer_start - shift + 1] != -100).any()):
            raise FlyThinkerError(f"row {row}: labels inside the prompt or thought block, where nothing is predicted")


# --------------------------------------------------------------------------- decoding


class LatentThoughtDecoder(StepDecoder):
    """Prefill = prompt + BEGIN_THOUGHT, k latent passes, END_THOUGHT; steps reuse the cache.

    The shared loop's mask and positions cover the prompt and the generated tokens only. The
    thought block (``extra`` columns) sits in the cache between the two, all real in every row: the
    prompts are left-padded, so the block starts at the same column in each row and needs no
    alignment. Each step therefore splices ``extra`` ones into the loop's mask after the prompt and
    shifts the loop's positions by ``extra``.
    """

    def __init__(self, lm: PreTrainedModel, markers: ThoughtMarkers, latents: int) -> None:
        self.lm, self.device = lm, lm.device
        self.markers, self.latents = markers, latents
        self.base_cache, self.lm_cache = _caches(lm)
        self.extra = len(markers.begin) + latents + len(markers.end)
        self.prompt_len = 0

    def _marker(self, ids: tuple[int, ...], batch: int) -> torch.Tensor:
        return torch.tensor(ids, device=self.device).expand(batch, -1)

    def prefill(self, input_ids, attention_mask, position_ids):
        batch, self.prompt_len = input_ids.shape
        begin = self._marker(self.markers.begin, batch)
        mask, begin_positions = _grow(attention_mask, position_ids[:, -1:], begin.shape[1])
        positions = torch.cat([position_ids, begin_positions], dim=1)
        hidden = self.lm.base_model(
            input_ids=torch.cat([input_ids, begin], dim=1), attention_mask=mask, position_ids=positions,
            use_cache=True, **self.base_cache,
        ).last_hidden_state[:, -1]
        mask, last = think(self.lm, hidden, mask, positions[:, -1:], self.latents, self.base_cache)
        end = self._marker(self.markers.end, batch)
        mask, end_positions = _grow(mask, last, end.shape[1])
        return self.lm(
            input_ids=end, attention_mask=mask, position_ids=end_positions, use_cache=True,
            logits_to_keep=1, **self.lm_cache,
        ).logits[:, -1].float()

    def step(self, tokens, attention_mask, position_ids):
        p = self.prompt_len
        thought = attention_mask.new_ones(attention_mask.shape[0], self.extra)
        mask = torch.cat([attention_mask[:, :p], thought, attention_mask[:, p:]], dim=1)
        return self.lm(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids + self.extra,
            use_cache=True, **self.lm_cache,
        ).logits[:, -1].float()


def generate_latent(
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    latents: int,
    eos_token_id: int | list[int] | None = None,
    on_token=None,
    output_scores: bool = False,
) -> GenerationOutput:
    """Decode a left-padded batch with ``latents`` thoughts before the answer, through the shared loop."""
    if config.cuda_graphs or config.compile:
        _warn_eager_once()
    decoder = LatentThoughtDecoder(lm, ThoughtMarkers.of(tokenizer), latents)
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    pad = pad_id(tokenizer)
    context = getattr(lm.config, "max_position_embeddings", None)
    with eval_mode(lm), torch.no_grad():
        return decode(
            decoder, input_ids, attention_mask, config, eos_token_id=eos, pad_token_id=pad,
            # The thought block takes context the loop does not see.
            context_length=None if context is None else context - decoder.extra,
            on_token=on_token, output_scores=output_scores,
        )


@functools.cache
def _warn_eager_once() -> None:
    log.warning("Coconut decodes with eager steps: its latent passes have no static-cache path, so cuda_graphs "
                "and compile are ignored")


# --------------------------------------------------------------------------- the method


# The thought markers without a tokenizer, for the benchmark: "<thought>" and "</thought>" are about
# three tokens each; which ids they are does not change the cost.
SHAPE_THOUGHT_MARKERS = ThoughtMarkers(begin=(3, 4, 5), end=(6, 4, 5))


class Coconut(LMMethod):
    name = "coconut"
    style = "profile"
    trainable = True
    heldout_comparable = False  # its training targets put rationale steps or latent thoughts before the answer

    @property
    def target_extra_tokens(self) -> int:
        return rationale_room(self)  # the first stage's target is CoT's


    @classmethod
    def bench_entries(cls, bench, floors):
        """Feeds ``latent_thoughts`` hidden states back between its thought markers, then answers;
        dynamic steps only (its latent passes have no static-cache path). Its training step is not
        timed: the curriculum's stages run k+1 sequential passes, not one comparable step."""
        if "dynamic" not in bench.steps:
            return []
        g, latents = bench.generator, bench.latent_thoughts
        thought_tokens = latents + len(SHAPE_THOUGHT_MARKERS.begin) + len(SHAPE_THOUGHT_MARKERS.end)

        def run(ids, mask, n, on_token):
            with torch.no_grad():
                return decode(LatentThoughtDecoder(g, SHAPE_THOUGHT_MARKERS, latents), ids, mask,
                              GenerationConfig(max_new_tokens=n), on_token=on_token, **NEVER_STOP)

        return [BenchEntry(cls.name, None, [g], run, floors.thinking(thought_tokens, bench.prompt_tokens), batched=False)]

    def build(self, checkpoint: Path | None = None) -> None:
        super().build(checkpoint)
        self.latent_lm = LatentLM(self.lm)

    def model(self) -> torch.nn.Module:
        return self.latent_lm

    def decode(self, input_ids, attention_mask, generation, on_token):
        return generate_latent(self.lm, self.tokenizer, input_ids, attention_mask, generation,
                               latents=self.config.latent_thoughts, on_token=on_token)

    def train(self, records: Sequence[LongLaMPRecord], config: TrainConfig, run_config=None,
              eval_records: Sequence[LongLaMPRecord] = ()) -> TrainResult:
        """The curriculum, one training run per stage. No evaluation curve: each stage trains on
        different targets (``eval_every`` is ignored here, with a warning)."""
        assert self.tokenizer is not None, "build() first"
        if config.eval_every:
            log.warning("Coconut logs no evaluation curve (its stages train on different targets); eval_every ignored")
            config = replace(config, eval_every=0)
        config = self.training_limits(config)
        examples = self.examples(records, for_training=True)
        rationales = method_rationales(self, records)  # before any stage changes the weights
        markers = ThoughtMarkers.of(self.tokenizer)
        results = []
        for stage in curriculum(config, self.config.latent_thoughts):
            items = [
                encode_stage_example(self.tokenizer, e, rationales[e.id], stage.latents, stage.keeps_rationale,
                                     markers, config.max_prompt_tokens, config.max_target_tokens)
                for e in examples
            ]
            results.append(train(self.latent_lm, self.tokenizer, items, stage.training,
                                 run_config=run_config, save=False, show_progress=True))
        out, processes = Path(config.output_dir), self.context.processes
        with processes.main_first():  # one writer; every process holds the same trained weights
            if processes.main:
                save_checkpoint(self.lm, self.tokenizer, out / "checkpoint", run_config or config)
                merge_stage_logs(results, out / LOG_NAME)
        return TrainResult(
            steps=sum(r.steps for r in results),
            losses=[loss for r in results for loss in r.losses],
            seconds=sum(r.seconds for r in results),
            samples=sum(r.samples for r in results),
            checkpoint=out / "checkpoint",
            log_path=out / LOG_NAME,
            extra={"stages": [{"stage": s, "steps": r.steps, "first_loss": r.losses[0], "last_loss": r.losses[-1]}
                              for s, r in enumerate(results)]},
        )


def merge_stage_logs(results: Sequence[TrainResult], path: Path) -> Path:
    """One log for the whole curriculum, as the training loop writes it, with a ``stage`` field and
    steps counted across stages."""
    path.unlink(missing_ok=True)
    done = 0
    for stage, result in enumerate(results):
        if result.log_path is not None and result.log_path.is_file():
            for line in result.log_path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                append_jsonl(path, {**row, "step": row["step"] + done, "stage": stage})
        done += result.steps
    return path
