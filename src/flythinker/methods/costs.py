"""What a method costs: the entries each method supplies to `flythinker bench`, and their floors.

A method lists the ways it decodes (`Method.bench_entries`: one `BenchEntry` per overlap mode and
step mode it has) and what its training step runs (`Method.bench_trainer`); the benchmark times
them side by side and never names a method itself. Each entry carries the floors of its ratios to
SFT, the cost implied by the work alone (see `flythinker.commands.bench`):

- decode: bytes of weights read per step (a memory-bound step cannot beat reading them once);
- time to first token: prefill FLOPs;
- training step: FLOPs;
- peak memory: parameter bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel

# The step modes a benchmark row can decode with, as the generation settings that select them:
# growing caches (every method), CUDA-graph replay, torch.compile'd static steps, and both.
STEP_OPTIONS: dict[str, dict[str, bool]] = {
    "dynamic": {},
    "graph": {"cuda_graphs": True},
    "compiled": {"compile": True},
    "compiled-graph": {"cuda_graphs": True, "compile": True},
}
# Ids that never end a run: every benchmark decode writes all the tokens it is asked for.
NEVER_STOP = {"eos_token_id": -1, "pad_token_id": 0}


@dataclass
class BenchContext:
    """What the benchmark hands every method: the models and the settings of this run."""

    generator: PreTrainedModel  # every method's generator; methods that change weights copy it
    reasoner: PreTrainedModel  # FlyThinker's reasoner (a copy of its own)
    device: torch.device
    steps: tuple[str, ...]  # step modes to time (`STEP_OPTIONS`)
    overlaps: tuple[str, ...]  # FlyThinker's overlap modes this machine can run
    packed: bool  # oneDNN pre-packed linears for every method (the generator is packed already)
    prompt_tokens: int
    rationale_tokens: int  # CoT: tokens written before the answer
    latent_thoughts: int  # Coconut: hidden states fed back before the answer
    lora_targets: tuple[str, ...] = ()  # FlyThinker-shared's adapted layers; empty: every linear one


Run = Callable[[torch.Tensor, torch.Tensor, int, Callable], object]  # (ids, mask, new_tokens, on_token)


@dataclass
class BenchEntry:
    """One method in one mode, ready to decode: ``run(ids, mask, new_tokens, on_token)``."""

    method: str
    overlap: str | None
    modules: list[nn.Module]  # whose weights the entry holds (peak memory)
    run: Run
    floors: dict[str, float]
    steps: str = "dynamic"
    batched: bool = True  # timed at batch 8 and 32 too
    baseline: bool = False  # the entry every other is compared with (SFT)

    @property
    def key(self) -> tuple[str, str | None, str]:
        return self.method, self.overlap, self.steps


@dataclass
class BenchTrainer:
    """What one training step of a method runs: ``build()`` a fresh trainable module (each call a
    new copy), on sequences ``extra_tokens`` longer than SFT's (CoT's rationale)."""

    method: str
    build: Callable[[], nn.Module]
    trained_bytes: int  # parameter bytes that get gradients and optimizer state
    extra_tokens: int = 0


@dataclass
class Floors:
    """The generator's own costs, the unit every floor is a multiple of."""

    generator: PreTrainedModel
    decode: int = field(init=False)  # weight bytes one decode step reads
    nonembedding: int = field(init=False)  # parameters a prefill multiplies by
    params: int = field(init=False)  # parameters a training step updates
    bytes: int = field(init=False)  # parameter and buffer bytes held

    def __post_init__(self) -> None:
        g = self.generator
        self.decode, self.nonembedding = decode_bytes(g, with_head=True), param_count(g, embeddings=False)
        self.params, self.bytes = param_count(g), module_bytes(g)

    def relative(self, extra_decode: int = 0, extra_prefill_params: int = 0, extra_params: int = 0,
                 extra_bytes: int = 0) -> dict[str, float]:
        decode = (self.decode + extra_decode) / self.decode
        return {
            "ttft_ms": 1 + extra_prefill_params / self.nonembedding,
            "decode_ms_per_token_b1": decode,
            "decode_tokens_per_s_b8": decode,
            "decode_tokens_per_s_b32": decode,
            "train_step_s": 1 + extra_params / self.params,
            "peak_memory_mb": (self.bytes + extra_bytes) / self.bytes,  # replaced from the weights held
        }

    def thinking(self, added_tokens: int, prompt_tokens: int) -> dict[str, float]:
        """The generator's own weights, plus ``added_tokens`` positions to process before answering."""
        return {**self.relative(), "ttft_ms": 1 + added_tokens / prompt_tokens}


def unique_bytes(tensors) -> int:
    """Bytes of the tensors' storages, each storage once."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        try:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        except (NotImplementedError, RuntimeError):  # opaque (pre-packed) tensors have no storage
            seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage once (tied weights count once)."""
    return unique_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def param_count(lm: PreTrainedModel, embeddings: bool = True) -> int:
    skip = set() if embeddings else {id(lm.get_input_embeddings().weight)}
    return sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values() if id(p) not in skip)


def decode_bytes(lm: PreTrainedModel, with_head: bool) -> int:
    """Weight bytes one decode step reads: the decoder without its embedding table (a lookup reads
    only B rows of it), plus the LM head when logits are needed."""
    decoder = lm.get_decoder()
    tensors = [p for n, p in decoder.named_parameters() if p is not lm.get_input_embeddings().weight]
    if with_head:
        tensors.append(lm.get_output_embeddings().weight)
    return unique_bytes(tensors)
