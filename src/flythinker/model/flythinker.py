"""FlyThinker: a Reasoner LM whose last hidden states steer a Generator LM, token by token.

At position i the generator reads ``e_G(s_i) + lam * rescale(h_{i-1})`` where ``h_{i-1}`` is the
reasoner's final (post-norm) hidden state after reading ``s_0..s_{i-1}``. No reasoning vector
depends on an earlier one, so training is one parallel pass per model (this file) and decoding
runs both models side by side (`flythinker.model.decoding`).

The reasoner's LM head is not on the loss path: it receives no gradient and stays as loaded,
except where it is tied to the input embeddings (which do train). It is kept, not dropped, so the
checkpoint stays a complete causal LM and the "reasoning lens" can read what a vector means.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from flythinker.config import SHARED_REASONER, FlyThinkerConfig
from flythinker.errors import FlyThinkerError
from flythinker.io import atomic_directory
from flythinker.model.decoding import (
    GenerationOutput,
    StepDecoder,
    generate,
    position_ids_from_mask,
)
from flythinker.model.fusion import (
    FUSION_WEIGHTS,
    LEGACY_PROJECTION_WEIGHTS,
    Fusion,
    embedding_row_norm_mean,
)
from flythinker.model.reasoners import (
    AdapterReasoner,
    Reasoner,
    SeparateReasoner,
    reasoner_class,
    with_prefix,
)
from flythinker.model.sources import DAMAGED, check_safetensors, first_line, saved_tokenizer_class

CONFIG_NAME = "flythinker_config.json"


@dataclass
class FlyThinkerOutput(ModelOutput):
    # A ModelOutput, not a plain dataclass: engines that hook module outputs (DeepSpeed ZeRO-3's
    # backward hooks) find the tensors inside it.
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # (batch, seq, vocab): the generator's next-token logits
    reasoning: torch.Tensor | None = None  # (batch, seq, d_R): h_i, the reasoner's vector after reading s_0..s_i


class FlyThinker(nn.Module):
    """A reasoner and a generator that share one tokenizer, trained jointly.

    The reasoner is a component (`flythinker.model.reasoners`): a causal LM of its own, or the
    generator plus an adapter (FlyThinker-shared). Build with `from_models` (two models in
    memory), `shared` (one model in memory), `from_config` (names or paths) or `from_pretrained`
    (a saved checkpoint directory).
    """

    def __init__(
        self,
        reasoner: PreTrainedModel | Reasoner,
        generator: PreTrainedModel,
        config: FlyThinkerConfig,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(reasoner, Reasoner):  # a model of its own (checked to be a causal LM below)
            reasoner = SeparateReasoner(reasoner)
        expected = reasoner_class(config)
        if type(reasoner) is not expected:
            raise FlyThinkerError(
                f"reasoner={config.reasoner!r} in the config needs a {expected.__name__}, got {type(reasoner).__name__}"
            )
        _check_compatible(reasoner.lm, generator, tokenizer)
        self.config = config
        # The component's own modules first, under its names: a separate reasoner's parameters
        # stay "reasoner.*", ahead of the generator's, as in every earlier checkpoint and
        # optimizer state. Set in _modules directly because `reasoner` is also the property
        # below, which names the reasoner's LM whatever the kind.
        self._modules.update(reasoner.modules())
        self.generator = generator
        self.reasoner_component = reasoner
        self.tokenizer = tokenizer
        self.fusion = Fusion(config, self.reasoner_width, self.generator_width, generator.dtype, generator.device)
        if not config.train_reasoner:
            for parameter in reasoner.own_parameters():
                parameter.requires_grad_(False)
        # One mode for every part, the generator's: loaded models come in eval mode, and a fresh
        # Fusion in train mode would otherwise drop signal (signal_dropout) in a plain forward.
        self.train(generator.training)

    @property
    def reasoner(self) -> PreTrainedModel:
        """The causal LM whose final hidden states are the reasoning vectors (the generator itself
        for FlyThinker-shared, whose reasoner role adds the adapter)."""
        return self.reasoner_component.lm

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(
        cls,
        reasoner: PreTrainedModel,
        generator: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config: object,
    ) -> FlyThinker:
        """Wrap two causal LMs already in memory; keyword arguments are `FlyThinkerConfig` fields
        (``reasoner`` and ``generator`` default to where the models were loaded from)."""
        config = {**_loaded_from(reasoner=reasoner, generator=generator), **config}
        return cls(reasoner, generator, FlyThinkerConfig(**config), tokenizer)  # type: ignore[arg-type]

    @classmethod
    def shared(
        cls, generator: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None, **config: object
    ) -> FlyThinker:
        """FlyThinker-shared from one causal LM in memory (its linear layers gain the reasoner's
        adapter in place); keyword arguments are `FlyThinkerConfig` fields."""
        settings = FlyThinkerConfig(**{**_loaded_from(generator=generator), **config, "reasoner": SHARED_REASONER})  # type: ignore[arg-type]
        return cls(AdapterReasoner(generator, settings), generator, settings, tokenizer)

    @classmethod
    def from_config(cls, config: FlyThinkerConfig) -> FlyThinker:
        """Load the models by name or path (local dir, built-in alias, then the hub)."""
        reasoner, generator, tokenizer = reasoner_class(config).build(config)
        return cls(reasoner, generator, config, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | None = None) -> FlyThinker:
        """Load a checkpoint written by `save_pretrained`.

        A damaged checkpoint (a missing or unreadable file, truncated weights, a config whose
        reasoner kind or fusion does not match the files) fails with one line naming the file.
        """
        root = Path(path)
        _explain_not_a_checkpoint(root)
        config = FlyThinkerConfig.from_json_file(root / CONFIG_NAME)
        if dtype is not None:
            config.dtype = dtype  # type: ignore[assignment]
        kind = reasoner_class(config)
        missing = [name for name in kind.checkpoint_files if not (root / name).is_file()]
        if missing:
            raise FlyThinkerError(
                f"{root} is not a complete checkpoint of the kind its {CONFIG_NAME} names "
                f"(reasoner={config.reasoner!r}): missing {', '.join(missing)}"
            )
        reasoner, generator = kind.load(root, config)
        model = cls(reasoner, generator, config, _load_tokenizer(root))
        load_fusion(model.fusion, root)
        return model

    def save_pretrained(
        self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write an inspectable checkpoint directory, atomically.

        Layout: the model files (``reasoner/`` and ``generator/``, Hugging Face model dirs; for
        FlyThinker-shared ``generator/`` and ``reasoner_adapter/``), the tokenizer files,
        ``flythinker_config.json`` and, when the fusion learns parameters (a linear projection, a
        gate), ``fusion.safetensors``. Files are written into a temporary sibling directory that
        is renamed into place at the end, so an interrupted save never leaves a half checkpoint
        under ``path``. ``state_dict`` holds the full weights (keys as in ``self.state_dict()``)
        when this module's own parameters are shards (FSDP, DeepSpeed ZeRO-3) gathered for saving.
        """
        with atomic_directory(path) as tmp:
            self.reasoner_component.save(tmp, self.generator, state_dict)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            save_fusion(self.fusion, tmp, None if state_dict is None else with_prefix(state_dict, "fusion."))
            self.config.to_json_file(tmp / CONFIG_NAME)
        return Path(path)

    # ------------------------------------------------------------------ the method
    @property
    def reasoner_width(self) -> int:
        return self.reasoner.get_input_embeddings().embedding_dim

    @property
    def generator_width(self) -> int:
        return self.generator.get_input_embeddings().embedding_dim

    def target_norm(self) -> torch.Tensor:
        """Mean L2 norm of the generator's input-embedding rows: the scale of a token's signal.

        Read from the full table under every engine and call path (`embedding_row_norm_mean`);
        zero or non-finite is an error, never a silently vanished signal.
        """
        return embedding_row_norm_mean(self.generator.get_input_embeddings().weight)

    def reasoning_signal(self, h: torch.Tensor, target_norm: torch.Tensor | None = None) -> torch.Tensor:
        """``lam * rescale(h)`` in the generator's embedding space: the term added to ``e_G(s)``
        (with a gate and a lambda warm-up when configured; `flythinker.model.fusion`).

        ``target_norm`` may be passed in by callers that reuse it across decode steps.
        """
        if self.config.rescale and target_norm is None:
            target_norm = self.target_norm()
        return self.fusion(h, target_norm if self.config.rescale else None)

    def set_training_step(self, step: int, total_steps: int) -> None:
        """Called by the training loop before each optimizer step (the lambda warm-up)."""
        self.fusion.set_training_step(step, total_steps)

    def training_log_values(self) -> dict[str, float]:
        """The fusion's lambda (and gate) at this step, for the training log."""
        return self.fusion.log_values()

    def reason(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        **kwargs: object,
    ):
        """Run the reasoner without its LM head: ``last_hidden_state`` is h for every position."""
        return self.reasoner_component.reason(input_ids, attention_mask, position_ids, **kwargs)

    def fuse(
        self,
        embeds: torch.Tensor,
        h: torch.Tensor,
        target_norm: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fusion step, the one place the formula is applied: ``e + lam * rescale(h)`` for
        token embeddings ``embeds`` (batch, n, d_G) and the vectors ``h`` (batch, n, d_R) already
        aligned with them. ``keep`` (batch, n, 1), where given, is False where a position gets no
        signal. Used by the training forward and by every decoder."""
        signal = self.reasoning_signal(h.to(embeds.device), target_norm).to(embeds.dtype)
        if keep is not None:
            # where(), not a product: a fully masked padding row may hold NaN, and NaN * 0 is NaN.
            signal = torch.where(keep, signal, torch.zeros((), dtype=embeds.dtype, device=embeds.device))
        return embeds + signal

    def fused_embeddings(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        reasoning: torch.Tensor,
        target_norm: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generator inputs for a whole sequence: position i gets ``lam * rescale(h_{i-1})``.

        Position 0, and any position whose predecessor is padding (a left-padded row's first real
        token), gets no signal, so a padded row sees exactly what it sees alone.
        """
        embeds = self.generator.get_input_embeddings()(input_ids)
        previous_is_real = attention_mask[:, :-1, None].bool().to(embeds.device)
        fused = self.fuse(embeds[:, 1:], reasoning[:, :-1], target_norm, previous_is_real)
        return torch.cat([embeds[:, :1], fused], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> FlyThinkerOutput:
        """One reasoner pass, one fused generator pass.

        ``labels`` follow the Hugging Face convention (unshifted, -100 = ignored); the loss is the
        generator's next-token cross-entropy on the labelled (target + EOS) tokens only.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self._check_length(input_ids.shape[1])
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        reasoning = self.reason(input_ids, attention_mask, position_ids).last_hidden_state
        embeds = self.fused_embeddings(input_ids, attention_mask, reasoning)
        out = self.generator(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, labels=labels
        )
        return FlyThinkerOutput(loss=out.loss, logits=out.logits, reasoning=reasoning)

    def context_length(self) -> int | None:
        lengths = [
            getattr(m.config, "max_position_embeddings", None) for m in (self.reasoner, self.generator)
        ]
        known = [n for n in lengths if n]
        return min(known) if known else None

    def _check_length(self, length: int) -> None:
        limit = self.context_length()
        if limit is not None and length > limit:
            raise FlyThinkerError(
                f"sequence of {length} tokens exceeds the models' context of {limit} tokens "
                "(max_position_embeddings); shorten the prompt or lower the token budgets"
            )

    def step_decoder(self, overlap: str = "none", steps: str = "dynamic", compile: bool = False) -> StepDecoder:
        """The prefill and decode step that `flythinker.model.decoding.generate` loops over, as
        the reasoner's kind runs it.

        ``steps``: "dynamic" caches, or "static" caches run eagerly or replayed as CUDA "graph"s;
        ``compile``: static steps through ``torch.compile``.
        """
        return self.reasoner_component.step_decoder(self, overlap, steps, compile)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> GenerationOutput:
        """Staggered decoding; see `flythinker.model.decoding.generate` for the arguments."""
        return generate(self, input_ids, attention_mask, **kwargs)


def save_fusion(fusion: Fusion, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The fusion's learned parameters, if it has any, as ``fusion.safetensors``."""
    weights = fusion.state_dict() if state_dict is None else state_dict
    if weights:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, directory / FUSION_WEIGHTS)


def load_fusion(fusion: Fusion, root: Path) -> None:
    """Load what `save_fusion` wrote; a checkpoint from before the gate may hold only
    ``projection.safetensors``."""
    expected = fusion.state_dict()
    if not expected:
        return
    if (root / FUSION_WEIGHTS).is_file():
        weights = _read_weights(root / FUSION_WEIGHTS)
    elif (root / LEGACY_PROJECTION_WEIGHTS).is_file() and set(expected) == {"projection.weight"}:
        weights = {"projection." + k: v for k, v in _read_weights(root / LEGACY_PROJECTION_WEIGHTS).items()}
    else:
        raise FlyThinkerError(
            f"{root}: the config's fusion learns {', '.join(sorted(expected))} but "
            f"{FUSION_WEIGHTS} is missing"
        )
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise FlyThinkerError(
            f"{root / FUSION_WEIGHTS} does not match the config's fusion (missing: "
            f"{', '.join(missing) or 'none'}; unexpected: {', '.join(unexpected) or 'none'})"
        )
    wrong = [f"{k} {tuple(weights[k].shape)}, expected {tuple(v.shape)}" for k, v in expected.items() if weights[k].shape != v.shape]
    if wrong:
        raise FlyThinkerError(f"{root / FUSION_WEIGHTS} does not fit the models: {'; '.join(wrong)}")
    fusion.load_state_dict(weights)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    return load_file(path)


def _load_tokenizer(root: Path) -> PreTrainedTokenizerBase | None:
    """The checkpoint's tokenizer (None when it was saved without one), or one error line."""
    if not (root / "tokenizer_config.json").is_file():
        if any((root / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
            raise FlyThinkerError(f"{root}: tokenizer files without tokenizer_config.json; save the tokenizer again")
        return None
    try:
        return saved_tokenizer_class(root).from_pretrained(root)
    except DAMAGED as exc:
        raise FlyThinkerError(f"{root}: cannot load the tokenizer ({first_line(exc)})") from None


def _check_compatible(
    reasoner: PreTrainedModel, generator: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    for role, model in (("reasoner", reasoner), ("generator", generator)):
        if not isinstance(model, PreTrainedModel) or model.get_output_embeddings() is None:
            raise FlyThinkerError(
                f"the {role} must be a Hugging Face causal LM (got {type(model).__name__})"
            )
    v_r, v_g = reasoner.config.vocab_size, generator.config.vocab_size
    if v_r != v_g:
        raise FlyThinkerError(
            f"reasoner and generator must share one tokenizer, but their vocabularies differ "
            f"({v_r} vs {v_g} tokens)"
        )
    if tokenizer is not None and len(tokenizer) > v_g:
        raise FlyThinkerError(
            f"the tokenizer has {len(tokenizer)} tokens but the models' vocabulary has {v_g}"
        )


def _explain_not_a_checkpoint(root: Path) -> None:
    """Name the usual wrong paths by what they are, and what to pass instead."""
    if not root.exists():
        raise FlyThinkerError(f"{root}: no such checkpoint directory")
    if not root.is_dir():
        raise FlyThinkerError(f"{root} is a file; a FlyThinker checkpoint is a directory")
    if (root / CONFIG_NAME).is_file():
        return
    if (root / "checkpoint" / CONFIG_NAME).is_file():
        raise FlyThinkerError(f"{root} is a method's run directory; pass its checkpoint: {root / 'checkpoint'}")
    found = sorted(str(c.parent) for c in root.glob("*/*/checkpoint/" + CONFIG_NAME))
    if found:
        raise FlyThinkerError(f"{root} is a run directory; pass one of its FlyThinker checkpoints: {', '.join(found)}")
    if (root / "config.json").is_file():
        raise FlyThinkerError(
            f"{root} is a plain language-model checkpoint (an SFT or baseline run, or a base model), "
            "not a FlyThinker one (no flythinker_config.json); pass a checkpoint of a flythinker run"
        )


def _loaded_from(**models: PreTrainedModel) -> dict[str, str]:
    """Each model's name or path as loaded, for the config a checkpoint records (models built
    from a config in memory have none, and keep the config's default)."""
    return {role: model.name_or_path for role, model in models.items() if getattr(model, "name_or_path", "")}
