"""The one training loop, for any model whose forward takes (input_ids, attention_mask,
position_ids) and returns ``.logits``: FlyThinker and a plain Hugging Face causal LM (SFT) alike.

accelerate runs it on one device or many (DDP, FSDP, DeepSpeed: `flythinker.training.engines`); AdamW
with a warm-up + decay schedule; one line per optimizer step in ``train_log.jsonl``; resumable
states every ``save_every`` steps (`flythinker.training.checkpoints`); the final model is written once,
gathered from every process, as the same inspectable ``checkpoint/`` directory whatever the
launcher.

The loss of a step is the cross-entropy summed over every labelled token the step trains on, on
all processes and micro-batches, divided by their number: each target token weighs the same
however the step is split. So gradient accumulation equals a bigger batch, N processes equal one
with the same global batch, and the loss curve does not depend on the launcher.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler

from flythinker.config import FlyThinkerConfig, TrainConfig
from flythinker.data.collate import (
    Encoded,
    Example,
    collate,
    encode,
    pad_id,
    read_prompt_target_jsonl,
)
from flythinker.errors import FlyThinkerError
from flythinker.io import append_jsonl, atomic_directory, to_plain, write_yaml
from flythinker.model.decoding import position_ids_from_mask
from flythinker.model.graphs import check_compile
from flythinker.training import checkpoints
from flythinker.training.engines import (
    configure_engine,
    distributed_kind,
    enable_gradient_checkpointing,
    make_accelerator,
    release_engine,
)
from flythinker.training.steps import StepPlan

LOG_NAME = "train_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"
RUN_CONFIG_NAME = "run_config.yaml"
# Settings that may change between a run and its resumption: they do not alter the updates.
RESUMABLE_CHANGES = frozenset({
    "output_dir",
    "report_to",
    "resume",
    "save_every",
    "keep_last",
    "log_every",
    "batch_size",
    "grad_accum",
    "compile",
    "eval_every",
    "keep_best",
})


@dataclass
class TrainResult:
    steps: int
    losses: list[float]  # mean loss of each optimizer step (of the whole run when resumed)
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
    eval_examples: Sequence[Example] | Sequence[Encoded] = (),
) -> TrainResult:
    """Fine-tune ``model`` on ``examples`` (text pairs, or already tokenised `Encoded` items).

    Returns the per-step losses and timing; with ``save`` the model, tokenizer and ``run_config``
    (default: ``config``) are written to ``<output_dir>/checkpoint``. With ``config.eval_every``,
    the loss on ``eval_examples`` is logged as training goes (``eval_log.jsonl``). Under
    `accelerate launch` every process calls this with the same arguments; ``batch_size`` is per
    process.
    """
    if not examples:
        raise FlyThinkerError("no training examples")
    if config.eval_every and not eval_examples:
        raise FlyThinkerError("training.eval_every needs evaluation examples (in the runner: a task with a validation split)")
    out_dir = Path(config.output_dir)
    prepare_output_dir(out_dir)

    def encoded_items(items):
        return [item if isinstance(item, Encoded) else encode(tokenizer, item, config.max_prompt_tokens, config.max_target_tokens)
                for item in items]

    encoded = encoded_items(examples)
    _check_context(model, examples, encoded)
    eval_encoded = encoded_items(eval_examples) if config.eval_every else []
    if eval_encoded:
        _check_context(model, eval_examples, eval_encoded, "evaluation example")
    accelerator = make_accelerator(config)
    if config.keep_best and distributed_kind(accelerator) in ("deepspeed", "fsdp"):
        raise FlyThinkerError(f"training.keep_best keeps whole weights: one process or DDP, not "
                              f"{distributed_kind(accelerator)}")
    plan = StepPlan(
        len(encoded),
        config.batch_size,
        accelerator.num_processes,
        config.grad_accum,
        config.epochs,
        config.max_steps,
        config.seed,
    )
    set_seed(config.seed)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    configure_engine(accelerator, model, config)
    optimizer = make_optimizer(model, config.lr, config.weight_decay, fused=distributed_kind(accelerator) != "fsdp")
    scheduler = get_scheduler(
        config.schedule,
        optimizer,
        num_warmup_steps=round(config.warmup_ratio * plan.total_steps),
        num_training_steps=plan.total_steps,
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    log_path = out_dir / LOG_NAME
    signature = _signature(config, plan, encoded, accelerator.unwrap_model(model))
    state = _start(accelerator, out_dir, log_path, signature, config.resume)
    resumed_from = state.step if state.losses else None
    pad = pad_id(tokenizer)
    model.train()
    progress = tqdm(
        total=plan.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        disable=not (show_progress and accelerator.is_main_process),
    )
    loop = _Loop(accelerator, model, optimizer, scheduler, plan, encoded, pad, config, log_path,
                 _loss_function(accelerator, config), eval_encoded)
    if config.report_to != "none":
        accelerator.init_trackers(out_dir.name or "flythinker", config=_hyperparameters(config, accelerator))
    try:
        with progress:  # closed on errors too, so a message after it starts on a line of its own
            loop.run(state, progress)
    finally:
        if config.report_to != "none":
            accelerator.end_training()  # flushes the tracker's files

    checkpoint = None
    if save:
        checkpoint = export_checkpoint(
            accelerator, model, tokenizer, out_dir / "checkpoint", run_config or config
        )
    release_engine(accelerator, model)
    accelerator.unwrap_model(model).eval()
    samples = sum(len(plan.step_examples(s)) for s in range(plan.total_steps))
    extra = {
        "processes": accelerator.num_processes,
        "global_batch": plan.global_batch,
        "main_process": accelerator.is_main_process,
        "resumed_from": resumed_from,
    }
    return TrainResult(
        plan.total_steps, state.losses, state.elapsed_s, samples, checkpoint, log_path, extra
    )


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with torch's fused kernel where it applies.

    On CPU torch's default AdamW updates one tensor at a time (a for-loop), which weighs most in short
    steps (43% of a batch-1 x 64-token step of the 0.5B shape; 4-7% at batch 4 x 256 on
    SmolLM2-135M, `bench/train_step_cpu.py`). The fused kernel does the same update: measured on 2
    CPU cores over SmolLM2-135M's shapes, 0.47 s per step against 1.96 s (foreach: 4.6 s), with
    weights within 3e-8 of the for-loop's after 8 steps. FSDP's sharded parameters keep the
    default (``fused=False``): the fused path is not what its GPU runs were verified with.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    usable = fused and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for p in trainable
    )
    return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, fused=True if usable else None)


# --------------------------------------------------------------------------- one step


def forward_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One micro-batch's forward and its summed next-token loss (what `TrainConfig.compile` compiles)."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=position_ids_from_mask(batch["attention_mask"]),
    )
    return token_cross_entropy_sum(out.logits, batch["labels"])


def _loss_function(accelerator: Accelerator, config: TrainConfig) -> Callable:
    if not config.compile:
        return forward_loss_sum
    kind = distributed_kind(accelerator)
    if kind in ("deepspeed", "fsdp"):
        raise FlyThinkerError(f"training.compile is not supported with {kind} (its sharding hooks); turn it off")
    check_compile([accelerator.device])
    return compiled_loss_sum()


def compiled_loss_sum() -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]:
    """`forward_loss_sum` through torch.compile, as `TrainConfig.compile` runs it.

    dynamic=True: batches are padded to their longest record, so lengths vary from step to step;
    one compilation with symbolic lengths serves them all instead of one per length.
    """
    return torch.compile(forward_loss_sum, dynamic=True)


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over the labelled tokens (labels unshifted, -100 ignored)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=-100,
        reduction="sum",
    )


@torch.no_grad()
def teacher_forced_losses(
    model: torch.nn.Module, encoded: Sequence[Encoded], pad_token_id: int, batch_size: int, device: torch.device
) -> list[tuple[float, int]]:
    """Per item, the summed next-token cross-entropy over its labelled tokens and their count
    (the model as it is: callers choose eval mode)."""
    losses = []
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[start : start + batch_size], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=position_ids_from_mask(batch["attention_mask"])).logits
        for row in range(logits.shape[0]):
            labels = batch["labels"][row : row + 1]
            losses.append((float(token_cross_entropy_sum(logits[row : row + 1], labels)), int((labels[:, 1:] != -100).sum())))
    return losses


def read_eval_log(path: Path) -> list[dict[str, Any]]:
    """The evaluations ``eval_log.jsonl`` holds (`TrainConfig.eval_every`), oldest first; none
    without the file."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _labelled_tokens(items) -> int:
    return sum(sum(1 for label in item.labels[1:] if label != -100) for item in items)


def _step_batches(
    plan: StepPlan, step: int, encoded: Sequence[Encoded], accelerator: Accelerator
) -> list[list[Encoded]]:
    """This process's micro-batches of ``step``; an empty one gets a row that carries no loss,
    so that every process still runs forward and backward and joins the gradient all-reduce."""
    micro = plan.micro_batches(step, accelerator.process_index)
    filler = encoded[plan.step_examples(step)[0]]
    blank = Encoded(filler.input_ids, [-100] * len(filler.labels))
    return [[encoded[i] for i in indices] or [blank] for indices in micro]


@dataclass
class _Loop:
    """The prepared pieces of one run, and the steps that use them."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    plan: StepPlan
    encoded: Sequence[Encoded]
    pad_token_id: int
    config: TrainConfig
    log_path: Path
    loss_sum: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # `forward_loss_sum`, maybe compiled
    eval_encoded: Sequence[Encoded] = ()  # examples `evaluate` scores every `config.eval_every` steps
    best_loss: float | None = None  # the lowest evaluation whose weights are kept (`config.keep_best`)

    def run(self, state: checkpoints.TrainerState, progress: tqdm) -> None:
        """Steps ``state.step`` to the end: train, log, and save a resumable state every so often."""
        config, plan = self.config, self.plan
        model = self.accelerator.unwrap_model(self.model)
        # A model may schedule something by the optimizer step (FlyThinker's lambda warm-up); it is
        # told each step's index, so a resumed run follows the schedule exactly.
        schedule = getattr(model, "set_training_step", None)
        log_values = getattr(model, "training_log_values", None)
        eval_log = self.log_path.parent / EVAL_LOG_NAME
        if config.eval_every:
            if self.accelerator.is_main_process:  # a resumed run drops evaluations past its state
                checkpoints.rewrite_log(eval_log, state.step)
            # A resumed run keeps the best its earlier session found: replayed steps give the same
            # weights and losses, so they do not displace it.
            best = checkpoints.read_best(eval_log.parent / checkpoints.BEST_DIR) if config.keep_best else None
            self.best_loss = None if best is None else best["loss"]
            if state.step % config.eval_every == 0 and state.step not in {row["step"] for row in read_eval_log(eval_log)}:
                self.evaluate(state, eval_log, progress)
        for step in range(state.step, plan.total_steps):
            if schedule is not None:
                schedule(step, plan.total_steps)
            lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
            start = time.perf_counter()
            loss, grad_norm, tokens = self.step(step)
            seconds = time.perf_counter() - start
            state.elapsed_s += seconds
            state.losses.append(loss)
            state.step = step + 1
            progress.update()
            progress.set_postfix(loss=f"{loss:.4f}")
            if config.report_to != "none":  # accelerate logs from the main process only
                scalars = {"train/loss": loss, "train/lr": lr, "train/target_tokens_per_s": tokens / max(seconds, 1e-9)}
                if grad_norm is not None:
                    scalars["train/grad_norm"] = grad_norm
                scalars.update({f"fusion/{k}": v for k, v in (log_values() if log_values is not None else {}).items()})
                self.accelerator.log(scalars, step=state.step)
            if self.accelerator.is_main_process and (
                state.step % config.log_every == 0 or state.step == plan.total_steps
            ):
                append_jsonl(
                    self.log_path,
                    {
                        "step": state.step,
                        "epoch": round(plan.epoch_of(state.step), 4),
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "elapsed_s": round(state.elapsed_s, 3),
                        **(log_values() if log_values is not None else {}),
                    },
                )
            if config.eval_every and (state.step % config.eval_every == 0 or state.step == plan.total_steps):
                self.evaluate(state, eval_log, progress)
            if config.save_every and state.step % config.save_every == 0:
                root = self.log_path.parent / checkpoints.STATES_DIR
                checkpoints.save_state(self.accelerator, root, state, config.keep_last)
        if schedule is not None:  # trained: evaluation and decoding use the full schedule
            schedule(plan.total_steps, plan.total_steps)

    def evaluate(self, state: checkpoints.TrainerState, eval_log: Path, progress: tqdm) -> None:
        """Log the loss per target token on the evaluation examples at this step.

        Every process runs the same forwards (a sharded model needs all of them); no gradient,
        dropout off, no random numbers drawn, so training continues exactly as without it. A
        model with a schedule (FlyThinker's lambda warm-up) is judged at its schedule's end, as it
        will decode: keep_best keeps these weights for decoding, so a point scored at the warm-up's
        small lambda of the moment would look like SFT and decode far worse. The next step sets its
        own schedule again.
        """
        schedule = getattr(self.accelerator.unwrap_model(self.model), "set_training_step", None)
        if schedule is not None:
            schedule(self.plan.total_steps, self.plan.total_steps)
        self.model.eval()
        try:
            pairs = teacher_forced_losses(self.model, self.eval_encoded, self.pad_token_id, self.config.batch_size,
                                          self.accelerator.device)
        finally:
            self.model.train()
        tokens = sum(n for _, n in pairs)
        loss = sum(total for total, _ in pairs) / max(tokens, 1)
        progress.set_postfix(eval_loss=f"{loss:.4f}")
        if self.config.report_to != "none":
            self.accelerator.log({"eval/loss": loss}, step=state.step)
        if self.accelerator.is_main_process:
            append_jsonl(eval_log, {"step": state.step, "epoch": round(self.plan.epoch_of(state.step), 4),
                                    "loss": loss, "tokens": tokens, "records": len(pairs)})
            if self.config.keep_best and (self.best_loss is None or loss < self.best_loss):
                checkpoints.save_best(self.accelerator.unwrap_model(self.model), eval_log.parent / checkpoints.BEST_DIR,
                                      state.step, loss)
                self.best_loss = loss
        self.accelerator.wait_for_everyone()

    def step(self, step: int) -> tuple[float, float | None, int]:
        """Forward and backward over this process's micro-batches of ``step``, then one update.

        Returns the step's loss (averaged over its labelled tokens on all processes), the
        gradient norm before clipping (None when not clipping) and the labelled tokens of the step.
        """
        accelerator, config = self.accelerator, self.config
        tokens = max(_labelled_tokens(self.encoded[i] for i in self.plan.step_examples(step)), 1)
        # accelerate divides each backward by grad_accum and DDP/FSDP average over processes;
        # undo both so the gradient is the token-weighted mean over the whole step.
        scale = accelerator.num_processes * config.grad_accum / tokens
        summed = torch.zeros((), device=accelerator.device)
        grad_norm = None
        for items in _step_batches(self.plan, step, self.encoded, accelerator):
            batch = {
                k: v.to(accelerator.device) for k, v in collate(items, self.pad_token_id).items()
            }
            with accelerator.accumulate(self.model):
                loss_sum = self.loss_sum(self.model, batch)
                accelerator.backward(loss_sum * scale)
                summed += loss_sum.detach()
                if accelerator.sync_gradients:
                    grad_norm = self._update()
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation lost step with the trainer's micro-batches")
        return float(accelerator.reduce(summed, "sum")) / tokens, grad_norm, tokens

    def _update(self) -> float | None:
        norm = None
        if self.config.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(
                self.model.parameters(), self.config.max_grad_norm
            )
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # an fp16 overflow leaves the lr as is
            self.scheduler.step()
        self.optimizer.zero_grad()
        return None if norm is None else float(norm)


# --------------------------------------------------------------------------- run directory


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it is writable, before any expensive work starts."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{id(out_dir)}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise FlyThinkerError(
            f"output directory {out_dir} is not writable: {exc.strerror or exc}"
        ) from exc


def _start(
    accelerator: Accelerator, out_dir: Path, log_path: Path, signature: dict, resume: bool
) -> checkpoints.TrainerState:
    """Resume from the newest state in ``out_dir`` or start afresh (clearing an old run's state)."""
    root = out_dir / checkpoints.STATES_DIR
    found = checkpoints.state_dirs(root)
    if resume and found:
        saved = checkpoints.read_state(found[-1])
        _check_signature(out_dir, saved.signature, signature)
        state = checkpoints.load_state(accelerator, found[-1])
        if accelerator.is_main_process:
            checkpoints.rewrite_log(log_path, state.step)
        accelerator.wait_for_everyone()
        return state
    accelerator.wait_for_everyone()  # every process has looked before the main one clears
    if accelerator.is_main_process:
        checkpoints.clear_states(root)
        log_path.unlink(missing_ok=True)
        (out_dir / EVAL_LOG_NAME).unlink(missing_ok=True)
        shutil.rmtree(out_dir / checkpoints.BEST_DIR, ignore_errors=True)
    accelerator.wait_for_everyone()
    return checkpoints.TrainerState(signature=signature)


def _hyperparameters(config: TrainConfig, accelerator: Accelerator) -> dict[str, Any]:
    """The run's settings as a tracker records them: flat scalars (lists as text)."""
    values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in to_plain(config).items()}
    return {**values, "processes": accelerator.num_processes}


def _signature(config: TrainConfig, plan: StepPlan, encoded: Sequence[Encoded], model: Any) -> dict:
    """What a resumed run must share with the saved one for the updates to continue unchanged."""
    digest = hashlib.sha256()
    for item in encoded:
        digest.update(array("q", item.input_ids).tobytes())
        digest.update(array("q", item.labels).tobytes())
    settings = {k: v for k, v in to_plain(config).items() if k not in RESUMABLE_CHANGES}
    model_config = getattr(model, "config", None)
    if dataclasses.is_dataclass(model_config):
        model_config = to_plain(model_config)
    elif hasattr(model_config, "to_diff_dict"):
        model_config = model_config.to_diff_dict()
    signature = {
        "settings": settings,
        "global_batch": plan.global_batch,
        "examples": len(encoded),
        "data_sha256": digest.hexdigest(),
        "model": to_plain(model_config) if model_config is not None else type(model).__name__,
    }
    return json.loads(json.dumps(signature, default=str))  # as it reads back from the state


def _check_signature(out_dir: Path, saved: dict, current: dict) -> None:
    changed = _differences(saved, current)
    if changed:
        raise FlyThinkerError(
            f"{out_dir} holds a run with other data or settings ({'; '.join(changed[:4])}); rerun "
            "with the same ones to resume it, pass --training.resume false to start over there, "
            "or choose another output_dir"
        )


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found: list[str] = []
        for key in sorted(set(saved) | set(current), key=str):
            found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
        return found
    saved, current = to_plain(saved), to_plain(current)
    if saved == current or (
        isinstance(saved, list) and isinstance(current, tuple) and saved == list(current)
    ):
        return []
    return [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]


def _check_context(model: Any, examples: Sequence, encoded: Sequence[Encoded], kind: str = "example") -> None:
    """Fail before training, naming the example, if a sequence exceeds the model's context."""
    limit = (
        model.context_length()
        if hasattr(model, "context_length")
        else getattr(getattr(model, "config", None), "max_position_embeddings", None)
    )
    if not limit:
        return
    longest = max(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    length = len(encoded[longest].input_ids)
    if length > limit:
        name = getattr(examples[longest], "id", longest)
        raise FlyThinkerError(
            f"{kind} {name!r} is {length} tokens (prompt + target + EOS) but the models' context "
            f"is {limit}; lower max_prompt_tokens / max_target_tokens"
        )


# --------------------------------------------------------------------------- export


def export_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    run_config: Any,
) -> Path:
    """Write the trained model as ``checkpoint/``, the same layout whatever the launcher.

    Every process must call this: under FSDP and DeepSpeed the full weights are gathered from
    all of them; the main process alone writes.
    """
    sharded = distributed_kind(accelerator) in ("fsdp", "deepspeed")
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        save_checkpoint(accelerator.unwrap_model(model), tokenizer, path, run_config, state_dict)
    accelerator.wait_for_everyone()
    return path


def save_checkpoint(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    run_config: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Model (its own ``save_pretrained`` layout), tokenizer and resolved run config, atomically.

    ``state_dict`` holds the full weights when the model's own parameters are shards.
    """
    with atomic_directory(path) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp)  # type: ignore[operator]
        else:
            model.save_pretrained(tmp, state_dict=state_dict)  # type: ignore[operator]
        tokenizer.save_pretrained(tmp)
        write_yaml(tmp / RUN_CONFIG_NAME, run_config)
    return path


# --------------------------------------------------------------------------- command


def train_command(
    data: str,
    model: FlyThinkerConfig = FlyThinkerConfig(),  # noqa: B008 - jsonargparse reads the default
    training: TrainConfig = TrainConfig(),  # noqa: B008
    eval_data: str | None = None,
) -> None:
    """Train a FlyThinker model (reasoner + generator, jointly) on prompt/target pairs.

    Writes ``<training.output_dir>/checkpoint`` (reasoner/, generator/, tokenizer,
    flythinker_config.json, run_config.yaml) and ``train_log.jsonl`` (one line per step); with
    ``training.save_every``, resumable states under ``states/``. Launch it with `accelerate launch
    --config_file configs/accelerate/<engine>.yaml -m flythinker train ...` for several devices.

    Args:
        data: JSONL file of {"prompt": ..., "target": ...} records (optional "id"); prompts are
            used verbatim, so apply any chat template beforehand.
        model: Which reasoner and generator, and how they are fused.
        training: Optimisation, batching and output settings.
        eval_data: A JSONL file like ``data`` whose loss is logged every ``training.eval_every``
            steps (``eval_log.jsonl``); needed when eval_every is set.
    """
    from flythinker.model.flythinker import FlyThinker

    examples = read_prompt_target_jsonl(data)
    eval_examples = read_prompt_target_jsonl(eval_data) if eval_data else []
    if training.eval_every and not eval_examples:
        raise FlyThinkerError("training.eval_every needs --eval_data (prompt/target pairs to evaluate on)")
    prepare_output_dir(Path(training.output_dir))  # before minutes of model loading
    flythinker = FlyThinker.from_config(model)
    assert flythinker.tokenizer is not None
    run_config = {"data": data, "eval_data": eval_data, "model": model, "training": training}
    result = train(flythinker, flythinker.tokenizer, examples, training, run_config=run_config,
                   eval_examples=eval_examples)
    if result.extra.get("main_process", True):
        if result.extra.get("resumed_from") is not None:
            print(f"resumed from the state at step {result.extra['resumed_from']}")
        losses = result.losses
        trend = (f"loss {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last)" if len(losses) > 1
                 else f"loss {losses[0]:.4f} (one step: no trend yet)") if losses else "no new steps"
        print(
            f"trained {result.steps} step(s) on {len(examples)} examples in {result.seconds:.2f}s; {trend}\n"
            f"checkpoint: {result.checkpoint}\nlog: {result.log_path}"
        )
