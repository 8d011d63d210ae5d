"""`flythinker serve`: OpenAI's HTTP API over any checkpoint the project writes, and a web page.

Endpoints: ``POST /v1/completions`` and ``POST /v1/chat/completions`` in OpenAI's wire format
(``stream: true`` as server-sent events ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health`` (with counters) and, at ``/``, a page that streams a text beside the reasoning lens.

Request fields beyond OpenAI's:

- ``profile``: the user's history, a list of LongLaMP profile items (what `flythinker write
  --profile` reads). The prompt (or the one user message) is then the query, rendered in the
  profile form the checkpoint was trained on: the same prompt builder, chat template and token
  budgets (the run's own budgets when the checkpoint records them).
- ``task``: product_review, abstract_generation or topic_writing; guessed from the profile's keys.
- ``lens_top``: (FlyThinker checkpoints) every chunk also carries ``choices[0].lens`` for its decode
  step: the reasoner's ``lens_top`` most likely tokens read through its own LM head, and that lens's
  probability of the token written.
- ``repetition_penalty``, ``no_repeat_ngram_size``: as in `GenerationConfig`; by default what the
  run that trained the checkpoint decoded with.

Decoding is greedy unless ``temperature`` is above 0, as the project's evaluations decode. Without
a profile, a completion's prompt is continued verbatim and chat messages go through the chat
template.

Batching: one thread per served model decodes. Between batches it takes the oldest waiting request
and every other waiting one that decodes alike (same settings, fitting the context together), up to
``max_batch``, as one left-padded batch, whose rows end independently; requests that arrive
meanwhile wait for the next batch. A client that leaves is no longer sent anything and a batch
stops as soon as none of its rows has anyone to send to; until then the row stays in the batch's
steps (the decoder has no way to drop one row of a batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from flythinker.commands.write import lens
from flythinker.config import GenerationConfig
from flythinker.data.collate import Encoded, collate, encode_prompts
from flythinker.data.longlamp import TASKS, LongLaMPRecord, one_user_record, task_of_profile
from flythinker.data.prompts import PromptBudgets, apply_chat, build_prompt
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import CausalLMDecoder, StepDecoder, decode
from flythinker.model.flythinker import CONFIG_NAME, FlyThinker
from flythinker.model.sources import load_causal_lm, load_tokenizer
from flythinker.training.train import RUN_CONFIG_NAME

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_LENS_TOP = 20
# A whole LongLaMP profile fits in a few MiB; anything larger is refused before it is parsed.
MAX_BODY_BYTES = 16 * 2**20
# Run methods whose checkpoints are plain causal LMs but are not decoded as one: CoT writes a
# rationale first and Coconut feeds hidden states back. Serving them as plain LMs would be wrong.
_NOT_SERVABLE = ("cot", "coconut")
# OpenAI fields this server does not implement, with the values that ask for nothing. Any other
# value is refused rather than silently ignored.
_UNSUPPORTED = {
    "n": (1,), "best_of": (1,), "echo": (False,), "logprobs": (False,), "top_logprobs": (0,),
    "suffix": ("",), "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},),
    "tools": ([],),
}
_JSON_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean", list: "a list"}


class RequestError(FlyThinkerError):
    """A request the server refuses: answered with ``status`` and OpenAI's error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code

    def body(self) -> dict:
        return error_body(str(self), "invalid_request_error", self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --------------------------------------------------------------------------- models


@dataclass
class ServedModel:
    """A loaded checkpoint with what serving it needs."""

    id: str
    role: str  # "primary", or "compare" for the checkpoint the page streams beside it
    kind: str  # "flythinker", "flythinker-shared", or a plain LM's run method ("sft"; "causal-lm")
    model: torch.nn.Module  # a FlyThinker, or a Hugging Face causal LM
    tokenizer: PreTrainedTokenizerBase
    budgets: PromptBudgets
    defaults: GenerationConfig  # the training run's decoding settings, where it recorded them
    context_length: int | None
    eos_token_ids: frozenset[int]
    pad_token_id: int

    @property
    def has_lens(self) -> bool:
        return isinstance(self.model, FlyThinker)

    def decoder(self) -> StepDecoder:
        return self.model.step_decoder() if isinstance(self.model, FlyThinker) else CausalLMDecoder(self.model)

    def describe(self) -> dict:
        return {"kind": self.kind, "role": self.role, "lens": self.has_lens}


def load_served_model(checkpoint: str, role: str = "primary") -> ServedModel:
    """A FlyThinker or FlyThinker-shared checkpoint, or a plain causal LM directory (SFT)."""
    root = Path(checkpoint)
    run = _run_config(root)
    if (root / "config.json").is_file() and not (root / CONFIG_NAME).is_file():
        method = (run.get("method") or {}).get("method")
        if method in _NOT_SERVABLE:
            raise FlyThinkerError(
                f"{root} is a {method} checkpoint, which does not decode as a plain language model; "
                "serve a FlyThinker, FlyThinker-shared or SFT checkpoint"
            )
        model = load_causal_lm(str(root)).eval()
        tokenizer = load_tokenizer(str(root))
        kind = method or "causal-lm"
        context = getattr(model.config, "max_position_embeddings", None)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    else:  # FlyThinker's loader explains every other directory (a run directory, a missing file)
        model = FlyThinker.from_pretrained(root).eval()
        if model.tokenizer is None:
            raise FlyThinkerError(f"{root} has no tokenizer files")
        tokenizer = model.tokenizer
        kind = model.reasoner_component.label
        context = model.context_length()
        eos = tokenizer.eos_token_id
    if eos is None:
        raise FlyThinkerError(f"{root}: neither the tokenizer nor the model names an EOS token")
    eos_ids = frozenset([eos] if isinstance(eos, int) else eos)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    budgets, defaults = _trained_settings(root, run)
    return ServedModel(str(root), role, kind, model, tokenizer, budgets, defaults, context, eos_ids, pad)


def _run_config(root: Path) -> dict:
    path = root / RUN_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise FlyThinkerError(f"cannot read {path}: {exc}") from None
    return config if isinstance(config, dict) else {}


def _trained_settings(root: Path, run_config: dict) -> tuple[PromptBudgets, GenerationConfig]:
    """The prompt budgets and repetition controls of the `flythinker run` that wrote the
    checkpoint (`flythinker train` records neither: the defaults then)."""
    run = run_config.get("run") or {}
    generation = run.get("generation") or {}
    try:
        budgets = PromptBudgets(**(run.get("budgets") or {}))
        defaults = GenerationConfig(
            repetition_penalty=generation.get("repetition_penalty", 1.0),
            no_repeat_ngram_size=generation.get("no_repeat_ngram_size", 0),
        )
    except TypeError as exc:
        raise FlyThinkerError(f"{root / RUN_CONFIG_NAME}: unexpected settings: {exc}") from None
    return budgets, defaults


# --------------------------------------------------------------------------- rows and batches


@dataclass
class Piece:
    """What one decode step released for one row: text (possibly none yet), and the lens."""

    text: str
    lens: dict | None = None
    finish_reason: str | None = None  # set on the row's last piece
    completion_tokens: int = 0  # set on the row's last piece


class DecodeFailed(RuntimeError):
    """The batch a row was in failed; the server's log has the traceback."""


class ReleasedText:
    """A row's text, released so that no piece is ever taken back.

    A multi-byte character waits for its last byte, and text that may begin a stop string waits
    until it cannot (OpenAI's ``stop``: the answer ends before the stop string).
    """

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.text = ""
        self.sent = 0  # characters released

    def update(self, text: str) -> tuple[str, bool]:
        """The newly releasable part of ``text`` (all text so far) and whether a stop string ended it."""
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        hits = [at for at in (text.find(s, self.sent) for s in self.stop) if at >= 0]
        if hits:
            return self._release(min(hits)), True
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._release(len(text) - held), False

    def flush(self, text: str) -> str:
        """All of ``text`` not yet released: the row has ended without a stop string."""
        self.text = text
        return self._release(len(text))

    def _release(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece


class Row:
    """One request's row: its prompt and settings, the worker's progress on it, and where its
    pieces go (an asyncio queue, fed from the decoding thread)."""

    def __init__(
        self, served: ServedModel, ids: list[int], max_tokens: int, generation: GenerationConfig,
        stop: tuple[str, ...], lens_top: int, seeded: bool,
    ) -> None:
        self.served, self.ids, self.max_tokens, self.generation = served, ids, max_tokens, generation
        self.lens_top = lens_top
        # Rows share a batch when they decode alike. One sampler draws for a whole batch, so a
        # seeded sample decodes alone: its draws must not depend on who else is in the batch.
        self.batch_key = (dataclasses.replace(generation, max_new_tokens=1, seed=0),
                          self if seeded and generation.do_sample else None)
        self.released = ReleasedText(stop)
        self.tokens: list[int] = []
        self.done = False  # ended or failed, by the worker
        self.dropped = False  # the client left; set on the event loop
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queue: asyncio.Queue[Piece | DecodeFailed] | None = None

    @property
    def live(self) -> bool:
        return not (self.done or self.dropped)

    def attach(self) -> None:
        """Deliver to the running event loop (call from it)."""
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def advance(self, token: int, lens_entry: dict | None) -> bool:
        """Take this row's token of one decode step; True when it ends the row."""
        if token in self.served.eos_token_ids:
            return self._end("stop")
        self.tokens.append(token)
        piece, stopped = self.released.update(self._text())
        if stopped:
            return self._end("stop", piece, lens_entry, flush=False)
        if len(self.tokens) == self.max_tokens:
            return self._end("length", piece, lens_entry)
        if piece or lens_entry:
            self._deliver(Piece(piece, lens_entry))
        return False

    def cut(self) -> None:
        """The batch ended first (its context ran out): end the row where it is."""
        self._end("length")

    def fail(self, error: DecodeFailed) -> None:
        self.done = True
        self._deliver(error)

    def _end(self, reason: str, piece: str = "", lens_entry: dict | None = None, flush: bool = True) -> bool:
        if flush:
            piece += self.released.flush(self._text())
        self.done = True
        self._deliver(Piece(piece, lens_entry, reason, len(self.tokens)))
        return True

    def _text(self) -> str:
        return self.served.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def _deliver(self, item: Piece | DecodeFailed) -> None:
        if not self.dropped:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _Settled(Exception):
    """Raised from a step callback to end a batch none of whose rows is live any more."""


class BatchWorker:
    """The thread that decodes one model's waiting rows, batch after batch."""

    def __init__(self, served: ServedModel, max_batch: int) -> None:
        self.served, self.max_batch = served, max_batch
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.wake = threading.Condition()
        self.closing = False
        # Written by the worker thread only.
        # row_steps: one per row per decode step it was computed in; a row whose client left, or
        # that ended, stops counting (it leaves the batch where the decoder can shrink it).
        self.counters = {"requests_served": 0, "requests_cancelled": 0, "decode_batches": 0, "rows_decoded": 0,
                         "row_steps": 0}
        self.thread = threading.Thread(target=self._serve, name=f"decode {served.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, row: Row) -> None:
        with self.wake:
            self.waiting.append(row)
            self.wake.notify()

    def close(self) -> None:
        """Stop after the current batch, which then ends at its next step."""
        with self.wake:
            self.closing = True
            for row in [*self.waiting, *self.running]:
                row.dropped = True
            self.wake.notify()
        self.thread.join()

    def stats(self) -> dict:
        return {**self.counters, "waiting": len(self.waiting)}

    def _serve(self) -> None:
        while True:
            with self.wake:
                while not self.waiting and not self.closing:
                    self.wake.wait()
                if self.closing:
                    return
                rows = self._take()
            if rows:
                self._decode(rows)

    def _take(self) -> list[Row]:
        """The oldest live waiting row and the waiting rows that can join it, in arrival order
        (call with ``wake`` held)."""
        limit = self.served.context_length
        batch: list[Row] = []
        width = steps = 0
        for row in list(self.waiting):
            if row.dropped:
                self.waiting.remove(row)
                self.counters["requests_cancelled"] += 1
                continue
            if len(batch) == self.max_batch or (batch and row.batch_key != batch[0].batch_key):
                continue
            # Left padding makes every row as long as the longest; the decoder cuts a batch that
            # would outgrow the context, so a row joins only where none would be cut.
            w, s = max(width, len(row.ids)), max(steps, row.max_tokens)
            if batch and limit is not None and w + s > limit:
                continue
            batch.append(row)
            width, steps = w, s
        for row in batch:
            self.waiting.remove(row)
        self.running = batch
        return batch

    def _decode(self, rows: list[Row]) -> None:
        served = self.served
        self.counters["decode_batches"] += 1
        self.counters["rows_decoded"] += len(rows)
        batch = collate([Encoded(row.ids, [-100] * len(row.ids)) for row in rows], served.pad_token_id)
        config = dataclasses.replace(rows[0].generation, max_new_tokens=max(row.max_tokens for row in rows))
        decoder = served.decoder()

        def on_token(tokens: torch.Tensor) -> None:
            self.counters["row_steps"] += len(decoder.rows)
            entries = self._lens(decoder, rows, tokens)
            for i, token in enumerate(tokens.tolist()):
                if rows[i].live and rows[i].advance(token, entries[i]):
                    self.counters["requests_served"] += 1
            if not any(row.live for row in rows):
                raise _Settled

        try:
            with torch.no_grad():
                decode(decoder, batch["input_ids"], batch["attention_mask"], config,
                       eos_token_id=sorted(served.eos_token_ids), pad_token_id=served.pad_token_id,
                       context_length=served.context_length, on_token=on_token,
                       unwanted=lambda: [i for i, row in enumerate(rows) if not row.live])
        except _Settled:
            pass
        except Exception as exc:  # one bad batch must not stop the server; its clients are told
            log.exception("decoding a batch of %d rows failed", len(rows))
            for row in rows:
                if row.live:
                    row.fail(DecodeFailed(f"decoding failed: {type(exc).__name__}: {exc}"))
        else:
            for row in rows:
                if row.live:
                    row.cut()
                    self.counters["requests_served"] += 1
        finally:
            self.running = []
        # Counted here, not as a step notices: a client may leave at any moment of a step.
        self.counters["requests_cancelled"] += sum(not row.done for row in rows)

    def _lens(self, decoder: StepDecoder, rows: list[Row], tokens: torch.Tensor) -> list[dict | None]:
        """Each row's lens entry for this step (None where not asked for or not live). The
        decoder's reasoning vectors are for the rows still in the batch (``decoder.rows``)."""
        wanted = [row.lens_top if row.live else 0 for row in rows]
        if not any(wanted):
            return [None] * len(rows)
        decode_token = self.served.tokenizer.decode
        probs, top = lens(self.served.model, decoder.reasoning(), max(wanted))
        in_batch = {row: at for at, row in enumerate(decoder.rows.tolist())}
        current = tokens[decoder.rows]
        written = probs.gather(1, current[:, None].to(probs.device))[:, 0].tolist()
        top_p = probs.gather(1, top).tolist()
        entries: list[dict | None] = []
        for i, k in enumerate(wanted):
            at = in_batch.get(i)
            entries.append(None if not k or at is None else {
                "token": decode_token([int(tokens[i])]),
                "p": round(written[at], 4),
                "top": [[decode_token([t]), round(p, 4)] for t, p in zip(top[at, :k].tolist(), top_p[at][:k])],
            })
        return entries


# --------------------------------------------------------------------------- requests


def _read(body: dict, name: str, kind: type, default: Any, valid: Callable[[Any], bool] | None = None,
          expect: str | None = None) -> Any:
    """``body[name]`` checked to be a JSON ``kind`` (and ``valid``); absent or null: ``default``."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        right_kind = isinstance(value, (int, float))
    else:
        right_kind = isinstance(value, kind)
    if isinstance(value, bool) and kind is not bool:
        right_kind = False
    if not right_kind or (valid is not None and not valid(value)):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise RequestError(f"'{name}' must be {expect or _JSON_KINDS[kind]}, got {shown}", param=name)
    return float(value) if kind is float else value


@dataclass
class Job:
    """A validated request: the row to decode, and how to answer."""

    row: Row
    worker: BatchWorker
    stream: bool
    chat: bool


def parse_request(body: dict, workers: dict[str, BatchWorker], chat: bool) -> Job:
    """Validate an OpenAI (chat) completion request and render its prompt; `RequestError` if bad."""
    primary = next(iter(workers))
    name = _read(body, "model", str, primary)
    if name not in workers:
        raise RequestError(f"model {name!r} is not served here; served: {', '.join(workers)}",
                           param="model", status=404, code="model_not_found")
    worker = workers[name]
    served = worker.served
    for unsupported, neutral in _UNSUPPORTED.items():
        if body.get(unsupported) is not None and body[unsupported] not in neutral:
            raise RequestError(f"'{unsupported}' is not supported by this server", param=unsupported)

    stream = _read(body, "stream", bool, False)
    temperature = _read(body, "temperature", float, 0.0, lambda v: math.isfinite(v) and v >= 0, "a number >= 0")
    top_p = _read(body, "top_p", float, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")
    seed = _read(body, "seed", int, None, lambda v: 0 <= v < 2**63, "an integer from 0 to 2**63 - 1")
    repetition_penalty = _read(body, "repetition_penalty", float, served.defaults.repetition_penalty,
                               lambda v: math.isfinite(v) and v > 0, "a number > 0 (1 disables it)")
    no_repeat = _read(body, "no_repeat_ngram_size", int, served.defaults.no_repeat_ngram_size,
                      lambda v: v >= 0, "an integer >= 0 (0 disables it)")
    lens_top = _read(body, "lens_top", int, 0, lambda v: 0 <= v <= MAX_LENS_TOP,
                     f"an integer from 0 to {MAX_LENS_TOP}")
    if lens_top and not served.has_lens:
        raise RequestError(f"'lens_top' needs a FlyThinker model; {served.id} is a {served.kind} model",
                           param="lens_top")
    stop = _stop_strings(body)
    limit_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _read(body, limit_name, int, None, lambda v: v >= 1, "an integer >= 1")

    ids = _prompt_ids(body, served, chat)
    room = None if served.context_length is None else served.context_length - len(ids)
    if room is not None and room < (max_tokens or 1):
        raise RequestError(
            f"the prompt has {len(ids)} tokens; with {limit_name}={max_tokens or 1} it would outgrow the model's "
            f"context of {served.context_length} tokens (at most {max(room, 0)} new tokens fit)",
            param="messages" if chat else "prompt", code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS if room is None else min(DEFAULT_MAX_TOKENS, room)
    sampled = temperature > 0
    generation = dataclasses.replace(
        served.defaults, max_new_tokens=max_tokens, do_sample=sampled,
        temperature=temperature if sampled else served.defaults.temperature,
        top_p=top_p if sampled else served.defaults.top_p,
        seed=seed if seed is not None else secrets.randbelow(2**31),
        repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat,
    )
    row = Row(served, ids, max_tokens, generation, stop, lens_top, seeded=seed is not None)
    return Job(row, worker, stream, chat)


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("'stop' must be a non-empty string or a list of them", param="stop")
    return tuple(stops)


def _prompt_ids(body: dict, served: ServedModel, chat: bool) -> list[int]:
    """The prompt's token ids: the profile form when a profile is given, else the prompt as is
    (completions) or through the chat template (chat)."""
    tokenizer = served.tokenizer
    if chat:
        messages = _messages(body)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            raise RequestError("send one prompt (a string) per request; concurrent requests are batched",
                               param="prompt")
        prompt = _read(body, "prompt", str, None)
        if not prompt:
            raise RequestError("'prompt' is missing or empty", param="prompt")

    profile = _read(body, "profile", list, None, lambda v: len(v) > 0, "a non-empty list of profile items")
    task = _read(body, "task", str, None, lambda v: v in TASKS, f"one of {', '.join(TASKS)}")
    if profile is None:
        if task is not None:
            raise RequestError("'task' needs a 'profile'", param="task")
        if not chat:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif len(messages) == 1 and messages[0]["role"] == "user":
            ids = tokenizer(apply_chat(tokenizer, messages[0]["content"]), add_special_tokens=False)["input_ids"]
        elif getattr(tokenizer, "chat_template", None):
            ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
        else:
            raise RequestError(f"{served.id}'s tokenizer has no chat template; send one user message",
                               param="messages")
        if not ids:
            raise RequestError("the prompt has no tokens", param="messages" if chat else "prompt")
        return ids

    if chat:
        if len(messages) != 1 or messages[0]["role"] != "user":
            raise RequestError("with a 'profile', send the query as one user message: the model was trained "
                               "on that prompt form (no system message, no earlier turns)", param="messages")
        prompt = messages[0]["content"]
    if not prompt.strip():
        raise RequestError("the query is empty", param="messages" if chat else "prompt")
    record = _profile_record(profile, prompt, task)
    rendered = build_prompt(record, tokenizer, "profile", budgets=served.budgets)
    return encode_prompts(tokenizer, [rendered], max_prompt_tokens=served.budgets.prompt_tokens)["input_ids"][0].tolist()


def _messages(body: dict) -> list[dict[str, str]]:
    messages = _read(body, "messages", list, None, lambda v: len(v) > 0, "a non-empty list of messages")
    if messages is None:
        raise RequestError("'messages' is missing", param="messages")
    for i, message in enumerate(messages):
        if not (isinstance(message, dict) and message.get("role") in ("system", "user", "assistant")
                and isinstance(message.get("content"), str)):
            raise RequestError(f"messages[{i}] must be an object with a 'role' (system, user or assistant) "
                               "and a string 'content'", param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _profile_record(items: list, query: str, task: str | None) -> LongLaMPRecord:
    """A one-user LongLaMP record from profile items and a query, as `flythinker write` builds it."""
    if task is None:
        task = task_of_profile(items)
        if task is None:
            keys = sorted(items[0]) if items and isinstance(items[0], dict) else []
            raise RequestError(f"cannot tell the task from profile item keys {keys}; "
                               f"send 'task' ({', '.join(TASKS)})", param="task")
    try:
        return one_user_record(task, query, items, record_id="request", location="request")
    except FlyThinkerError as exc:
        raise RequestError(str(exc), param="profile") from None


# --------------------------------------------------------------------------- answers


@dataclass
class Answer:
    """One request's answer in OpenAI's shape: a (chat) completion, whole or in chunks."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = field(init=False)
    created: int = field(init=False, default_factory=lambda: int(time.time()))
    first: bool = field(init=False, default=True)  # a chat stream names the role in its first chunk

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(self, piece: Piece) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": piece.text} if self.first else {"content": piece.text}
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": piece.text}
        self.first = False
        choice |= {"logprobs": None, "finish_reason": piece.finish_reason}
        if piece.lens is not None:
            choice["lens"] = piece.lens
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", choice)

    def whole(self, pieces: list[Piece]) -> dict:
        text = "".join(p.text for p in pieces)
        last = pieces[-1]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}} if self.chat else {"index": 0, "text": text}
        choice |= {"logprobs": None, "finish_reason": last.finish_reason}
        lens_steps = [{"text": p.text, **p.lens} for p in pieces if p.lens is not None]
        if lens_steps:
            choice["lens"] = lens_steps
        body = self._envelope("chat.completion" if self.chat else "text_completion", choice)
        body["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": last.completion_tokens,
                         "total_tokens": self.prompt_tokens + last.completion_tokens}
        return body

    def _envelope(self, kind: str, choice: dict) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": [choice]}


async def _pieces(job: Job) -> AsyncIterator[Piece]:
    """The row's pieces as the worker releases them. Leaving early (a client gone) drops the row."""
    job.row.attach()
    job.worker.submit(job.row)
    try:
        while True:
            item = await job.row.queue.get()
            if isinstance(item, DecodeFailed):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        job.row.dropped = True


async def _events(job: Job, answer: Answer) -> AsyncIterator[str]:
    async with contextlib.aclosing(_pieces(job)) as pieces:
        try:
            async for piece in pieces:
                yield f"data: {json.dumps(answer.chunk(piece))}\n\n"
        except DecodeFailed as exc:
            yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
    yield "data: [DONE]\n\n"


async def _collect(job: Job, request: Request) -> list[Piece] | None:
    """All of the row's pieces, or None when the client leaves first."""

    async def collect() -> list[Piece]:
        async with contextlib.aclosing(_pieces(job)) as pieces:
            return [piece async for piece in pieces]

    async def disconnected() -> None:
        # The body has been read, so the next message the server sends is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, left = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    await asyncio.wait({done_task, left}, return_when=asyncio.FIRST_COMPLETED)
    left.cancel()
    if not done_task.done():
        done_task.cancel()
        return None
    return done_task.result()


async def _json_body(request: Request) -> dict:
    size, chunks = 0, []
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise RequestError(f"the request body is over {MAX_BODY_BYTES // 2**20} MiB", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


# --------------------------------------------------------------------------- the app


def _server_stack() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FlyThinkerError("flythinker serve needs Starlette and uvicorn: pip install 'flythinker[serve]'") from None


def create_app(checkpoint: str, compare: str | None = None, max_batch: int = 8) -> Starlette:
    """The server's ASGI app, its models loaded; their decoding threads run while the app does.

    Starlette (FastAPI's core) without FastAPI's request models: the endpoints check their JSON
    themselves, to answer every bad field in OpenAI's error shape.

    Args:
        checkpoint: The checkpoint served by default (see `serve_command`).
        compare: A second checkpoint, served under its own model id.
        max_batch: Most rows decoded together per model.
    """
    _server_stack()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise FlyThinkerError(f"max_batch must be an integer >= 1, got {max_batch!r}")
    if compare is not None and Path(compare).resolve() == Path(checkpoint).resolve():
        raise FlyThinkerError("--compare names the served checkpoint itself; pass another one (e.g. SFT's)")
    served = [load_served_model(checkpoint, "primary")]
    if compare is not None:
        served.append(load_served_model(compare, "compare"))
    workers = {model.id: BatchWorker(model, max_batch) for model in served}
    page = resources.files("flythinker").joinpath("assets/serve/index.html").read_text(encoding="utf-8")
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        for worker in workers.values():
            worker.start()
        try:
            yield
        finally:
            for worker in workers.values():
                worker.close()

    async def refused(request: Request, exc: RequestError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(error_body(exc.detail, "invalid_request_error"), status_code=exc.status_code,
                            headers=exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # A bug: the client gets OpenAI's error shape, the log the traceback (Starlette re-raises).
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    async def complete(request: Request, chat: bool) -> Response:
        body = await _json_body(request)
        # Rendering a profile tokenizes it several times over: off the event loop.
        job = await run_in_threadpool(parse_request, body, workers, chat)
        answer = Answer(chat, job.row.served.id, len(job.row.ids))
        if job.stream:
            return StreamingResponse(_events(job, answer), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            pieces = await _collect(job, request)
        except DecodeFailed as exc:
            return JSONResponse(error_body(str(exc), "server_error"), status_code=500)
        if pieces is None:
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        return JSONResponse(answer.whole(pieces))

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": w.served.id, "object": "model", "created": started, "owned_by": "flythinker",
             "flythinker": w.served.describe()}
            for w in workers.values()
        ]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "models": {
            w.served.id: {**w.served.describe(), **w.stats()} for w in workers.values()
        }})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/", index),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={RequestError: refused, HTTPException: http_error, Exception: server_error})


def serve_command(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    compare: str | None = None,
    max_batch: int = 8,
) -> None:
    """Serve a checkpoint over OpenAI's HTTP API, with a web page that streams its text and reasoning lens.

    Concurrent requests are decoded together in batches. Extension fields (a LongLaMP `profile`,
    its `task`, `lens_top`) are described in the module `flythinker.commands.serve`.

    Args:
        checkpoint: A FlyThinker, FlyThinker-shared or SFT checkpoint directory
            (e.g. runs/demo/product_review/flythinker/checkpoint).
        host: Address to listen on; 0.0.0.0 also serves other machines (there is no authentication).
        port: TCP port to listen on.
        compare: A second checkpoint (e.g. the same run's SFT one), served under its own model id;
            the web page streams its text beside the first's for the same query.
        max_batch: Most requests decoded together in one batch, per model.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise FlyThinkerError(f"port must be an integer from 1 to 65535, got {port!r}")
    _server_stack()
    import uvicorn

    app = create_app(checkpoint, compare=compare, max_batch=max_batch)
    print(f"serving {checkpoint} at http://{host}:{port}/ (OpenAI API under /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
