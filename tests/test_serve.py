"""`flythinker serve` on tiny checkpoints: a live uvicorn server, driven by OpenAI's own client.

Every text the server writes is checked against the library's decoders run on the same prompt, so
batching, streaming and prompt rendering cannot change what a model writes.
"""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from conftest import SERVE_BLOCKER as BLOCKER
from conftest import SERVE_PROFILE as PROFILE
from conftest import SERVE_QUERY as QUERY
from conftest import live_server

from flythinker.commands.cli import main
from flythinker.commands.serve import ReleasedText, create_app, load_served_model
from flythinker.data.collate import encode_prompts
from flythinker.data.longlamp import parse_record
from flythinker.data.prompts import PromptBudgets, apply_chat, build_prompt
from flythinker.model.decoding import generate_plain
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    tokenizer = load_tokenizer("tiny")
    flythinker = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), tokenizer, fusion="pad")
    sft = root / "sft"  # an SFT checkpoint is a plain causal LM directory with its tokenizer
    build_tiny(64, seed=3).save_pretrained(sft)
    tokenizer.save_pretrained(sft)
    return SimpleNamespace(flythinker=flythinker.save_pretrained(root / "flythinker"), sft=sft, root=root)


@pytest.fixture(scope="module")
def server(checkpoints):
    app = create_app(str(checkpoints.flythinker), compare=str(checkpoints.sft))
    with live_server(app) as url:
        flythinker = FlyThinker.from_pretrained(checkpoints.flythinker).eval()
        yield SimpleNamespace(
            url=url,
            model=str(checkpoints.flythinker),
            sft=str(checkpoints.sft),
            client=openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0),
            flythinker=flythinker,
            tokenizer=flythinker.tokenizer,
            lm=load_causal_lm(str(checkpoints.sft)).eval(),
            # Loaded as the server loads it: from a model directory transformers may pick another
            # tokenizer class than the one saved (Qwen2's for the tiny models).
            sft_tokenizer=load_tokenizer(str(checkpoints.sft)),
        )


def until_eos(ids: list[int], tokenizer) -> list[int]:
    return ids[: ids.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ids else ids


def flythinker_text(server, ids: list[int], max_tokens: int) -> str:
    out = server.flythinker.generate(torch.tensor([ids]), max_new_tokens=max_tokens).sequences[0].tolist()
    return server.tokenizer.decode(until_eos(out, server.tokenizer), skip_special_tokens=True)


def raw_ids(server, prompt: str) -> list[int]:
    return server.tokenizer(prompt, add_special_tokens=False)["input_ids"]


def health(server) -> dict:
    return httpx.get(f"{server.url}/health").json()["models"][server.model]


def test_models_and_health_describe_both_checkpoints(server):
    models = {m.id: m for m in server.client.models.list().data}
    assert set(models) == {server.model, server.sft}
    assert models[server.model].flythinker == {"kind": "flythinker", "role": "primary", "lens": True}
    assert models[server.sft].flythinker == {"kind": "causal-lm", "role": "compare", "lens": False}
    stats = health(server)
    assert {"requests_served", "decode_batches", "rows_decoded", "requests_cancelled", "waiting"} <= set(stats)


def test_greedy_completion_equals_model_generate(server):
    prompt = BLOCKER
    done = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=12, temperature=0)
    choice = done.choices[0]
    assert choice.text == flythinker_text(server, raw_ids(server, prompt), 12)
    assert choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens == len(raw_ids(server, prompt))
    assert done.object == "text_completion" and done.model == server.model


def test_streamed_completion_is_the_whole_one_in_pieces(server):
    prompt = "An abstract about sparse arrays, please."
    chunks = list(server.client.completions.create(model=server.model, prompt=prompt, max_tokens=10, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks) == flythinker_text(server, raw_ids(server, prompt), 10)
    assert [c.choices[0].finish_reason for c in chunks][-1] in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_with_a_profile_renders_the_training_prompt(server):
    done = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": QUERY}], max_tokens=8,
        extra_body={"profile": PROFILE, "task": "product_review"},
    )
    record = parse_record("product_review", {"input": QUERY, "output": "-", "reviewerId": "u", "profile": PROFILE},
                          default_id="t", location="test")
    budgets = PromptBudgets()
    prompt = build_prompt(record, server.tokenizer, "profile", budgets=budgets)
    ids = encode_prompts(server.tokenizer, [prompt], budgets.prompt_tokens)["input_ids"][0].tolist()
    assert "Earlier reviews written by this user" in prompt
    assert done.choices[0].message.content == flythinker_text(server, ids, 8)
    assert done.usage.prompt_tokens == len(ids)


def test_the_compare_checkpoint_decodes_as_a_plain_lm(server):
    done = server.client.chat.completions.create(
        model=server.sft, messages=[{"role": "user", "content": "Hi there"}], max_tokens=9)
    tokenizer = server.sft_tokenizer
    ids = tokenizer(apply_chat(tokenizer, "Hi there"), add_special_tokens=False)["input_ids"]
    out = generate_plain(server.lm, torch.tensor([ids]), max_new_tokens=9, tokenizer=tokenizer)
    expected = tokenizer.decode(until_eos(out.sequences[0].tolist(), tokenizer), skip_special_tokens=True)
    assert done.choices[0].message.content == expected


def test_a_stop_string_ends_the_text_before_it(server):
    prompt = "Write a review of the red kettle."
    full = flythinker_text(server, raw_ids(server, prompt), 30)
    stop = full[10:13]
    done = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=30, stop=[stop])
    assert done.choices[0].text == full[: full.index(stop)]
    assert done.choices[0].finish_reason == "stop"


def test_a_seeded_sample_repeats_and_differs_from_greedy(server):
    def sample(**extra) -> str:
        return server.client.completions.create(model=server.model, prompt="Hello", max_tokens=12, **extra).choices[0].text

    first = sample(temperature=1.5, seed=7)
    assert sample(temperature=1.5, seed=7) == first
    assert first != sample()


def test_a_client_that_leaves_before_its_answer_frees_its_row(server):
    before = health(server)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/completions", json={"prompt": BLOCKER, "max_tokens": 1900}, timeout=0.5)
    deadline = time.monotonic() + 30
    while health(server)["requests_cancelled"] == before["requests_cancelled"]:
        assert time.monotonic() < deadline, "the server kept decoding for a client that left"
        time.sleep(0.05)
    assert health(server)["requests_served"] == before["requests_served"]


def test_a_client_that_leaves_mid_batch_stops_costing_and_the_others_are_unchanged(server):
    """Two rows share a batch; one client leaves after its first piece. Its row leaves the batch
    (the server's row-steps count one row from then on) and the other row's text is its own."""
    steps = 300
    before = health(server)

    async def scenario() -> str:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        blocker = await client.completions.create(model=server.model, prompt=BLOCKER, max_tokens=1900, stream=True)
        await blocker.__anext__()
        stays = asyncio.create_task(client.completions.create(model=server.model, prompt=BLOCKER, max_tokens=steps,
                                                              stream=True))
        leaves = asyncio.create_task(client.completions.create(model=server.model, prompt=BLOCKER + " again",
                                                               max_tokens=1900, stream=True))
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while (await http.get(f"{server.url}/health")).json()["models"][server.model]["waiting"] < 2:
                assert time.monotonic() < deadline, "the two requests did not queue up"
                await asyncio.sleep(0.02)
        await blocker.close()
        leaving = await leaves
        await leaving.__anext__()
        await leaving.close()
        return "".join([c.choices[0].text async for c in await stays])

    text = asyncio.run(scenario())
    after = health(server)
    assert after["decode_batches"] - before["decode_batches"] == 2  # the blocker's, then the two together
    assert text == flythinker_text(server, raw_ids(server, BLOCKER), steps)
    # The batch of two ran `steps` steps; had the leaver stayed, it would count 2 * steps.
    blocker_steps = 3  # at most: the blocker's batch ends within a step or two of its client leaving
    assert after["row_steps"] - before["row_steps"] < 1.5 * steps + blocker_steps * 2, after


def test_the_stream_carries_the_reasoning_lens_when_asked(server):
    body = {"model": server.model, "prompt": "Hello", "max_tokens": 5, "stream": True, "lens_top": 3}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [json.loads(e)["choices"][0] for e in events[:-1]]
    lensed = [c["lens"] for c in choices if "lens" in c]
    assert lensed and all(len(entry["top"]) == 3 and 0 <= entry["p"] <= 1 for entry in lensed)
    assert all(entry["top"][0][1] >= entry["top"][1][1] >= entry["top"][2][1] for entry in lensed)


def test_concurrent_streams_share_batches_and_each_equals_its_single_output(server):
    prompts = [f"Review number {i} of the kettle{'!' * i}" for i in range(8)]
    lengths = [6 + 2 * i for i in range(8)]  # rows end at different steps
    before = health(server)

    async def scenario() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        async def text(prompt: str, n: int) -> str:
            chunks = await client.completions.create(model=server.model, prompt=prompt, max_tokens=n, stream=True)
            return "".join([c.choices[0].text async for c in chunks])

        # A long request (this model writes no EOS for it) holds the decoder while the eight queue
        # up behind it; leaving then frees its row, and the eight go in together.
        blocker = await client.completions.create(model=server.model, prompt=BLOCKER, max_tokens=1900, stream=True)
        await blocker.__anext__()
        tasks = [asyncio.create_task(text(p, n)) for p, n in zip(prompts, lengths)]
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as http:
            while (await http.get(f"{server.url}/health")).json()["models"][server.model]["waiting"] < 8:
                assert time.monotonic() < deadline, "the eight requests did not all queue up"
                await asyncio.sleep(0.02)
        await blocker.close()
        return await asyncio.gather(*tasks)

    texts = asyncio.run(scenario())
    after = health(server)
    assert after["rows_decoded"] - before["rows_decoded"] == 9
    assert after["decode_batches"] - before["decode_batches"] == 2  # the blocker's, then all eight
    assert after["requests_cancelled"] - before["requests_cancelled"] == 1
    assert after["requests_served"] - before["requests_served"] == 8
    for prompt, n, got in zip(prompts, lengths, texts):
        assert got == flythinker_text(server, raw_ids(server, prompt), n)


# One row per kind of bad request: (path, body, status, param); a body given as bytes is sent raw.
BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "hi",', 400, None),
    "body not an object": ("/v1/completions", b'["hi"]', 400, None),
    "prompt missing": ("/v1/completions", {}, 400, "prompt"),
    "prompt a list": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    "max_tokens a string": ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    "max_tokens zero": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    "temperature negative": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "top_p above 1": ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    "stream not a boolean": ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    "stop a number": ("/v1/completions", {"prompt": "hi", "stop": 5}, 400, "stop"),
    "profile not a list": ("/v1/completions", {"prompt": "hi", "profile": {"reviewText": "x"}}, 400, "profile"),
    "profile item invalid": ("/v1/completions", {"prompt": "hi", "profile": [{"overall": 5}], "task": "product_review"},
                             400, "profile"),
    "unknown task": ("/v1/completions", {"prompt": "hi", "profile": PROFILE, "task": "poetry"}, 400, "task"),
    "task without profile": ("/v1/completions", {"prompt": "hi", "task": "product_review"}, 400, "task"),
    "prompt over the context": ("/v1/completions", {"prompt": "word " * 3000}, 400, "prompt"),
    "max_tokens over the context": ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, 400, "prompt"),
    "unknown model": ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    "lens of a plain LM": ("/v1/completions", {"model": "SFT", "prompt": "hi", "lens_top": 3}, 400, "lens_top"),
    "several choices": ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    "messages not a list": ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    "message without content": ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    "profile with a system message": ("/v1/chat/completions", {"profile": PROFILE, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": QUERY}]}, 400, "messages"),
    "unknown path": ("/v1/embeddings", {"input": "hi"}, 404, None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_an_openai_error_and_the_server_keeps_serving(server, case):
    path, body, status, param = BAD_REQUESTS[case]
    if isinstance(body, dict) and body.get("model") == "SFT":
        body = {**body, "model": server.sft}
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(f"{server.url}{path}", headers={"Content-Type": "application/json"}, **sent)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_the_context_error_has_openais_code(server):
    with pytest.raises(openai.BadRequestError) as raised:
        server.client.completions.create(model=server.model, prompt="hi", max_tokens=10**6)
    assert raised.value.code == "context_length_exceeded"


def test_the_web_page_is_served(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>FlyThinker</title>" in page.text and "/v1/completions" in page.text


def test_a_shared_checkpoint_serves_with_its_lens(tmp_path):
    from starlette.testclient import TestClient

    tokenizer = load_tokenizer("tiny")
    path = FlyThinker.shared(build_tiny(64, seed=4), tokenizer, lora_rank=2).save_pretrained(tmp_path / "c")
    assert load_served_model(str(path)).kind == "flythinker-shared"
    with TestClient(create_app(str(path))) as client:
        body = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "lens_top": 2}).json()
    model = FlyThinker.from_pretrained(path)
    out = model.generate(torch.tensor([tokenizer("Hello", add_special_tokens=False)["input_ids"]]), max_new_tokens=4)
    assert body["choices"][0]["text"] == tokenizer.decode(until_eos(out.sequences[0].tolist(), tokenizer),
                                                          skip_special_tokens=True)
    assert all(len(step["top"]) == 2 for step in body["choices"][0]["lens"])


def test_released_text_holds_back_stop_string_prefixes_and_partial_characters():
    text = ReleasedText(("END",))
    assert text.update("abc E") == ("abc ", False)
    assert text.update("abc EN") == ("", False)
    assert text.update("abc ENX") == ("ENX", False)
    assert text.update("abc ENX caf\ufffd") == ("", False)
    assert text.update("abc ENX café E") == (" café ", False)
    assert text.update("abc ENX café END and on") == ("", True)
    assert ReleasedText(()).flush("all of it") == "all of it"


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "70000"], "port must be an integer from 1 to 65535"),
    (["--max-batch", "0"], "max_batch must be an integer >= 1"),
])
def test_serve_refuses_bad_options_in_one_line(checkpoints, capsys, args, message):
    assert main(["serve", "--checkpoint", str(checkpoints.flythinker), *args]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_checkpoint_it_would_decode_wrongly(checkpoints, tmp_path, capsys):
    cot = tmp_path / "cot"
    build_tiny(32, seed=5).save_pretrained(cot)
    load_tokenizer("tiny").save_pretrained(cot)
    (cot / "run_config.yaml").write_text("method:\n  method: cot\n")
    assert main(["serve", "--checkpoint", str(cot)]) == 2
    assert "cot checkpoint" in capsys.readouterr().err
