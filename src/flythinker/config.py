"""Typed configuration for every knob: the model, training and decoding.

Each dataclass validates itself in ``__post_init__`` so a bad value fails where it is set, with a
message that names the field, rather than deep inside torch many minutes later.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flythinker.errors import FlyThinkerError

Fusion = Literal["pad", "linear"]
Gate = Literal["none", "scalar", "vector"]
ProjectionInit = Literal["random", "zero"]
DType = Literal["float32", "bfloat16", "float16"]
Overlap = Literal["none", "streams", "devices"]
MixedPrecision = Literal["no", "bf16", "fp16"]
Schedule = Literal["cosine", "linear", "constant"]
# accelerate's experiment trackers (accelerate.utils.LoggerType), and "none".
TRACKERS = ("none", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "trackio", "swanlab")


# `FlyThinkerConfig.reasoner` value that makes the generator its own reasoner (plus an adapter).
SHARED_REASONER = "shared"


def require(condition: bool, message: str) -> None:
    """Raise FlyThinkerError(message) unless ``condition``: the form of every config check."""
    if not condition:
        raise FlyThinkerError(message)


@dataclass
class FlyThinkerSettings:
    """How the reasoner's vectors enter the generator (README, "The method, as implemented"),
    and the adapter of a shared reasoner: every knob of the method, defined once. A run's method
    rows (`flythinker.methods.MethodConfig`) inherit these fields, so a new knob is one field here
    (and its check below) plus the code that uses it.

    The defaults here are the published method, so a run's method row that leaves them out (the
    paper's config and its ablations) reproduces the paper. A model built directly
    (`FlyThinkerConfig`, `flythinker train`) defaults instead to what the real-data study found
    best: with a same-model pair the published pad fusion ends far worse than SFT, while
    ``fusion="linear", projection_init="zero"`` starts exactly at SFT and ends level with it
    (docs/results/start_at_sft.md).

    Attributes:
        lam: lambda, the weight of the reasoning vector in the generator's input. 0 recovers
            plain SFT exactly; the paper finds 0.2-2 beats SFT and 5 degrades. Published: 0.5.
        rescale: Scale each reasoning vector to the mean L2 norm of the generator's embedding
            table (both norms detached), as the published code does; raw hidden states are often
            10-100x larger than token embeddings and would swamp them.
        fusion: How a d_R-dim vector enters a d_G-dim embedding: "pad" adds it into the first
            d_R dimensions (published; needs d_R <= d_G), "linear" learns a projection.
        lam_warmup: Fraction of the optimizer steps over which lambda rises linearly from 0 to
            ``lam`` (0: none, as published). The first update is then made exactly as SFT's. The
            factor is computed from the step alone, so a resumed run follows it exactly.
        gate: A learned multiplier on the signal, initialised at zero so training starts exactly
            at SFT and opens it only as far as the loss asks: "none" (published), "scalar" or
            "vector" (one per generator dimension).
        gate_scale: The gate is stored divided by this, so it moves this many times faster than
            the weights: AdamW moves every parameter by about lr per step whatever its gradient,
            and a gate stored as is would need ~1/lr steps to open.
        projection_init: With fusion="linear": "random" (nn.Linear's default; the vector is
            projected, then rescaled) or "zero" (the vector is rescaled, then projected by a
            matrix that starts at zero: FlyThinker starts exactly at SFT and the direction the
            generator reads is learned, not inherited from the reasoner's next-token direction).
            Pad fusion has no projection: a model's config (default "zero") ignores it there, a
            run's method row (default "random") refuses "zero" with it.
        projection_scale: The projection is stored divided by this (1: as is), so it moves this
            many times faster than the weights, for the reason gate_scale exists: a projection
            that starts at zero opens by about lr per entry per step, and at a fine-tuning lr it
            stays shut (measured: spectral norm 0.07 after 48 steps at 5e-5, docs/method.md).
            A random projection with rescale on is rescaled after projecting, which cancels the
            scale, so that pairing is refused.
        lora_rank: Rank of the reasoner's LoRA adapter when reasoner="shared".
        lora_alpha: LoRA scale numerator when reasoner="shared" (the update is alpha/rank * BA).
        lora_targets: Linear layers of each decoder block that get the adapter, by name (e.g.
            ["q_proj", "v_proj"]); empty (default) adapts all of them. On a GPU each adapted layer
            adds two small kernels to a decode step, which at batch 1 cost about as much as the
            layer itself; fewer targets decode faster and give the reasoner less room to differ.
        train_reasoner: Train the reasoner's own weights (the separate model, or the shared
            reasoner's adapter) with the generator, as published. False keeps them as loaded and
            trains only the generator and the fusion: the signal path then adds no capacity of its
            own (measured: opened, it overfits 64 training records; docs/results/start_at_sft.md).
        signal_dropout: In training only, drop each position's whole reasoning vector with this
            probability (the rest scaled by 1/(1-p)), so the generator cannot lean on every one;
            0 (published) never drops. Decoding is unaffected.
    """

    lam: float = 0.5
    rescale: bool = True
    fusion: Fusion = "pad"
    lam_warmup: float = 0.0
    gate: Gate = "none"
    gate_scale: float = 100.0
    projection_init: ProjectionInit = "random"
    projection_scale: float = 1.0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: list[str] = dataclasses.field(default_factory=list)
    train_reasoner: bool = True
    signal_dropout: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.train_reasoner, bool), f"train_reasoner must be true or false, got {self.train_reasoner!r}")
        require(
            isinstance(self.signal_dropout, (int, float)) and 0 <= self.signal_dropout < 1,
            f"signal_dropout must be in [0, 1), got {self.signal_dropout!r}",
        )
        require(
            isinstance(self.lora_rank, int) and self.lora_rank >= 1,
            f"lora_rank must be an integer >= 1, got {self.lora_rank!r}",
        )
        require(
            isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
            f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}",
        )
        require(
            isinstance(self.lora_targets, list) and all(isinstance(t, str) and t for t in self.lora_targets),
            f"lora_targets must be a list of layer names, got {self.lora_targets!r}",
        )
        require(
            isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0,
            f"lam (lambda) must be a finite number >= 0, got {self.lam!r}",
        )
        require(
            self.fusion in ("pad", "linear"),
            f"fusion must be 'pad' or 'linear', got {self.fusion!r}",
        )
        require(
            isinstance(self.lam_warmup, (int, float)) and 0 <= self.lam_warmup <= 1,
            f"lam_warmup must be a fraction of the steps in [0, 1], got {self.lam_warmup!r}",
        )
        require(
            self.gate in ("none", "scalar", "vector"),
            f"gate must be 'none', 'scalar' or 'vector', got {self.gate!r}",
        )
        require(
            isinstance(self.gate_scale, (int, float)) and math.isfinite(self.gate_scale) and self.gate_scale > 0,
            f"gate_scale must be a finite number > 0, got {self.gate_scale!r}",
        )
        require(
            isinstance(self.projection_scale, (int, float)) and math.isfinite(self.projection_scale)
            and self.projection_scale > 0,
            f"projection_scale must be a finite number > 0, got {self.projection_scale!r}",
        )
        require(
            self.projection_scale == 1.0 or self.fusion == "linear",
            "projection_scale needs fusion='linear' (pad fusion has no projection)",
        )
        require(
            self.projection_scale == 1.0 or self.projection_init == "zero" or not self.rescale,
            "projection_scale changes nothing with projection_init='random' and rescale on: the "
            "projected vector is rescaled after the projection, which cancels the scale",
        )
        require(
            self.projection_init in ("random", "zero"),
            f"projection_init must be 'random' or 'zero', got {self.projection_init!r}",
        )
        # Where "zero" is not the default, asking for it with pad fusion is a mistake worth naming
        # (the start-at-SFT projection without fusion: linear); where it is, pad simply ignores it.
        require(
            self.projection_init == "random" or self.fusion == "linear" or type(self).projection_init == "zero",
            "projection_init='zero' needs fusion='linear' (pad fusion has no projection)",
        )



@dataclass
class FlyThinkerConfig(FlyThinkerSettings):
    """A FlyThinker model: which reasoner and generator, and the method's settings (inherited
    from `FlyThinkerSettings`, documented there). Saved as ``flythinker_config.json``.

    Attributes:
        reasoner: Reasoner model: a local directory, a built-in alias (see `flythinker.model.sources`)
            or a Hugging Face hub id. A saved checkpoint records it for provenance. "shared"
            makes the reasoner the generator's own weights plus a LoRA adapter
            (`flythinker.model.reasoners.AdapterReasoner`): one model in memory, both roles read it
            once per step.
        generator: Generator model, resolved the same way; its tokenizer is the one both share.
        dtype: Weight dtype of both models; float32 is what the exactness tests use.
    """

    reasoner: str = "tiny"
    generator: str = "tiny"
    dtype: DType = "float32"
    # The study's best setting, not the published one (see `FlyThinkerSettings`).
    fusion: Fusion = "linear"
    projection_init: ProjectionInit = "zero"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(
            self.dtype in ("float32", "bfloat16", "float16"),
            f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}",
        )

    def to_json_file(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_json_file(cls, path: Path) -> FlyThinkerConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FlyThinkerError(f"cannot read FlyThinker config {path}: {exc}") from exc
        if isinstance(raw, dict):  # saved before projection_init existed: its projection was random
            raw.setdefault("projection_init", "random")
        return from_dict(cls, raw, source=str(path))


@dataclass
class GenerationConfig:
    """Decoding settings, the same for every method of a comparison.

    Attributes:
        max_new_tokens: Most tokens generated per prompt (published: 1536).
        do_sample: False decodes greedily; True samples with temperature, top_k and top_p.
        temperature: Softmax temperature when sampling (published: 0.8).
        top_p: Nucleus sampling mass; 1 disables it (published: 0.95).
        top_k: Keep only the k most likely tokens when sampling; 0 disables it.
        seed: Seed of the sampler, so a sampled run can be repeated exactly.
        repetition_penalty: Divide the logit (multiply, if negative) of every token already
            generated by this (transformers' RepetitionPenaltyLogitsProcessor); 1 disables it.
            Small models loop on one sentence, which drowns any difference between methods.
            Counted over the generated text only, not the prompt, whose profile words a
            personalised text should be free to reuse. The same for every method.
        no_repeat_ngram_size: Never generate an n-gram of this many tokens twice in one text
            (transformers' NoRepeatNGramLogitsProcessor, over the generated text); 0 disables it.
        overlap: "none" runs the reasoner step then the generator step; "streams" runs them on
            two CUDA streams of one GPU; "devices" when the two models sit on different devices.
        cuda_graphs: Decode on static KV caches and replay each step from a CUDA graph (CUDA
            only). At small batches a GPU step is bound by kernel launches; a graph launches the
            whole step at once. Costs one static cache of prompt + max_new_tokens slots per model.
        compile: Decode on static KV caches and run each step through ``torch.compile``
            (inductor; on a CPU it needs a C++ compiler), which fuses the step's many small
            kernels; with cuda_graphs the compiled step is replayed from a graph. Compiles once
            per batch size and cache length (rounded up to 256 slots), then every later call of
            that shape in the process reuses it: worth it for long runs and servers, not for a
            few short texts.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    overlap: Overlap = "none"
    cuda_graphs: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"temperature must be > 0, got {self.temperature}",
        )
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        require(
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
            f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}",
        )
        require(
            self.no_repeat_ngram_size >= 0,
            f"no_repeat_ngram_size must be >= 0 (0 disables it), got {self.no_repeat_ngram_size}",
        )
        require(
            self.overlap in ("none", "streams", "devices"),
            f"overlap must be none, streams or devices, got {self.overlap!r}",
        )


@dataclass
class TrainConfig:
    """One training run: optimisation, batching and where results go.

    Published settings (3B models on LongLaMP): AdamW, lr 5e-6, weight decay 0.025, 5 epochs, bf16.

    Attributes:
        output_dir: Run directory: the checkpoint, train_log.jsonl and run_config.yaml go here.
        epochs: Passes over the training data (fractions allowed).
        max_steps: Exactly this many optimizer steps, cycling through the data as often as that
            takes (overrides epochs, as in transformers' Trainer); 0: run ``epochs``.
        batch_size: Examples per forward pass.
        grad_accum: Forward passes per optimizer step (effective batch = batch_size * grad_accum).
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: Fraction of the steps spent warming the learning rate up from 0.
        schedule: Learning-rate schedule after warm-up: cosine, linear or constant.
        max_grad_norm: Clip the global gradient norm to this; 0 disables clipping.
        mixed_precision: "no", "bf16" or "fp16" autocast through accelerate (weights, gradients
            and their all-reduce stay fp32). Unset: the launcher's setting (`accelerate launch
            --mixed_precision` or its config file), else "no".
        seed: Seed of weights initialised here, data order and dropout.
        log_every: Write a line to train_log.jsonl every this many optimizer steps.
        max_prompt_tokens: Longest prompt in tokens (published profile 1250 + query 300); a
            longer one keeps its end, where the query is. `flythinker run` raises it, where
            lower, to what its prompt budgets allow, so training never cuts what decoding keeps.
        max_target_tokens: Longest target in tokens (published 1000); a longer one keeps its
            start. `flythinker run` raises it, where lower, to its target budget plus what a
            method puts before the answer (CoT's rationale and marker).
        gradient_checkpointing: Recompute each decoder layer's activations in the backward pass
            (reasoner and generator both): much less activation memory for about a third more
            compute.
        compile: Run each training forward and its loss through ``torch.compile`` (inductor;
            on a CPU it needs a C++ compiler), which fuses the elementwise work between the
            matmuls, forward and backward. Compiled once with dynamic shapes, since batches differ
            in length; the first step pays the compilation. Single process or DDP (DeepSpeed and
            FSDP are refused). Changes how a step runs, not what it computes: a run may resume
            with it switched.
        eval_every: Every this many optimizer steps (and before the first and after the last),
            the teacher-forced loss per target token on the evaluation examples (the runner: the
            task's validation split), one line each in output_dir/eval_log.jsonl: the curve that
            shows when a run starts to overfit. 0 evaluates never. Changes nothing trained.
            FlyThinker under a lambda warm-up is scored at its full lambda, as it decodes.
        keep_best: With eval_every, also keep the weights of the evaluation with the lowest loss
            (output_dir/best/: model.safetensors and best.json with its step and loss), so that
            early stopping can be judged on held-out data afterwards (the runner reports the
            held-out loss of those weights). The exported checkpoint stays the last step's.
        save_every: Save a resumable training state (model, optimizer, scheduler, RNG states,
            step) under output_dir/states every this many optimizer steps; 0 saves none.
        keep_last: How many of those states to keep; older ones are deleted once a newer one is
            complete.
        resume: Continue from the newest state under output_dir/states when there is one, so
            rerunning the same command after a crash or kill picks the run up where it was
            saved. It refuses (naming the difference) if the data or settings changed. False
            starts afresh, deleting that directory's states and train_log.jsonl.
        report_to: Also log each step (loss, learning rate, gradient norm, target tokens per
            second, the fusion's lambda and gate) to an experiment tracker, from the main process
            only, under output_dir/tracking: "none" (train_log.jsonl only, always written),
            "tensorboard", "wandb" (offline unless WANDB_MODE says otherwise), or another of
            accelerate's trackers. The tracker's package must be installed.
    """

    output_dir: str = "runs/train"
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5e-6
    weight_decay: float = 0.025
    warmup_ratio: float = 0.0
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0
    mixed_precision: MixedPrecision | None = None
    seed: int = 0
    log_every: int = 1
    max_prompt_tokens: int = 1550
    max_target_tokens: int = 1000
    gradient_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 0
    keep_best: bool = False
    save_every: int = 0
    keep_last: int = 2
    resume: bool = True
    report_to: str = "none"

    def __post_init__(self) -> None:
        require(
            math.isfinite(self.epochs) and self.epochs > 0,
            f"epochs must be a finite number > 0, got {self.epochs}",
        )
        require(self.max_steps >= 0, f"max_steps must be >= 0, got {self.max_steps}")
        require(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        require(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        require(math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}")
        require(0 <= self.warmup_ratio < 1, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        require(self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1")
        require(self.max_target_tokens >= 1, "max_target_tokens must be >= 1")
        require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay must be >= 0, got {self.weight_decay}",
        )
        require(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
            f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm}",
        )
        require(
            self.mixed_precision in (None, "no", "bf16", "fp16"),
            f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}",
        )
        require(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        require(self.eval_every >= 0, f"eval_every must be >= 0 (0 evaluates never), got {self.eval_every}")
        require(not self.keep_best or self.eval_every > 0, "keep_best needs eval_every > 0 (evaluations to choose from)")
        require(self.save_every >= 0, f"save_every must be >= 0 (0 saves no states), got {self.save_every}")
        require(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        require(self.report_to in TRACKERS, f"report_to must be one of {', '.join(TRACKERS)}, got {self.report_to!r}")


def from_dict(cls: type, raw: Any, source: str = "config") -> Any:
    """Build dataclass ``cls`` from a plain dict, rejecting unknown keys (typos) by name."""
    if not isinstance(raw, dict):
        raise FlyThinkerError(f"{source}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise FlyThinkerError(
            f"{source}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    return cls(**raw)


__all__ = [
    "FlyThinkerConfig",
    "FlyThinkerSettings",
    "GenerationConfig",
    "TrainConfig",
    "from_dict",
]
