"""The method's invariants on the parallel (training) forward (README, "The method, as implemented")."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flythinker.config import FlyThinkerConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import position_ids_from_mask
from flythinker.model.flythinker import FlyThinker
from flythinker.model.reasoners import check_same_vocab
from flythinker.model.sources import build_tiny, load_tokenizer


def test_lambda_zero_gives_exactly_the_generators_logits(make_model, prompt_batch):
    model = make_model(lam=0.0)
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        fused = model(ids, mask).logits
        plain = model.generator(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)
        ).logits
    real = mask.bool()
    assert torch.equal(fused[real], plain[real])


def test_lambda_changes_the_logits(make_model, prompt_batch):
    # Guards the test above: with lambda > 0 the reasoner must actually reach the generator.
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        a = make_model(lam=0.0)(ids, mask).logits
        b = make_model(lam=0.5)(ids, mask).logits
    assert (a - b)[mask.bool()].abs().max() > 1e-3


def test_signal_is_lambda_times_rescaled_previous_vector(make_model, tokenizer):
    """The fused input at position i is e(s_i) + lam * h_{i-1} * mean||E|| / ||h_{i-1}||."""
    model = make_model(lam=0.7)
    ids = tokenizer(["one two three four"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h = model.reason(ids, mask, position_ids_from_mask(mask)).last_hidden_state
        fused = model.fused_embeddings(ids, mask, h)
        table = model.generator.get_input_embeddings().weight
        expected = table[ids].clone()
        norm = table.norm(dim=-1).mean()
        expected[:, 1:] += 0.7 * h[:, :-1] * norm / h[:, :-1].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)
    # Every signal has the norm of an average token embedding, times lambda.
    signal_norm = (fused - table[ids])[:, 1:].norm(dim=-1)
    torch.testing.assert_close(signal_norm, torch.full_like(signal_norm, 0.7 * norm.item()), rtol=1e-4, atol=1e-5)


def test_left_padded_rows_equal_each_row_alone(make_model, tokenizer, prompt_batch):
    model = make_model(lam=1.0)
    with torch.no_grad():
        batched = model(prompt_batch.input_ids, prompt_batch.attention_mask).logits
        for row, text in enumerate(["Write a review of the blue kettle.", "Hi"]):
            alone_ids = tokenizer([text], return_tensors="pt").input_ids
            alone = model(alone_ids).logits[0]
            real = prompt_batch.attention_mask[row].bool()
            assert (batched[row][real] - alone).abs().max() < 1e-5


def test_loss_counts_target_tokens_only(make_model, tokenizer):
    model = make_model()
    ids = tokenizer(["prompt words then target words"], return_tensors="pt").input_ids
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = model(ids, labels=labels)
    manual = torch.nn.functional.cross_entropy(out.logits[0, 2:-1], ids[0, 3:])
    torch.testing.assert_close(out.loss, manual)


@pytest.mark.parametrize("fusion", ["pad", "linear"])
def test_save_load_round_trip(make_model, prompt_batch, tmp_path, fusion):
    model = make_model(fusion=fusion, d_r=32, d_g=64)
    path = model.save_pretrained(tmp_path / "ckpt")
    names = {p.name for p in path.iterdir()}
    assert {"reasoner", "generator", "flythinker_config.json", "tokenizer.json"} <= names
    assert ("fusion.safetensors" in names) == (fusion == "linear")
    assert json.loads((path / "flythinker_config.json").read_text())["fusion"] == fusion
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left behind"

    loaded = FlyThinker.from_pretrained(path).eval()
    with torch.no_grad():
        before = model(prompt_batch.input_ids, prompt_batch.attention_mask).logits
        after = loaded(prompt_batch.input_ids, prompt_batch.attention_mask).logits
    assert torch.equal(before, after)
    assert loaded.tokenizer is not None and loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert loaded.tokenizer(ENCODED_ALIKE)["input_ids"] == model.tokenizer(ENCODED_ALIKE)["input_ids"]


# Digits after a space: a generic tokenizer saved with a Qwen2 model must not come back as a
# Qwen2Tokenizer, which splits " 5" in two (a reused SFT checkpoint once scored validation
# records differently from the model in memory).
ENCODED_ALIKE = "Rating: 5.0, 1234 stars"


def test_a_saved_lm_loads_its_tokenizer_back_as_it_tokenized(tokenizer, tmp_path):
    build_tiny(64, seed=0).save_pretrained(tmp_path)  # a config.json naming the qwen2 model type
    tokenizer.save_pretrained(tmp_path)
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded) is type(tokenizer)
    assert loaded(ENCODED_ALIKE)["input_ids"] == tokenizer(ENCODED_ALIKE)["input_ids"]


def test_save_replaces_an_existing_checkpoint_atomically(make_model, tmp_path):
    first, second = make_model(lam=0.1), make_model(lam=0.9)
    first.save_pretrained(tmp_path / "ckpt")
    second.save_pretrained(tmp_path / "ckpt")
    assert FlyThinker.from_pretrained(tmp_path / "ckpt").config.lam == 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_interrupted_save_keeps_the_previous_checkpoint(make_model, tmp_path, monkeypatch):
    model = make_model(lam=0.1)
    model.save_pretrained(tmp_path / "ckpt")

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model.generator, "save_pretrained", crash)
    model.config.lam = 0.9
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "ckpt")
    assert FlyThinker.from_pretrained(tmp_path / "ckpt").config.lam == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_incomplete_checkpoint_is_named(make_model, tmp_path):
    path = make_model().save_pretrained(tmp_path / "ckpt")
    (path / "generator" / "config.json").unlink()
    with pytest.raises(FlyThinkerError, match="missing generator/config.json"):
        FlyThinker.from_pretrained(path)


@pytest.mark.parametrize(("fusion", "d_r", "d_g"), [("pad", 32, 64), ("linear", 32, 64), ("linear", 64, 32)])
def test_different_widths(make_model, prompt_batch, fusion, d_r, d_g):
    model = make_model(fusion=fusion, d_r=d_r, d_g=d_g)
    out = model(prompt_batch.input_ids, prompt_batch.attention_mask, labels=prompt_batch.input_ids)
    assert out.reasoning.shape[-1] == d_r and out.logits.shape[:2] == prompt_batch.input_ids.shape
    out.loss.backward()
    assert model.reasoner.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    if fusion == "linear":
        assert model.fusion.projection.weight.grad.abs().sum() > 0


def test_pad_fusion_rejects_a_wider_reasoner(make_model):
    with pytest.raises(FlyThinkerError, match="fusion='linear'"):
        make_model(fusion="pad", d_r=64, d_g=32)


@pytest.mark.parametrize("lam", [math.nan, math.inf, -0.5, "0.5"])
def test_lambda_must_be_a_finite_non_negative_number(lam):
    with pytest.raises(FlyThinkerError, match="lam"):
        FlyThinkerConfig(lam=lam)


def test_models_with_different_vocabularies_are_rejected(tokenizer):
    with pytest.raises(FlyThinkerError, match="share one tokenizer"):
        FlyThinker.from_models(build_tiny(vocab_size=600), build_tiny(), tokenizer)


def test_tokenizers_with_different_vocabularies_are_rejected(tokenizer):
    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other.add_tokens(["<extra_token>"])
    check_same_vocab(tokenizer, tokenizer)
    with pytest.raises(FlyThinkerError, match="share one tokenizer"):
        check_same_vocab(tokenizer, other)


def test_prompt_longer_than_the_context_is_a_clear_error(tokenizer):
    short = {"max_position_embeddings": 16}
    model = FlyThinker.from_models(build_tiny(**short), build_tiny(**short), tokenizer)
    ids = torch.randint(3, 500, (1, 17))
    with pytest.raises(FlyThinkerError, match="exceeds the models' context of 16"):
        model(ids)
    with pytest.raises(FlyThinkerError, match="context of 16"):
        model.generate(ids, max_new_tokens=2)


def test_models_wrapped_in_memory_record_where_they_were_loaded_from(tokenizer, tmp_path):
    generator, reasoner = build_tiny(), build_tiny()
    generator.save_pretrained(tmp_path / "gen")
    loaded = type(generator).from_pretrained(tmp_path / "gen")
    model = FlyThinker.from_models(reasoner, loaded, tokenizer)
    # The checkpoint's config names the loaded generator; the reasoner, built in memory, has no name.
    assert model.config.generator == str(tmp_path / "gen") and model.config.reasoner == FlyThinkerConfig().reasoner
    assert FlyThinker.shared(loaded, tokenizer).config.generator == str(tmp_path / "gen")


def test_non_causal_lm_is_rejected(tokenizer):
    with pytest.raises(FlyThinkerError, match="causal LM"):
        FlyThinker.from_models(torch.nn.Linear(2, 2), build_tiny(), tokenizer)  # type: ignore[arg-type]


def test_target_norm_in_blocks_equals_the_whole_table_at_once(make_model):
    model = make_model()
    weight = model.generator.get_input_embeddings().weight
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape) * torch.linspace(0.1, 3.0, weight.shape[0])[:, None])
    whole = weight.detach().float().norm(dim=-1).mean()
    assert torch.allclose(model.target_norm(), whole, rtol=1e-6)
    # Blocks of 16384 rows: a table that spans several blocks gives the same mean.
    big = torch.nn.Embedding(40000, 8)
    model.generator.set_input_embeddings(big)
    assert torch.allclose(model.target_norm(), big.weight.detach().norm(dim=-1).mean(), rtol=1e-6)
