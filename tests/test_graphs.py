"""Static-cache decode steps equal dynamic ones; on a GPU, their CUDA-graph replays do too.

The static path is the graph's body run eagerly, so the CPU tests here prove the step a graph
replays; the GPU tests add only the capture and replay.
"""

from __future__ import annotations

import pytest
import torch
from conftest import parallel_logits_at_decoded_positions
from test_shared import randomize_adapter

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import CausalLMDecoder, FlyThinkerDecoder, decode
from flythinker.model.flythinker import FlyThinker
from flythinker.model.graphs import SlotMask
from flythinker.model.sources import build_tiny

NEW_TOKENS = 10
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def decoders(kind: str, make_model, tokenizer, steps: str, overlap: str = "none", device: str = "cpu",
             compile: bool = False):
    """A fresh decoder of one family over fixed tiny weights (the same weights for every ``steps``)."""
    if kind == "plain":
        return CausalLMDecoder(build_tiny(64, seed=2).eval().to(device), steps, compile)
    if kind == "shared":
        torch.manual_seed(3)
        model = randomize_adapter(FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lam=1.0)).eval()
        return model.to(device).step_decoder(steps=steps, compile=compile)
    fusion, d_r = ("pad", 32) if kind == "flythinker-pad" else ("linear", 64)
    return FlyThinkerDecoder(make_model(lam=1.0, fusion=fusion, d_r=d_r, d_g=64).to(device), overlap, steps, compile)


def run(decoder, prompt_batch, device="cpu"):
    """Decode; return the output and the static step the decoder used (None for dynamic steps)."""
    used = []
    release = decoder.release

    def keep_then_release():
        used.append(decoder.static)
        release()

    decoder.release = keep_then_release
    with torch.no_grad():
        out = decode(decoder, prompt_batch.input_ids.to(device), prompt_batch.attention_mask.to(device),
                     GenerationConfig(max_new_tokens=NEW_TOKENS), eos_token_id=-1, pad_token_id=0,
                     output_scores=True, output_reasoning=not isinstance(decoder, CausalLMDecoder))
    assert decoder.static is None  # released: no graph outlives its decode call
    return out, used[0]


@pytest.mark.parametrize("kind", ["plain", "flythinker-pad", "flythinker-linear", "shared"])
def test_static_steps_equal_dynamic_steps(kind, make_model, tokenizer, prompt_batch):
    dynamic, no_step = run(decoders(kind, make_model, tokenizer, "dynamic"), prompt_batch)
    static, step = run(decoders(kind, make_model, tokenizer, "static"), prompt_batch)
    assert no_step is None and step is not None and step.calls == NEW_TOKENS - 1
    assert torch.equal(static.sequences, dynamic.sequences)
    score_diff = max((s - d).abs().max().item() for s, d in zip(static.scores, dynamic.scores))
    assert score_diff <= 1e-5, f"static vs dynamic logits differ by {score_diff}"
    if dynamic.reasoning is not None:
        # Each step's vector is its own tensor, not a view of the buffer the next step rewrites.
        assert len({r.data_ptr() for r in static.reasoning}) == NEW_TOKENS
        assert max((s - d).abs().max().item() for s, d in zip(static.reasoning, dynamic.reasoning)) <= 1e-5


def test_static_steps_match_the_parallel_forward(make_model, tokenizer, prompt_batch):
    decoder = decoders("flythinker-pad", make_model, tokenizer, "static")
    out, _ = run(decoder, prompt_batch)
    parallel = parallel_logits_at_decoded_positions(decoder.model, prompt_batch, out.sequences)
    assert (parallel - torch.stack(out.scores, dim=1)).abs().max() <= 1e-4


def test_slot_mask_keeps_padding_masked_and_opens_one_slot_per_step():
    prompt_mask = torch.tensor([[0, 0, 1], [1, 1, 1]])
    mask = SlotMask(prompt_mask, max_length=6, dtype=torch.float32)
    first = mask.advance()
    assert first.shape == (2, 1, 1, 6)
    open_slots = (first == 0).squeeze(1).squeeze(1)
    assert open_slots.tolist() == [[False, False, True, True, False, False], [True, True, True, True, False, False]]
    second = (mask.advance() == 0).squeeze(1).squeeze(1)
    assert second[:, 4].all() and not second[:, 5].any() and not second[0, :2].any()


def test_cuda_graphs_on_a_cpu_is_a_clear_error(make_model, prompt_batch):
    with pytest.raises(FlyThinkerError, match="cuda_graphs needs the models on a CUDA device"):
        make_model().generate(prompt_batch.input_ids, max_new_tokens=2, cuda_graphs=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("kind", "overlap"), [("plain", "none"), ("flythinker-pad", "none"),
                                               ("flythinker-pad", "streams"), ("flythinker-linear", "streams"),
                                               ("shared", "none")])
def test_cuda_graph_replays_give_the_cpu_tokens(kind, overlap, make_model, tokenizer, prompt_batch):
    reference, _ = run(decoders(kind, make_model, tokenizer, "dynamic"), prompt_batch)
    decoder = decoders(kind, make_model, tokenizer, "graph", overlap, device="cuda")
    out, step = run(decoder, prompt_batch, device="cuda")
    assert step.capture_error is None, step.capture_error
    assert step.graph is not None and step.calls == NEW_TOKENS - 1
    assert torch.equal(out.sequences.cpu(), reference.sequences)
    score_diff = max((s.cpu() - d).abs().max().item() for s, d in zip(out.scores, reference.scores))
    assert score_diff <= 1e-3, f"graph vs CPU logits differ by {score_diff}"


# --------------------------------------------------------------------------- rows leaving a batch


@pytest.mark.parametrize("steps", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["plain", "flythinker-linear", "shared"])
def test_a_row_nobody_waits_for_leaves_and_the_rest_decode_as_before(kind, steps, make_model, tokenizer, prompt_batch):
    """A server's client leaves at step 3: its row is padding from then on, the others decode as
    if it had stayed; with dynamic caches it also leaves the caches (smaller steps), with static
    ones (a fixed batch) it stays as padding."""
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    assert ids.shape[0] >= 2
    with torch.no_grad():
        whole = decode(decoders(kind, make_model, tokenizer, steps), ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS),
                       eos_token_id=-1, pad_token_id=0).sequences
        decoder, batch_sizes, step = decoders(kind, make_model, tokenizer, steps), [], [0]

        def on_token(_):
            step[0] += 1
            batch_sizes.append(len(decoder.rows))

        out = decode(decoder, ids, mask, GenerationConfig(max_new_tokens=NEW_TOKENS), eos_token_id=-1, pad_token_id=0,
                     on_token=on_token, unwanted=lambda: [0] if step[0] >= 3 else []).sequences
    assert torch.equal(out[1:], whole[1:])
    assert torch.equal(out[0, :3], whole[0, :3]) and bool((out[0, 3:] == 0).all())
    rows = ids.shape[0]
    expected = [rows] * 3 + [rows - 1] * (NEW_TOKENS - 3) if steps == "dynamic" else [rows] * NEW_TOKENS
    assert batch_sizes == expected
    assert decoder.rows.tolist() == (list(range(1, rows)) if steps == "dynamic" else list(range(rows)))


def test_rows_leaving_and_returned_scores_do_not_mix(make_model, tokenizer, prompt_batch):
    with pytest.raises(FlyThinkerError, match="cannot leave"):
        decode(decoders("plain", make_model, tokenizer, "dynamic"), prompt_batch.input_ids, prompt_batch.attention_mask,
               GenerationConfig(max_new_tokens=2), eos_token_id=-1, pad_token_id=0, output_scores=True,
               unwanted=list)
