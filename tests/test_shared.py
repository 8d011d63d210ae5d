"""FlyThinker-shared keeps every invariant of the method, and its 2B-row decode equals the two roles run apart."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import PROMPTS, parallel_logits_at_decoded_positions, requires_cuda
from peft import PeftModel
from test_train import copy_examples

from flythinker.config import FlyThinkerConfig, GenerationConfig, TrainConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.adapter import RoleLoRALinear, stack_adapter_weights
from flythinker.model.decoding import (
    FlyThinkerDecoder,
    decode,
    generate_plain,
    position_ids_from_mask,
)
from flythinker.model.flythinker import FlyThinker
from flythinker.model.reasoners import ADAPTER_DIR, AdapterReasoner
from flythinker.model.sources import build_tiny
from flythinker.training.train import train

NEW_TOKENS = 10


def randomize_adapter(model: FlyThinker, seed: int = 5) -> FlyThinker:
    """B starts at zero (reasoner == generator); move it so the tests can see the adapter act."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture
def make_shared(tokenizer):
    def make(lam: float = 1.0, fusion: str = "pad") -> FlyThinker:
        torch.manual_seed(3)  # adapter A and the linear projection
        model = FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lam=lam, fusion=fusion, projection_init="random")
        return randomize_adapter(model).eval()

    return make


def test_lambda_zero_gives_exactly_the_base_generator(tokenizer, prompt_batch):
    base = build_tiny(64, seed=2).eval()
    model = randomize_adapter(FlyThinker.shared(copy.deepcopy(base), tokenizer, lam=0.0)).eval()
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        fused = model(ids, mask).logits
        plain = base(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    assert torch.equal(fused[mask.bool()], plain[mask.bool()])
    decoded = model.generate(ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    alone = generate_plain(base, ids, mask, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0).sequences
    assert torch.equal(decoded, alone)


def test_the_adapter_makes_the_reasoner_differ_from_the_generator(make_shared, prompt_batch):
    model = make_shared()
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        h = model.reason(ids, mask, position_ids_from_mask(mask)).last_hidden_state
        plain = model.generator.get_decoder()(input_ids=ids, attention_mask=mask,
                                              position_ids=position_ids_from_mask(mask)).last_hidden_state
    assert (h - plain)[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize(("fusion", "lam"), [("pad", 1.0), ("linear", 0.5)])
def test_staggered_decoding_matches_the_parallel_forward(make_shared, prompt_batch, fusion, lam):
    model = make_shared(lam=lam, fusion=fusion)
    out = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=NEW_TOKENS,
                         output_scores=True, eos_token_id=-1)
    assert out.sequences.shape == (len(PROMPTS), NEW_TOKENS)
    diff = (parallel_logits_at_decoded_positions(model, prompt_batch, out.sequences) - torch.stack(out.scores, dim=1)).abs().max().item()
    assert diff <= 1e-4, f"staggered vs parallel logits differ by {diff}"


def test_batched_roles_equal_the_two_roles_run_apart(make_shared, prompt_batch):
    """One 2B-row forward per step == FlyThinker's loop with the reasoner and generator separate."""
    model = make_shared()
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    batched = model.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True,
                             output_reasoning=True)
    with torch.no_grad():
        apart = decode(FlyThinkerDecoder(model), *args, GenerationConfig(max_new_tokens=NEW_TOKENS),
                       eos_token_id=-1, pad_token_id=0, output_scores=True, output_reasoning=True)
    assert torch.equal(batched.sequences, apart.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(batched.scores, apart.scores)) <= 1e-4
    assert max((a - b).abs().max().item() for a, b in zip(batched.reasoning, apart.reasoning)) <= 1e-4


def test_left_padded_batch_equals_each_prompt_alone(make_shared, tokenizer, prompt_batch):
    model = make_shared()
    batched = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=NEW_TOKENS,
                             eos_token_id=-1, output_scores=True)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(tokenizer([prompt], return_tensors="pt").input_ids, max_new_tokens=NEW_TOKENS,
                               eos_token_id=-1, output_scores=True)
        assert torch.equal(batched.sequences[row], alone.sequences[0])
        assert max((b[row] - a[0]).abs().max().item() for b, a in zip(batched.scores, alone.scores)) <= 1e-4


def test_checkpoint_holds_the_base_once_plus_a_peft_adapter(make_shared, prompt_batch, tmp_path):
    model = make_shared(fusion="linear")
    path = model.save_pretrained(tmp_path / "ckpt")
    assert {"generator", ADAPTER_DIR, "flythinker_config.json", "fusion.safetensors"} <= {p.name for p in path.iterdir()}
    assert not (path / "reasoner").exists()
    assert json.loads((path / "flythinker_config.json").read_text())["reasoner"] == "shared"

    loaded = FlyThinker.from_pretrained(path).eval()  # the generic loader recognises the variant
    assert isinstance(loaded.reasoner_component, AdapterReasoner)
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        before, after = model(ids, mask), loaded(ids, mask)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.reasoning, after.reasoning)

    # The files are peft's: the plain saved generator plus PeftModel reproduces the reasoner.
    peft_model = PeftModel.from_pretrained(
        type(model.generator).from_pretrained(path / "generator"), str(path / ADAPTER_DIR)
    ).eval()
    with torch.no_grad():
        h = peft_model.get_base_model().get_decoder()(
            input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    torch.testing.assert_close(h, before.reasoning, rtol=1e-5, atol=1e-5)


def test_an_adapter_of_another_rank_is_refused(make_shared, tmp_path):
    path = make_shared().save_pretrained(tmp_path / "ckpt")
    config = json.loads((path / "flythinker_config.json").read_text())
    (path / "flythinker_config.json").write_text(json.dumps({**config, "lora_rank": 4}))
    with pytest.raises(FlyThinkerError, match="lora_rank"):
        FlyThinker.from_pretrained(path)


def test_one_training_step_moves_the_adapter_and_the_generator(make_shared, tokenizer, tmp_path):
    model = make_shared()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any("lora_A" in n for n in before) and any("base_layer" in n for n in before)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, lr=1e-2, weight_decay=0.0)
    train(model, tokenizer, copy_examples(4), config, save=False, show_progress=False)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(before[name], p)]
    assert unchanged == []


def test_gradient_checkpointing_is_refused_with_a_clear_error(make_shared, tokenizer, tmp_path):
    # Recomputed layers would run without the adapter: torch fails deep in backward otherwise.
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, gradient_checkpointing=True)
    with pytest.raises(FlyThinkerError, match="cannot train with gradient_checkpointing"):
        train(make_shared(), tokenizer, copy_examples(4), config, save=False, show_progress=False)


def test_from_config_builds_the_shared_variant():
    model = FlyThinker.from_config(FlyThinkerConfig(reasoner="shared", generator="tiny", lora_rank=4))
    assert isinstance(model.reasoner_component, AdapterReasoner) and model.reasoner is model.generator
    assert model.generator.get_decoder().layers[0].self_attn.q_proj.lora_A.weight.shape[0] == 4


def test_two_device_overlap_is_refused(make_shared, prompt_batch):
    with pytest.raises(FlyThinkerError, match="one batched forward"):
        make_shared().generate(prompt_batch.input_ids, max_new_tokens=2, overlap="devices")


def test_a_generator_that_reworks_its_logits_is_refused(make_shared, prompt_batch):
    # Gemma 2's soft-capping happens after the LM head, which the one-forward step reads directly.
    model = make_shared()
    model.generator.config.final_logit_softcapping = 30.0
    with pytest.raises(FlyThinkerError, match="would skip final_logit_softcapping"):
        model.generate(prompt_batch.input_ids, max_new_tokens=2)


@pytest.mark.gpu
@requires_cuda
def test_batched_roles_on_cuda_give_the_cpu_tokens(make_shared, prompt_batch):
    model = make_shared()
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    reference = model.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1).sequences
    model.cuda()
    out = model.generate(*[a.cuda() for a in args], max_new_tokens=NEW_TOKENS, eos_token_id=-1)
    assert torch.equal(out.sequences.cpu(), reference)
    with torch.no_grad():
        apart = decode(FlyThinkerDecoder(model), *[a.cuda() for a in args],
                       GenerationConfig(max_new_tokens=NEW_TOKENS), eos_token_id=-1, pad_token_id=0)
    assert torch.equal(apart.sequences.cpu(), reference)


def test_adapter_targets_choose_the_adapted_layers(tokenizer, prompt_batch, tmp_path):
    model = FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lora_targets=["q_proj", "v_proj"])
    assert model.reasoner_component.paths and {p.rsplit(".", 1)[-1] for p in model.reasoner_component.paths} == {"q_proj", "v_proj"}
    randomize_adapter(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FlyThinker.from_pretrained(tmp_path / "ckpt")
    assert set(loaded.reasoner_component.adapter_state()) == set(model.reasoner_component.adapter_state())
    with torch.no_grad():
        args = (prompt_batch.input_ids, prompt_batch.attention_mask)
        assert torch.equal(model(*args).logits, loaded(*args).logits)
    with pytest.raises(FlyThinkerError, match="lora_targets qq_proj name no linear layer"):
        FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lora_targets=["qq_proj"])


def test_write_decodes_a_shared_checkpoint_with_its_own_decoder(make_shared, tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from flythinker.commands import write
    from flythinker.commands.cli import main
    from flythinker.model.decoding import SharedDecoder

    used = []
    real_decode = write.decode
    monkeypatch.setattr(write, "decode", lambda decoder, *a, **k: used.append(type(decoder)) or real_decode(decoder, *a, **k))
    from flythinker.commands.write import read_profile
    from flythinker.data.collate import encode_prompts
    from flythinker.data.prompts import PromptBudgets, build_prompt
    from flythinker.model.flythinker import FlyThinker

    profile = Path(__file__).resolve().parents[1] / "examples" / "profile_reviews.json"
    query = 'Generate the review text for a product with description "Ceramic Mug". The summary is "Lovely."'
    path = make_shared().save_pretrained(tmp_path / "shared")
    assert main(["write", "--checkpoint", str(path), "--profile", str(profile), "--query", query,
                 "--max-new-tokens", "10", "--profile-tokens", "256"]) == 0
    written = capsys.readouterr().out.rstrip("\n").splitlines()[-1]  # after any library banner

    model = FlyThinker.from_pretrained(path)
    prompt = build_prompt(read_profile(str(profile), query, None), model.tokenizer, "profile",
                          budgets=PromptBudgets(profile_tokens=256))
    batch = encode_prompts(model.tokenizer, [prompt], max_prompt_tokens=PromptBudgets(profile_tokens=256).prompt_tokens)
    tokens = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=10).sequences[0].tolist()
    assert written == model.tokenizer.decode(tokens, skip_special_tokens=True)
    assert used == [SharedDecoder]  # one forward of both roles per step, not the two-model decoder


# --------------------------------------------------------------------------- A stacked under W


@pytest.mark.parametrize("steps", ["dynamic", "static"])
def test_stacked_adapter_weights_decode_as_the_layers_apart(make_shared, prompt_batch, steps):
    """(W; A) in one GEMM per mixed step gives the tokens and logits of the two GEMMs, and holds
    no second copy of any weight."""
    apart, stacked = make_shared(fusion="linear"), make_shared(fusion="linear")
    stacked_layers = stack_adapter_weights(stacked)
    assert stacked_layers == len(stacked.reasoner_component.paths) > 0
    layer = next(m for m in stacked.modules() if isinstance(m, RoleLoRALinear))
    assert layer.base_layer.weight.data_ptr() == layer.stacked_weight.data_ptr()
    assert layer.lora_A.weight.untyped_storage().data_ptr() == layer.stacked_weight.untyped_storage().data_ptr()
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    with torch.no_grad():
        reference = decode(apart.step_decoder(steps=steps), *args, GenerationConfig(max_new_tokens=NEW_TOKENS),
                           eos_token_id=-1, pad_token_id=0, output_scores=True, output_reasoning=True)
        out = decode(stacked.step_decoder(steps=steps), *args, GenerationConfig(max_new_tokens=NEW_TOKENS),
                     eos_token_id=-1, pad_token_id=0, output_scores=True, output_reasoning=True)
    assert torch.equal(out.sequences, reference.sequences)
    assert max((a - b).abs().max().item() for a, b in zip(out.scores, reference.scores)) <= 1e-5
    assert max((a - b).abs().max().item() for a, b in zip(out.reasoning, reference.reasoning)) <= 1e-5
    # Cast (new tensors for every parameter): stacked again, still the same model.
    stacked.to(torch.float64)
    assert layer.stacked_weight.dtype == torch.float64 and layer.base_layer.weight.data_ptr() == layer.stacked_weight.data_ptr()
    again = stacked.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1)
    assert torch.equal(again.sequences, reference.sequences)


def test_a_stacked_model_trains_saves_and_loads_as_an_unstacked_one(make_shared, tokenizer, prompt_batch, tmp_path):
    models = {"apart": make_shared(fusion="linear"), "stacked": make_shared(fusion="linear")}
    stack_adapter_weights(models["stacked"])
    for name, model in models.items():
        config = TrainConfig(output_dir=str(tmp_path / name), max_steps=2, batch_size=4, lr=1e-2)
        train(model, tokenizer, copy_examples(8), config, show_progress=False)
    loaded = {name: FlyThinker.from_pretrained(tmp_path / name / "checkpoint").eval() for name in models}
    ids, mask = prompt_batch.input_ids, prompt_batch.attention_mask
    with torch.no_grad():
        logits = {name: model(ids, mask).logits for name, model in loaded.items()}
    torch.testing.assert_close(logits["stacked"], logits["apart"], rtol=1e-5, atol=1e-5)
