"""`flythinker write`: stream one text for one user, optionally through the reasoning lens.

The reasoning lens projects each reasoning vector through the reasoner's own LM head: the tokens
it ranks highest are what the reasoner "thinks" as the generator writes that token (the paper's
fourth limitation, made visible). `--lens-out` saves the text as HTML coloured by how strongly the
lens anticipated each written token.
"""

from __future__ import annotations

import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from flythinker.config import GenerationConfig
from flythinker.data.collate import encode_prompts
from flythinker.data.longlamp import TASKS, LongLaMPRecord, one_user_record, task_of_profile
from flythinker.data.prompts import PromptBudgets, build_prompt
from flythinker.errors import FlyThinkerError
from flythinker.model.decoding import decode
from flythinker.model.flythinker import FlyThinker


@dataclass
class LensStep:
    token: str
    lens: list[tuple[str, float]]  # the reasoner's top tokens and their probabilities
    p_written: float  # the lens's probability of the token actually written


def read_profile(path: str, query: str, task: str | None) -> LongLaMPRecord:
    """A one-user record from a JSON profile: a list of items, or an object with "profile"."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FlyThinkerError(f"profile file {file} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlyThinkerError(f"profile file {file} is not valid JSON: {exc}") from None
    items = raw.get("profile") if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise FlyThinkerError(f"{file}: expected a non-empty list of profile items (or an object with one under 'profile')")
    if task is None:
        task = task_of_profile(items)
        if task is None:
            keys = sorted(items[0]) if isinstance(items[0], dict) else []
            raise FlyThinkerError(f"{file}: cannot tell the task from profile item keys {keys}; pass --task ({', '.join(TASKS)})")
    if task not in TASKS:
        raise FlyThinkerError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not query.strip():
        raise FlyThinkerError("--query is empty")
    return one_user_record(task, query, items, record_id="write", location=str(file))


def lens(model: FlyThinker, h: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities and ids of the reasoner head's ``top`` tokens for reasoning vectors ``h``."""
    head = model.reasoner.get_output_embeddings()
    probs = head(h.to(head.weight.dtype)).float().softmax(-1)
    return probs, probs.topk(top, dim=-1).indices


def write_command(
    checkpoint: str,
    profile: str,
    query: str,
    task: str | None = None,
    max_new_tokens: int = 300,
    do_sample: bool = False,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    show_reasoning: bool = False,
    lens_top: int = 3,
    lens_out: str | None = None,
    profile_tokens: int = 1250,
) -> None:
    """Write one text in a user's voice with a trained FlyThinker checkpoint, streamed to the terminal.

    Args:
        checkpoint: A FlyThinker checkpoint directory (e.g. runs/demo/product_review/flythinker/checkpoint).
        profile: JSON file with the user's history: a list of LongLaMP profile items of any task
            (reviews, abstracts, posts), or a LongLaMP record with a "profile" list.
        query: What to write, in the task's own words (e.g. the LongLaMP "input").
        task: product_review, abstract_generation or topic_writing; guessed from the profile's keys.
        max_new_tokens: Longest text in tokens.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Sampling seed.
        show_reasoning: Print each token on its own line beside the reasoner's top tokens (the
            reasoning lens) instead of streaming plain text.
        lens_top: How many lens tokens to show per written token.
        lens_out: Also save the text as HTML coloured by the lens (hover a token for its lens).
        profile_tokens: Token budget of the rendered profile.
    """
    record = read_profile(profile, query, task)
    model = FlyThinker.from_pretrained(checkpoint).eval()
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise FlyThinkerError(f"{checkpoint} has no tokenizer files")
    budgets = PromptBudgets(profile_tokens=profile_tokens)
    prompt = build_prompt(record, tokenizer, "profile", budgets=budgets)
    batch = encode_prompts(tokenizer, [prompt], max_prompt_tokens=budgets.prompt_tokens)
    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature, top_p=top_p, seed=seed)
    decoder = model.step_decoder()  # the checkpoint's own decoder (a shared reasoner has its own)
    written: list[int] = []
    steps: list[LensStep] = []

    def on_token(token: torch.Tensor) -> None:
        token_id = int(token[0])
        if token_id == tokenizer.eos_token_id:
            return
        before = tokenizer.decode(written, skip_special_tokens=True)
        written.append(token_id)
        piece = tokenizer.decode(written, skip_special_tokens=True)[len(before):]
        if show_reasoning or lens_out:
            # The reasoner's vector from reading every token before this one: its own reading of
            # this token, which the generator takes in with it at the next step (still current:
            # the decoder advances only after this callback returns).
            probs, top = lens(model, decoder.reasoning()[:1], lens_top)
            step = LensStep(piece, [(tokenizer.decode([int(i)]), float(probs[0, i])) for i in top[0]],
                            float(probs[0, token_id]))
            steps.append(step)
        if show_reasoning:
            shown = " | ".join(f"{t!r} {p:.2f}" for t, p in steps[-1].lens)
            print(f"{piece!r:>18}   lens: {shown}", flush=True)
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()

    with torch.no_grad():
        decode(decoder, batch["input_ids"], batch["attention_mask"], generation,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               context_length=model.context_length(), on_token=on_token)
    print()
    if lens_out:
        Path(lens_out).write_text(lens_html(steps, query), encoding="utf-8")
        print(f"lens view: {lens_out}", file=sys.stderr)  # stdout holds the text alone


def lens_html(steps: list[LensStep], title: str) -> str:
    """The text, each token shaded by the lens's probability of it, its lens in a tooltip."""
    spans = []
    for step in steps:
        tip = "\n".join(f"{t!r}: {p:.3f}" for t, p in step.lens)
        alpha = min(1.0, 0.1 + step.p_written)
        spans.append(
            f'<span title="{html.escape(tip)}" style="background: rgba(255,140,0,{alpha:.2f})">'
            f"{html.escape(step.token)}</span>"
        )
    return (
        "<!doctype html><meta charset='utf-8'><title>FlyThinker reasoning lens</title>"
        "<style>body{font:16px/1.7 Georgia,serif;max-width:46em;margin:2em auto;white-space:pre-wrap}"
        "p.note{font:13px sans-serif;color:#555}</style>"
        f"<h3>{html.escape(title)}</h3>"
        "<p class='note'>Shade: how likely the reasoner's vector, read through the reasoner's own LM head, "
        "made the token that was written. Hover a token for the lens's top tokens.</p>"
        f"<div>{''.join(spans)}</div>"
    )
