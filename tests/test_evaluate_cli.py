"""`flythinker evaluate` end to end: predictions JSONL in, metrics.json and a table out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LONGLAMP_FIXTURES as FIXTURES

from flythinker.commands.cli import main
from flythinker.data.longlamp import load_longlamp
from flythinker.errors import FlyThinkerError
from flythinker.evaluation.metrics import evaluate_command, read_predictions

REVIEWS = FIXTURES / "product_review.json"


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def references():
    return load_longlamp("product_review", "test", REVIEWS)


def test_cli_with_references_from_a_longlamp_file(tmp_path, references, capsys):
    predictions = _write(
        tmp_path / "preds.jsonl", [{"id": r.id, "prediction": r.target} for r in references]
    )
    code = main(
        [
            "evaluate",
            "--predictions",
            str(predictions),
            "--references",
            str(REVIEWS),
            "--task",
            "product_review",
            "--span_tokens",
            "15",
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "preds.metrics.json").read_text())
    assert result["metrics"]["rouge1"] == 1.0 and result["metrics"]["bleu"] == pytest.approx(100.0)
    assert result["n_samples"] == 2 and result["n_empty_predictions"] == 0
    assert result["span_tokens"] == 15
    assert [s["n"] for s in result["spans"]] == [2, 1]  # 20- and 12-token references
    settings = result["settings"]
    assert settings["rouge"]["use_stemmer"] is False
    assert "WordNet 3.0" in settings["meteor"]["wordnet"]
    assert "tok:13a" in settings["bleu"]["signature"]
    assert set(settings["versions"]) >= {"rouge-score", "nltk", "sacrebleu", "python"}
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["metric", "all", "0-15", "15-30"]
    assert "ROUGE-1" in table and "2 samples; 0 empty predictions" in table


def test_inline_references_empty_prediction_and_out_path(tmp_path, capsys):
    predictions = _write(
        tmp_path / "p.jsonl",
        [
            {"id": 1, "prediction": "", "reference": "a short reference text"},
            {
                "id": "b",
                "prediction": "a short reference text",
                "reference": "a short reference text",
            },
        ],
    )
    out = tmp_path / "nested" / "m.json"
    evaluate_command(str(predictions), out=str(out))
    result = json.loads(out.read_text())
    assert result["references"] == "inline" and result["n_empty_predictions"] == 1
    assert result["metrics"]["rouge1"] == pytest.approx(0.5)
    assert "1 empty predictions" in capsys.readouterr().out


def test_partial_predictions_are_counted(tmp_path, references):
    predictions = _write(
        tmp_path / "p.jsonl", [{"id": "test-1", "prediction": references[1].target}]
    )
    evaluate_command(str(predictions), str(REVIEWS), task="product_review")
    assert (
        json.loads((tmp_path / "p.metrics.json").read_text())["n_references_without_prediction"] == 1
    )


@pytest.mark.parametrize(
    "lines, kwargs, message",
    [
        (
            ['{"id": "x", "prediction": "p"}'],
            {},
            "have no 'reference'; add it or pass --references",
        ),
        (
            ['{"id": "x", "prediction": 3, "reference": "r"}'],
            {},
            "line 1: field 'prediction' must be a string",
        ),
        (
            [
                '{"id": "x", "prediction": "p", "reference": "r"}',
                '{"id": "x", "prediction": "p", "reference": "r"}',
            ],
            {},
            "line 2: id 'x' already on line 1",
        ),
        (["{not json"], {}, "line 1: malformed JSON"),
        ([], {}, "no predictions"),
        (
            ['{"id": "nope", "prediction": "p"}'],
            {"references": str(REVIEWS), "task": "product_review"},
            "ids are not in",
        ),
        (
            ['{"id": "test-0", "prediction": "p"}'],
            {"references": str(REVIEWS)},
            "--references needs --task",
        ),
        (
            ['{"id": "test-0", "prediction": "p", "reference": "other"}'],
            {"references": str(REVIEWS), "task": "product_review"},
            "inline 'reference' differs",
        ),
    ],
)
def test_bad_predictions(tmp_path, lines, kwargs, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines))
    with pytest.raises(FlyThinkerError, match=message.replace("(", r"\(")):
        evaluate_command(str(path), **kwargs)


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["evaluate", "--predictions", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.strip().endswith("missing.jsonl: no such file")


def test_help_documents_the_arguments(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    text = capsys.readouterr().out
    assert "--span_tokens" in text and "whitespace tokens per span" in text


def test_read_predictions_keeps_order_and_string_ids(tmp_path):
    path = _write(
        tmp_path / "p.jsonl", [{"id": 7, "prediction": "x"}, {"id": "a", "prediction": "y"}]
    )
    assert [(p.id, p.prediction) for p in read_predictions(path)] == [("7", "x"), ("a", "y")]


def test_a_runs_own_metrics_json_is_never_replaced(tmp_path, references, capsys):
    """Pointed at a run's predictions, evaluate writes beside them, and refuses to replace a file
    it did not write unless told to."""
    run_metrics = tmp_path / "metrics.json"
    run_metrics.write_text(json.dumps({"metrics": {}, "efficiency": {"decode_ms_per_token": 3.0}}))
    predictions = _write(tmp_path / "predictions.jsonl", [{"id": r.id, "prediction": r.target} for r in references])
    evaluate_command(str(predictions), str(REVIEWS), task="product_review")
    assert json.loads(run_metrics.read_text())["efficiency"] == {"decode_ms_per_token": 3.0}
    assert (tmp_path / "predictions.metrics.json").is_file()

    with pytest.raises(FlyThinkerError, match="not written by `flythinker evaluate`.*--overwrite"):
        evaluate_command(str(predictions), str(REVIEWS), task="product_review", out=str(run_metrics))
    evaluate_command(str(predictions), str(REVIEWS), task="product_review")  # its own file: replaced
    evaluate_command(str(predictions), str(REVIEWS), task="product_review", out=str(run_metrics), overwrite=True)
    assert json.loads(run_metrics.read_text())["written_by"] == "flythinker evaluate"


def test_the_shipped_sample_is_a_reference_source(tmp_path):
    from flythinker.data.longlamp import sample_data_path

    records = load_longlamp("product_review", "test", sample_data_path(), limit=3)
    predictions = _write(tmp_path / "p.jsonl", [{"id": r.id, "prediction": r.target} for r in records])
    assert main(["evaluate", "--predictions", str(predictions), "--references", "sample"]) == 0
    assert json.loads((tmp_path / "p.metrics.json").read_text())["metrics"]["rouge1"] == 1.0


def test_task_without_references_is_named(tmp_path):
    predictions = _write(tmp_path / "p.jsonl", [{"id": "x", "prediction": "p", "reference": "p"}])
    with pytest.raises(FlyThinkerError, match="--task names the task of --references"):
        evaluate_command(str(predictions), task="product_review")
