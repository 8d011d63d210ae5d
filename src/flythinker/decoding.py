"""Staggered decoding: reasoner and generator advance together, each with its own KV cache.

After the prompt prefill (reasoner first, then the generator over fused prompt embeddings), every
decode step feeds the newest token ``s_i`` to both models. The generator adds ``h_{i-1}``, which the
reasoner produced one step earlier; the reasoner reads ``s_i`` to produce ``h_i`` for the next step.
The two halves of a step do not depend on each other, which is what the overlap modes exploit:

- ``"none"``: reasoner step, then generator step, on the current stream (the CPU default).
- ``"streams"``: one GPU, the two steps on two CUDA streams joined by events every step.
- ``"devices"``: reasoner and generator on different devices; only the new token and one small
  vector per row cross between them, with non-blocking copies, so both devices run at once.

Hugging Face ``generate()`` cannot change a model's inputs per step, hence this loop. Only the
reasoner's base model runs (its LM head would be pure waste), and the generator's prefill keeps the
logits of the last position only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model import position_ids_from_mask

if TYPE_CHECKING:
    from flythinker.model import FlyThinker

log = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    # (batch, steps) new tokens only; rows that finished early are filled with the pad id.
    sequences: torch.Tensor
    # Per step, (batch, vocab) float32 generator logits before any warping (output_scores=True).
    scores: list[torch.Tensor] | None = None
    # Per step, (batch, d_R): the reasoning vector fused into the step that chose that token
    # (output_reasoning=True), for the reasoning lens.
    reasoning: list[torch.Tensor] | None = None


@torch.no_grad()
def generate(
    model: FlyThinker,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    *,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    output_scores: bool = False,
    output_reasoning: bool = False,
    **overrides: object,
) -> GenerationOutput:
    """Decode a left-padded batch with both models in lockstep.

    Args:
        model: the FlyThinker model; each of its two LMs stays on the device it is on.
        input_ids: (batch, prompt_len) prompt ids, left-padded.
        attention_mask: 1 for real tokens, 0 for padding (default: all ones).
        config: decoding settings; keyword ``overrides`` replace single fields of it.
        eos_token_id: id(s) that end a row (default: the tokenizer's / generator's EOS).
        pad_token_id: filler for finished rows (default: the tokenizer's pad, else EOS).
        on_token: called after every step with the (batch,) tensor of new tokens, for streaming.
        output_scores: also return each step's raw logits.
        output_reasoning: also return each step's reasoning vector.
    """
    config = dataclasses.replace(config or GenerationConfig(), **overrides)  # type: ignore[arg-type]
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise FlyThinkerError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise FlyThinkerError(f"empty prompt in batch row(s) {empty}: every prompt needs at least one token")
    max_new_tokens = _fit_context(model, input_ids.shape[1], config.max_new_tokens)
    eos_ids, pad_id = _special_ids(model, eos_token_id, pad_token_id)

    r_dev, g_dev = model.reasoner.device, model.generator.device
    streams = _Streams.for_mode(config.overlap, r_dev, g_dev)
    was_training = model.training
    model.eval()
    try:
        target_norm = model.target_norm() if model.config.rescale else None
        select = _token_selector(config, g_dev)

        mask_g = attention_mask.to(g_dev)
        positions = position_ids_from_mask(mask_g)
        # Caches are made here and filled in place by the models, one per role.
        r_cache = cache_kwargs(model.reasoner.base_model, DynamicCache(config=model.reasoner.config))
        g_cache = cache_kwargs(model.generator, DynamicCache(config=model.generator.config))
        # Prefill: the generator's prompt embeddings need every h of the prompt, so R goes first.
        h_prompt = model.reason(
            input_ids.to(r_dev), attention_mask.to(r_dev), positions.to(r_dev), use_cache=True, **r_cache
        ).last_hidden_state
        h_prev = h_prompt[:, -1].to(g_dev, non_blocking=True)
        embeds = model.fused_embeddings(input_ids.to(g_dev), mask_g, h_prompt.to(g_dev), target_norm)
        logits = model.generator(
            inputs_embeds=embeds,
            attention_mask=mask_g,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **g_cache,
        ).logits[:, -1].float()

        batch = input_ids.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=g_dev)
        eos = torch.tensor(eos_ids, device=g_dev)
        tokens: list[torch.Tensor] = []
        scores: list[torch.Tensor] | None = [] if output_scores else None
        reasoning: list[torch.Tensor] | None = [] if output_reasoning else None
        position = positions[:, -1:]
        for step in range(max_new_tokens):
            if scores is not None:
                scores.append(logits)
            if reasoning is not None:
                reasoning.append(h_prev)
            token = torch.where(finished, pad_id, select(logits))
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            finished |= torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask_g = torch.cat([mask_g, mask_g.new_ones(batch, 1)], dim=1)
            position = position + 1
            # Both halves of the step read only the new token and h_prev; neither waits on the other.
            signal = model.reasoning_signal(h_prev[:, None], target_norm)
            with streams.reasoner():
                h_next = model.reason(
                    token[:, None].to(r_dev, non_blocking=True),
                    mask_g.to(r_dev, non_blocking=True),
                    position.to(r_dev, non_blocking=True),
                    use_cache=True,
                    **r_cache,
                ).last_hidden_state[:, -1]
            with streams.generator():
                token_embeds = model.generator.get_input_embeddings()(token[:, None])
                embeds = token_embeds + signal.to(token_embeds.dtype)
                logits = model.generator(
                    inputs_embeds=embeds,
                    attention_mask=mask_g,
                    position_ids=position,
                    use_cache=True,
                    **g_cache,
                ).logits[:, -1].float()
            streams.join()
            h_prev = h_next.to(g_dev, non_blocking=True)
        return GenerationOutput(torch.stack(tokens, dim=1), scores, reasoning)
    finally:
        model.train(was_training)


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """``{name: cache}`` for ``model.forward``: transformers renamed ``past_key_values`` to ``cache``."""
    return {_cache_argument(type(model)): cache}


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _fit_context(model: FlyThinker, prompt_len: int, max_new_tokens: int) -> int:
    limit = model.context_length()
    if limit is None:
        return max_new_tokens
    if prompt_len >= limit:
        raise FlyThinkerError(
            f"prompt of {prompt_len} tokens leaves no room in the models' context of {limit} tokens; "
            "shorten the prompt or lower the token budgets"
        )
    if prompt_len + max_new_tokens > limit:
        log.warning("max_new_tokens cut from %d to %d to fit the context of %d", max_new_tokens, limit - prompt_len, limit)
        return limit - prompt_len
    return max_new_tokens


def _special_ids(model: FlyThinker, eos_token_id, pad_token_id) -> tuple[list[int], int]:
    tokenizer = model.tokenizer
    if eos_token_id is None:
        eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
    if eos_token_id is None:
        eos_token_id = model.generator.generation_config.eos_token_id
    if eos_token_id is None:
        raise FlyThinkerError("no EOS token id: pass eos_token_id or attach a tokenizer with an EOS token")
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    return eos_ids, eos_ids[0] if pad_token_id is None else pad_token_id


def _token_selector(config: GenerationConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    if not config.do_sample:
        return lambda logits: logits.argmax(dim=-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(config.temperature)])
    if config.top_k > 0:
        warpers.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(config.top_p))
    generator = torch.Generator(device=device).manual_seed(config.seed)

    def sample(logits: torch.Tensor) -> torch.Tensor:
        probs = warpers(None, logits).softmax(dim=-1)  # these warpers never read input_ids
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return sample


class _Streams:
    """Where each half of a decode step runs. Without streams both contexts are no-ops."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        if device is None:
            return
        self.main = torch.cuda.current_stream(device)
        self.r_stream = torch.cuda.Stream(device)
        self.g_stream = torch.cuda.Stream(device)

    @classmethod
    def for_mode(cls, overlap: str, r_dev: torch.device, g_dev: torch.device) -> _Streams:
        if overlap == "streams":
            if r_dev.type != "cuda" or r_dev != g_dev:
                raise FlyThinkerError(
                    f"overlap='streams' needs both models on one CUDA device (reasoner on {r_dev}, "
                    f"generator on {g_dev}); use overlap='none' on a CPU or 'devices' across devices"
                )
            return cls(r_dev)
        if overlap == "devices" and r_dev == g_dev:
            raise FlyThinkerError(
                f"overlap='devices' needs the reasoner and generator on different devices (both on {r_dev})"
            )
        return cls()

    def reasoner(self):
        return self._on(self.r_stream) if self.device is not None else contextlib.nullcontext()

    def generator(self):
        return self._on(self.g_stream) if self.device is not None else contextlib.nullcontext()

    def _on(self, stream: torch.cuda.Stream):
        # The side stream must see the new token, written on the main stream.
        stream.wait_stream(self.main)
        return torch.cuda.stream(stream)

    def join(self) -> None:
        """The main stream (sampling, the next step) waits until both halves are done."""
        if self.device is not None:
            self.main.wait_stream(self.r_stream)
            self.main.wait_stream(self.g_stream)
