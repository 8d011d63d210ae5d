"""Staggered decoding: reasoner and generator advance together, each with its own KV cache.

After the prompt prefill (reasoner first, then the generator over fused prompt embeddings), every
decode step feeds the newest token ``s_i`` to both models. The generator adds ``h_{i-1}``, which the
reasoner produced one step earlier; the reasoner reads ``s_i`` to produce ``h_i`` for the next step.
The two halves of a step do not depend on each other, which is what the overlap modes exploit:

- ``"none"``: reasoner step, then generator step, on the current stream (the CPU default).
- ``"streams"``: one GPU, the two steps on two CUDA streams joined by events every step.
- ``"devices"``: reasoner and generator on different devices; only the new token and one small
  vector per row cross between them, with non-blocking copies, so both devices run at once.

Orthogonally, ``cuda_graphs`` decodes on static KV caches and replays each step from a CUDA graph
(`flythinker.model.graphs`); under ``"streams"`` one graph holds both models' branches. ``compile``
runs the static steps through ``torch.compile`` (replayed from graphs too when both are on).

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
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.graphs import (
    KEPT_STATES,
    StaticState,
    StaticStep,
    StepInputs,
    check_compile,
    check_step_mode,
    compile_step,
    reserved_length,
    weights_fingerprint,
)

if TYPE_CHECKING:
    from flythinker.model.adapter import AdapterRows
    from flythinker.model.flythinker import FlyThinker

log = logging.getLogger(__name__)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0, 1, ... counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@dataclass
class GenerationOutput:
    # (batch, steps) new tokens only; rows that finished early are filled with the pad id.
    sequences: torch.Tensor
    # Per step, (batch, vocab) float32 generator logits before any warping (output_scores=True).
    scores: list[torch.Tensor] | None = None
    # Per step, (batch, d_R): the reasoner's vector after reading every token before that one,
    # its own reading of what comes next; the generator takes it in with that token's embedding
    # at the following step (output_reasoning=True), for the reasoning lens.
    reasoning: list[torch.Tensor] | None = None
    # Per row, the decode step whose token is the answer's first, for decoders that write
    # something else first (CoT's rationale); None: the answer starts at the first step.
    answer_steps: list[int] | None = None


class StepDecoder(ABC):
    """One model family's prefill and decode step; `decode` owns the loop around them.

    ``prefill`` reads the left-padded prompts and ``step`` one new token per row; both return the
    (batch, vocab) next-token logits. Implementations keep their own caches. `decode` calls
    ``reserve`` first with the longest sequence it may produce, which static caches are sized to.

    ``steps`` chooses how `step` runs `forward_step`: on the caches the prefill grew ("dynamic"),
    or on static caches and fixed buffers filled by `static_inputs` at the first step, eagerly
    ("static") or replayed from a CUDA graph ("graph"). With ``compile`` the static step goes
    through ``torch.compile`` (`compile_steps`). A decoder without static steps overrides `step`
    itself.

    Static buffers and the captured graph outlive the call: `release` hands them to
    `graphs.KEPT_STATES` under the decoder's `static_key`, and the next decoder of the same model
    and shape takes them back, refills them and replays the graph without capturing again.
    """

    device: torch.device  # where logits come out and tokens are chosen
    owner: torch.nn.Module  # the model whose kept static states this decoder uses
    steps: str = "dynamic"
    compile: bool = False
    max_length: int | None = None
    # Which of the batch's rows the caches hold, in order (`decode` updates it when rows leave);
    # None until decoding starts.
    rows: torch.Tensor | None = None
    static: StaticStep | None = None  # the step on static buffers, when the decoder uses one
    inputs: StepInputs | None = None  # its fixed input buffers
    state: StaticState | None = None  # what holds both, and the key it goes back under
    state_key: Hashable = None
    state_weights: int | None = None  # `weights_fingerprint` of the owner when the state was taken

    def reserve(self, max_length: int) -> None:
        self.max_length = reserved_length(max_length, static=self.steps != "dynamic")

    def use_steps(self, steps: str, compile: bool, models: Sequence[torch.nn.Module]) -> None:
        """Check and set how steps run (`steps`, `compile`) for ``models`` (the modules the steps
        run, on their devices); compiling needs static caches."""
        devices = [model.device for model in models]
        check_step_mode(steps, *devices)
        if compile:
            check_compile(devices, models)
            if steps == "dynamic":
                raise FlyThinkerError("compiled steps run on static caches: use steps 'static' or 'graph' with compile")
        self.steps, self.compile = steps, compile

    def release(self) -> None:
        """Hand the static state back for the next call when decoding ends. The step forgets this
        decoder's method (its body): a kept state must not keep the decoder, or the model its
        states are kept for, alive."""
        if self.state is not None:
            self.state.step.body = None
            KEPT_STATES.put(self.owner, self.state_key, self.state, weights=self.state_weights)
        self.static = self.state = self.inputs = None

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor: ...

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.steps == "dynamic":
            return self.forward_step(tokens, attention_mask, position_ids)
        if self.static is None:  # set up at the first step, so that it never delays the first token
            self._take_static_state(tokens.shape[0])
        self.inputs.load(tokens, position_ids)
        return self.static()

    def _take_static_state(self, batch: int) -> None:
        self.state_weights = weights_fingerprint(self.owner)
        self.state_key = self.static_key(batch)
        state = KEPT_STATES.take(self.owner, self.state_key) or StaticState(self.max_length)
        state.uses += 1
        self.inputs = self.static_inputs(state)
        if self.compile:
            self.compile_steps()
        if state.step is None:
            state.step = StaticStep(self._static_step, self.device, capture=self.steps == "graph")
        else:  # a kept graph replays without this; an eager or failed capture runs it
            state.step.body = self._static_step
        self.state, self.static = state, state.step

    def static_key(self, batch: int) -> Hashable:
        """What a kept static state must match to serve this call: the decoder and how it steps,
        the batch and cache length, where the weights live, and any Python value a captured step
        bakes in (`static_key_extras`)."""
        return (type(self).__name__, self.steps, self.compile, self.device, batch, self.max_length,
                self.state_weights, *self.static_key_extras())

    def static_key_extras(self) -> tuple[Hashable, ...]:
        return ()

    def _static_step(self) -> torch.Tensor:
        inputs = self.inputs
        return self.forward_step(inputs.tokens, inputs.mask.advance(), inputs.position)

    def compile_steps(self) -> None:
        """Route static steps through ``torch.compile``: by default the whole `forward_step`.
        The slot mask advances outside it (two tiny ops whose in-place cursor would only add a
        mutation for the compiler to track)."""
        self.forward_step = compile_step(self.forward_step)

    def forward_step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One token per row through the current caches; ``attention_mask`` is the growing 2-D
        padding mask (dynamic steps) or `SlotMask`'s 4-D one (static steps)."""
        raise NotImplementedError(f"{type(self).__name__} overrides step() instead")

    def static_inputs(self, state: StaticState) -> StepInputs:
        """Move the prefill's caches (and any buffer a step rewrites) into ``state``'s; return
        the fixed buffers steps read."""
        raise NotImplementedError(f"{type(self).__name__} has no static-cache steps")

    def reasoning(self) -> torch.Tensor | None:
        """The reasoner's vector at the last position read (h_{i-1} for the token i the current
        logits choose), if any: fused with token i's embedding at the next step, not this one."""
        return None

    def keep_rows(self, index: torch.Tensor) -> bool:
        """Keep only the batch rows at ``index`` (positions in the current batch) in every cache
        and buffer, so rows nobody waits for stop costing compute. False: this decoder cannot
        (static caches and CUDA graphs have a fixed batch), and the rows stay as padding."""
        return self.steps == "dynamic" and self._select_rows(index)

    def _select_rows(self, index: torch.Tensor) -> bool:
        """Select ``index`` in the growing caches and per-row buffers; False where there are none
        this class knows how to shrink."""
        return False


class CausalLMDecoder(StepDecoder):
    """A plain Hugging Face causal LM with a KV cache: the SFT and zero-shot baselines.

    ``steps``: "dynamic" (growing cache), "static" or "graph" (static cache, CUDA-graph replay);
    ``compile``: static steps through ``torch.compile``.
    """

    def __init__(self, lm: PreTrainedModel, steps: str = "dynamic", compile: bool = False) -> None:
        self.use_steps(steps, compile, [lm])
        self.lm, self.owner, self.device = lm, lm, lm.device
        self.prefill_cache = DynamicCache(config=lm.config)
        self.cache = cache_kwargs(lm, self.prefill_cache)

    def prefill(self, input_ids, attention_mask, position_ids):
        self.prompt_mask = attention_mask
        return self._logits(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)

    def forward_step(self, tokens, attention_mask, position_ids):
        return self._logits(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=position_ids)

    def static_inputs(self, state):
        self.cache = cache_kwargs(self.lm, state.cache("lm", self.lm.config, [self.prefill_cache]))
        self.prefill_cache = None  # copied: free it
        return state.step_inputs(self.prompt_mask, self.lm.dtype)

    def _select_rows(self, index):
        self.prefill_cache.batch_select_indices(index)
        return True

    def _logits(self, **inputs) -> torch.Tensor:
        return self.lm(**inputs, use_cache=True, **self.cache).logits[:, -1].float()


class FlyThinkerDecoder(StepDecoder):
    """Reasoner and generator in lockstep, each with its own cache, on the devices they are on.

    ``steps`` and ``compile`` as for `CausalLMDecoder`; with "graph" and ``overlap="streams"``
    one graph holds both models, on two branches the GPU runs side by side.
    """

    def __init__(self, model: FlyThinker, overlap: str = "none", steps: str = "dynamic", compile: bool = False) -> None:
        self.model = self.owner = model
        self.overlap = overlap
        self.r_dev, self.device = model.reasoner.device, model.generator.device
        self.use_steps(steps, compile, [model.reasoner, model.generator])
        if steps != "dynamic" and self.r_dev != self.device:
            raise FlyThinkerError("static caches and CUDA graphs need both models on one device; not with overlap='devices'")
        self.streams = _Streams.for_mode(overlap, self.r_dev, self.device)
        self.target_norm = model.target_norm() if model.config.rescale else None
        # Caches are made here and filled in place by the models, one per role.
        self.r_prefill = DynamicCache(config=model.reasoner.config)
        self.g_prefill = DynamicCache(config=model.generator.config)
        self.r_cache = cache_kwargs(model.reasoner.base_model, self.r_prefill)
        self.g_cache = cache_kwargs(model.generator, self.g_prefill)
        self.h_prev: torch.Tensor | None = None

    def prefill(self, input_ids, attention_mask, position_ids):
        model, r_dev = self.model, self.r_dev
        # The generator's prompt embeddings need every h of the prompt, so R goes first.
        h_prompt = model.reason(
            input_ids.to(r_dev), attention_mask.to(r_dev), position_ids.to(r_dev), use_cache=True, **self.r_cache
        ).last_hidden_state.to(self.device)
        self.h_prev = h_prompt[:, -1].clone()  # a buffer of its own: steps rewrite it in place
        embeds = model.fused_embeddings(input_ids, attention_mask, h_prompt, self.target_norm)
        self.prompt_mask = attention_mask
        return model.generator(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **self.g_cache,
        ).logits[:, -1].float()

    def forward_step(self, tokens, attention_mask, position_ids):
        logits, h_next = self._both(tokens, attention_mask, position_ids)
        self.h_prev.copy_(h_next, non_blocking=True)  # after the join: the generator has read the old value
        return logits

    def static_inputs(self, state):
        model = self.model
        self.r_cache = cache_kwargs(model.reasoner.base_model, state.cache("reasoner", model.reasoner.config, [self.r_prefill]))
        self.g_cache = cache_kwargs(model.generator, state.cache("generator", model.generator.config, [self.g_prefill]))
        self.r_prefill = self.g_prefill = None  # copied: free them
        self.h_prev = state.buffer("h_prev", self.h_prev)
        if self.target_norm is not None:
            self.target_norm = state.buffer("target_norm", self.target_norm)
        return state.step_inputs(self.prompt_mask, model.generator.dtype)

    def static_key_extras(self):
        # Streams fork and join inside a captured step; lambda (warm-up included) is a Python float.
        return (self.overlap, self.model.fusion.lam())

    def _select_rows(self, index):
        self.r_prefill.batch_select_indices(index.to(self.r_dev))
        self.g_prefill.batch_select_indices(index)
        self.h_prev = self.h_prev[index]
        return True

    def compile_steps(self):
        """Each model's half of a step compiled on its own, so the stream switches around them
        stay plain Python (and two halves can still overlap on two streams)."""
        self._reason_step = compile_step(self._reason_step)
        self._generate_step = compile_step(self._generate_step)

    def _both(self, tokens, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of each model; both read only the new token and h_prev, neither waits on the other."""
        with self.streams.reasoner():
            h_next = self._reason_step(tokens, attention_mask, position_ids)
        with self.streams.generator():
            logits = self._generate_step(tokens, attention_mask, position_ids)
        self.streams.join()
        return logits, h_next

    def _reason_step(self, tokens, attention_mask, position_ids) -> torch.Tensor:
        r_dev = self.r_dev
        return self.model.reason(
            tokens[:, None].to(r_dev, non_blocking=True),
            attention_mask.to(r_dev, non_blocking=True),
            position_ids.to(r_dev, non_blocking=True),
            use_cache=True,
            **self.r_cache,
        ).last_hidden_state[:, -1]

    def _generate_step(self, tokens, attention_mask, position_ids) -> torch.Tensor:
        model = self.model
        token_embeds = model.generator.get_input_embeddings()(tokens[:, None])
        return model.generator(
            inputs_embeds=model.fuse(token_embeds, self.h_prev[:, None], self.target_norm),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **self.g_cache,
        ).logits[:, -1].float()

    def reasoning(self):
        return self.h_prev.clone()


# Config fields of LM classes that change the logits after the LM head (Gemma 2/3, Cohere, Granite).
LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class SharedDecoder(StepDecoder):
    """Both roles in one forward per step: rows [0, B) are the generator, rows [B, 2B) the reasoner.

    The prompt prefill stays two passes (the generator's prompt needs every reasoner vector of
    the prompt); their caches are then stacked into one 2B-row cache, dynamic or static
    (``steps`` as for `flythinker.model.decoding.CausalLMDecoder`).
    """

    def __init__(self, model: FlyThinker, adapter_rows: AdapterRows, steps: str = "dynamic", compile: bool = False) -> None:
        # A step reads the LM head directly (only the generator rows need logits), so it would
        # skip what some LM classes do to the logits after it, and decode other tokens than the
        # training forward scores.
        changed = [key for key in LOGIT_POSTPROCESSING if getattr(model.generator.config, key, None) not in (None, 1, 1.0)]
        if changed:
            raise FlyThinkerError(
                f"FlyThinker-shared decoding reads the LM head directly and would skip {changed[0]} of this "
                f"{model.generator.config.model_type} model; use a separate reasoner with it")
        self.model = self.owner = model
        self.adapter_rows = adapter_rows
        self.lm = model.generator
        self.device = self.lm.device
        self.use_steps(steps, compile, [self.lm])
        self.target_norm = model.target_norm() if model.config.rescale else None
        self.cache: Cache | None = None
        self.h_prev: torch.Tensor | None = None

    def prefill(self, input_ids, attention_mask, position_ids):
        model, config = self.model, self.lm.config
        r_cache, g_cache = DynamicCache(config=config), DynamicCache(config=config)
        h_prompt = model.reason(
            input_ids, attention_mask, position_ids, use_cache=True, **cache_kwargs(self.lm.get_decoder(), r_cache)
        ).last_hidden_state
        self.h_prev = h_prompt[:, -1].clone()  # a buffer of its own: steps rewrite it in place
        embeds = model.fused_embeddings(input_ids, attention_mask, h_prompt, self.target_norm)
        logits = self.lm(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=True, logits_to_keep=1, **cache_kwargs(self.lm, g_cache),
        ).logits[:, -1].float()
        if self.steps == "dynamic":
            self.use_cache(stack_caches(g_cache, r_cache, config))
        else:  # copied into static caches at the first step, so that never delays the first token
            self.prefill_caches, self.prompt_mask = (g_cache, r_cache), attention_mask
        return logits

    def forward_step(self, tokens, attention_mask, position_ids):
        if attention_mask.ndim == 2:  # the loop's padding mask covers the B prompts; a static
            attention_mask = attention_mask.repeat(2, 1)  # step's 4-D mask already has 2B rows
        logits, h_next = self._both_roles(tokens, attention_mask, position_ids)
        self.h_prev.copy_(h_next)
        return logits

    def static_inputs(self, state):
        self.use_cache(state.cache("stacked", self.lm.config, self.prefill_caches))
        self.prefill_caches = ()
        self.h_prev = state.buffer("h_prev", self.h_prev)
        if self.target_norm is not None:
            self.target_norm = state.buffer("target_norm", self.target_norm)
        return state.step_inputs(self.prompt_mask, self.lm.dtype, rows=2 * self.prompt_mask.shape[0])

    def static_key_extras(self):
        return (self.model.fusion.lam(),)

    def use_cache(self, cache: Cache) -> None:
        # The decoder's keyword for it is looked up here, outside any compiled step.
        self.cache, self.cache_kwargs = cache, cache_kwargs(self.lm.get_decoder(), cache)

    def _select_rows(self, index):
        batch = self.h_prev.shape[0]  # the stacked cache holds the generator rows, then the reasoner's
        self.cache.batch_select_indices(torch.cat([index, index + batch]))
        self.h_prev = self.h_prev[index]
        return True

    def _both_roles(self, tokens, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """One 2B-row forward; ``attention_mask`` already covers all 2B rows."""
        batch = tokens.shape[0]
        token_embeds = self.lm.get_input_embeddings()(tokens[:, None])
        embeds = torch.cat([self.model.fuse(token_embeds, self.h_prev[:, None], self.target_norm), token_embeds])
        with self.adapter_rows.active(slice(batch, None)):
            hidden = self.lm.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids.repeat(2, 1),
                use_cache=True,
                **self.cache_kwargs,
            ).last_hidden_state[:, -1]
        # Only the generator rows need logits: the LM head is read for B rows, as in plain decoding.
        return self.lm.get_output_embeddings()(hidden[:batch]).float(), hidden[batch:]

    def reasoning(self):
        return self.h_prev.clone()


def stack_caches(first: DynamicCache, second: DynamicCache, config) -> DynamicCache:
    """One cache whose rows are ``first``'s then ``second``'s, layer by layer."""
    stacked = DynamicCache(config=config)
    for index, (a, b) in enumerate(zip(first.layers, second.layers, strict=True)):
        stacked.update(torch.cat([a.keys, b.keys]), torch.cat([a.values, b.values]), index)
    return stacked


@torch.no_grad()
def generate(
    model: FlyThinker,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    **kwargs: object,
) -> GenerationOutput:
    """Staggered decoding of a left-padded batch with both models in lockstep.

    Each of the two LMs stays on the device it is on. Arguments as for `decode`; keyword
    arguments that are `GenerationConfig` fields override ``config``.
    """
    config, options = _split_overrides(config, kwargs)
    with eval_mode(model):
        return decode(model.step_decoder(config.overlap, _step_mode(config), config.compile), input_ids, attention_mask, config,
                      **_defaults(model.tokenizer, model.generator, model.context_length(), options))


@torch.no_grad()
def generate_plain(
    lm: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **kwargs: object,
) -> GenerationOutput:
    """The same loop, sampler and stopping rule for a plain causal LM (SFT and zero-shot baselines)."""
    config, options = _split_overrides(config, kwargs)
    with eval_mode(lm):
        context = getattr(lm.config, "max_position_embeddings", None)
        return decode(CausalLMDecoder(lm, _step_mode(config), config.compile), input_ids, attention_mask, config,
                      **_defaults(tokenizer, lm, context, options))


def decode(
    decoder: StepDecoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GenerationConfig,
    *,
    eos_token_id: int | list[int],
    pad_token_id: int,
    context_length: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    output_scores: bool = False,
    output_reasoning: bool = False,
    unwanted: Callable[[], Collection[int]] | None = None,
) -> GenerationOutput:
    """The decode loop shared by every model family.

    Args:
        decoder: the model family's prefill and step.
        input_ids: (batch, prompt_len) prompt ids, left-padded.
        attention_mask: 1 for real tokens, 0 for padding (default: all ones).
        config: decoding settings.
        eos_token_id: id(s) that end a row.
        pad_token_id: filler for finished rows.
        context_length: the models' context; the prompt must fit, generation is cut to fit.
        on_token: called after every step with the (batch,) tensor of new tokens, for streaming.
        output_scores: also return each step's raw logits.
        output_reasoning: also return each step's reasoning vector.
        unwanted: called after every step: the batch rows nobody waits for any more (a server's
            client that left). They leave the batch, so the rest decode as fast as a smaller
            batch (where the decoder can: `StepDecoder.keep_rows`), and are padding from then on.
            The rows left decode as they would have; ``decoder.rows`` tells which they are.
    """
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise FlyThinkerError(f"input_ids must be (batch, length) with length >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    empty = (attention_mask.sum(-1) == 0).nonzero().flatten().tolist()
    if empty:
        raise FlyThinkerError(f"empty prompt in batch row(s) {empty}: every prompt needs at least one token")
    if unwanted is not None and (output_scores or output_reasoning):
        raise FlyThinkerError("rows cannot leave a batch whose scores or reasoning vectors are returned")
    max_new_tokens = _fit_context(context_length, input_ids.shape[1], config.max_new_tokens)
    decoder.reserve(input_ids.shape[1] + max_new_tokens)
    device = decoder.device
    select = _token_selector(config, device)
    mask = attention_mask.to(device)
    position = position_ids_from_mask(mask)
    batch = input_ids.shape[0]
    decoder.rows = rows = torch.arange(batch, device=device)  # the batch's rows still decoding
    try:
        logits = decoder.prefill(input_ids.to(device), mask, position)
        position = position[:, -1:]

        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, device=device)
        tokens: list[torch.Tensor] = []  # (batch,) per step, every row of the batch
        chosen: list[torch.Tensor] = []  # the same for the rows still decoding (repetition controls)
        scores: list[torch.Tensor] | None = [] if output_scores else None
        reasoning: list[torch.Tensor] | None = [] if output_reasoning else None
        for step in range(max_new_tokens):
            if scores is not None:
                scores.append(logits)
            if reasoning is not None:
                reasoning.append(decoder.reasoning())
            token = torch.where(finished, pad_token_id, select(logits, chosen))
            chosen.append(token)
            if len(rows) < batch:
                token = torch.full((batch,), pad_token_id, dtype=token.dtype, device=device).index_copy_(0, rows, token)
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            finished |= torch.isin(chosen[-1], eos)
            if unwanted is not None:
                finished |= torch.isin(rows, torch.tensor(sorted(unwanted()), dtype=rows.dtype, device=device))
                if bool(finished.any()) and not bool(finished.all()) and decoder.keep_rows(keep := (~finished).nonzero().flatten()):
                    decoder.rows = rows = rows[keep]
                    finished, mask, position = finished[keep], mask[keep], position[keep]
                    chosen = [c[keep] for c in chosen]
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            position = position + 1
            logits = decoder.step(chosen[-1], mask, position)
    finally:
        decoder.release()
    return GenerationOutput(torch.stack(tokens, dim=1), scores, reasoning)


def _step_mode(config: GenerationConfig) -> str:
    if config.cuda_graphs:
        return "graph"
    return "static" if config.compile else "dynamic"


_LOOP_OPTIONS = ("eos_token_id", "pad_token_id", "on_token", "output_scores", "output_reasoning")


def _split_overrides(config: GenerationConfig | None, kwargs: dict) -> tuple[GenerationConfig, dict]:
    unknown = set(kwargs) - set(_LOOP_OPTIONS) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unexpected generation argument(s): {', '.join(sorted(unknown))}")
    fields = {k: v for k, v in kwargs.items() if k not in _LOOP_OPTIONS}
    options = {k: v for k, v in kwargs.items() if k in _LOOP_OPTIONS}
    return dataclasses.replace(config or GenerationConfig(), **fields), options


def _defaults(
    tokenizer: PreTrainedTokenizerBase | None, lm: PreTrainedModel, context_length: int | None, options: dict
) -> dict:
    """EOS and pad ids from the tokenizer, else the generation config; caller's values win."""
    eos = options.pop("eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        eos = lm.generation_config.eos_token_id
    if eos is None:
        raise FlyThinkerError("no EOS token id: pass eos_token_id or attach a tokenizer with an EOS token")
    pad = options.pop("pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if isinstance(eos, int) else eos[0]
    return dict(eos_token_id=eos, pad_token_id=pad, context_length=context_length, **options)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def cache_kwargs(model: torch.nn.Module, cache: DynamicCache) -> dict[str, DynamicCache]:
    """``{name: cache}`` for ``model.forward``: transformers renamed ``past_key_values`` to ``cache``."""
    return {_cache_argument(type(model)): cache}


@functools.cache
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def _fit_context(limit: int | None, prompt_len: int, max_new_tokens: int) -> int:
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


def _token_selector(
    config: GenerationConfig, device: torch.device
) -> Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]:
    """``select(logits, generated)``: the next token of each row; ``generated`` holds the (batch,)
    tokens chosen so far, which only the repetition controls read (stacked only when they are on,
    so a plain decode step does no extra work). They look at the generated text only, never the
    prompt: a profile's words are what personalised text should reuse."""
    penalties = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        penalties.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        penalties.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    choose = _chooser(config, device)
    if not penalties:
        return lambda logits, generated: choose(logits)

    def select(logits: torch.Tensor, generated: list[torch.Tensor]) -> torch.Tensor:
        if generated:
            logits = penalties(torch.stack(generated, dim=1), logits.clone())
        return choose(logits)

    return select


def _chooser(config: GenerationConfig, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
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
    """Where each half of a decode step runs. Without streams both contexts are no-ops.

    Each half forks from whatever stream is current when it starts, and `join` brings both back
    to it, so the same code runs eagerly and inside a CUDA graph capture (whose stream is current).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        if device is None:
            return
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
        # The side stream must see the new token, written on the stream that is current now.
        stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(stream)

    def join(self) -> None:
        """The current stream (sampling, the next step) waits until both halves are done."""
        if self.device is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.r_stream)
            current.wait_stream(self.g_stream)
