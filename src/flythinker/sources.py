"""Where models come from: a local directory, a built-in alias, or the Hugging Face hub.

Built-in aliases:
- ``tiny``, ``tiny-small``: random-weight Qwen2 models built from config (hidden 64 and 32) with the
  byte-level tokenizer shipped in ``assets/tiny_tokenizer``. For tests and smoke runs: they load
  offline in milliseconds and are deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from flythinker.errors import FlyThinkerError

TINY_TOKENIZER = "assets/tiny_tokenizer"


def tiny_tokenizer_path() -> Path:
    return Path(str(resources.files("flythinker") / TINY_TOKENIZER))


def tiny_config(hidden_size: int = 64, num_layers: int = 2, **overrides: object) -> Qwen2Config:
    """A Qwen2 config small enough to train in seconds on a CPU, over the shipped tokenizer."""
    values: dict[str, object] = dict(
        vocab_size=512,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return Qwen2Config(**values)


def build_tiny(hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **overrides: object) -> Qwen2ForCausalLM:
    """Random-weight tiny causal LM; the same seed always gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(tiny_config(hidden_size, num_layers, **overrides)).eval()


_ALIASES: dict[str, Callable[[], PreTrainedModel]] = {
    "tiny": lambda: build_tiny(64, seed=0),
    "tiny-small": lambda: build_tiny(32, seed=1),
}


def is_alias(name: str) -> bool:
    return name in _ALIASES


def load_causal_lm(name: str, dtype: str = "float32") -> PreTrainedModel:
    """Resolve ``name`` (local dir, alias, hub id) to a causal LM in ``dtype``."""
    torch_dtype = getattr(torch, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise FlyThinkerError(f"cannot load a causal LM from directory {path}: {exc}") from exc
    if name in _ALIASES:
        return _ALIASES[name]().to(torch_dtype)
    return _from_hub(AutoModelForCausalLM, name, dtype=torch_dtype)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with ``load_causal_lm(name)``; left padding for batched decoding."""
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise FlyThinkerError(f"cannot load a tokenizer from directory {path}: {exc}") from exc
    elif name in _ALIASES:
        tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    else:
        tokenizer = _from_hub(AutoTokenizer, name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_hub(loader, name: str, **kwargs):
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise FlyThinkerError(
            f"cannot load {name!r}: it is not a local directory, not a built-in alias "
            f"({', '.join(sorted(_ALIASES))}), and the Hugging Face hub could not provide it "
            f"({type(exc).__name__}). Download it on a machine with the hub "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass DIR instead."
        ) from exc
