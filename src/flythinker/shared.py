"""FlyThinker-shared: the reasoner is the generator's own weights plus a LoRA adapter.

One causal LM plays both roles. The reasoner role runs it with the adapter, the generator role
without; the method (README, "The method, as implemented") is otherwise unchanged (``reasoning_signal``, ``fused_embeddings`` and
the training ``forward`` are FlyThinker's own). What changes is cost:

- memory: one model plus an adapter, instead of two models;
- decoding: each step is ONE forward of 2B rows through the shared weights, B generator rows (fused
  embeddings, no adapter) then B reasoner rows (plain embeddings, adapter), each role with its own
  KV-cache rows. Decoding is bound by reading the weights, so both roles cost about one model.

The adapter is hand-written (`RoleLoRALinear`) rather than peft's module, because a decode batch
mixes roles: peft's mixed-adapter path splits every batch in Python at each of the ~170 adapted
layers, which cost more than the matmuls themselves at batch 1 on a CPU. Here each layer adds the
low-rank update to a contiguous row range in one slice. The files are peft's own
(``adapter_config.json`` + ``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained``
on the saved generator reproduces the reasoner.

Training must run the adapter's forward inside `FlyThinkerShared.reason`: activation
(gradient) checkpointing, which re-runs forwards outside it, is not supported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Cache,
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flythinker.config import FlyThinkerConfig
from flythinker.decoding import StepDecoder, cache_kwargs
from flythinker.errors import FlyThinkerError
from flythinker.fusion import Fusion
from flythinker.graphs import StepInputs, check_step_mode, static_cache
from flythinker.model import (
    CONFIG_NAME,
    FlyThinker,
    _check_compatible,
    _with_prefix,
    load_fusion,
)

ADAPTER_DIR = "reasoner_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft names a LoRA weight "<prefix><module path>.lora_A.weight" under a PeftModel.
PEFT_PREFIX = "base_model.model."


class AdapterRows:
    """Which batch rows the adapter applies to, shared by every adapted layer of one model.

    ``None``: no rows (the generator role). ``slice(None)``: all rows (the reasoner role).
    ``slice(b, None)``: rows from ``b`` on, the reasoner half of a mixed decode batch.
    """

    def __init__(self) -> None:
        self.rows: slice | None = None

    @contextlib.contextmanager
    def active(self, rows: slice) -> Iterator[None]:
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous


class RoleLoRALinear(nn.Module):
    """``base_layer(x)``, plus ``alpha/r * B A x`` on the rows the adapter is active for.

    Parameter names follow peft (``base_layer``, ``lora_A``, ``lora_B``) so the adapter's
    state dict maps one to one onto peft's files. A starts random and B at zero (peft's default),
    so a fresh reasoner equals the generator until training moves B.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, rows: AdapterRows) -> None:
        super().__init__()
        self.base_layer = base_layer
        kwargs = {"bias": False, "dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Linear(base_layer.in_features, rank, **kwargs)
        self.lora_B = nn.Linear(rank, base_layer.out_features, **kwargs)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self._rows = rows  # a plain attribute, not a submodule: every layer shares the one switch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = self._rows.rows
        if rows is None:
            return y
        if rows == slice(None):
            return y + self.lora_B(self.lora_A(x)) * self.scaling
        # A mixed decode batch (inference): only the selected rows move, in place on the base output.
        # A plain B accumulates into those rows in the GEMM itself; each kernel saved counts, since
        # a batch-1 step on a GPU costs about what its kernel count does.
        target, low_rank = y[rows], self.lora_A(x[rows])
        if type(self.lora_B) is nn.Linear and target.is_contiguous():
            target.view(-1, target.shape[-1]).addmm_(
                low_rank.view(-1, low_rank.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling
            )
        else:  # e.g. an inference-only packed layer (`flythinker.prepack`): no plain weight
            target.add_(self.lora_B(low_rank), alpha=self.scaling)
        return y


def attach_adapter(
    model: PreTrainedModel, rank: int, alpha: float, rows: AdapterRows, targets: Sequence[str] = ()
) -> list[str]:
    """Wrap linear layers of the decoder blocks in `RoleLoRALinear`; return their paths.

    ``targets``: layer names (the last path component, as peft's ``target_modules``) to adapt;
    empty adapts every linear layer. The embeddings and the LM head stay plain: the reasoner's
    output is the final hidden state, and its input embedding is the generator's (no signal is
    added on the reasoner side).
    """
    blocks = model.get_decoder().layers
    prefix = _decoder_layers_path(model)
    paths: list[str] = []
    seen: set[str] = set()
    for index, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            parent_name, _, attr = name.rpartition(".")
            seen.add(attr)
            if targets and attr not in targets:
                continue
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, RoleLoRALinear(module, rank, alpha, rows))
            paths.append(f"{prefix}.{index}.{name}")
    unknown = sorted(set(targets) - seen)
    if unknown:
        raise FlyThinkerError(
            f"lora_targets {', '.join(unknown)} name no linear layer of {type(model).__name__}'s decoder blocks "
            f"(they have: {', '.join(sorted(seen))})"
        )
    if not paths:
        raise FlyThinkerError(f"{type(model).__name__} has no linear layers in its decoder blocks to adapt")
    return paths


def _decoder_layers_path(model: PreTrainedModel) -> str:
    blocks = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise FlyThinkerError(f"cannot locate the decoder blocks of {type(model).__name__}")


class FlyThinkerShared(FlyThinker):
    """FlyThinker whose reasoner is its generator plus a LoRA adapter.

    Build with `from_model` (a causal LM in memory), `from_config` (``reasoner="shared"``) or
    `from_pretrained`. ``reasoner`` is the generator itself, so everything written against
    FlyThinker's interface (training, `FlyThinkerDecoder`) runs the two roles unchanged.
    """

    def __init__(
        self, generator: PreTrainedModel, config: FlyThinkerConfig, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> None:
        nn.Module.__init__(self)
        _check_compatible(generator, generator, tokenizer)
        if config.reasoner != "shared":
            raise FlyThinkerError(f"FlyThinkerShared needs reasoner='shared', got {config.reasoner!r}")
        self.config = config
        self.generator = generator
        self.tokenizer = tokenizer
        self.adapter_rows = AdapterRows()
        self.adapter_paths = attach_adapter(
            generator, config.lora_rank, config.lora_alpha, self.adapter_rows, config.lora_targets
        )
        width = self.generator_width
        self.fusion = Fusion(config, width, width, generator.dtype, generator.device)

    @property
    def reasoner(self) -> PreTrainedModel:  # type: ignore[override]
        """The same model as the generator: the role is chosen by `reason`, not by weights."""
        return self.generator

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls, generator: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, **config: object
    ) -> FlyThinkerShared:
        """Wrap a causal LM in memory (its linear layers gain an adapter in place)."""
        return cls(generator, FlyThinkerConfig(**{"reasoner": "shared", **config}), tokenizer)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, config: FlyThinkerConfig) -> FlyThinkerShared:
        from flythinker.sources import load_causal_lm, load_tokenizer

        generator = load_causal_lm(config.generator, dtype=config.dtype)
        return cls(generator, config, load_tokenizer(config.generator))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | None = None) -> FlyThinkerShared:
        """Load a checkpoint written by `save_pretrained`: the base once, then the adapter."""
        root = Path(path)
        needed = (CONFIG_NAME, "generator/config.json", f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")
        missing = [name for name in needed if not (root / name).is_file()]
        if missing:
            raise FlyThinkerError(f"{root} is not a complete FlyThinker-shared checkpoint: missing {', '.join(missing)}")
        config = FlyThinkerConfig.from_json_file(root / CONFIG_NAME)
        if dtype is not None:
            config.dtype = dtype  # type: ignore[assignment]
        try:
            generator = AutoModelForCausalLM.from_pretrained(root / "generator", dtype=getattr(torch, config.dtype))
        except (OSError, ValueError) as exc:
            raise FlyThinkerError(f"cannot load the generator in checkpoint {root}: {exc}") from exc
        tokenizer = AutoTokenizer.from_pretrained(root) if (root / "tokenizer_config.json").is_file() else None
        model = cls(generator, config, tokenizer)
        model._load_adapter(root / ADAPTER_DIR)
        load_fusion(model.fusion, root)
        return model

    def _save_models(self, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """``generator/``: the base weights under their own names; ``reasoner_adapter/``: peft files.

        ``state_dict``: full weights gathered from shards, keyed as in ``self.state_dict()``.
        """
        weights = self.generator.state_dict() if state_dict is None else _with_prefix(state_dict, "generator.")
        base = {name.replace(".base_layer.", "."): tensor for name, tensor in weights.items() if ".lora_" not in name}
        self.generator.save_pretrained(directory / "generator", state_dict=base)
        adapter_dir = directory / ADAPTER_DIR
        adapter_dir.mkdir()
        LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            target_modules=sorted({path.rsplit(".", 1)[-1] for path in self.adapter_paths}),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.config.generator,
        ).save_pretrained(adapter_dir)
        save_file(
            {PEFT_PREFIX + name: tensor.detach().contiguous().cpu() for name, tensor in weights.items() if ".lora_" in name},
            adapter_dir / ADAPTER_WEIGHTS,
        )

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the generator's module paths (``...q_proj.lora_A.weight``)."""
        return {name: p for name, p in self.generator.named_parameters() if ".lora_" in name}

    def _load_adapter(self, directory: Path) -> None:
        saved = load_file(directory / ADAPTER_WEIGHTS)
        state = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in saved.items()}
        expected = self.adapter_state()
        if set(state) != set(expected):
            raise FlyThinkerError(
                f"{directory}: the adapter does not fit this generator "
                f"({len(set(expected) - set(state))} weights missing, {len(set(state) - set(expected))} unexpected)"
            )
        with torch.no_grad():
            for name, param in expected.items():
                if state[name].shape != param.shape:
                    raise FlyThinkerError(
                        f"{directory}: {name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)} "
                        "(lora_rank differs from the checkpoint's config?)"
                    )
                param.copy_(state[name])

    # ------------------------------------------------------------------ the method
    def reason(self, input_ids, attention_mask, position_ids, **kwargs):
        """The generator's decoder with the adapter on every row: ``last_hidden_state`` is h."""
        with self.adapter_rows.active(slice(None)):
            return self.generator.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
            )

    def step_decoder(self, overlap: str = "none", steps: str = "dynamic") -> StepDecoder:
        """One batched 2B-row forward per step. ``overlap`` 'none' and 'streams' both mean that
        (it is this model's one-device overlap); 'devices' cannot split one set of weights."""
        if overlap == "devices":
            raise FlyThinkerError(
                "overlap='devices' needs two models on two devices; FlyThinker-shared runs both roles "
                "in one batched forward on one device (use overlap='none')"
            )
        return SharedDecoder(self, steps)


class SharedDecoder(StepDecoder):
    """Both roles in one forward per step: rows [0, B) are the generator, rows [B, 2B) the reasoner.

    The prompt prefill stays two passes (the generator's prompt needs every reasoner vector of
    the prompt); their caches are then stacked into one 2B-row cache, dynamic or static
    (``steps`` as for `flythinker.decoding.CausalLMDecoder`).
    """

    def __init__(self, model: FlyThinkerShared, steps: str = "dynamic") -> None:
        self.model = model
        self.lm = model.generator
        self.device = self.lm.device
        check_step_mode(steps, self.device)
        self.steps = steps
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
            self.cache = stack_caches(g_cache, r_cache, config)
        else:  # copied into static caches at the first step, so that never delays the first token
            self.prefill_caches, self.prompt_mask = (g_cache, r_cache), attention_mask
        return logits

    def forward_step(self, tokens, attention_mask, position_ids):
        if attention_mask.ndim == 2:  # the loop's padding mask covers the B prompts; a static
            attention_mask = attention_mask.repeat(2, 1)  # step's 4-D mask already has 2B rows
        logits, h_next = self._both_roles(tokens, attention_mask, position_ids)
        self.h_prev.copy_(h_next)
        return logits

    def static_inputs(self, batch):
        self.cache, self.prefill_caches = static_cache(self.lm.config, self.prefill_caches, self.max_length), ()
        return StepInputs(self.prompt_mask, self.max_length, self.lm.dtype, rows=2 * batch)

    def _both_roles(self, tokens, attention_mask, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """One 2B-row forward; ``attention_mask`` already covers all 2B rows."""
        batch = tokens.shape[0]
        token_embeds = self.lm.get_input_embeddings()(tokens[:, None])
        signal = self.model.reasoning_signal(self.h_prev[:, None], self.target_norm)
        embeds = torch.cat([token_embeds + signal.to(token_embeds.dtype), token_embeds])
        with self.model.adapter_rows.active(slice(batch, None)):
            hidden = self.lm.get_decoder()(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids.repeat(2, 1),
                use_cache=True,
                **cache_kwargs(self.lm.get_decoder(), self.cache),
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
