"""What the start-at-SFT study stands on: the paired bootstrap, the diagnosis, repetition controls,
the validation split carved from train, held-out loss and the paired report."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_run import small_config

from flythinker.commands.run import TaskConfig, load_split, run_experiment
from flythinker.config import GenerationConfig
from flythinker.data.collate import Example, collate, encode
from flythinker.data.longlamp import sample_data_path
from flythinker.errors import FlyThinkerError
from flythinker.evaluation.diagnose import CONTROLS, diagnose
from flythinker.evaluation.stats import paired_bootstrap
from flythinker.methods import MethodConfig
from flythinker.model.decoding import generate_plain

# --------------------------------------------------------------------------- paired bootstrap


def test_a_consistent_gain_has_an_interval_above_zero():
    baseline = [0.1 * (i % 7) for i in range(40)]
    better = [b + 0.05 for b in baseline]
    d = paired_bootstrap(better, baseline)
    assert d.difference == pytest.approx(0.05)
    assert d.low == pytest.approx(0.05) and d.high == pytest.approx(0.05)  # every resample agrees
    assert d.verdict == "above" and d.n == 40
    assert paired_bootstrap(baseline, better).verdict == "below"


def test_noise_around_zero_overlaps_and_the_interval_is_seeded():
    baseline = [0.5] * 40
    noisy = [0.5 + 0.1 * math.sin(1.7 * i) for i in range(40)]  # mean ~0, varied magnitudes
    d = paired_bootstrap(noisy, baseline, seed=3)
    assert d.low < 0 < d.high and d.verdict == "overlaps"
    assert paired_bootstrap(noisy, baseline, seed=3) == d
    assert paired_bootstrap(noisy, baseline, seed=4) != d


def test_ratio_of_sums_weights_records_by_their_tokens():
    # Loss per token: a long record's loss counts by its tokens, not as one record.
    d = paired_bootstrap([10.0, 1.0], [20.0, 1.0], [10, 1], [10, 1])
    assert d.difference == pytest.approx(11 / 11 - 21 / 11)


def test_unpaired_lists_are_refused():
    with pytest.raises(FlyThinkerError, match="equal, non-empty"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(FlyThinkerError, match="equal, non-empty"):
        paired_bootstrap([], [])


# --------------------------------------------------------------------------- diagnosis


@pytest.fixture
def diagnosis_batches(tokenizer):
    examples = [Example(id=str(i), prompt=f"Write a review of item {i}:", target=f"Good item {i}, I liked it.")
                for i in range(4)]
    encoded = [encode(tokenizer, e, 32, 16) for e in examples]
    return [collate(encoded[:2], tokenizer.pad_token_id), collate(encoded[2:], tokenizer.pad_token_id)]


def test_diagnosis_at_lambda_zero_is_the_generators_own_loss(make_model, diagnosis_batches):
    model = make_model(lam=0.5, d_r=32, d_g=64)
    result = diagnose(model, diagnosis_batches, lams=(0.0, 1.0), control_lam=0.5)

    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in diagnosis_batches:
            logits = model.generator(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)).logits
            labels = batch["labels"][:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum"))
            tokens += int((labels != -100).sum())
    losses = result["target_loss"]
    assert losses["lambda=0"] == pytest.approx(total / tokens, rel=1e-5)
    assert losses["lambda=1"] != pytest.approx(losses["lambda=0"], rel=1e-3)  # the signal reaches the loss
    assert set(losses) == {"lambda=0", "lambda=1"} | {f"{c} (lambda=0.5)" for c in CONTROLS}
    figures = result["figures"]
    assert 0.0 <= figures["next_token_concentration"] <= 1.0
    assert -1.0 <= figures["cosine_with_next_token_embedding"] <= 1.0
    real = sum(int(b["attention_mask"].sum()) - len(b["attention_mask"]) for b in diagnosis_batches)
    assert figures["positions"] == real  # every real position after each row's first
    assert figures["embedding_norm"] == pytest.approx(float(model.target_norm()))


def test_diagnosis_finds_a_reasoner_that_points_at_the_next_token(make_model, diagnosis_batches):
    """The mechanism it exists to detect: a reasoner whose vector is the next token's embedding
    (built here by construction) scores 100% concentration and cosine 1."""
    model = make_model(d_r=64, d_g=64)
    table = model.generator.get_input_embeddings().weight

    def next_token_oracle(ids, mask, position):  # h_{i-1} = e_G(s_i), read from the batch it is given
        return SimpleNamespace(last_hidden_state=F.pad(table[ids[:, 1:]], (0, 0, 0, 1)))

    model.reason = next_token_oracle
    figures = diagnose(model, diagnosis_batches, lams=(0.0,))["figures"]
    assert figures["next_token_concentration"] == pytest.approx(1.0)
    assert figures["cosine_with_next_token_embedding"] == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- repetition controls


def _ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize("n", [2, 3])
def test_no_repeat_ngram_holds_for_every_method(make_model, prompt_batch, n):
    model = make_model(lam=0.5)
    config = GenerationConfig(max_new_tokens=40, no_repeat_ngram_size=n)
    outputs = {
        "plain": generate_plain(model.generator, prompt_batch.input_ids, prompt_batch.attention_mask, config,
                                eos_token_id=-1, pad_token_id=0).sequences,
        "flythinker": model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, config=config,
                                     eos_token_id=-1).sequences,
    }
    free = generate_plain(model.generator, prompt_batch.input_ids, prompt_batch.attention_mask,
                          GenerationConfig(max_new_tokens=40), eos_token_id=-1, pad_token_id=0).sequences
    assert any(len(set(_ngrams(row, n))) < len(_ngrams(row, n)) for row in free.tolist()), \
        "the tiny model should loop without the control, or this test checks nothing"
    for name, sequences in outputs.items():
        for row in sequences.tolist():
            assert len(set(_ngrams(row, n))) == len(_ngrams(row, n)), f"{name} repeated an {n}-gram"


def test_lambda_zero_flythinker_equals_plain_under_the_same_controls(make_model, prompt_batch):
    model = make_model(lam=0.0)
    config = GenerationConfig(max_new_tokens=24, no_repeat_ngram_size=2, repetition_penalty=1.3)
    plain = generate_plain(model.generator, prompt_batch.input_ids, prompt_batch.attention_mask, config,
                           eos_token_id=-1, pad_token_id=0).sequences
    ours = model.generate(prompt_batch.input_ids, prompt_batch.attention_mask, config=config, eos_token_id=-1).sequences
    assert torch.equal(plain, ours)


def test_repetition_penalty_changes_what_is_chosen(make_model, prompt_batch):
    lm = make_model().generator
    kwargs = {"eos_token_id": -1, "pad_token_id": 0}
    free = generate_plain(lm, prompt_batch.input_ids, prompt_batch.attention_mask, GenerationConfig(max_new_tokens=40), **kwargs)
    penalised = generate_plain(lm, prompt_batch.input_ids, prompt_batch.attention_mask,
                               GenerationConfig(max_new_tokens=40, repetition_penalty=5.0), **kwargs)
    assert not torch.equal(free.sequences, penalised.sequences)
    distinct = lambda seqs: sum(len(set(row)) for row in seqs.tolist())
    assert distinct(penalised.sequences) > distinct(free.sequences)


@pytest.mark.parametrize("bad", [{"repetition_penalty": 0.0}, {"no_repeat_ngram_size": -1}])
def test_bad_repetition_settings_are_named(bad):
    with pytest.raises(FlyThinkerError, match=next(iter(bad))):
        GenerationConfig(**bad)


# --------------------------------------------------------------------------- runner


def test_validation_is_carved_from_the_end_of_train_and_never_overlaps():
    task = TaskConfig(task="product_review", data="sample", validation=3)
    whole = load_split(TaskConfig(task="product_review", data="sample"), "train", 0)
    train, validation = load_split(task, "train", 0), load_split(task, "validation", 0)
    assert [r.id for r in train] == [r.id for r in whole[:-3]]
    assert [r.id for r in validation] == [r.id for r in whole[-3:]]
    assert load_split(task, "test", 0) == load_split(TaskConfig(task="product_review", data="sample"), "test", 0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"validation": -1}, "validation must be"), ({"eval_split": "validation"}, "needs validation"),
     ({"eval_split": "train"}, "held-out")],
)
def test_bad_splits_are_named(settings, message):
    with pytest.raises(FlyThinkerError, match=message):
        TaskConfig(task="product_review", data="sample", **settings)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_source_without_named_splits_is_never_both_train_and_test(tmp_path, suffix):
    # A .jsonl file (or a JSON list) reads the same records for every split name: a run that
    # trained on it and evaluated its "test" would score its own training records.
    records = json.loads(sample_data_path().read_text())["train"]
    source = tmp_path / f"reviews{suffix}"
    source.write_text("\n".join(map(json.dumps, records)) if suffix == ".jsonl" else json.dumps(records))
    task = TaskConfig(task="product_review", data=str(source))
    with pytest.raises(FlyThinkerError, match="not named splits.*training on the test set"):
        load_split(task, "test", 0, held_out=True)
    assert len(load_split(task, "test", 0)) == len(records)  # nothing trained on it: scored as given
    carved = TaskConfig(task="product_review", data=str(source), validation=4, eval_split="validation")
    train, validation = load_split(carved, "train", 0), load_split(carved, "validation", 0, held_out=True)
    assert len(validation) == 4 and {r.id for r in train}.isdisjoint(r.id for r in validation)
    # A directory with one file per split names its splits.
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "train.jsonl").write_text("\n".join(map(json.dumps, records[:-4])))
    (tmp_path / "split" / "test.jsonl").write_text("\n".join(map(json.dumps, records[-4:])))
    assert len(load_split(TaskConfig(task="product_review", data=str(tmp_path / "split")), "test", 0, held_out=True)) == 4


def test_validation_larger_than_train_is_named():
    with pytest.raises(FlyThinkerError, match="nothing would be left"):
        load_split(TaskConfig(task="product_review", data="sample", validation=10_000), "train", 0)


@pytest.mark.parametrize(
    ("row", "message"),
    [({"lam_warmup": 1.5}, "lam_warmup"), ({"projection_init": "zero"}, "projection_init"),
     ({"gate_scale": 0.0}, "gate_scale")],
)
def test_a_bad_fusion_setting_fails_before_anything_trains(tmp_path, row, message):
    with pytest.raises(FlyThinkerError, match=rf"'bad'.*{message}"):
        small_config(tmp_path, [MethodConfig(method="sft"), MethodConfig(method="flythinker", label="bad", **row)])


def test_report_pairs_every_trained_method_with_sft(tmp_path):
    methods = [MethodConfig(method="sft", label="baseline"), MethodConfig(method="flythinker"),
               MethodConfig(method="non_personalized")]
    results = run_experiment(small_config(tmp_path, methods, eval_limit=4))["product_review"]
    for label in ("baseline", "flythinker"):
        loss = results[label]["heldout_loss"]
        assert loss["per_token"] > 0 and loss["per_sample"]["id"] == results[label]["per_sample"]["id"]
        assert json.loads((tmp_path / "product_review" / label / "heldout_loss.json").read_text())
    assert "heldout_loss" not in results["non_personalized"]  # nothing trained, nothing to compare

    with (tmp_path / "paired.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["baseline"] for r in rows} == {"baseline"}  # SFT found by method, whatever its label
    flythinker = {r["metric"]: r for r in rows if r["method"] == "flythinker"}
    assert set(flythinker) == {"rouge1", "rougeL", "meteor", "heldout_loss"}
    loss = flythinker["heldout_loss"]
    assert float(loss["difference"]) == pytest.approx(
        results["flythinker"]["heldout_loss"]["per_token"] - results["baseline"]["heldout_loss"]["per_token"])
    assert float(loss["ci_low"]) <= float(loss["difference"]) <= float(loss["ci_high"])
    assert "paired" in (tmp_path / "results.md").read_text().lower()


def test_a_run_evaluated_on_test_also_reports_validation_loss_for_choosing_settings(tmp_path):
    from dataclasses import replace

    config = small_config(tmp_path, [MethodConfig(method="sft"), MethodConfig(method="non_personalized")])
    config = replace(config, tasks=[replace(config.tasks[0], validation=3)],
                     training=replace(config.training, eval_every=1))
    results = run_experiment(config)["product_review"]
    validation = results["sft"]["validation_loss"]
    # The training curve on the validation split ends where the trained row's validation loss is.
    curve = [json.loads(line) for line in (tmp_path / "product_review" / "sft" / "eval_log.jsonl").read_text().splitlines()]
    assert curve[0]["step"] == 0 and curve[-1]["records"] == 3
    assert curve[-1]["loss"] == pytest.approx(validation["per_token"], rel=1e-5)
    assert results["sft"]["validation_curve"] == [[row["step"], row["loss"]] for row in curve]
    assert (tmp_path / "plots" / "validation_curves.png").stat().st_size > 0
    held_out_ids = [r.id for r in load_split(config.tasks[0], "validation", 0)]
    assert validation["per_sample"]["id"] == held_out_ids  # the carved records, not test's
    assert validation["per_sample"]["id"] != results["sft"]["heldout_loss"]["per_sample"]["id"]
    assert validation["per_token"] > 0 and validation["per_token"] != results["sft"]["heldout_loss"]["per_token"]
    assert "validation_loss" not in results["non_personalized"]
    assert json.loads((tmp_path / "product_review" / "sft" / "validation_loss.json").read_text()).keys() == set(held_out_ids)
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "product_review validation loss" in header
    with (tmp_path / "results.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["sft"]["validation_loss"]) == pytest.approx(validation["per_token"])
    assert rows["non_personalized"]["validation_loss"] == ""


def test_keep_best_reports_the_held_out_loss_of_the_weights_chosen_on_validation(tmp_path):
    from dataclasses import replace

    config = small_config(tmp_path, [MethodConfig(method="sft"), MethodConfig(method="flythinker")])
    config = replace(config, tasks=[replace(config.tasks[0], validation=3)],
                     training=replace(config.training, eval_every=1, keep_best=True))
    results = run_experiment(config)["product_review"]
    for label in ("sft", "flythinker"):
        m = results[label]
        at_best = m["heldout_loss_at_best"]
        best_step, best_loss = min(m["validation_curve"], key=lambda point: point[1])
        assert at_best["step"] == best_step and at_best["validation_loss"] == pytest.approx(best_loss)
        assert at_best["per_sample"]["id"] == m["heldout_loss"]["per_sample"]["id"]
        if best_step == m["validation_curve"][-1][0]:  # the kept weights are the final ones
            assert at_best["per_token"] == pytest.approx(m["heldout_loss"]["per_token"], rel=1e-5)
        else:
            assert at_best["per_token"] != pytest.approx(m["heldout_loss"]["per_token"], rel=1e-5)
    with (tmp_path / "paired.csv").open() as f:
        paired = {(r["method"], r["metric"]): r for r in csv.DictReader(f)}
    row = paired[("flythinker", "heldout_loss_at_best")]
    assert float(row["difference"]) == pytest.approx(
        results["flythinker"]["heldout_loss_at_best"]["per_token"] - results["sft"]["heldout_loss_at_best"]["per_token"])
    assert "held-out loss, best step" in (tmp_path / "results.md").read_text()


def test_an_evaluation_curve_without_a_validation_split_is_refused(tmp_path):
    from dataclasses import replace

    config = small_config(tmp_path, [MethodConfig(method="sft")])
    with pytest.raises(FlyThinkerError, match="eval_every needs a validation split"):
        run_experiment(replace(config, training=replace(config.training, eval_every=1)))


def test_signal_ablation_measures_what_the_signal_changes(make_model, diagnosis_batches):
    from flythinker.evaluation.diagnose import signal_ablation

    silent = signal_ablation(make_model(lam=0.0), diagnosis_batches)
    assert silent["signal_gain"] == 0.0 and silent["signal_norm"] == 0.0
    model = make_model(lam=1.0)
    result = signal_ablation(model, diagnosis_batches)
    assert result["signal_gain"] != 0.0
    assert result["signal_norm"] == pytest.approx(result["embedding_norm"], rel=1e-4)  # rescale, lambda 1
    assert model.fusion.lam() == 1.0  # the model is left as it was
    off = diagnose(model, diagnosis_batches, lams=(0.0,))["target_loss"]["lambda=0"]
    assert result["target_loss"]["signal off (lambda 0)"] == pytest.approx(off, rel=1e-5)


def test_diagnose_command_on_the_sample_before_and_after_training(tmp_path, capsys, make_model):
    from flythinker.commands.cli import main

    before = tmp_path / "before.json"
    assert main(["diagnose", "--data", "sample", "--task", "product_review", "--reasoner", "tiny-small",
                 "--generator", "tiny", "--limit", "2", "--lams", "[0, 0.5]", "--out", str(before)]) == 0
    assert "| lambda=0.5 |" in capsys.readouterr().out
    assert json.loads(before.read_text())["settings"]["records"] == 2
    checkpoint = make_model(lam=0.5).save_pretrained(tmp_path / "ckpt")
    assert main(["diagnose", "--data", "sample", "--task", "product_review", "--checkpoint", str(checkpoint),
                 "--limit", "2"]) == 0
    assert "signal off (lambda 0)" in capsys.readouterr().out


def load_study_rows():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_rows", Path(__file__).parents[1] / "tools" / "study_rows.py")
    study_rows = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study_rows)
    return study_rows


def test_the_rouge_l_split_tells_a_longer_prediction_from_better_overlap():
    from flythinker.evaluation.metrics import rouge_per_sample

    reference = "the kettle boils fast and the handle stays cool while it pours"
    baseline = {"a": "the kettle boils fast", "b": "a red lamp"}
    longer = {"a": "the kettle boils fast and the handle stays cool", "b": "a red lamp"}
    split = load_study_rows().rouge_l_split([reference] * 2, list(baseline.values()), list(longer.values()))
    assert split["recall"] > 0 and split["precision"] == pytest.approx(0.0)  # every added word is in the reference
    assert split["words"] == pytest.approx(2.5)  # +5 words on one record of two
    assert split["f_words_correlation"] == pytest.approx(1.0)
    f = [rouge_per_sample([rows[k] for k in "ab"], [reference] * 2)["rougeL"] for rows in (baseline, longer)]
    assert split["f"] == pytest.approx(sum(f[1]) / 2 - sum(f[0]) / 2)  # the reported metric's difference


def test_study_rows_publishes_finished_rows(tmp_path, capsys):
    """tools/study_rows.py, which publishes each stage of a long study: rows as the runner
    reported them, paired rows, the ROUGE-L split and the curves."""
    from dataclasses import replace

    study_rows = load_study_rows()
    config = small_config(tmp_path / "run", [MethodConfig(method="sft"), MethodConfig(method="flythinker")])
    config = replace(config, tasks=[replace(config.tasks[0], validation=3)],
                     training=replace(config.training, eval_every=1, keep_best=True))
    results = run_experiment(config)["product_review"]
    out = tmp_path / "published" / "results.json"
    argv = ["study_rows", config.out, "product_review", str(out), "sft", "flythinker"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", argv)
        assert study_rows.main() == 0
    published = json.loads(out.read_text())
    row = published["rows"]["flythinker"]
    assert row["heldout_loss"] == pytest.approx(results["flythinker"]["heldout_loss"]["per_token"])
    assert row["best_step"] == results["flythinker"]["heldout_loss_at_best"]["step"]
    paired = {p["metric"]: p for p in published["paired_vs_sft"]}
    split = published["rouge_l_split_vs_sft"]["flythinker"]
    assert split["f"] == pytest.approx(paired["rougeL"]["difference"], abs=1e-9)
    assert split["words"] == pytest.approx(row["prediction_words"] - published["rows"]["sft"]["prediction_words"])
    assert (out.parent / "validation_curves.png").is_file()
    # Rows decoded again from those checkpoints (checkpoints_from) have no training log of their own.
    sampled = replace(config, out=str(tmp_path / "sampled"), checkpoints_from=config.out,
                      generation=GenerationConfig(max_new_tokens=8, do_sample=True))
    run_experiment(sampled)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["study_rows", sampled.out, "product_review", str(tmp_path / "s.json"), "sft", "flythinker"])
        assert study_rows.main() == 0
    again = json.loads((tmp_path / "s.json").read_text())["rows"]["flythinker"]
    assert again["train_loss_third_epoch_mean"] is None
    assert again["heldout_loss"] == pytest.approx(row["heldout_loss"], rel=1e-6)
    # A row that has not finished is named, and nothing is written.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", [*argv[:3], str(tmp_path / "other.json"), "sft", "rag"])
        assert study_rows.main() == 2
    assert "has no metrics.json" in capsys.readouterr().err and not (tmp_path / "other.json").exists()


def test_pooled_seeds_average_each_records_difference_over_seeds(tmp_path, capsys):
    """tools/pool_seeds.py: per record, the mean over seeds; so the pooled difference is the mean
    of the seeds' differences, and its interval resamples records of the averaged scores."""
    import importlib.util
    from dataclasses import replace

    spec = importlib.util.spec_from_file_location("pool_seeds", Path(__file__).parents[1] / "tools" / "pool_seeds.py")
    pool_seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool_seeds)
    base = small_config(tmp_path / "seed0", [MethodConfig(method="sft"), MethodConfig(method="flythinker")])
    runs = {seed: replace(base, out=str(tmp_path / f"seed{seed}"), seed=seed) for seed in (0, 1)}
    results = {seed: run_experiment(config)["product_review"] for seed, config in runs.items()}
    out = tmp_path / "pooled.json"
    argv = ["pool_seeds", "product_review", str(out), "--runs", *(c.out for c in runs.values()), "--labels", "sft", "flythinker"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", argv)
        assert pool_seeds.main() == 0
    pooled = {p["metric"]: p for p in json.loads(out.read_text())["paired_vs_sft_pooled_over_seeds"]}
    per_seed = [r["flythinker"]["heldout_loss"]["per_token"] - r["sft"]["heldout_loss"]["per_token"] for r in results.values()]
    assert per_seed[0] != pytest.approx(per_seed[1])  # the seeds differ, so the mean is a real test
    assert pooled["heldout_loss"]["difference"] == pytest.approx(sum(per_seed) / 2)
    assert pooled["heldout_loss"]["ci_low"] <= pooled["heldout_loss"]["difference"] <= pooled["heldout_loss"]["ci_high"]
    rouge = [r["flythinker"]["metrics"]["rougeL"] - r["sft"]["metrics"]["rougeL"] for r in results.values()]
    assert pooled["rougeL"]["difference"] == pytest.approx(sum(rouge) / 2)
    # Runs evaluated on other records are not pooled.
    run_experiment(replace(runs[1], out=str(tmp_path / "fewer"), tasks=[replace(base.tasks[0], eval_limit=2)]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", [*argv[:4], runs[0].out, str(tmp_path / "fewer"), "--labels", "sft", "flythinker"])
        assert pool_seeds.main() == 2
    assert "different records" in capsys.readouterr().err


def test_target_calibration_loss_is_the_runners_held_out_loss(tmp_path, capsys):
    """tools/target_calibration.py reads a run's rows back from their checkpoints: its loss per
    target token must be the runner's held-out loss (same records, encoding and weights)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("target_calibration", Path(__file__).parents[1] / "tools" / "target_calibration.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    config = small_config(tmp_path / "run", [MethodConfig(method="sft"), MethodConfig(method="flythinker")])
    results = run_experiment(config)["product_review"]
    out = tmp_path / "calibration.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["target_calibration", config.out, "product_review", "sft", "flythinker", "--out", str(out)])
        assert tool.main() == 0
    rows = json.loads(out.read_text())["rows"]
    for label in ("sft", "flythinker"):
        assert rows[label]["nll"] == pytest.approx(results[label]["heldout_loss"]["per_token"], rel=1e-5)
        assert rows[label]["tokens"] == results[label]["heldout_loss"]["tokens"]
        assert 0 < rows[label]["top_probability"] <= 1 and 0 <= rows[label]["top_is_reference"] <= 1
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["target_calibration", config.out, "product_review", "rag"])
        assert tool.main() == 2
    assert "holds no trained checkpoint" in capsys.readouterr().err
