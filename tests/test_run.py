"""The experiment runner end to end on tiny models: files, resume, and lambda 0 equals SFT."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from flythinker.commands.cli import main
from flythinker.commands.run import RunConfig, TaskConfig, run_experiment
from flythinker.config import GenerationConfig, TrainConfig
from flythinker.data.prompts import PromptBudgets
from flythinker.errors import FlyThinkerError
from flythinker.evaluation.report import lambda_sweep
from flythinker.io import to_plain
from flythinker.methods import METHODS, MethodConfig
from flythinker.methods.base import Method

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def small_config(out: Path, methods: list[MethodConfig], eval_limit: int = 4, **overrides) -> RunConfig:
    return RunConfig(
        out=str(out),
        tasks=[TaskConfig(task="product_review", data="sample", train_limit=8, eval_limit=eval_limit)],
        methods=methods,
        training=TrainConfig(epochs=1, batch_size=4, lr=3e-3),
        generation=GenerationConfig(max_new_tokens=8),
        budgets=PromptBudgets(profile_tokens=96, query_tokens=48, target_tokens=32),
        decode_batch_size=2,
        **overrides,
    )


def read_predictions(path: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was predicted twice"
    return {r["id"]: r["prediction"] for r in rows}


def test_tiny_yaml_runs_every_method_through_the_cli(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    assert {m["method"] for m in config["methods"]} == set(METHODS), "configs/tiny.yaml must list every method"
    # Smaller than the shipped smoke config, to keep the suite fast; same code path and file.
    config["tasks"][0].update(eval_limit=3, train_limit=6)
    smaller = tmp_path / "tiny.yaml"
    smaller.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    assert main(["run", "--config", str(smaller), "--out", str(out),
                 "--generation.max_new_tokens", "6", "--training.epochs", "1"]) == 0
    labels = [m.get("label") or m["method"] for m in config["methods"]]
    for label in labels:
        assert len(read_predictions(out / "product_review" / label / "predictions.jsonl")) == 3
    metrics = json.loads((out / "metrics.json").read_text())["product_review"]
    assert set(metrics) == set(labels)
    for m in metrics.values():
        assert set(m["metrics"]) == {"rouge1", "rougeL", "meteor", "bleu"} and m["n_samples"] == 3
        assert m["efficiency"]["decode_ms_per_token"] > 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == labels
    assert {"method", "task", "rouge1", "rougeL", "meteor", "bleu", "decode_ms_per_token_ratio_to_sft"} <= set(rows[0])
    assert float(next(r for r in rows if r["method"] == "sft")["decode_ms_per_token_ratio_to_sft"]) == 1.0
    assert "| flythinker |" in (out / "results.md").read_text()
    assert "indicative only" in (out / "results.md").read_text()  # one timing per method is not a speed comparison
    for png in ("spans.png", "efficiency.png"):
        assert (out / "plots" / png).read_bytes()[:8] == PNG_MAGIC
    assert yaml.safe_load((out / "run_config.yaml").read_text())["generation"]["max_new_tokens"] == 6
    assert "results:" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_predictions(tmp_path, monkeypatch):
    methods = [MethodConfig(method="sft"), MethodConfig(method="flythinker")]
    reference = run_experiment(small_config(tmp_path / "whole", methods, eval_limit=6))

    calls = {"n": 0}
    original = Method._decode_timed

    def crash_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash inside generation")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Method, "_decode_timed", crash_on_third_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(small_config(tmp_path / "resumed", methods, eval_limit=6))
    partial = read_predictions(tmp_path / "resumed" / "product_review" / "sft" / "predictions.jsonl")
    assert len(partial) == 4  # two batches of two were written before the crash
    monkeypatch.setattr(Method, "_decode_timed", original)
    resumed = run_experiment(small_config(tmp_path / "resumed", methods, eval_limit=6))

    for label in ("sft", "flythinker"):
        assert read_predictions(tmp_path / "resumed" / "product_review" / label / "predictions.jsonl") == \
            read_predictions(tmp_path / "whole" / "product_review" / label / "predictions.jsonl")
        assert resumed["product_review"][label]["metrics"] == reference["product_review"][label]["metrics"]


def test_torn_last_line_is_redone(tmp_path, capsys):
    methods = [MethodConfig(method="non_personalized")]
    run_experiment(small_config(tmp_path, methods))
    path = tmp_path / "product_review" / "non_personalized" / "predictions.jsonl"
    whole = path.read_text()
    path.write_text(whole[: whole.rindex("\n", 0, len(whole) - 1) + 10])  # cut inside the last row
    capsys.readouterr()
    run_experiment(small_config(tmp_path, methods))
    assert "reusing 3 earlier prediction(s)" in capsys.readouterr().out  # a resumed run says so
    assert read_predictions(path) == {json.loads(x)["id"]: json.loads(x)["prediction"] for x in whole.splitlines()}


def test_rerun_with_other_settings_is_refused(tmp_path):
    methods = [MethodConfig(method="non_personalized")]
    run_experiment(small_config(tmp_path, methods, eval_limit=2))
    run_experiment(small_config(tmp_path, methods, eval_limit=3))  # more records: fine, resumes
    record = (tmp_path / "run_config.yaml").read_text()
    config = small_config(tmp_path, methods, eval_limit=3)
    config.generation = GenerationConfig(max_new_tokens=9)
    with pytest.raises(FlyThinkerError, match="other settings \\(generation changed\\)"):
        run_experiment(config)
    # Refused before anything is written: the directory still describes the results it holds.
    assert (tmp_path / "run_config.yaml").read_text() == record


def test_a_setting_added_since_resumes_at_its_default_and_refuses_otherwise(tmp_path):
    """Results made before an option existed were made with its default: a long study resumes
    after the code gains an option, unless the rerun sets it to something else."""
    methods = [MethodConfig(method="non_personalized")]
    run_experiment(small_config(tmp_path, methods, eval_limit=2))
    settings = tmp_path / "product_review" / "non_personalized" / "settings.json"
    saved = json.loads(settings.read_text())
    del saved["method"]["lam_warmup"], saved["generation"]["no_repeat_ngram_size"]  # "not yet invented"
    settings.write_text(json.dumps(saved))
    run_experiment(small_config(tmp_path, methods, eval_limit=2))  # both at their defaults: resumes
    with pytest.raises(FlyThinkerError, match="other settings \\(method changed\\)"):
        run_experiment(small_config(tmp_path, [MethodConfig(method="non_personalized", lam_warmup=0.5)], eval_limit=2))


def test_checkpointing_settings_do_not_refuse_a_rerun_and_a_trained_row_keeps_no_states(tmp_path, capsys):
    """Saving resumable states changes how a row is trained, not what it produces: a long study
    may start saving them midway. Once the row is trained its states (optimizer included) go."""
    methods = [MethodConfig(method="sft")]
    config = small_config(tmp_path, methods, eval_limit=2)
    config.training = replace(config.training, save_every=1)
    run_experiment(config)
    work = tmp_path / "product_review" / "sft"
    assert (work / "checkpoint").is_dir() and not (work / "states").exists()
    capsys.readouterr()
    run_experiment(small_config(tmp_path, methods, eval_limit=2))  # save_every back to 0: reused
    assert f"reusing {work / 'checkpoint'}" in capsys.readouterr().out
    # Nor does compiling (training resumes with it switched): a row trained compiled is reused.
    saved = json.loads((work / "settings.json").read_text())
    saved["training"]["compile"] = True
    (work / "settings.json").write_text(json.dumps(saved))
    run_experiment(small_config(tmp_path, methods, eval_limit=2))
    assert f"reusing {work / 'checkpoint'}" in capsys.readouterr().out


def test_checkpoints_from_decodes_trained_rows_again_without_retraining(tmp_path, monkeypatch):
    """Another decoding of a finished run (the published sampling next to greedy) reads its
    checkpoints, validation curve and kept best weights in place instead of training again."""
    methods = [MethodConfig(method="non_personalized"), MethodConfig(method="sft")]
    greedy = small_config(tmp_path / "greedy", methods, eval_limit=3)
    greedy = replace(greedy, tasks=[replace(greedy.tasks[0], validation=3)],
                     training=replace(greedy.training, eval_every=1, keep_best=True))
    before = run_experiment(greedy)["product_review"]["sft"]

    def no_training(*args, **kwargs):
        raise AssertionError("a row in checkpoints_from was trained again")

    monkeypatch.setattr(Method, "train", no_training)
    sampled = replace(greedy, out=str(tmp_path / "sampled"), checkpoints_from=greedy.out,
                      generation=GenerationConfig(max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.95, seed=1))
    after = run_experiment(sampled)["product_review"]
    work = tmp_path / "sampled" / "product_review" / "sft"
    assert not (work / "checkpoint").exists(), "checkpoints are read in place, not copied"
    assert len(read_predictions(work / "predictions.jsonl")) == 3
    # The same weights: the same teacher-forced losses, curve and best point.
    for key in ("heldout_loss", "validation_loss"):
        assert after["sft"][key]["per_token"] == pytest.approx(before[key]["per_token"], rel=1e-6)
    assert after["sft"]["validation_curve"] == before["validation_curve"]
    assert after["sft"]["heldout_loss_at_best"]["per_token"] == pytest.approx(before["heldout_loss_at_best"]["per_token"], rel=1e-6)
    assert json.loads((work / "settings.json").read_text())["generation"]["do_sample"] is True


@pytest.mark.parametrize(
    ("change", "message"),
    [(lambda c, tmp: replace(c, training=replace(c.training, lr=1e-3)), "trained with other settings \\(training changed\\)"),
     (lambda c, tmp: replace(c, methods=[*c.methods, MethodConfig(method="sft", label="sft-b")]),
      "holds no finished checkpoint of row 'sft-b'"),
     (lambda c, tmp: replace(c, checkpoints_from=c.out, out=c.out), "is the run's own --out")],
    ids=["other training", "row not trained there", "its own out"],
)
def test_checkpoints_from_is_refused_unless_every_trained_row_was_trained_alike(tmp_path, change, message):
    first = small_config(tmp_path / "first", [MethodConfig(method="sft")], eval_limit=2)
    run_experiment(first)
    again = replace(first, out=str(tmp_path / "again"), checkpoints_from=first.out,
                    generation=GenerationConfig(max_new_tokens=8, do_sample=True))
    with pytest.raises(FlyThinkerError, match=message):
        run_experiment(change(again, tmp_path))
    assert not (tmp_path / "again" / "product_review").exists(), "refused before anything was written"


def test_lambda_zero_flythinker_predicts_what_sft_predicts(tmp_path):
    methods = [MethodConfig(method="sft"), MethodConfig(method="flythinker", lam=0.0)]
    run_experiment(small_config(tmp_path, methods, eval_limit=4))
    sft = read_predictions(tmp_path / "product_review" / "sft" / "predictions.jsonl")
    fly = read_predictions(tmp_path / "product_review" / "flythinker" / "predictions.jsonl")
    assert sft == fly


def test_lambda_sweep_plot_appears_with_several_lambdas(tmp_path):
    methods = [MethodConfig(method="sft")] + [
        MethodConfig(method="flythinker", lam=lam, label=f"flythinker-lam{lam}") for lam in (0.0, 1.0)
    ]
    run_experiment(small_config(tmp_path, methods, eval_limit=2))
    assert (tmp_path / "plots" / "lambda_sweep.png").read_bytes()[:8] == PNG_MAGIC


def test_lambda_sweep_draws_one_line_per_variant():
    def row(score, **settings):
        return {"method": to_plain(MethodConfig(**settings)), "metrics": {"rougeL": score}}

    results = {"product_review": {
        "sft": row(0.30, method="sft"),
        "pad-1": row(0.20, method="flythinker", lam=1.0, label="pad-1"),
        "pad-0": row(0.30, method="flythinker", lam=0.0, label="pad-0"),
        "linear-0.5": row(0.31, method="flythinker", lam=0.5, fusion="linear", label="linear-0.5"),
        "linear-1": row(0.32, method="flythinker", lam=1.0, fusion="linear", label="linear-1"),
        "gate": row(0.33, method="flythinker", lam=1.0, gate="scalar", label="gate"),  # alone: no line
    }}
    lines = lambda_sweep(results)
    assert [(line.label, line.points) for line in lines] == [
        ("pad-1", [(0.0, 0.30), (1.0, 0.20)]), ("linear-0.5", [(0.5, 0.31), (1.0, 0.32)])]


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ([MethodConfig(method="sfft")], "unknown method"),
        ([MethodConfig(method="sft"), MethodConfig(method="sft")], "used twice"),
        ([], "no methods"),
    ],
)
def test_bad_run_configs_are_named(tmp_path, methods, message):
    with pytest.raises(FlyThinkerError, match=message):
        small_config(tmp_path, methods)


STUDY = REPO / "configs" / "studies" / "start_at_sft.yaml"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "configs" / "ablations").glob("*.yaml"))
                         + sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path, capsys):
    # Ablations stack on the paper's setting, study stages on the study.
    base = {"configs": [], "ablations": ["--config", str(REPO / "configs" / "longlamp_qwen2.5-3b.yaml")],
            "studies": [] if path == STUDY else ["--config", str(STUDY)]}[path.parent.name]
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *base, "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "generation:" in capsys.readouterr().out


def test_a_training_output_dir_in_a_run_config_is_refused(tmp_path):
    config = small_config(tmp_path, [MethodConfig(method="sft")])
    with pytest.raises(FlyThinkerError, match="output_dir is chosen by the runner"):
        RunConfig(out=config.out, tasks=config.tasks, methods=config.methods,
                  training=TrainConfig(output_dir=str(tmp_path / "elsewhere")))


@pytest.mark.parametrize(
    ("row", "fragments"),
    [({"lam": -1}, ["method row 'bad'", "lam (lambda) must be"]),  # our check, naming the row
     ({"fusion": "sum"}, ['"fusion"', "sum"])],  # the parser's type check, naming field and value
)
def test_a_bad_value_in_a_later_row_of_the_yaml_fails_before_anything_trains(tmp_path, capsys, row, fragments):
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["methods"].append({"method": "flythinker", "label": "bad", **row})
    config["out"] = str(tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(f in err for f in fragments), err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("row", "message"),
    [({"retriever": "grep"}, "unknown retriever 'grep'"), ({"k": 0}, "k must be"),
     ({"latent_thoughts": 0}, "latent_thoughts must be"), ({"rationale_tokens": -3}, "rationale_tokens must be")],
)
def test_a_bad_baseline_setting_names_its_row(tmp_path, row, message):
    with pytest.raises(FlyThinkerError, match=rf"method row 'odd': {message}"):
        small_config(tmp_path, [MethodConfig(method="sft"), MethodConfig(method="rag", label="odd", **row)])
