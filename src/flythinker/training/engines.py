"""The distributed engine under the training loop: accelerate, set up for a two-model module.

FlyThinker is one ``nn.Module`` holding both models, so whatever `accelerate launch` chose (one
process, DDP, FSDP, DeepSpeed ZeRO) sees a single model to wrap. What that module cannot tell
accelerate by itself is set here:

- FSDP wraps the decoder-layer classes of *both* models (a plain Hugging Face model advertises
  them as ``_no_split_modules``; the parent module does not).
- Mixed precision computes in bf16/fp16 but reduces gradients in fp32 (accelerate's FSDP default
  would reduce in bf16).
- DeepSpeed takes its micro-batch size and clipping from `TrainConfig`, as every engine does,
  since the trainer feeds batches itself rather than through a prepared DataLoader.
- Several processes on a machine without a GPU become a gloo process group: accelerate only does
  that when asked for the CPU, and would otherwise run N independent copies of the job.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from transformers import PreTrainedModel

from flythinker.config import TrainConfig
from flythinker.errors import FlyThinkerError

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


TRACKING_DIR = "tracking"


@dataclass(frozen=True)
class Processes:
    """This process among those `accelerate launch` started (one process by default).

    The experiment runner uses it to split work that is not training (decoding, rationales,
    files): the trainer's own collectives go through its `Accelerator`.
    """

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        return self.index == 0

    def wait(self) -> None:
        """Every process reaches this point before any goes on."""
        if self.count > 1:
            from accelerate import PartialState

            PartialState().wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (writing a cache, repairing a file), the others
        after it, when they find its results."""
        if not self.main:
            self.wait()
        yield
        if self.main:
            self.wait()


def current_processes() -> Processes:
    """The launched processes, joined in one process group (gloo on a machine without a GPU)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched == 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=_cpu_group(launched))
    return Processes(state.process_index, state.num_processes)


def _cpu_group(launched: int) -> bool:
    return launched > 1 and not torch.cuda.is_available()


def make_accelerator(config: TrainConfig) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if _cpu_group(launched) and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # Measured (accelerate 1.x, deepspeed 0.19.8): asked for the CPU, accelerate silently
        # trains plain DDP instead; not asked, it sets up one process. Refuse rather than pretend.
        raise FlyThinkerError(
            "DeepSpeed through `accelerate launch` needs GPUs: on a machine without one accelerate "
            "would run plain DDP under the DeepSpeed config. Use configs/accelerate/ddp.yaml here "
            "(tools/zero3_norm_check.py runs ZeRO-3 itself on a CPU)"
        )
    tracking = config.report_to != "none"
    if config.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; sync later
    accelerator = Accelerator(
        log_with=config.report_to if tracking else None,
        project_dir=os.path.join(config.output_dir, TRACKING_DIR) if tracking else None,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        # The trainer steps the scheduler once per optimizer step itself; accelerate's default
        # would step it once per process, assuming step counts of an unsharded data loader.
        step_scheduler_with_optimizer=False,
        cpu=_cpu_group(launched),
        # Some parameters are off the loss path by design (FlyThinker's reasoner LM head: its
        # vectors enter the generator before any head); DDP must not wait for their gradients.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    # A launcher config may set its own accumulation (accelerate reads it from the environment
    # over the argument); TrainConfig is the one source, since the step plan is built from it.
    accelerator.gradient_accumulation_steps = config.grad_accum
    if tracking and not accelerator.log_with:
        raise FlyThinkerError(
            f"report_to={config.report_to!r}: its package is not installed (pip install {config.report_to})"
        )
    if accelerator.num_processes != launched:
        raise FlyThinkerError(
            f"launched as {launched} processes but accelerate set up {accelerator.num_processes}; "
            "check the accelerate config's distributed_type"
        )
    return accelerator


def distributed_kind(accelerator: Accelerator) -> str:
    """ "single", "ddp", "fsdp" or "deepspeed": what the checkpoint code must know."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "single" if accelerator.num_processes == 1 else "ddp"


def configure_engine(accelerator: Accelerator, model: torch.nn.Module, config: TrainConfig) -> None:
    """Fill in what the engine needs to know about ``model`` before `accelerator.prepare`."""
    kind = distributed_kind(accelerator)
    if kind == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        if plugin.transformer_cls_names_to_wrap is None:
            plugin.transformer_cls_names_to_wrap = decoder_layer_classes(model)
        if accelerator.mixed_precision in _LOW_PRECISION:
            plugin.mixed_precision_policy = _fsdp_policy(
                plugin.fsdp_version, _LOW_PRECISION[accelerator.mixed_precision]
            )
    elif kind == "deepspeed":
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = config.batch_size
        ds["train_batch_size"] = config.batch_size * config.grad_accum * accelerator.num_processes
        ds["gradient_accumulation_steps"] = config.grad_accum
        ds["gradient_clipping"] = config.max_grad_norm


def decoder_layer_classes(model: torch.nn.Module) -> list[str]:
    """Class names of the decoder layers of every Hugging Face model inside ``model``."""
    names: set[str] = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            names.update(module._no_split_modules or [])
    if not names:
        raise FlyThinkerError(
            f"FSDP found no decoder-layer classes in {type(model).__name__}; set "
            "fsdp_transformer_layer_cls_to_wrap in the accelerate config"
        )
    return sorted(names)


def _fsdp_policy(version: int, dtype: torch.dtype):
    if version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=dtype)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Checkpoint the decoder layers of the model, or of each model a parent module holds."""
    models = (
        [model]
        if isinstance(model, PreTrainedModel)
        else [child for child in model.children() if isinstance(child, PreTrainedModel)]
    )
    if not models:
        raise FlyThinkerError(
            f"gradient_checkpointing: {type(model).__name__} holds no Hugging Face model"
        )
    for child in models:
        # Non-reentrant checkpointing works with inputs_embeds (the generator's fused input),
        # with inputs that need no grad, and under FSDP.
        child.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
