"""The README's Python example is a file the tests run, on a tiny checkpoint."""

from __future__ import annotations

import ast
import re
import runpy
import sys
from pathlib import Path

import pytest

from flythinker.data.collate import encode_prompts
from flythinker.data.prompts import apply_chat, encode_chat
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "python_usage.py"


def test_the_readme_shows_the_example_file_verbatim():
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.DOTALL)
    assert EXAMPLE.read_text() in blocks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), load_tokenizer("tiny"))
    return model.save_pretrained(tmp_path_factory.mktemp("example") / "ckpt")


def test_the_python_example_writes_text(checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(checkpoint)])
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    streamed, final = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
    texts = ast.literal_eval(final)  # the example prints the list of decoded texts
    assert texts[0].strip() and streamed.strip()
    assert "<|im_end|>" not in streamed and "<|endoftext|>" not in streamed  # specials are not streamed


def test_encode_chat_renders_prompts_as_training_does():
    tokenizer = load_tokenizer("tiny")
    message = "Write a review of the blue kettle."
    rendered = encode_chat(tokenizer, [message], max_prompt_tokens=200)["input_ids"][0].tolist()
    assert tokenizer.decode(rendered) == apply_chat(tokenizer, message)
    assert "<|im_start|>assistant" in tokenizer.decode(rendered)  # the model's turn is opened
    bare = encode_prompts(tokenizer, [message], max_prompt_tokens=200)["input_ids"][0].tolist()
    assert rendered != bare
