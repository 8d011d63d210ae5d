"""The training loop: gradients reach both models, a tiny model learns, the CLI writes a checkpoint."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from flythinker.commands.cli import main
from flythinker.config import TrainConfig
from flythinker.data.collate import Example, collate, encode
from flythinker.errors import FlyThinkerError
from flythinker.model.flythinker import FlyThinker
from flythinker.training.checkpoints import load_best
from flythinker.training.train import teacher_forced_losses, train

WORDS = ["apple", "river", "stone", "cloud", "light", "music", "paper", "garden", "window", "silver"]


def copy_examples(n: int, seed: int = 0) -> list[Example]:
    """Targets copyable from the prompt: a model that uses its input can drive the loss near zero."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(5))
        examples.append(Example(str(i), f"Repeat: {words}\nAnswer:", f" {words}"))
    return examples


def test_one_step_changes_every_parameter_on_the_loss_path(make_model, tokenizer, tmp_path):
    model = make_model(fusion="linear", d_r=32, d_g=64)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=4, lr=1e-2, weight_decay=0.0)
    train(model, tokenizer, copy_examples(4), config, save=False, show_progress=False)
    unchanged = [name for name, p in model.named_parameters() if torch.equal(before[name], p)]
    # The reasoner's (untied) LM head is not on the loss path: its vectors feed the generator
    # before any head. It is kept, unchanged, for the reasoning lens. Everything else must move.
    assert unchanged == ["reasoner.lm_head.weight"]


def test_encode_masks_the_prompt_and_appends_eos(tokenizer):
    item = encode(tokenizer, Example("0", "Prompt here:", " the target"), 100, 100)
    n_prompt = len(tokenizer("Prompt here:", add_special_tokens=False).input_ids)
    assert item.labels[:n_prompt] == [-100] * n_prompt
    assert item.labels[n_prompt:] == item.input_ids[n_prompt:]
    assert item.input_ids[-1] == tokenizer.eos_token_id
    batch = collate([item, encode(tokenizer, Example("1", "P:", " t"), 100, 100)], pad_token_id=0)
    assert batch["attention_mask"][1].tolist()[: len(item.input_ids) - 4] == [0] * (len(item.input_ids) - 4)
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_budgets_keep_the_prompts_end_and_the_targets_start(tokenizer):
    item = encode(tokenizer, Example("0", "a b c d e f g h", " one two three four five"), 3, 2)
    assert tokenizer.decode(item.input_ids[:3]) == tokenizer.decode(
        tokenizer("a b c d e f g h").input_ids[-3:]
    )
    assert len(item.input_ids) == 3 + 2 + 1


def test_tiny_model_learns_to_copy(make_model, tokenizer, tmp_path):
    model = make_model(lam=0.5)
    config = TrainConfig(output_dir=str(tmp_path), epochs=8, batch_size=8, lr=3e-3, warmup_ratio=0.1)
    result = train(model, tokenizer, copy_examples(64), config, show_progress=False)
    first, last = result.losses[0], sum(result.losses[-4:]) / 4
    assert last < 0.3 * first, f"loss fell only from {first:.3f} to {last:.3f}"
    log = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, result.steps + 1))
    reloaded = FlyThinker.from_pretrained(result.checkpoint)
    assert reloaded.config.lam == 0.5
    assert (result.checkpoint / "run_config.yaml").is_file()


def test_gradient_accumulation_steps_once_per_group(make_model, tokenizer, tmp_path):
    """8 examples, micro-batches of 2, 4 per step: 2 epochs are 2 optimizer steps of 8 samples."""
    model = make_model()
    config = TrainConfig(output_dir=str(tmp_path), epochs=2, batch_size=2, grad_accum=4, lr=1e-3)
    result = train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False)
    assert result.steps == 2 and len(result.losses) == 2 and result.samples == 16


def test_train_cli_end_to_end(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": e.prompt, "target": e.target}) for e in copy_examples(8)))
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--training.output_dir", str(out),
                 "--training.max_steps", "2", "--training.batch_size", "4", "--model.lam", "0.25"])
    assert code == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert FlyThinker.from_pretrained(out / "checkpoint").config.lam == 0.25
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "p", "target": "t"}\n{"prompt": "p"', "pairs.jsonl:2: malformed JSON"),
        ('{"prompt": "p", "target": 3}', "pairs.jsonl:1: field 'target' must be a non-empty string"),
        ('["p", "t"]', "pairs.jsonl:1: expected an object"),
        ("", "no records"),
    ],
)
def test_train_cli_bad_data_is_one_clear_line(tmp_path, capsys, content, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    assert main(["train", "--data", str(data), "--training.output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_train_cli_missing_file(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_max_steps_runs_exactly_that_many_steps_and_logs_the_rate_each_used(make_model, tokenizer, tmp_path):
    """Four examples at batch 4 are one step per epoch; max_steps=3 must still train 3 steps
    (cycling through the data), and each log line must show the rate its own update used."""
    config = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=4, lr=1e-3, warmup_ratio=0.0,
                         schedule="linear")
    result = train(make_model(), tokenizer, copy_examples(4), config, save=False, show_progress=False)
    assert result.steps == 3 and len(result.losses) == 3
    rates = [json.loads(line)["lr"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert rates == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])  # linear decay; the first step at the peak


def test_report_to_tensorboard_writes_the_logged_scalars(make_model, tokenizer, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = TrainConfig(output_dir=str(tmp_path), max_steps=3, batch_size=2, lr=1e-3, report_to="tensorboard",
                         max_grad_norm=1.0)
    model = make_model(fusion="linear", gate="scalar")
    result = train(model, tokenizer, copy_examples(6), config, save=False, show_progress=False)
    runs = {e.parent for e in (tmp_path / "tracking").rglob("events.out.tfevents.*")}
    assert runs, "no TensorBoard event file"
    # accelerate writes the scalars in the run's directory and the hyperparameters in a subfolder.
    scalars = next(a for a in (EventAccumulator(str(d)).Reload() for d in runs) if a.Tags()["scalars"])
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/target_tokens_per_s", "fusion/lam", "fusion/gate_abs_mean"} <= tags
    logged = [e.value for e in scalars.Scalars("train/loss")]
    assert [e.step for e in scalars.Scalars("train/loss")] == [1, 2, 3]
    assert logged == pytest.approx(result.losses, rel=1e-6)
    # The JSONL log stays, the same numbers.
    lines = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines] == pytest.approx(logged, rel=1e-6)


def test_an_unknown_tracker_is_named():
    with pytest.raises(Exception, match="report_to must be one of"):
        TrainConfig(report_to="neptune-ish")


def test_the_optimizer_is_torchs_fused_adamw_and_updates_as_the_plain_one_does():
    """Fused AdamW (4x faster per step on CPUs) must be the same optimizer, not a new one."""
    from flythinker.training.train import make_optimizer

    def trained(fused: bool) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        model[2].bias.requires_grad_(False)  # frozen parameters get no optimizer state
        optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.025, fused=fused)
        for step in range(5):
            optimizer.zero_grad()
            model(torch.randn(3, 8, generator=torch.Generator().manual_seed(step))).square().mean().backward()
            optimizer.step()
        return optimizer, [p.detach().clone() for p in model.parameters()]

    fused, fused_weights = trained(True)
    plain, plain_weights = trained(False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    assert sum(len(g["params"]) for g in fused.param_groups) == 3
    assert max((a - b).abs().max().item() for a, b in zip(fused_weights, plain_weights)) < 1e-6
    torch.manual_seed(0)
    untrained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    moved = [(a - b).abs().max().item() for a, b in zip(fused_weights, untrained.parameters())]
    assert min(moved[:3]) > 1e-3 and moved[3] == 0  # every trained tensor moved, the frozen one did not


def test_a_compiled_training_step_updates_as_the_eager_one_does(make_model, tokenizer, tmp_path):
    """`TrainConfig.compile`: the same losses and weights as eager training, through one compiled
    graph (no breaks: the rescale norm's check runs inside it) that serves every batch length."""
    from torch._dynamo.utils import counters

    one_layer = {"num_hidden_layers": 1}  # compile time grows with depth; one layer shows the same
    examples = copy_examples(8)  # records of different lengths: batches padded to different lengths
    trained = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = make_model(fusion="linear", d_r=32, d_g=64, reasoner_overrides=one_layer, generator_overrides=one_layer)
        config = TrainConfig(output_dir=str(tmp_path / str(compiled)), max_steps=3, batch_size=2, lr=1e-2,
                             compile=compiled)
        trained[compiled] = (train(model, tokenizer, examples, config, save=False, show_progress=False).losses, model)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    (eager_losses, eager), (compiled_losses, compiled) = trained[False], trained[True]
    assert compiled_losses == pytest.approx(eager_losses, abs=1e-5)
    worst = max((p - q).abs().max().item() for p, q in zip(eager.parameters(), compiled.parameters()))
    assert worst < 1e-4
    # The compiled function was the training loop's own: the trained model runs eagerly after it.
    captured = counters["stats"]["calls_captured"]
    batch = collate([encode(tokenizer, e, 64, 64) for e in examples[:2]], pad_token_id=0)
    with torch.no_grad():
        compiled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert counters["stats"]["calls_captured"] == captured


def eval_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_log.jsonl").read_text().splitlines()]


def test_the_evaluation_curve_changes_nothing_trained_and_ends_at_the_trained_models_loss(make_model, tokenizer, tmp_path):
    held_out = copy_examples(6, seed=1)
    runs = {}
    for name, every in (("plain", 0), ("evaluated", 2)):
        model = make_model(fusion="linear", d_r=32)
        config = TrainConfig(output_dir=str(tmp_path / name), max_steps=5, batch_size=4, lr=1e-2, eval_every=every)
        runs[name] = model, train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False,
                                  eval_examples=held_out)
    (plain, plain_result), (evaluated, evaluated_result) = runs["plain"], runs["evaluated"]
    assert evaluated_result.losses == plain_result.losses
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), evaluated.parameters(), strict=True))
    assert not (tmp_path / "plain" / "eval_log.jsonl").exists()

    rows = eval_rows(tmp_path / "evaluated")
    assert [r["step"] for r in rows] == [0, 2, 4, 5]  # before training, every 2 steps, and the last
    assert all(r["records"] == 6 and r["tokens"] > 0 for r in rows)
    pairs = teacher_forced_losses(evaluated.eval(), [encode(tokenizer, e, 1550, 1000) for e in held_out],
                                  tokenizer.pad_token_id, 3, torch.device("cpu"))
    assert rows[-1]["loss"] == pytest.approx(sum(t for t, _ in pairs) / sum(n for _, n in pairs), rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]  # the copy task generalises to unseen word lists


def test_a_resumed_run_continues_the_evaluation_curve_exactly(make_model, tokenizer, tmp_path):
    held_out = copy_examples(4, seed=1)

    def run(out):
        config = TrainConfig(output_dir=str(out), max_steps=6, batch_size=4, lr=1e-2, eval_every=2, save_every=2,
                             keep_last=3)
        train(make_model(), tokenizer, copy_examples(8), config, save=False, show_progress=False, eval_examples=held_out)

    run(tmp_path / "whole")
    whole = eval_rows(tmp_path / "whole")
    # As if killed after step 5: the states of steps 4 and 6 never written, the log already past step 2.
    for name in ("step-00000004", "step-00000006"):
        shutil.rmtree(tmp_path / "whole" / "states" / name)
    run(tmp_path / "whole")
    resumed = eval_rows(tmp_path / "whole")
    assert [r["step"] for r in resumed] == [0, 2, 4, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], abs=1e-6)


def test_evaluations_during_a_lambda_warm_up_judge_the_model_at_its_full_lambda(make_model, tokenizer, tmp_path):
    """The weights an evaluation judges (and keep_best keeps) are decoded at the full lambda, so the
    curve measures them there, not at the warm-up's lambda of the moment: otherwise an early point
    scored near lambda 0 looks like SFT and is kept, then decodes at full lambda far worse."""
    held_out = copy_examples(4, seed=1)
    encoded = [encode(tokenizer, e, 1550, 1000) for e in held_out]

    def loss(model) -> float:
        pairs = teacher_forced_losses(model.eval(), encoded, tokenizer.pad_token_id, 4, torch.device("cpu"))
        return sum(t for t, _ in pairs) / sum(n for _, n in pairs)

    model = make_model(lam=0.5, lam_warmup=1.0)
    # lr this small leaves the weights where they are: every point must then read the same loss.
    config = TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, lr=1e-12, eval_every=1)
    train(model, tokenizer, copy_examples(8), config, save=False, show_progress=False, eval_examples=held_out)
    full = loss(model)
    model.set_training_step(0, 4)  # lambda 0: what a point scored at the warm-up's lambda would read
    at_zero = loss(model)
    assert abs(at_zero - full) > 1e-3  # the signal matters to this model, so the check below can fail
    assert [r["loss"] for r in eval_rows(tmp_path)] == pytest.approx([full] * 5, rel=1e-5)


def test_evaluating_without_evaluation_examples_is_a_clear_error(make_model, tokenizer, tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), max_steps=1, eval_every=2)
    with pytest.raises(FlyThinkerError, match="eval_every needs evaluation examples"):
        train(make_model(), tokenizer, copy_examples(4), config, save=False, show_progress=False)


def test_keep_best_keeps_the_weights_of_the_lowest_evaluation(make_model, tokenizer, tmp_path):
    held_out = copy_examples(6, seed=1)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=6, batch_size=4, lr=1e-2, eval_every=1, keep_best=True)
    trained = make_model(fusion="linear", d_r=32)
    train(trained, tokenizer, copy_examples(8), config, save=False, show_progress=False, eval_examples=held_out)
    rows = eval_rows(tmp_path)
    best = min(rows, key=lambda r: r["loss"])

    kept = make_model(fusion="linear", d_r=32)
    assert load_best(kept, tmp_path / "best") == {"step": best["step"], "loss": best["loss"]}
    pairs = teacher_forced_losses(kept.eval(), [encode(tokenizer, e, 1550, 1000) for e in held_out],
                                  tokenizer.pad_token_id, 4, torch.device("cpu"))
    assert sum(t for t, _ in pairs) / sum(n for _, n in pairs) == pytest.approx(best["loss"], rel=1e-5)
    fresh = make_model(fusion="linear", d_r=32)
    assert best["step"] > 0 and not all(torch.equal(a, b) for a, b in zip(kept.parameters(), fresh.parameters(), strict=True))


def test_keep_best_without_evaluations_is_refused():
    with pytest.raises(FlyThinkerError, match="keep_best needs eval_every"):
        TrainConfig(keep_best=True)
