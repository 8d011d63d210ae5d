"""Start-at-SFT fusion options: each starts exactly at the generator, trains, decodes staggered like
the parallel forward, saves and loads; the published fusion is unchanged; the rescale norm is
right or a clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import parallel_logits_at_decoded_positions, requires_cuda
from test_train import copy_examples

from flythinker.config import FlyThinkerConfig, TrainConfig
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import position_ids_from_mask
from flythinker.model.flythinker import FlyThinker
from flythinker.model.fusion import Fusion, embedding_row_norm_mean, warmup_factor
from flythinker.training.train import _Loop, train

# Each start-at-SFT option, as FlyThinkerConfig fields.
START_AT_SFT = {
    "warmup": {"lam_warmup": 0.5},
    "scalar gate": {"gate": "scalar"},
    "vector gate": {"gate": "vector"},
    "zero projection": {"fusion": "linear", "projection_init": "zero"},
    "zero projection + gate": {"fusion": "linear", "projection_init": "zero", "gate": "scalar"},
    "scaled zero projection": {"fusion": "linear", "projection_init": "zero", "projection_scale": 50.0},
}


def generator_logits(model, batch):
    ids, mask = batch.input_ids, batch.attention_mask
    return model.generator(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits


def test_a_model_starts_at_sft_by_default_and_a_run_row_at_the_published_fusion(tokenizer, prompt_batch):
    # Defaults follow the real-data study for a model built directly; a run's method row keeps the
    # paper's, so the paper's config and its ablations reproduce it without naming it.
    from flythinker.methods import MethodConfig
    from flythinker.model.sources import build_tiny

    model = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), tokenizer).eval()
    assert (model.config.fusion, model.config.projection_init) == ("linear", "zero")
    out = model(prompt_batch.input_ids, prompt_batch.attention_mask)
    assert torch.equal(out.logits, generator_logits(model, prompt_batch))
    row = MethodConfig(method="flythinker")
    assert (row.fusion, row.projection_init) == ("pad", "random")
    assert row.flythinker_config("float32").fusion == "pad"


def test_a_checkpoint_from_before_projection_init_loads_its_random_projection(make_model, prompt_batch, tmp_path):
    model = make_model(lam=1.0, fusion="linear", d_r=32)  # projection_init "random", as every linear one was then
    path = model.save_pretrained(tmp_path / "old")
    saved = json.loads((path / "flythinker_config.json").read_text())
    del saved["projection_init"]
    (path / "flythinker_config.json").write_text(json.dumps(saved))
    loaded = FlyThinker.from_pretrained(path)
    assert loaded.config.projection_init == "random"
    torch.testing.assert_close(loaded(prompt_batch.input_ids, prompt_batch.attention_mask).logits,
                               model(prompt_batch.input_ids, prompt_batch.attention_mask).logits)


def perturb_fusion(model: FlyThinker) -> None:
    """Move the fusion's learned parts off their zero start, as training would."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=generator))


@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_step_zero_gives_exactly_the_generators_logits(make_model, prompt_batch, option):
    model = make_model(lam=1.0, **START_AT_SFT[option])
    model.set_training_step(0, 10)  # the warm-up's first step; the other options ignore it
    with torch.no_grad():
        fused = model(prompt_batch.input_ids, prompt_batch.attention_mask).logits
        plain = generator_logits(model, prompt_batch)
    real = prompt_batch.attention_mask.bool()
    assert torch.equal(fused[real], plain[real])


@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_once_moved_the_reasoner_reaches_the_generator(make_model, prompt_batch, option):
    # Guards the test above: the option must not simply cut the reasoner off.
    model = make_model(lam=1.0, **START_AT_SFT[option])
    model.set_training_step(10, 10)
    perturb_fusion(model)
    with torch.no_grad():
        fused = model(prompt_batch.input_ids, prompt_batch.attention_mask).logits
        plain = generator_logits(model, prompt_batch)
    assert (fused - plain)[prompt_batch.attention_mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_staggered_decoding_matches_the_parallel_forward(make_model, prompt_batch, option):
    model = make_model(lam=1.0, d_r=32, d_g=64, **START_AT_SFT[option])
    perturb_fusion(model)
    out = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, max_new_tokens=10,
                         output_scores=True, eos_token_id=-1)
    parallel = parallel_logits_at_decoded_positions(model, prompt_batch, out.sequences)
    assert (parallel - torch.stack(out.scores, dim=1)).abs().max() <= 1e-4


@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_save_load_round_trips_the_fusion(make_model, prompt_batch, tmp_path, option):
    model = make_model(lam=1.0, **START_AT_SFT[option])
    perturb_fusion(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FlyThinker.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for name, p in model.fusion.named_parameters():
        assert torch.equal(p, dict(loaded.fusion.named_parameters())[name])
    with torch.no_grad():
        a = model(prompt_batch.input_ids, prompt_batch.attention_mask).logits
        b = loaded(prompt_batch.input_ids, prompt_batch.attention_mask).logits
    assert torch.equal(a, b)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_step_zero_is_the_generator_on_cuda_in_bf16(make_model, prompt_batch, option):
    # The CPU test above in fp32; here the kernels and the dtype a GPU user trains in. A zero
    # gate or projection must add exact zeros, not a rounding of them.
    model = make_model(lam=1.0, **START_AT_SFT[option]).to("cuda", torch.bfloat16)
    model.set_training_step(0, 10)
    batch = prompt_batch.to("cuda")
    with torch.no_grad():
        fused = model(batch.input_ids, batch.attention_mask).logits
        plain = generator_logits(model, batch)
    real = batch.attention_mask.bool()
    assert torch.equal(fused[real], plain[real])


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("option", list(START_AT_SFT))
def test_staggered_decoding_matches_the_parallel_forward_on_cuda(make_model, prompt_batch, option):
    model = make_model(lam=1.0, d_r=32, d_g=64, **START_AT_SFT[option])
    perturb_fusion(model)
    model.cuda()
    batch = prompt_batch.to("cuda")
    out = model.generate(batch.input_ids, batch.attention_mask, max_new_tokens=10, output_scores=True, eos_token_id=-1)
    parallel = parallel_logits_at_decoded_positions(model, batch, out.sequences)
    assert (parallel - torch.stack(out.scores, dim=1)).abs().max() <= 1e-4


def test_a_checkpoint_missing_its_fusion_weights_is_refused(make_model, tmp_path):
    model = make_model(gate="vector")
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "fusion.safetensors").unlink()
    with pytest.raises(FlyThinkerError, match="fusion.safetensors is missing"):
        FlyThinker.from_pretrained(tmp_path / "ckpt")


def test_published_fusion_learns_nothing_and_writes_no_fusion_file(make_model, tmp_path):
    model = make_model()
    assert list(model.fusion.parameters()) == []
    model.save_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt" / "fusion.safetensors").exists()


def test_gate_and_warmup_compose_into_the_published_formula(make_model, tokenizer):
    """signal = (lam * warm-up factor) * gate * rescale(h); with gate 1 it is the published one."""
    model = make_model(lam=0.8, gate="scalar", lam_warmup=0.5)
    with torch.no_grad():
        model.fusion.gate.fill_(1.0 / model.config.gate_scale)  # a gate of exactly 1
    model.set_training_step(2, 8)  # warm-up over 4 steps: factor 0.5
    ids = tokenizer(["one two three four"], return_tensors="pt").input_ids
    h = torch.randn(1, ids.shape[1], 64)
    table = model.generator.get_input_embeddings().weight
    expected = 0.4 * h * table.norm(dim=-1).mean() / h.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(model.reasoning_signal(h), expected, rtol=1e-5, atol=1e-6)


def test_warmup_factor_is_a_function_of_the_step():
    assert [warmup_factor(s, 8, 0.5) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert warmup_factor(0, 8, 0.0) == 1.0  # no warm-up: the published lambda from the start


def test_zero_projection_has_a_finite_gradient_at_its_zero_start(make_model, prompt_batch):
    # Rescaling a zero projection's output would divide by zero; the vector is rescaled first.
    model = make_model(lam=1.0, fusion="linear", projection_init="zero").train()
    out = model(prompt_batch.input_ids, prompt_batch.attention_mask, labels=prompt_batch.input_ids)
    out.loss.backward()
    grad = model.fusion.projection.weight.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # At the start nothing reaches the reasoner (the projection is zero) ...
    assert all(p.grad is None or not p.grad.any() for p in model.reasoner.parameters())


@pytest.mark.parametrize("option", ["scalar gate", "zero projection"])
def test_training_moves_the_fusion_and_then_the_reasoner(make_model, tokenizer, tmp_path, option):
    # ... but after the first update it does: the option starts at SFT without freezing the method.
    model = make_model(lam=1.0, d_r=32, d_g=64, **START_AT_SFT[option])
    reasoner_before = {n: p.detach().clone() for n, p in model.reasoner.named_parameters()}
    config = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-2, weight_decay=0.0)
    train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False)
    assert all(p.detach().abs().sum() > 0 for p in model.fusion.parameters())
    moved = [n for n, p in model.reasoner.named_parameters() if not torch.equal(reasoner_before[n], p)]
    assert "model.layers.0.self_attn.q_proj.weight" in moved


def test_warmup_follows_the_step_across_an_interrupted_run(make_model, tokenizer, tmp_path, monkeypatch):
    config = TrainConfig(output_dir=str(tmp_path / "whole"), max_steps=8, batch_size=2, lr=1e-3,
                         save_every=2, seed=0)
    examples = copy_examples(16)
    whole = make_model(lam=1.0, lam_warmup=0.5)
    train(whole, tokenizer, examples, config, save=False, show_progress=False)
    log_whole = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [row["lam"] for row in log_whole] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert whole.fusion.lam() == 1.0  # trained: decoding uses the full lambda

    broken_config = TrainConfig(**{**config.__dict__, "output_dir": str(tmp_path / "broken")})
    original_step = _Loop.step

    def step_then_die(self, step):
        if step == 5:
            raise KeyboardInterrupt
        return original_step(self, step)

    monkeypatch.setattr(_Loop, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(make_model(lam=1.0, lam_warmup=0.5), tokenizer, examples, broken_config, save=False, show_progress=False)
    monkeypatch.setattr(_Loop, "step", original_step)
    resumed = make_model(lam=1.0, lam_warmup=0.5)
    result = train(resumed, tokenizer, examples, broken_config, save=False, show_progress=False)
    assert result.extra["resumed_from"] == 4
    log_broken = [json.loads(line) for line in (tmp_path / "broken" / "train_log.jsonl").read_text().splitlines()]
    assert [row["lam"] for row in log_broken] == [row["lam"] for row in log_whole]
    assert [row["loss"] for row in log_broken] == pytest.approx([row["loss"] for row in log_whole], abs=1e-6)
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters()):
        assert (a - b).abs().max() <= 1e-6, name


def test_gate_is_logged_while_training(make_model, tokenizer, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-2)
    train(make_model(gate="vector"), tokenizer, copy_examples(8), config, save=False, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["gate_abs_mean"] > 0  # logged after the step: the gate has opened a little


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"gate": "half"}, "gate must be"), ({"lam_warmup": 1.5}, "lam_warmup"),
     ({"gate_scale": 0}, "gate_scale"),
     ({"fusion": "linear", "projection_scale": 0.0}, "projection_scale must be"),
     ({"fusion": "pad", "projection_scale": 10.0}, "projection_scale needs fusion='linear'"),
     ({"projection_init": "random", "projection_scale": 10.0}, "changes nothing with projection_init='random'"),
     ({"signal_dropout": 1.0}, "signal_dropout must be in"), ({"train_reasoner": "no"}, "train_reasoner must be")],
)
def test_bad_fusion_settings_name_the_field(fields, message):
    with pytest.raises(FlyThinkerError, match=message):
        FlyThinkerConfig(**fields)


# --------------------------------------------------------------------------- the rescale norm


def test_norm_of_a_released_weight_is_a_clear_error(make_model):
    # What a DeepSpeed ZeRO-3 parameter looks like outside its module's forward: an empty tensor.
    model = make_model()
    model.generator.get_input_embeddings().weight = torch.nn.Parameter(torch.empty(0))
    with pytest.raises(FlyThinkerError, match="rescale would zero the reasoning signal"):
        model.target_norm()


def test_non_finite_norm_is_a_clear_error():
    weight = torch.ones(4, 8)
    weight[1, 0] = float("nan")
    with pytest.raises(FlyThinkerError, match="mean row norm of nan"):
        embedding_row_norm_mean(weight)


def test_norm_of_a_row_sharded_dtensor_equals_the_full_tables(tmp_path):
    """FSDP2 holds the table as a DTensor sharded by rows; the norm comes from every shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        table = torch.randn(37, 16)
        sharded = distribute_tensor(table, init_device_mesh("cpu", (1,)), [Shard(0)])
        torch.testing.assert_close(embedding_row_norm_mean(sharded), table.norm(dim=-1).mean())
    finally:
        dist.destroy_process_group()


def test_norm_reads_big_tables_in_blocks_exactly():
    table = torch.randn(40000, 4, dtype=torch.bfloat16)
    torch.testing.assert_close(embedding_row_norm_mean(table), table.float().norm(dim=-1).mean())


def test_fusion_module_rejects_a_wide_reasoner_for_pad():
    with pytest.raises(FlyThinkerError, match="needs d_R <= d_G"):
        Fusion(FlyThinkerConfig(fusion="pad"), 64, 32, torch.float32, "cpu")


def test_a_zero_projection_is_logged_opening(make_model, tokenizer, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-2)
    model = make_model(fusion="linear", projection_init="zero")
    assert model.training_log_values()["projection_spectral_norm"] == 0.0
    train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False)
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert 0 < rows[0]["projection_spectral_norm"] < rows[1]["projection_spectral_norm"]


def test_projection_scale_opens_a_zero_projection_that_many_times_faster(make_model, tokenizer, tmp_path):
    """AdamW's first update moves each stored entry by about lr whatever its gradient; stored
    divided by a scale, the projection in force moves scale times as far."""
    opened = {}
    for scale in (1.0, 10.0):
        model = make_model(lam=1.0, fusion="linear", projection_init="zero", projection_scale=scale)
        config = TrainConfig(output_dir=str(tmp_path / str(scale)), max_steps=1, batch_size=4, lr=1e-3,
                             weight_decay=0.0, warmup_ratio=0.0)
        train(model, tokenizer, copy_examples(4), config, save=False, show_progress=False)
        opened[scale] = model.fusion.projection_weight().detach()
    assert float(opened[10.0].abs().max()) == pytest.approx(10 * float(opened[1.0].abs().max()), rel=1e-3)


# --------------------------------------------------------------------------- regularising the signal


def test_signal_dropout_drops_whole_vectors_in_training_only():
    config = FlyThinkerConfig(lam=1.0, fusion="pad", rescale=False, signal_dropout=0.25)
    fusion = Fusion(config, 16, 16, torch.float32, torch.device("cpu"))
    h = torch.randn(4, 500, 16)
    torch.manual_seed(0)
    fusion.train()
    out = fusion(h, None)
    dropped = (out == 0).all(-1)
    assert 0.2 < dropped.float().mean() < 0.3  # each position's vector whole, about a quarter
    torch.testing.assert_close(out[~dropped], h[~dropped] / 0.75)  # the rest scaled up, unbiased
    fusion.eval()
    torch.testing.assert_close(fusion(h, None), h)  # decoding sees every vector


def test_a_frozen_reasoner_stays_as_loaded_while_the_generator_and_fusion_train(make_model, tokenizer, tmp_path):
    model = make_model(lam=1.0, fusion="linear", d_r=32, d_g=64, train_reasoner=False, signal_dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = TrainConfig(output_dir=str(tmp_path), max_steps=2, batch_size=4, lr=1e-2, weight_decay=0.0)
    train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert not any(n.startswith("reasoner.") for n in moved)
    assert "fusion.projection.weight" in moved and any(n.startswith("generator.") for n in moved)
    loaded = FlyThinker.from_pretrained(model.save_pretrained(tmp_path / "ckpt"))
    assert loaded.config.train_reasoner is False  # a checkpoint trains on as it was set
    # Loaded in one mode, eval, fusion included: a plain forward drops no signal.
    assert not any(module.training for module in loaded.modules())


def test_a_frozen_shared_reasoner_keeps_its_adapter(tokenizer, tmp_path):
    from flythinker.model.sources import build_tiny

    model = FlyThinker.shared(build_tiny(64, seed=2), tokenizer, train_reasoner=False)
    adapter = model.reasoner_component.adapter_state()
    assert adapter and not any(p.requires_grad for p in adapter.values())
    assert all(p.requires_grad for n, p in model.generator.named_parameters() if ".lora_" not in n)
