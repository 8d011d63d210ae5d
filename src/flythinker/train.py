"""The one training loop, for any model whose forward takes (input_ids, attention_mask, labels,
position_ids) and returns ``.loss``: FlyThinker and a plain Hugging Face causal LM (SFT) alike.

accelerate places the model and runs mixed precision and gradient accumulation; AdamW with a
warm-up + decay schedule; one line per optimizer step in ``train_log.jsonl``; the checkpoint is
written atomically as an inspectable directory with the resolved run config beside it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from flythinker.config import FlyThinkerConfig, TrainConfig
from flythinker.data.collate import Encoded, Example, collate, encode, read_prompt_target_jsonl
from flythinker.errors import FlyThinkerError
from flythinker.io import append_jsonl, atomic_directory, write_yaml
from flythinker.model import position_ids_from_mask

LOG_NAME = "train_log.jsonl"
RUN_CONFIG_NAME = "run_config.yaml"


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean loss of each optimizer step
    seconds: float  # wall time of the optimisation, excluding tokenisation and saving
    samples: int  # examples seen, counting repeats over epochs
    checkpoint: Path | None = None
    log_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example] | Sequence[Encoded],
    config: TrainConfig,
    *,
    run_config: Any = None,
    save: bool = True,
    show_progress: bool = True,
) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` (text pairs, or already tokenised `Encoded` items).

    Returns the per-step losses and timing; with ``save`` the model, tokenizer and ``run_config``
    (default: ``config``) are written to ``<output_dir>/checkpoint``.
    """
    if not examples:
        raise FlyThinkerError("no training examples")
    set_seed(config.seed)
    encoded = [
        item
        if isinstance(item, Encoded)
        else encode(tokenizer, item, config.max_prompt_tokens, config.max_target_tokens)
        for item in examples
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(
        encoded,  # type: ignore[arg-type]
        batch_size=config.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(config.seed),
        collate_fn=partial(collate, pad_token_id=pad),
    )
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum
    )
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    steps_per_epoch = math.ceil(len(loader) / config.grad_accum)
    total_steps = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    scheduler = get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    out_dir = Path(config.output_dir)
    log_path = out_dir / LOG_NAME
    if accelerator.is_main_process:
        _prepare_output_dir(out_dir)
        log_path.unlink(missing_ok=True)
    model.train()
    losses: list[float] = []
    micro_losses: list[float] = []
    samples = 0
    start = time.perf_counter()
    progress = tqdm(
        total=total_steps, desc="train", unit="step", disable=not (show_progress and accelerator.is_main_process)
    )
    while len(losses) < total_steps:
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(**batch, position_ids=position_ids_from_mask(batch["attention_mask"]))
                accelerator.backward(out.loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro_losses.append(out.loss.detach().float().item())
            samples += batch["input_ids"].shape[0]
            if not accelerator.sync_gradients:
                continue
            losses.append(sum(micro_losses) / len(micro_losses))
            micro_losses.clear()
            step = len(losses)
            progress.update()
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if accelerator.is_main_process and (step % config.log_every == 0 or step == total_steps):
                append_jsonl(
                    log_path,
                    {
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": losses[-1],
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": None if grad_norm is None else float(grad_norm),
                        "elapsed_s": round(time.perf_counter() - start, 3),
                    },
                )
            if step >= total_steps:
                break
    progress.close()
    seconds = time.perf_counter() - start
    model = accelerator.unwrap_model(model)
    model.eval()
    checkpoint = None
    if save and accelerator.is_main_process:
        checkpoint = save_checkpoint(model, tokenizer, out_dir / "checkpoint", run_config or config)
    return TrainResult(total_steps, losses, seconds, samples, checkpoint, log_path)


def save_checkpoint(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path, run_config: Any
) -> Path:
    """Model (its own ``save_pretrained`` layout), tokenizer and resolved run config, atomically."""
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        write_yaml(tmp / RUN_CONFIG_NAME, run_config)
    return path


def _prepare_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise FlyThinkerError(f"output directory {out_dir} is not writable: {exc.strerror}") from exc


def train_command(
    data: str,
    model: FlyThinkerConfig = FlyThinkerConfig(),  # noqa: B008 - jsonargparse reads the default
    training: TrainConfig = TrainConfig(),  # noqa: B008
) -> None:
    """Train a FlyThinker model (reasoner + generator, jointly) on prompt/target pairs.

    Writes ``<training.output_dir>/checkpoint`` (reasoner/, generator/, tokenizer,
    flythinker_config.json, run_config.yaml) and ``train_log.jsonl`` (one line per step).

    Args:
        data: JSONL file of {"prompt": ..., "target": ...} records (optional "id"); prompts are
            used verbatim, so apply any chat template beforehand.
        model: Which reasoner and generator, and how they are fused.
        training: Optimisation, batching and output settings.
    """
    from flythinker.model import FlyThinker

    examples = read_prompt_target_jsonl(data)
    flythinker = FlyThinker.from_config(model)
    assert flythinker.tokenizer is not None
    run_config = {"data": data, "model": model, "training": training}
    result = train(flythinker, flythinker.tokenizer, examples, training, run_config=run_config)
    print(
        f"trained {result.steps} steps on {len(examples)} examples in {result.seconds:.1f}s; "
        f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}\n"
        f"checkpoint: {result.checkpoint}\nlog: {result.log_path}"
    )
