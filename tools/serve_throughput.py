"""Requests and tokens per second of `flythinker serve` at several numbers of concurrent requests.

Starts the server in this process on a checkpoint, then for each concurrency C sends C greedy
completions of distinct prompts at once, ``rounds`` times, and reports requests/s and generated
tokens/s (the server's own usage counts; a row that meets EOS writes fewer than ``max_tokens``),
with the ratio to C = 1, one request at a time. Timings on a shared machine are noisy: compare
the rows of one run.

    python tools/serve_throughput.py CHECKPOINT [--concurrency 1 4 16] [--max-tokens 32] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import httpx
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


async def burst(url: str, model: str, concurrency: int, max_tokens: int, start_index: int) -> tuple[float, int]:
    async with httpx.AsyncClient() as client:
        began = time.perf_counter()
        tokens = await asyncio.gather(*(
            one(client, url, model, f"Review number {start_index + i}: this kettle", max_tokens)
            for i in range(concurrency)
        ))
        return time.perf_counter() - began, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    url, server, thread = start(args.checkpoint, args.max_batch)
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    asyncio.run(burst(url, model, 1, 4, 10_000))  # warm-up, untimed
    rows, index = [], 0
    for concurrency in args.concurrency:
        seconds = tokens = 0.0
        for _ in range(args.rounds):
            s, t = asyncio.run(burst(url, model, concurrency, args.max_tokens, index))
            seconds, tokens, index = seconds + s, tokens + t, index + concurrency
        requests = concurrency * args.rounds
        rows.append({"concurrency": concurrency, "requests_per_s": requests / seconds, "tokens_per_s": tokens / seconds,
                     "requests": requests, "tokens": int(tokens), "seconds": seconds})
    base = rows[0]
    print(f"{'streams':>8} {'req/s':>8} {'tok/s':>8} {'x one-at-a-time':>16}")
    for r in rows:
        print(f"{r['concurrency']:>8} {r['requests_per_s']:>8.3f} {r['tokens_per_s']:>8.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>15.2f}x")
    print("health:", json.dumps(httpx.get(f"{url}/health").json()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "max_tokens": args.max_tokens, "rounds": args.rounds,
                       "rows": rows}, f, indent=2)
    server.should_exit = True
    thread.join(timeout=30)


if __name__ == "__main__":
    main()
