"""A soak of `flythinker serve`: 200 mixed good and bad requests, eight at a time, against one
server on a tiny checkpoint. Afterwards the server still answers, writes what it wrote before, has
nothing left waiting, and its memory (the server runs in this process) has stayed flat.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import SERVE_BLOCKER as BLOCKER
from conftest import SERVE_PROFILE as PROFILE
from conftest import SERVE_QUERY as QUERY
from conftest import live_server

from flythinker.commands.serve import create_app
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_tokenizer

GREEDY = {"prompt": "An abstract about sparse arrays, please.", "max_tokens": 16, "temperature": 0}
WARM_UP, TOTAL, WORKERS = 40, 200, 8
MAX_GROWTH_MIB = 50

# (name, path, body, expected status); bytes are sent raw. Good rows answer 200, bad ones 4xx.
KINDS = [
    ("completion", "/v1/completions", {"prompt": "Hello there", "max_tokens": 6}, 200),
    ("streamed completion", "/v1/completions", {"prompt": "Tell me about kettles", "max_tokens": 8,
                                                "stream": True}, 200),
    ("profile chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": QUERY}],
                                              "profile": PROFILE, "max_tokens": 6}, 200),
    ("streamed lens", "/v1/completions", {"prompt": "Hi", "max_tokens": 5, "stream": True, "lens_top": 3}, 200),
    ("sampled", "/v1/completions", {"prompt": "Hello", "max_tokens": 6, "temperature": 1.2, "seed": 3}, 200),
    ("streamed chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi there"}],
                                               "max_tokens": 6, "stream": True}, 200),
    ("abandoned stream", "/v1/completions", {"prompt": BLOCKER, "max_tokens": 300, "stream": True}, 200),
    ("malformed JSON", "/v1/completions", b'{"prompt": "hi",', 400),
    ("body not an object", "/v1/chat/completions", b'[1, 2]', 400),
    ("max_tokens a string", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400),
    ("temperature negative", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400),
    ("profile not a list", "/v1/completions", {"prompt": "hi", "profile": {"reviewText": "x"}}, 400),
    ("unknown task", "/v1/completions", {"prompt": "hi", "profile": PROFILE, "task": "poetry"}, 400),
    ("prompt over the context", "/v1/completions", {"prompt": "word " * 3000}, 400),
    ("messages not a list", "/v1/chat/completions", {"messages": "hi"}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404),
    ("unknown path", "/v1/embeddings", {"input": "hi"}, 404),
]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory):
    tokenizer = load_tokenizer("tiny")
    flythinker = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), tokenizer, fusion="pad")
    checkpoint = flythinker.save_pretrained(tmp_path_factory.mktemp("serve_soak") / "flythinker")
    app = create_app(str(checkpoint), max_batch=8)
    with live_server(app) as url:
        yield url


def rss_mib() -> float:
    """This process's resident memory now (not its peak), from /proc."""
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("no /proc/self/status to read the resident memory from")
    for line in status.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("/proc/self/status has no VmRSS")


_clients = threading.local()


def client() -> httpx.Client:
    if not hasattr(_clients, "client"):
        _clients.client = httpx.Client(timeout=60)
    return _clients.client


def send(url: str, i: int) -> str | None:
    """Request number ``i`` of the soak; None when it was answered as expected, else what went wrong."""
    name, path, body, status = KINDS[i % len(KINDS)]
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    request = client().build_request("POST", f"{url}{path}", headers={"Content-Type": "application/json"}, **sent)
    response = client().send(request, stream=True)
    try:
        if response.status_code != status:
            return f"{name}: {response.status_code} {response.read()[:200]!r}"
        if status != 200:
            error = json.loads(response.read())["error"]
            return None if set(error) == {"message", "type", "param", "code"} and error["message"] else f"{name}: {error}"
        if not body.get("stream"):
            choice = json.loads(response.read())["choices"][0]
            return None if choice["finish_reason"] in ("stop", "length") else f"{name}: {choice}"
        events = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if name == "abandoned stream":
                    return None  # leave after the first chunk: the server must drop the row
        if events[-1] != "[DONE]" or json.loads(events[-2])["choices"][0]["finish_reason"] not in ("stop", "length"):
            return f"{name}: the stream did not end properly: {events[-2:]}"
        return None
    finally:
        response.close()


def health(url: str) -> dict:
    response = httpx.get(f"{url}/health", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    (stats,) = response.json()["models"].values()
    return stats


def greedy(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json=GREEDY, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_a_soak_of_mixed_requests_leaves_the_server_answering_and_its_memory_flat(server_url):
    before_text = greedy(server_url)
    before = health(server_url)
    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        failures = [f for f in pool.map(lambda i: send(server_url, i), range(WARM_UP)) if f]
        gc.collect()
        warm = rss_mib()
        failures += [f for f in pool.map(lambda i: send(server_url, i), range(WARM_UP, TOTAL)) if f]
    gc.collect()
    soaked = rss_mib()
    elapsed = time.monotonic() - started
    assert not failures, failures[:5]

    deadline = time.monotonic() + 30  # abandoned rows end at the server's next step
    while (stats := health(server_url))["waiting"] or stats["requests_served"] + stats["requests_cancelled"] \
            - before["requests_served"] - before["requests_cancelled"] < expected_rows():
        assert time.monotonic() < deadline, f"the server did not settle: {stats}"
        time.sleep(0.1)
    assert stats["requests_cancelled"] - before["requests_cancelled"] <= TOTAL // len(KINDS) + 1
    assert greedy(server_url) == before_text
    growth = soaked - warm
    print(f"soak: {TOTAL} requests in {elapsed:.1f} s; RSS {warm:.0f} MiB after {WARM_UP}, "
          f"{soaked:.0f} MiB after {TOTAL} ({growth:+.1f} MiB); "
          f"{stats['decode_batches'] - before['decode_batches']} batches for {expected_rows()} rows")
    assert growth < MAX_GROWTH_MIB, f"RSS grew {growth:.1f} MiB over {TOTAL - WARM_UP} requests"


def expected_rows() -> int:
    """How many of the soak's requests reach the decoder (the good ones)."""
    return sum(1 for i in range(TOTAL) if KINDS[i % len(KINDS)][3] == 200)
