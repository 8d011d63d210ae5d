"""Compiled decode steps (``GenerationConfig.compile``) give eager static steps' tokens, and a
second decode call of the same shape reuses the compiled code instead of compiling again.

Compiling costs tens of seconds per family on two cores, so each family compiles once, in one
test that checks both.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from test_graphs import NEW_TOKENS, decoders, run
from torch._dynamo.utils import counters

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model import graphs
from flythinker.model.decoding import CausalLMDecoder, generate_plain
from flythinker.model.prepack import prepack_linears
from flythinker.model.sources import build_tiny


def compiled(kind, make_model, tokenizer, steps="static", device="cpu"):
    return decoders(kind, make_model, tokenizer, steps, device=device, compile=True)


@pytest.mark.parametrize("kind", ["plain", "flythinker-pad", "shared"])
def test_compiled_steps_give_eager_tokens_and_compile_once_per_shape(kind, make_model, tokenizer, prompt_batch):
    torch._dynamo.reset()  # count this test's compilations only
    counters.clear()
    eager, _ = run(decoders(kind, make_model, tokenizer, "static"), prompt_batch)
    first, step = run(compiled(kind, make_model, tokenizer), prompt_batch)
    assert step.calls == NEW_TOKENS - 1
    # Compiled whole: one graph per compiled function (a FlyThinker step's two halves are two),
    # none broken into pieces that would run eagerly in between.
    assert counters["stats"]["unique_graphs"] == (2 if kind == "flythinker-pad" else 1)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(first.sequences, eager.sequences)
    score_diff = max((c - e).abs().max().item() for c, e in zip(first.scores, eager.scores))
    assert score_diff <= 1e-4, f"compiled vs eager logits differ by {score_diff}"
    # A fresh decoder over fresh (equal) weights: what a second `write` or a server's next batch
    # of the same shape does. Recompiling here would raise.
    with torch.compiler.set_stance("fail_on_recompile"):
        second, _ = run(compiled(kind, make_model, tokenizer), prompt_batch)
    assert torch.equal(second.sequences, first.sequences)


def test_compile_rounds_static_caches_up_so_nearby_lengths_share_a_shape():
    assert graphs.reserved_length(300, static=True) == graphs.reserved_length(500, static=True) == 512
    assert graphs.reserved_length(300, static=False) == 300


def test_compile_without_static_caches_is_a_clear_error():
    with pytest.raises(FlyThinkerError, match="compiled steps run on static caches"):
        CausalLMDecoder(build_tiny(64, seed=2), "dynamic", compile=True)


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_up_front(monkeypatch, prompt_batch):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(FlyThinkerError, match="needs a C\\+\\+ compiler"):
        generate_plain(build_tiny(64, seed=2), prompt_batch.input_ids, max_new_tokens=2, compile=True,
                       eos_token_id=-1, pad_token_id=0)


def test_compile_over_prepacked_weights_is_refused_up_front(prompt_batch):
    lm = build_tiny(128, seed=2).eval()  # wide enough for prepack_linears to pack
    assert prepack_linears(lm) > 0
    with pytest.raises(FlyThinkerError, match="pre-packed for oneDNN"):
        generate_plain(lm, prompt_batch.input_ids, max_new_tokens=2, compile=True, eos_token_id=-1, pad_token_id=0)


def test_compile_is_a_generation_setting():
    assert GenerationConfig(compile=True).compile


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", ["plain", "flythinker-pad", "shared"])
def test_compiled_cuda_graph_replays_give_the_cpu_tokens(kind, make_model, tokenizer, prompt_batch):
    reference, _ = run(decoders(kind, make_model, tokenizer, "dynamic"), prompt_batch)
    out, step = run(compiled(kind, make_model, tokenizer, "graph", device="cuda"), prompt_batch, device="cuda")
    assert step.capture_error is None, step.capture_error
    assert step.graph is not None
    assert torch.equal(out.sequences.cpu(), reference.sequences)
