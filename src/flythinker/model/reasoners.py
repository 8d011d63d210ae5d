"""Where the reasoning vectors come from: the reasoner is a component that `FlyThinker` holds.

A component supplies only what differs between kinds of reasoner:

- running it over a sequence (`Reasoner.reason`: the final hidden state h at every position);
- its decode step (`Reasoner.step_decoder`);
- its part of the checkpoint (`Reasoner.save`, `Reasoner.load`) and of loading by name
  (`Reasoner.build`).

The method itself (index alignment, rescale, fusion, the loss) is `FlyThinker`'s, the same for
every kind. Two kinds exist, chosen by `FlyThinkerConfig.reasoner` in one place
(`reasoner_class`):

- `SeparateReasoner`: a causal LM of its own (the published setting).
- `AdapterReasoner` (``reasoner: shared``, "FlyThinker-shared"): the generator's own weights plus
  a LoRA adapter (`flythinker.model.adapter`). Memory is one model plus the adapter; a decode
  step is one forward of 2B rows, both roles at about the cost of one model. Training must run the
  adapter's forward inside `AdapterReasoner.reason`: activation (gradient) checkpointing, which
  re-runs forwards outside it, is not supported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flythinker.config import SHARED_REASONER, FlyThinkerConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.adapter import AdapterRows, attach_adapter
from flythinker.model.decoding import FlyThinkerDecoder, SharedDecoder, StepDecoder
from flythinker.model.sources import (
    DAMAGED,
    first_line,
    load_causal_lm,
    load_lm,
    load_tokenizer,
    trains_checkpointed,
)

if TYPE_CHECKING:
    from flythinker.model.flythinker import FlyThinker

ADAPTER_DIR = "reasoner_adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft names a LoRA weight "<prefix><module path>.lora_A.weight" under a PeftModel.
PEFT_PREFIX = "base_model.model."


class Reasoner(ABC):
    """What one kind of reasoner supplies to `FlyThinker` (see the module docstring)."""

    lm: PreTrainedModel  # the causal LM whose final hidden states are the reasoning vectors
    # Files a checkpoint of this kind must hold, besides flythinker_config.json.
    checkpoint_files: ClassVar[tuple[str, ...]]
    label: ClassVar[str]  # how reports and the server name a model with this reasoner

    @classmethod
    @abstractmethod
    def build(cls, config: FlyThinkerConfig) -> tuple[Reasoner, PreTrainedModel, PreTrainedTokenizerBase]:
        """This reasoner, the generator and the tokenizer, loaded by name or path."""

    @classmethod
    @abstractmethod
    def load(cls, root: Path, config: FlyThinkerConfig) -> tuple[Reasoner, PreTrainedModel]:
        """This reasoner and the generator from a checkpoint that `save` wrote."""

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Modules the FlyThinker module owns on this reasoner's behalf (their parameters train)."""

    @abstractmethod
    def reason(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        """The reasoner's decoder without its LM head: ``last_hidden_state`` is h at every position."""

    @abstractmethod
    def save(self, directory: Path, generator: PreTrainedModel, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Write the model files (this reasoner's and the generator's) into ``directory``.

        ``state_dict``: the FlyThinker module's full weights, gathered from shards (FSDP, ZeRO-3),
        keyed as in its ``state_dict()``; None reads the modules themselves.
        """

    @abstractmethod
    def step_decoder(self, model: FlyThinker, overlap: str, steps: str, compile: bool = False) -> StepDecoder:
        """The prefill and decode step that `flythinker.model.decoding.decode` loops over."""

    @abstractmethod
    def own_parameters(self) -> list[nn.Parameter]:
        """The weights that are this reasoner's alone (`FlyThinkerSettings.train_reasoner`)."""


def reasoner_class(config: FlyThinkerConfig) -> type[Reasoner]:
    """The kind of reasoner a config asks for: the one place the choice is made."""
    return AdapterReasoner if config.reasoner == SHARED_REASONER else SeparateReasoner


class SeparateReasoner(Reasoner):
    """A causal LM of its own, saved as ``reasoner/`` beside ``generator/``."""

    checkpoint_files = ("reasoner/config.json", "generator/config.json")
    label = "flythinker"

    def __init__(self, lm: PreTrainedModel) -> None:
        self.lm = lm

    @classmethod
    def build(cls, config):
        generator = load_causal_lm(config.generator, dtype=config.dtype)
        reasoner = load_causal_lm(config.reasoner, dtype=config.dtype)
        tokenizer = load_tokenizer(config.generator)
        if config.reasoner != config.generator:
            check_same_vocab(tokenizer, load_tokenizer(config.reasoner))
        return cls(reasoner), generator, tokenizer

    @classmethod
    def load(cls, root, config):
        return cls(load_lm(root / "reasoner", config.dtype)), load_lm(root / "generator", config.dtype)

    def modules(self):
        return {"reasoner": self.lm}

    def reason(self, input_ids, attention_mask, position_ids, **kwargs):
        return self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def save(self, directory, generator, state_dict):
        for name, lm in (("reasoner", self.lm), ("generator", generator)):
            lm.save_pretrained(directory / name, state_dict=None if state_dict is None else with_prefix(state_dict, f"{name}."))

    def step_decoder(self, model, overlap, steps, compile=False):
        return FlyThinkerDecoder(model, overlap, steps, compile)

    def own_parameters(self):
        return list(self.lm.parameters())


class AdapterReasoner(Reasoner):
    """The generator plus a LoRA adapter (attached to the generator in place, so its parameters
    are the generator's). Saved as ``generator/`` (the base weights under their own names) and
    ``reasoner_adapter/`` (peft's files)."""

    checkpoint_files = ("generator/config.json", f"{ADAPTER_DIR}/adapter_config.json", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")
    label = "flythinker-shared"

    def __init__(self, generator: PreTrainedModel, config: FlyThinkerConfig) -> None:
        self.lm = generator
        self.config = config
        self.rows = AdapterRows()  # which batch rows the adapter applies to, set by `reason` and the decoder
        self.paths = attach_adapter(generator, config.lora_rank, config.lora_alpha, self.rows, config.lora_targets)

    @classmethod
    def build(cls, config):
        generator = load_causal_lm(config.generator, dtype=config.dtype)
        return cls(generator, config), generator, load_tokenizer(config.generator)

    @classmethod
    def load(cls, root, config):
        generator = load_lm(root / "generator", config.dtype)
        reasoner = cls(generator, config)
        reasoner._load_adapter(root / ADAPTER_DIR)
        return reasoner, generator

    def modules(self):
        return {}

    def reason(self, input_ids, attention_mask, position_ids, **kwargs):
        if trains_checkpointed(self.lm):
            # The backward pass would re-run the layers outside `rows.active`, without the adapter,
            # and fail deep in torch ("Number of tensors saved during forward ...").
            raise FlyThinkerError("FlyThinker-shared (reasoner: shared) cannot train with gradient_checkpointing: "
                                  "recomputed layers would skip its adapter; turn it off or use a separate reasoner")
        with self.rows.active(slice(None)):
            return self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)

    def save(self, directory, generator, state_dict):
        weights = generator.state_dict() if state_dict is None else with_prefix(state_dict, "generator.")
        base = {name.replace(".base_layer.", "."): tensor for name, tensor in weights.items() if ".lora_" not in name}
        generator.save_pretrained(directory / "generator", state_dict=base)
        adapter_dir = directory / ADAPTER_DIR
        adapter_dir.mkdir()
        LoraConfig(
            r=self.config.lora_rank,
            lora_alpha=self.config.lora_alpha,
            target_modules=sorted({path.rsplit(".", 1)[-1] for path in self.paths}),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=self.config.generator,
        ).save_pretrained(adapter_dir)
        save_file(
            {PEFT_PREFIX + name: tensor.detach().contiguous().cpu() for name, tensor in weights.items() if ".lora_" in name},
            adapter_dir / ADAPTER_WEIGHTS,
        )

    def step_decoder(self, model, overlap, steps, compile=False):
        """One batched 2B-row forward per step. ``overlap`` 'none' and 'streams' both mean that
        (it is this reasoner's one-device overlap); 'devices' cannot split one set of weights."""
        if overlap == "devices":
            raise FlyThinkerError(
                "overlap='devices' needs two models on two devices; FlyThinker-shared runs both roles "
                "in one batched forward on one device (use overlap='none')"
            )
        return SharedDecoder(model, self.rows, steps, compile)

    def own_parameters(self):
        return list(self.adapter_state().values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under the generator's module paths (``...q_proj.lora_A.weight``)."""
        return {name: p for name, p in self.lm.named_parameters() if ".lora_" in name}

    def _load_adapter(self, directory: Path) -> None:
        path = directory / ADAPTER_WEIGHTS
        try:
            saved = load_file(path)
        except DAMAGED as exc:
            raise FlyThinkerError(f"{path}: damaged adapter weights ({first_line(exc)})") from None
        state = {name.removeprefix(PEFT_PREFIX): tensor for name, tensor in saved.items()}
        expected = self.adapter_state()
        if set(state) != set(expected):
            raise FlyThinkerError(
                f"{path}: the adapter does not fit this generator "
                f"({len(set(expected) - set(state))} weights missing, {len(set(state) - set(expected))} unexpected)"
            )
        with torch.no_grad():
            for name, param in expected.items():
                if state[name].shape != param.shape:
                    raise FlyThinkerError(
                        f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(param.shape)} "
                        "(lora_rank differs from the checkpoint's config?)"
                    )
                param.copy_(state[name])


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of one submodule, its prefix removed."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}


def check_same_vocab(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> None:
    """Fail unless two tokenizers map every token string to the same id."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        differing = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise FlyThinkerError(
            "reasoner and generator must share one tokenizer, but their vocabularies differ "
            f"({len(va)} vs {len(vb)} tokens; e.g. {differing})"
        )
