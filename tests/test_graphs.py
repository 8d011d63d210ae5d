"""Static-cache decode steps equal dynamic ones; on a GPU, their CUDA-graph replays do too.

The static path is the graph's body run eagerly, so the CPU tests here prove the step a graph
replays; the GPU tests add only the capture and replay.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import parallel_logits_at_decoded_positions, requires_cuda
from test_shared import randomize_adapter

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import CausalLMDecoder, decode
from flythinker.model.flythinker import FlyThinker
from flythinker.model.graphs import KEPT_STATES, SlotMask
from flythinker.model.prepack import prepack_linears
from flythinker.model.sources import build_tiny

NEW_TOKENS = 10
PROMPTS_TWO = ["Write a review of the blue kettle.", "Hi"]


def tiny_model(kind: str, make_model, tokenizer):
    """The fixed tiny weights of one family (the same weights for every ``steps``)."""
    if kind == "plain":
        return build_tiny(64, seed=2).eval()
    if kind == "shared":
        torch.manual_seed(3)
        return randomize_adapter(FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lam=1.0, fusion="pad")).eval()
    fusion, d_r = ("pad", 32) if kind == "flythinker-pad" else ("linear", 64)
    return make_model(lam=1.0, fusion=fusion, d_r=d_r, d_g=64)


def decoder_over(model, steps: str, overlap: str = "none", compile: bool = False):
    """A fresh decoder of ``model``'s family."""
    if isinstance(model, FlyThinker):
        return model.step_decoder(overlap, steps, compile)
    return CausalLMDecoder(model, steps, compile)


def decoders(kind: str, make_model, tokenizer, steps: str, overlap: str = "none", device: str = "cpu",
             compile: bool = False):
    """A fresh decoder of one family over fresh copies of its fixed tiny weights."""
    return decoder_over(tiny_model(kind, make_model, tokenizer).to(device), steps, overlap, compile)


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


# --------------------------------------------------------------------------- kept static states

OTHER_PROMPTS = ["A long review, please: the kettle boils fast, looks fine and the lid", "Hello there", "An abstract"]


def greedy(decoder, batch):
    with torch.no_grad():
        return decode(decoder, batch.input_ids.to(decoder.device), batch.attention_mask.to(decoder.device),
                      GenerationConfig(max_new_tokens=NEW_TOKENS), eos_token_id=-1, pad_token_id=0, output_scores=True)


@pytest.mark.parametrize("kind", ["plain", "flythinker-pad", "flythinker-linear", "shared"])
def test_a_later_call_of_the_same_shape_reuses_the_static_state_for_its_own_prompts(kind, make_model, tokenizer, prompt_batch):
    """What a second `write`, or a server's next batch, does: a fresh decoder over the same model
    takes the first call's caches and buffers (on a GPU: its captured graph), refills them, and
    decodes its own, differently padded prompts as a decoder that never saw the first call would."""
    model = tiny_model(kind, make_model, tokenizer)
    other = tokenizer(OTHER_PROMPTS, return_tensors="pt", padding=True)
    assert other.input_ids.shape[1] != prompt_batch.input_ids.shape[1]
    reference = greedy(decoder_over(model, "dynamic"), other)

    greedy(decoder_over(model, "static"), prompt_batch)
    assert KEPT_STATES.kept(model) == 1
    hits = KEPT_STATES.hits
    second = decoder_over(model, "static")
    out = greedy(second, other)
    assert KEPT_STATES.hits == hits + 1 and KEPT_STATES.kept(model) == 1
    assert torch.equal(out.sequences, reference.sequences)
    score_diff = max((s - r).abs().max().item() for s, r in zip(out.scores, reference.scores))
    assert score_diff <= 1e-5, f"reused-state vs dynamic logits differ by {score_diff}"


def test_a_kept_state_serves_only_its_own_shape_weights_and_lambda(make_model, tokenizer, prompt_batch):
    model = tiny_model("flythinker-linear", make_model, tokenizer)
    greedy(decoder_over(model, "static"), prompt_batch)
    misses = KEPT_STATES.misses
    greedy(decoder_over(model, "static"), tokenizer(PROMPTS_TWO, return_tensors="pt", padding=True))  # batch 2
    with torch.no_grad():  # new tensors for one parameter: a graph would read the old ones
        model.fusion.projection.weight = torch.nn.Parameter(model.fusion.projection.weight.clone())
    greedy(decoder_over(model, "static"), prompt_batch)
    assert KEPT_STATES.kept(model) == 1  # the states over the old tensors can never serve again: dropped
    model.fusion.lam_scale = 0.5  # lambda is a Python number a captured step bakes in
    greedy(decoder_over(model, "static"), prompt_batch)
    assert KEPT_STATES.misses == misses + 3 and KEPT_STATES.kept(model) == 2


def test_kept_states_are_bounded_per_model_and_go_with_the_model(tokenizer):
    model = build_tiny(64, seed=2).eval()
    for length in range(1, 7):  # six batch sizes: six shapes
        greedy(decoder_over(model, "static"), tokenizer(["Hi"] * length, return_tensors="pt"))
    assert KEPT_STATES.kept(model) == KEPT_STATES.per_model
    kept = weakref.ref(next(iter(KEPT_STATES._kept[model].values())))
    del model
    gc.collect()
    assert kept() is None  # the state did not keep its model alive, nor the model its state


def test_a_call_that_fails_midway_leaves_a_state_the_next_call_can_use(make_model, tokenizer, prompt_batch):
    model = tiny_model("flythinker-pad", make_model, tokenizer)
    reference = greedy(decoder_over(model, "dynamic"), prompt_batch)

    tokens_seen = []

    def fail_at_step_4(token):
        tokens_seen.append(token)
        if len(tokens_seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        decode(decoder_over(model, "static"), prompt_batch.input_ids, prompt_batch.attention_mask,
               GenerationConfig(max_new_tokens=NEW_TOKENS), eos_token_id=-1, pad_token_id=0, on_token=fail_at_step_4)
    hits = KEPT_STATES.hits
    assert torch.equal(greedy(decoder_over(model, "static"), prompt_batch).sequences, reference.sequences)
    assert KEPT_STATES.hits == hits + 1


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize(("kind", "overlap"), [("plain", "none"), ("flythinker-pad", "streams"), ("shared", "none")])
def test_a_later_call_replays_the_graph_an_earlier_call_captured(kind, overlap, make_model, tokenizer, prompt_batch):
    model = tiny_model(kind, make_model, tokenizer)
    other = tokenizer(OTHER_PROMPTS, return_tensors="pt", padding=True)
    reference = greedy(decoder_over(model, "dynamic"), other)
    model.to("cuda")
    first = decoder_over(model, "graph", overlap)
    greedy(first, prompt_batch)
    (state,) = KEPT_STATES._kept[model].values()
    graph = state.step.graph
    assert graph is not None and state.step.capture_error is None, state.step.capture_error
    out = greedy(decoder_over(model, "graph", overlap), other)
    assert state.step.graph is graph and state.uses == 2  # replayed from its first step, not captured again
    assert torch.equal(out.sequences.cpu(), reference.sequences)


def test_kept_states_work_over_opaque_prepacked_weights(prompt_batch):
    """oneDNN pre-packed weights have no data pointer: the weights' fingerprint still holds."""
    model = build_tiny(64, seed=2).eval()
    prepack_linears(model)
    reference = greedy(CausalLMDecoder(model, "dynamic"), prompt_batch)
    hits = KEPT_STATES.hits
    for _ in range(2):
        assert torch.equal(greedy(CausalLMDecoder(model, "static"), prompt_batch).sequences, reference.sequences)
    assert KEPT_STATES.hits == hits + 1
