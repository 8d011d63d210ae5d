"""Staggered decoding equals the parallel forward; batching, EOS, sampling, streaming, overlap modes.

The template is transformers' cache-vs-no-cache test: decode step by step with KV caches, then run
one parallel forward over the full sequence, and compare the logits at every decoded position.
"""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS, parallel_logits_at_decoded_positions, requires_cuda

from flythinker.config import GenerationConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import generate, generate_plain

NEW_TOKENS = 12


@pytest.mark.parametrize(
    ("fusion", "d_r", "d_g", "lam"),
    [("pad", 64, 64, 0.5), ("pad", 32, 64, 2.0), ("linear", 64, 32, 1.0)],
)
def test_staggered_decoding_matches_the_parallel_forward(make_model, prompt_batch, fusion, d_r, d_g, lam):
    model = make_model(lam=lam, fusion=fusion, d_r=d_r, d_g=d_g)
    out = model.generate(
        prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=NEW_TOKENS,
        output_scores=True, eos_token_id=-1,  # no EOS: every row decodes all steps
    )
    assert out.sequences.shape == (len(PROMPTS), NEW_TOKENS)
    parallel = parallel_logits_at_decoded_positions(model, prompt_batch, out.sequences)
    staggered = torch.stack(out.scores, dim=1)
    max_diff = (parallel - staggered).abs().max().item()
    assert max_diff <= 1e-4, f"staggered vs parallel logits differ by {max_diff}"


def test_sampled_decoding_also_matches_the_parallel_forward(make_model, prompt_batch):
    model = make_model(lam=1.0)
    out = model.generate(
        prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=NEW_TOKENS,
        do_sample=True, temperature=1.5, seed=7, output_scores=True, eos_token_id=-1,
    )
    parallel = parallel_logits_at_decoded_positions(model, prompt_batch, out.sequences)
    assert (parallel - torch.stack(out.scores, dim=1)).abs().max() <= 1e-4


def test_batched_left_padded_decoding_equals_each_prompt_alone(make_model, tokenizer, prompt_batch):
    model = make_model(lam=1.0)
    batched = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask,
                             max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(tokenizer([prompt], return_tensors="pt").input_ids,
                               max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
        assert torch.equal(batched.sequences[row], alone.sequences[0])
        diff = max((b[row] - a[0]).abs().max().item() for b, a in zip(batched.scores, alone.scores))
        assert diff <= 1e-4


def test_lambda_zero_decodes_like_the_plain_generator(make_model, prompt_batch):
    model = make_model(lam=0.0)
    ours = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask,
                          max_new_tokens=NEW_TOKENS, eos_token_id=-1)
    theirs = model.generator.generate(
        input_ids=prompt_batch.input_ids, attention_mask=prompt_batch.attention_mask,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
    )[:, prompt_batch.input_ids.shape[1]:]
    assert torch.equal(ours.sequences, theirs)


def test_plain_decoding_matches_transformers_generate(make_model, tokenizer, prompt_batch):
    """The baselines' decode loop (same sampler, same stopping) agrees with Hugging Face's."""
    lm = make_model().generator
    ours = generate_plain(lm, prompt_batch.input_ids, prompt_batch.attention_mask, tokenizer=tokenizer,
                          max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    theirs = lm.generate(
        input_ids=prompt_batch.input_ids, attention_mask=prompt_batch.attention_mask,
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
    )[:, prompt_batch.input_ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_each_row_stops_at_its_own_eos(make_model, prompt_batch):
    model = make_model(lam=1.0)
    free = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask,
                          max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    eos = int(free[0, 3])  # row 0 emits this token at step 3; other rows may or may not
    out = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask,
                         max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0).sequences
    for row in range(len(PROMPTS)):
        hits = (free[row] == eos).nonzero().flatten().tolist()
        stop = hits[0] + 1 if hits else free.shape[1]
        assert torch.equal(out[row, :stop], free[row, :stop])
        assert (out[row, stop:] == 0).all()
    assert out.shape[1] <= NEW_TOKENS


def test_sampling_is_seeded_and_top_k_one_is_greedy(make_model, prompt_batch):
    model = make_model()
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    sample = lambda seed, **kw: model.generate(*args, max_new_tokens=NEW_TOKENS, do_sample=True,
                                               seed=seed, eos_token_id=-1, temperature=2.0, **kw).sequences
    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    greedy = model.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    assert torch.equal(sample(3, top_k=1), greedy)


def test_streaming_callback_sees_every_step(make_model, prompt_batch):
    model = make_model()
    seen: list[torch.Tensor] = []
    out = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=5,
                         eos_token_id=-1, on_token=lambda t: seen.append(t.clone()))
    assert torch.equal(torch.stack(seen, dim=1), out.sequences)


def test_reasoning_vectors_are_returned_per_step(make_model, prompt_batch):
    model = make_model(d_r=32, d_g=64)
    out = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=4,
                         eos_token_id=-1, output_reasoning=True)
    assert len(out.reasoning) == 4 and out.reasoning[0].shape == (len(PROMPTS), 32)
    # Step 0 fuses h of the last prompt token, as in the parallel forward.
    with torch.no_grad():
        h = model(prompt_batch.input_ids, prompt_batch.attention_mask).reasoning[:, -1]
    torch.testing.assert_close(out.reasoning[0], h, rtol=1e-4, atol=1e-5)


def test_generate_restores_training_mode(make_model, prompt_batch):
    model = make_model().train()
    model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=2)
    assert model.training


def test_empty_prompt_is_a_clear_error(make_model):
    model = make_model()
    ids = torch.tensor([[5, 6, 7], [0, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(FlyThinkerError, match=r"empty prompt in batch row\(s\) \[1\]"):
        generate(model, ids, mask, max_new_tokens=2)
    with pytest.raises(FlyThinkerError, match="length >= 1"):
        generate(model, torch.zeros((1, 0), dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 1.5},
                                 {"overlap": "threads"}])
def test_bad_generation_settings_are_named(bad):
    with pytest.raises(FlyThinkerError, match=next(iter(bad))):
        GenerationConfig(**bad)


def test_overlap_modes_check_their_devices(make_model, prompt_batch):
    model = make_model()
    with pytest.raises(FlyThinkerError, match="streams' needs both models on one CUDA device"):
        model.generate(prompt_batch.input_ids, max_new_tokens=2, overlap="streams")
    with pytest.raises(FlyThinkerError, match="different devices"):
        model.generate(prompt_batch.input_ids, max_new_tokens=2, overlap="devices")


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("overlap", ["streams", "devices"])
def test_overlap_modes_give_the_same_greedy_tokens(make_model, prompt_batch, overlap):
    model = make_model(lam=1.0, d_r=32, d_g=64)
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    reference = model.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    if overlap == "streams":
        model.cuda()
    else:  # one GPU here: the reasoner on it, the generator on the CPU (or a second GPU if present)
        model.reasoner.cuda()
        if torch.cuda.device_count() > 1:
            model.generator.to("cuda:1")
            model.fusion.to("cuda:1")
    out = model.generate(*[a.to(model.generator.device) for a in args], max_new_tokens=NEW_TOKENS,
                         eos_token_id=-1, overlap=overlap).sequences
    assert torch.equal(out.cpu(), reference)
