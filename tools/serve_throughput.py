"""Requests and tokens per second of `flythinker serve` at several numbers of concurrent streams.

Starts the server in this process on a checkpoint and sends the same set of ``requests`` greedy
completions (distinct prompts) at each concurrency C: at most C in flight at once, a new one sent
as soon as one finishes, so the server batches whatever is waiting. C = 1 is one request at a
time, the baseline: every row does the same work, so the ratios are the batching's gain.
Tokens are the server's own usage counts (a row that meets EOS writes fewer than ``max_tokens``;
greedy, the same prompt writes the same text whatever the batch, so every row counts about the
same tokens). The whole set runs ``repeats`` times per row and the median is reported. Timings
on a shared machine are noisy: compare the rows of one run, on a quiet machine.

    python tools/serve_throughput.py CHECKPOINT [--concurrency 1 4 16] [--requests 16]
        [--max-tokens 48] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx
import torch
import uvicorn

from flythinker.commands.serve import create_app


def start(checkpoint: str, max_batch: int) -> tuple[str, uvicorn.Server, threading.Thread]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(checkpoint, max_batch=max_batch), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{sock.getsockname()[1]}", server, thread


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": False}
    answer = await client.post(f"{url}/v1/completions", json=body, timeout=600)
    answer.raise_for_status()
    return int(answer.json()["usage"]["completion_tokens"])


PROMPTS = [
    "Review of a stainless steel kettle: ", "My honest opinion of this coffee grinder: ",
    "Abstract: We study the effect of ", "A review of the paperback edition: ",
    "This vacuum cleaner, after six months of use, ", "Abstract: This paper proposes a method for ",
    "Five stars for these running shoes because ", "I returned this blender since ",
]


def prompt(i: int) -> str:
    return f"{PROMPTS[i % len(PROMPTS)]}(note {i}) "


async def workload(url: str, model: str, concurrency: int, requests: int, max_tokens: int) -> tuple[float, int]:
    """All ``requests`` prompts, at most ``concurrency`` in flight; (seconds, generated tokens)."""
    gate = asyncio.Semaphore(concurrency)

    async def limited(client: httpx.AsyncClient, i: int) -> int:
        async with gate:
            return await one(client, url, model, prompt(i), max_tokens)

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 4)) as client:
        began = time.perf_counter()
        tokens = await asyncio.gather(*(limited(client, i) for i in range(requests)))
        return time.perf_counter() - began, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="prompts per measurement (the same set each row)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row; the median is reported")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    url, server, thread = start(args.checkpoint, args.max_batch)
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    asyncio.run(workload(url, model, 2, 2, 4))  # warm-up, untimed
    rows = []
    for concurrency in args.concurrency:
        runs = sorted((asyncio.run(workload(url, model, concurrency, args.requests, args.max_tokens))
                       for _ in range(args.repeats)), key=lambda run: run[0])
        seconds, tokens = runs[len(runs) // 2]
        rows.append({"concurrency": concurrency, "requests_per_s": args.requests / seconds,
                     "tokens_per_s": tokens / seconds, "requests": args.requests, "tokens": tokens,
                     "median_seconds": seconds, "all_seconds": [run[0] for run in runs]})
    base = rows[0]
    print(f"{'streams':>8} {'req/s':>8} {'tok/s':>8} {'x row 1':>8}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['requests_per_s']:>8.3f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x")
    health = httpx.get(f"{url}/health").json()
    print("health:", json.dumps(health))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "requests": args.requests, "max_tokens": args.max_tokens,
                       "repeats": args.repeats, "max_batch": args.max_batch, "torch_threads": torch.get_num_threads(),
                       "rows": rows, "health": health}, f, indent=2)
    server.should_exit = True
    thread.join(timeout=30)


if __name__ == "__main__":
    main()
