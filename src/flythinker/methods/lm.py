"""Methods whose model is one causal LM: the zero-shot baselines and SFT share this."""

from __future__ import annotations

from pathlib import Path

import torch

from flythinker.methods.base import Method
from flythinker.model.decoding import generate_plain
from flythinker.model.sources import load_causal_lm, load_tokenizer


class LMMethod(Method):
    """The generator alone, decoded with the same loop, sampler and stopping rule as FlyThinker."""

    def build(self, checkpoint: Path | None = None) -> None:
        source = str(checkpoint) if checkpoint is not None else self.config.generator
        self.lm = load_causal_lm(source, dtype=self.context.dtype)
        self.tokenizer = load_tokenizer(source)

    def model(self) -> torch.nn.Module:
        return self.lm

    def decode(self, input_ids, attention_mask, generation, on_token):
        return generate_plain(self.lm, input_ids, attention_mask, generation, tokenizer=self.tokenizer,
                              on_token=on_token)
