"""Shared fixtures: tiny random models built from config and the shipped byte-level tokenizer.

Everything here is offline and deterministic: the same seed always builds the same weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_tokenizer

# Small LongLaMP files in the hub's schema, one per task.
LONGLAMP_FIXTURES = Path(__file__).parent / "fixtures" / "longlamp"
# The CUDA tests (also marked `gpu`) skip cleanly on a machine without a GPU.
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# A user, a query and a prompt for the server's tests.
SERVE_PROFILE = [
    {"overall": 5.0, "summary": "Lovely mug", "description": "Ceramic Mug",
     "reviewText": "I drink my tea from it every morning. It keeps the heat well."},
    {"overall": 2.0, "summary": "Too dim", "description": "Desk Lamp",
     "reviewText": "The light is weak. I returned it after a week."},
]
SERVE_QUERY = 'Generate the review text for a product with description "Kettle". The summary is "Fast."'
SERVE_BLOCKER = "Write a review of the blue kettle."  # the tiny model writes no EOS for it

PROMPTS = [
    "Write a review of the blue kettle.",
    "Hi",
    "An abstract about direction-of-arrival estimation with sparse arrays, please.",
]


_OWN_EXTENSIONS_DIR: str | None = None


def pytest_configure(config):
    """A torch-extensions directory of this test session's own (one ~20 s build of DeepSpeed's op).

    DeepSpeed's CPU tests JIT-build its shared-memory allreduce op under a file lock in
    TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). A build killed part-way (an earlier
    run interrupted) leaves the lock behind, and every later build then waits on it in silence:
    that hung all three ZeRO-3 tests once (measured: a 0-byte `lock` left by a killed run). Set
    here, before any test module builds its subprocess environment, so they all inherit it; a
    directory the user named is respected.
    """
    global _OWN_EXTENSIONS_DIR
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        _OWN_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="flythinker-test-extensions-")
        os.environ["TORCH_EXTENSIONS_DIR"] = _OWN_EXTENSIONS_DIR


def pytest_unconfigure(config):
    if _OWN_EXTENSIONS_DIR is not None:
        shutil.rmtree(_OWN_EXTENSIONS_DIR, ignore_errors=True)
        del os.environ["TORCH_EXTENSIONS_DIR"]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture
def make_model(tokenizer):
    """``make_model(lam=0.5, fusion="pad", d_r=64, d_g=64, **cfg)`` -> FlyThinker in fp32.

    A linear projection starts random unless a test asks for ``projection_init="zero"`` (the
    model default): the invariants need a signal that changes the generator's output."""

    def make(lam: float = 0.5, fusion: str = "pad", d_r: int = 64, d_g: int = 64, **config) -> FlyThinker:
        reasoner = build_tiny(d_r, seed=1, **config.pop("reasoner_overrides", {}))
        generator = build_tiny(d_g, seed=2, **config.pop("generator_overrides", {}))
        config.setdefault("projection_init", "random")
        torch.manual_seed(3)  # the linear projection's initialisation
        return FlyThinker.from_models(reasoner, generator, tokenizer, lam=lam, fusion=fusion, **config).eval()

    return make


@pytest.fixture
def prompt_batch(tokenizer):
    """Left-padded prompts of different lengths."""
    return tokenizer(PROMPTS, return_tensors="pt", padding=True)


def parallel_logits_at_decoded_positions(model, prompt_batch, sequences):
    """One parallel forward over prompt + decoded tokens; the logits that chose each decoded token."""
    ids = torch.cat([prompt_batch.input_ids, sequences], dim=1)
    mask = torch.cat([prompt_batch.attention_mask, torch.ones_like(sequences)], dim=1)
    with torch.no_grad():
        logits = model(ids, mask).logits
    start = prompt_batch.input_ids.shape[1] - 1
    return logits[:, start : start + sequences.shape[1]]


@contextlib.contextmanager
def live_server(app):
    """``app`` served by uvicorn in a thread on a free port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with other tests
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
