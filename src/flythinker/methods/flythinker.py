"""FlyThinker: a reasoner's per-token vectors steer the generator (`flythinker.model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from flythinker.methods.base import Method, MethodConfig
from flythinker.model import FlyThinker


class FlyThinkerMethod(Method):
    name = "flythinker"
    style = "profile"
    trainable = True

    @classmethod
    def check(cls, config: MethodConfig) -> None:
        config.flythinker_config("float32")  # FlyThinkerConfig validates every fusion setting

    def build(self, checkpoint: Path | None = None) -> None:
        if checkpoint is not None:
            self.flythinker = FlyThinker.from_pretrained(checkpoint, dtype=self.context.dtype)
        else:
            self.flythinker = FlyThinker.from_config(self.config.flythinker_config(self.context.dtype))
        self.tokenizer = self.flythinker.tokenizer

    def model(self) -> torch.nn.Module:
        return self.flythinker

    def decode(self, input_ids, attention_mask, generation, on_token):
        return self.flythinker.generate(input_ids, attention_mask, config=generation, on_token=on_token)
