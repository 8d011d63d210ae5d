"""The bad-input matrix (docs/training.md): each row fails with one line naming the problem, a
non-zero exit, and no data already written lost.

CLI rows run `flythinker.commands.cli.main` against an output directory that already holds an earlier
run; its bytes must be unchanged afterwards. LongLaMP rows go through the loader's and the
prompt builder's public API, and the runner's CLI for unknown task and method names.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import yaml
from test_distributed import write_pairs

from flythinker.commands.cli import main
from flythinker.data.longlamp import load_longlamp, parse_record
from flythinker.data.prompts import PromptBudgets, build_prompt
from flythinker.errors import FlyThinkerError
from flythinker.model.sources import build_tiny, load_tokenizer

GOOD = {"prompt": "Repeat: apple\nAnswer:", "target": " apple"}


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """An output directory holding an earlier run's files, which no failure may touch."""
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "flythinker_config.json").write_text('{"lam": 0.5}\n')
    (run / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return run


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def fails(capsys, argv: list[str], message: str) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    # Progress bars (loading weights, training) share stderr; the rest is the error.
    lines = [line for line in err.splitlines() if line.strip() and not _is_progress(line)]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("flythinker: error: ") and message in lines[0], err
    return lines[0]


def _is_progress(line: str) -> bool:
    return (
        re.search(r"\d+%\|", line) is not None
    )  # a tqdm bar: training, loading or writing weights


def train_argv(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--training.output_dir",
        str(out),
        "--training.max_steps",
        "1",
        *extra,
    ]


# --------------------------------------------------------------------------- prompt/target JSONL


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "p", "target": "t"}\n{"prompt": "p"', "pairs.jsonl:2: malformed JSON"),
        ('{"prompt": "p"}', "pairs.jsonl:1: field 'target' must be a non-empty string"),
        (
            '{"prompt": "p", "target": ["t"]}',
            "pairs.jsonl:1: field 'target' must be a non-empty string",
        ),
        (
            '{"prompt": "p", "target": ""}',
            "pairs.jsonl:1: field 'target' must be a non-empty string",
        ),
        (
            '{"prompt": "  ", "target": "t"}',
            "pairs.jsonl:1: field 'prompt' must be a non-empty string",
        ),
    ],
    ids=["malformed-json", "missing-field", "mistyped-field", "empty-target", "empty-prompt"],
)
def test_bad_training_records(tmp_path, capsys, earlier_run, content, message):
    data = tmp_path / "pairs.jsonl"
    data.write_text(content)
    before = snapshot(earlier_run)
    fails(capsys, train_argv(data, earlier_run), message)
    assert snapshot(earlier_run) == before


def test_non_utf8_training_file(tmp_path, capsys, earlier_run):
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "target": "t"}\n')
    before = snapshot(earlier_run)
    fails(capsys, train_argv(data, earlier_run), "pairs.jsonl: not valid UTF-8")
    assert snapshot(earlier_run) == before


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model.lam", "nan"], 'Parser key "model.lam"'),
        (["--model.lam", "-1"], "lam (lambda) must be a finite number >= 0, got -1.0"),
        (["--training.lrr", "1e-3"], "unrecognized arguments: --training.lrr"),
        (["--training.keep_last", "0"], "keep_last must be >= 1"),
        (["--training.eval_every", "2"], "training.eval_every needs --eval_data"),
        (["--training.keep_best", "true"], "keep_best needs eval_every > 0"),
    ],
    ids=["lambda-nan", "lambda-negative", "unknown-key", "bad-value", "eval-without-data", "best-without-eval"],
)
def test_bad_settings(tmp_path, capsys, earlier_run, extra, message):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    before = snapshot(earlier_run)
    fails(capsys, train_argv(data, earlier_run, *extra), message)
    assert snapshot(earlier_run) == before


def test_unknown_key_in_a_config_file(tmp_path, capsys, earlier_run):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump({"data": str(data), "training": {"output_dir": str(earlier_run), "lrr": 1}})
    )
    before = snapshot(earlier_run)
    fails(capsys, ["train", "--config", str(config)], "does not accept option 'training.lrr'")
    assert snapshot(earlier_run) == before


def test_output_directory_not_writable(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me\n")
    # A path below a regular file cannot be created, even by root (chmod would not stop root).
    fails(
        capsys,
        train_argv(data, blocker / "run"),
        f"output directory {blocker / 'run'} is not writable",
    )
    assert blocker.read_text() == "keep me\n"


# --------------------------------------------------------------------------- models


def test_reasoner_and_generator_with_different_tokenizers(tmp_path, capsys, earlier_run):
    other = tmp_path / "other-reasoner"
    build_tiny(32, seed=4).save_pretrained(other)
    tokenizer = load_tokenizer("tiny")
    tokenizer.add_tokens(["<not-in-the-generator>"])
    tokenizer.save_pretrained(other)
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    before = snapshot(earlier_run)
    fails(
        capsys,
        train_argv(data, earlier_run, "--model.reasoner", str(other)),
        "reasoner and generator must share one tokenizer",
    )
    assert snapshot(earlier_run) == before


def test_model_directory_missing_a_file(tmp_path, capsys, earlier_run):
    broken = tmp_path / "generator"
    build_tiny(64, seed=2).save_pretrained(broken)
    load_tokenizer("tiny").save_pretrained(broken)
    (broken / "model.safetensors").unlink()
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    before = snapshot(earlier_run)
    fails(
        capsys,
        train_argv(data, earlier_run, "--model.generator", str(broken)),
        f"{broken}: no weights (model.safetensors is missing)",
    )
    assert snapshot(earlier_run) == before


def test_checkpoint_missing_a_file(tmp_path, make_model):
    from flythinker.model.flythinker import FlyThinker

    path = make_model().save_pretrained(tmp_path / "checkpoint")
    (path / "generator" / "config.json").unlink()
    with pytest.raises(
        FlyThinkerError, match=r"not a complete checkpoint .*: missing generator/config.json"
    ):
        FlyThinker.from_pretrained(path)


def test_training_state_missing_a_file(tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    argv = train_argv(data, out, "--training.save_every", "1", "--training.max_steps", "2")
    assert main(argv) == 0
    state = out / "states" / "step-00000002"
    (state / "optimizer.bin").unlink()
    before = snapshot(out)
    fails(capsys, argv, f"training state {state} is missing optimizer.bin")
    assert snapshot(out) == before


def test_sequence_longer_than_the_models_context(tmp_path, capsys, earlier_run):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "huge", "prompt": "word " * 2100, "target": " ok"}) + "\n")
    before = snapshot(earlier_run)
    fails(
        capsys,
        train_argv(data, earlier_run, "--training.max_prompt_tokens", "5000"),
        "example 'huge' is",
    )
    assert snapshot(earlier_run) == before


def test_evaluation_example_longer_than_the_models_context(tmp_path, capsys, earlier_run):
    # Named before training starts, not at the first evaluation.
    data = write_pairs(tmp_path / "pairs.jsonl", 4)
    huge = tmp_path / "eval.jsonl"
    huge.write_text(json.dumps({"id": "huge", "prompt": "word " * 2100, "target": " ok"}) + "\n")
    before = snapshot(earlier_run)
    fails(
        capsys,
        train_argv(data, earlier_run, "--training.max_prompt_tokens", "5000", "--eval_data", str(huge),
                   "--training.eval_every", "1"),
        "evaluation example 'huge' is",
    )
    assert snapshot(earlier_run) == before


# --------------------------------------------------------------------------- disk full


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_disk_full(*args, **kwargs):
    # What torch.save raises when a write fails (measured writing to /dev/full, torch 2.13).
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize(("fill", "reason"), [(_disk_full, "No space left on device"), (_torch_disk_full, "unexpected pos 704 vs 598")])
def test_disk_full_while_saving_a_state_keeps_the_last_good_one(tmp_path, capsys, monkeypatch, fill, reason):
    import torch

    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    argv = train_argv(
        data,
        out,
        "--training.save_every",
        "2",
        "--training.max_steps",
        "6",
        "--training.epochs",
        "3",
    )
    real_save = torch.save

    def fill_up_after_the_first_state(obj, f, *args, **kwargs):
        if "step-00000004" in str(f):
            fill()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fill_up_after_the_first_state)
    fails(capsys, argv, f"{reason}; the previous state is intact")
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in (out / "states").iterdir()] == ["step-00000002"]  # no partial left
    assert main(argv) == 0  # space freed: the same command resumes from step 2 and finishes
    assert "resumed from the state at step 2" in capsys.readouterr().out
    assert (out / "checkpoint" / "generator" / "model.safetensors").is_file()


def test_disk_full_while_exporting_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    import transformers.modeling_utils

    data = write_pairs(tmp_path / "pairs.jsonl", 8)
    out = tmp_path / "run"
    argv = train_argv(data, out, "--training.save_every", "1")
    assert main(argv) == 0
    before = snapshot(out)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", _disk_full)
    fails(capsys, argv, "No space left on device; any earlier checkpoint is unchanged")
    assert snapshot(out) == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- LongLaMP data


def review(**overrides) -> dict:
    record = {
        "reviewerId": "u1",
        "input": "Write a review of the kettle.",
        "output": "It boils fast.",
        "profile": [{"overall": 5.0, "summary": "Good", "reviewText": "Fine pan."}],
    }
    return {**record, **overrides}


def write_split(path: Path, records: list) -> Path:
    path.write_text(json.dumps({"train": records}))
    return path


def test_longlamp_malformed_json(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text(json.dumps(review()) + "\n{oops\n")
    with pytest.raises(FlyThinkerError, match="line 2: malformed JSON"):
        load_longlamp("product_review", "train", path)


def test_longlamp_non_utf8(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_bytes(json.dumps(review()).encode() + b"\n\xff\xfe\n")
    with pytest.raises(FlyThinkerError, match="not valid UTF-8"):
        load_longlamp("product_review", "train", path)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (review(output=None), "field 'output' is missing"),
        (review(profile="none"), "field 'profile' must be a list"),
        (review(profile=[{"overall": 5.0}]), "field 'profile[0].reviewText' is missing"),
        (review(output=""), "field 'output' must be a non-empty string"),
    ],
    ids=["missing-field", "mistyped-field", "missing-profile-field", "empty-target"],
)
def test_longlamp_bad_records_name_the_field(tmp_path, record, message):
    path = write_split(
        tmp_path / "reviews.json", [review(), {k: v for k, v in record.items() if v is not None}]
    )
    with pytest.raises(FlyThinkerError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_longlamp("product_review", "train", path)


def test_longlamp_empty_profile_falls_back_to_the_query(tokenizer):
    record = parse_record("product_review", review(profile=[]), default_id="r", location="test")
    prompt = build_prompt(record, tokenizer, "profile")
    assert "Write a review of the kettle." in prompt


def test_longlamp_profile_and_query_longer_than_every_budget(tokenizer):
    words = "word " * 4000
    record = parse_record(
        "product_review",
        review(input=words, profile=[{"reviewText": words}]),
        default_id="r",
        location="test",
    )
    budgets = PromptBudgets(profile_tokens=50, query_tokens=20, target_tokens=10)
    prompt = build_prompt(record, tokenizer, "profile", budgets=budgets)
    template = len(
        tokenizer(
            build_prompt(
                parse_record(
                    "product_review", review(input="x", profile=[]), default_id="e", location="t"
                ),
                tokenizer,
                "query",
            ),
            add_special_tokens=False,
        ).input_ids
    )
    assert len(tokenizer(prompt, add_special_tokens=False).input_ids) <= 50 + 20 + template + 4


def _runner_config(tmp_path: Path, task: str, method: str) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "out"),
                "tasks": [{"task": task, "data": "sample", "train_limit": 2, "eval_limit": 1}],
                "methods": [{"method": method}],
            }
        )
    )
    return config


def test_unknown_task_name(tmp_path, capsys):
    fails(
        capsys,
        ["run", "--config", str(_runner_config(tmp_path, "poetry", "sft"))],
        "unknown task 'poetry'",
    )
    with pytest.raises(FlyThinkerError, match="unknown task 'poetry'"):
        load_longlamp("poetry", "train", tmp_path)


def test_unknown_method_name(tmp_path, capsys):
    fails(
        capsys,
        ["run", "--config", str(_runner_config(tmp_path, "product_review", "telepathy"))],
        "unknown method(s) telepathy",
    )


def test_wrong_checkpoint_paths_are_told_apart(tmp_path, make_model):
    """Each usual mistake is named by what it is, with what to pass instead."""
    from flythinker.model.flythinker import FlyThinker
    from flythinker.model.sources import build_tiny

    with pytest.raises(FlyThinkerError, match="no such checkpoint directory"):
        FlyThinker.from_pretrained(tmp_path / "nowhere")
    run = tmp_path / "run"
    make_model().save_pretrained(run / "product_review" / "flythinker" / "checkpoint")
    with pytest.raises(FlyThinkerError, match="is a run directory; pass one of its FlyThinker checkpoints: .*flythinker/checkpoint"):
        FlyThinker.from_pretrained(run)
    with pytest.raises(FlyThinkerError, match="is a method's run directory; pass its checkpoint"):
        FlyThinker.from_pretrained(run / "product_review" / "flythinker")
    sft = tmp_path / "sft-checkpoint"
    build_tiny(32).save_pretrained(sft)
    with pytest.raises(FlyThinkerError, match="plain language-model checkpoint .* not a FlyThinker one"):
        FlyThinker.from_pretrained(sft)
