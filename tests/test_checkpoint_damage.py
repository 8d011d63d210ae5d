"""A damaged checkpoint fails with one line naming the file and what is wrong, on every loader
(`FlyThinker.from_pretrained`, and `flythinker write`, which a user meets first)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bad_inputs import fails

from flythinker.errors import FlyThinkerError
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_causal_lm, load_tokenizer

PROFILE = Path(__file__).resolve().parents[1] / "examples" / "profile_reviews.json"


@pytest.fixture
def checkpoint(make_model, tmp_path) -> Path:
    return make_model(fusion="linear").save_pretrained(tmp_path / "checkpoint")


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def refused(path: Path, *patterns: str) -> str:
    with pytest.raises(FlyThinkerError) as caught:
        FlyThinker.from_pretrained(path)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_truncated_generator_weights_are_named(checkpoint):
    weights = checkpoint / "generator" / "model.safetensors"
    truncate(weights)
    refused(checkpoint, str(weights), "truncated")


def test_weights_cut_inside_their_header_are_named(checkpoint):
    weights = checkpoint / "reasoner" / "model.safetensors"
    truncate(weights, keep=0.0001)
    refused(checkpoint, str(weights), "damaged weights file")


def test_truncated_fusion_weights_are_named(checkpoint):
    truncate(checkpoint / "fusion.safetensors")
    refused(checkpoint, str(checkpoint / "fusion.safetensors"), "truncated")


def test_a_model_config_that_is_not_json_is_named(checkpoint):
    (checkpoint / "generator" / "config.json").write_text('{"model_type": "qwen2", ')
    refused(checkpoint, str(checkpoint / "generator" / "config.json"), "not a readable JSON config")


def test_missing_weights_are_named(checkpoint):
    (checkpoint / "reasoner" / "model.safetensors").unlink()
    refused(checkpoint, str(checkpoint / "reasoner"), "no weights")


def test_a_damaged_tokenizer_is_named(checkpoint):
    truncate(checkpoint / "tokenizer.json")
    refused(checkpoint, str(checkpoint), "cannot load the tokenizer")


def test_tokenizer_files_without_their_config_are_named(checkpoint):
    (checkpoint / "tokenizer_config.json").unlink()
    refused(checkpoint, "tokenizer files without tokenizer_config.json")


def test_a_config_of_the_other_reasoner_kind_names_the_missing_files(checkpoint):
    config = checkpoint / "flythinker_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "reasoner": "shared"}))
    refused(checkpoint, "reasoner='shared'", "missing reasoner_adapter/adapter_config.json")


def test_a_config_of_another_fusion_names_the_fusion_file(checkpoint):
    config = checkpoint / "flythinker_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "fusion": "linear", "gate": "vector"}))
    refused(checkpoint, "fusion.safetensors does not match the config's fusion", "gate")


def test_a_fusion_file_for_other_model_widths_is_named(checkpoint, make_model, tmp_path):
    other = make_model(fusion="linear", d_r=32).save_pretrained(tmp_path / "other")
    (checkpoint / "fusion.safetensors").write_bytes((other / "fusion.safetensors").read_bytes())
    refused(checkpoint, "fusion.safetensors does not fit the models", "projection.weight")


def test_a_shared_checkpoint_with_a_truncated_adapter_is_named(tokenizer, tmp_path):
    path = FlyThinker.shared(build_tiny(64, seed=2), tokenizer, lora_rank=2).save_pretrained(tmp_path / "shared")
    adapter = path / "reasoner_adapter" / "adapter_model.safetensors"
    truncate(adapter)
    refused(path, str(adapter))


def test_a_plain_model_directory_with_truncated_weights_is_named(tmp_path):
    directory = tmp_path / "sft"
    build_tiny(64, seed=2).save_pretrained(directory)
    truncate(directory / "model.safetensors")
    with pytest.raises(FlyThinkerError, match="damaged weights file"):
        load_causal_lm(str(directory))


def test_write_on_a_truncated_checkpoint_is_one_error_line(checkpoint, capsys):
    weights = checkpoint / "generator" / "model.safetensors"
    truncate(weights)
    query = 'Generate the review text for a product with description "Ceramic Mug".'
    line = fails(capsys, ["write", "--checkpoint", str(checkpoint), "--profile", str(PROFILE), "--query", query,
                          "--max-new-tokens", "4"], str(weights))
    assert "truncated" in line


def test_an_intact_checkpoint_still_loads(checkpoint, make_model):
    loaded = FlyThinker.from_pretrained(checkpoint)
    assert loaded.tokenizer is not None and len(loaded.tokenizer) == len(load_tokenizer("tiny"))
