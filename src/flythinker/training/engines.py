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
- Several processes on a machine without a GPU become a gloo process group (DDP, or DeepSpeed on
  its CPU accelerator); FSDP, which accelerate enables only on GPUs, is refused there.
- After training the module is handed back plain and whole (`release_engine`), whatever engine
  sharded it, so decoding and evaluation never meet the engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs
from transformers import PreTrainedModel

from flythinker.config import TrainConfig
from flythinker.errors import FlyThinkerError

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


TRACKING_DIR = "tracking"

log = logging.getLogger(__name__)

# torch builds a JIT extension (DeepSpeed's ops: on CPUs its shared-memory allreduce, ~20 s) under a
# `lock` file it creates and deletes itself; a build killed part-way leaves the file, and every later
# build of that op then waits on it forever without a word (measured: it hung CI's ZeRO-3 runs). A
# build takes seconds to minutes, so a lock this old is left over.
STALE_BUILD_LOCK_S = 600.0


def stale_build_locks() -> list[Path]:
    """Build locks under the torch-extensions directory older than `STALE_BUILD_LOCK_S`."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    # <root>/<extension>/lock with TORCH_EXTENSIONS_DIR set, <root>/<python>_<device>/<extension>/lock without.
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    return sorted(lock for lock in locks if now - lock.stat().st_mtime > STALE_BUILD_LOCK_S)


def warn_on_stale_build_locks() -> None:
    for lock in stale_build_locks():
        log.warning(
            "%s is a build lock left by an interrupted build (%.0f min old): DeepSpeed would wait on it "
            "forever. Delete it unless a build of that op is running now.",
            lock, (time.time() - lock.stat().st_mtime) / 60,
        )


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

    state = PartialState(**_group_kwargs(launched))
    return Processes(state.process_index, state.num_processes)


def _group_kwargs(launched: int) -> dict:
    """How accelerate must join ``launched`` processes on this machine.

    With GPUs accelerate knows. Without one it joins them only when asked for the CPU, and would
    otherwise run N independent copies of the job; but asked for the CPU it also drops a DeepSpeed
    launcher config and silently trains plain DDP (measured, accelerate 1.16). So DeepSpeed on CPUs
    is asked for as a gloo group on the default device, and DeepSpeed told to use its CPU accelerator.
    """
    if launched == 1 or torch.cuda.is_available():
        return {"cpu": False}
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # accelerate 1.16 turns FSDP on only for accelerator devices: on CPUs it would train plain
        # DDP under the FSDP config (measured: unsharded states). Refuse rather than pretend.
        raise FlyThinkerError(
            "FSDP through `accelerate launch` needs GPUs: on a machine without one accelerate would "
            "run plain DDP under the FSDP config. Use configs/accelerate/ddp.yaml here, or "
            "configs/accelerate/deepspeed_zero3.yaml for sharded training on CPUs"
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
        return {"cpu": False, "backend": "gloo"}
    return {"cpu": True}


def make_accelerator(config: TrainConfig) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    group = _group_kwargs(launched)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        warn_on_stale_build_locks()
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
        cpu=group["cpu"],
        kwargs_handlers=[
            # Some parameters are off the loss path by design (FlyThinker's reasoner LM head: its
            # vectors enter the generator before any head); DDP must not wait for their gradients.
            DistributedDataParallelKwargs(find_unused_parameters=True),
            *([InitProcessGroupKwargs(backend=group["backend"])] if "backend" in group else []),
        ],
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


def release_engine(accelerator: Accelerator, prepared: torch.nn.Module) -> None:
    """Leave the trained module a plain one holding its full weights on every process.

    Whoever uses the module after training (decoding dealt out per process, held-out loss on the
    main process alone, the next stage of a curriculum with an engine of its own) must not meet
    the engine: under DeepSpeed ZeRO-3 every parameter outside its module's own forward is an
    empty placeholder, and the engine's hooks would gather it with collectives that the other
    processes, decoding other records, never join. So the full values are gathered once, the
    engine's hooks removed, and every parameter replaced by a plain one (tied weights stay tied).
    DDP leaves the module itself untouched; FSDP does not run here without GPUs (see
    `_group_kwargs`) and is left as accelerate leaves it.
    """
    if distributed_kind(accelerator) != "deepspeed":
        return
    module = accelerator.unwrap_model(prepared)
    full: dict[int, torch.Tensor] = {}
    if accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        for sub in module.modules():  # one gather per module: all processes take part in each
            own = [p for p in sub.parameters(recurse=False) if id(p) not in full]
            with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
                full.update((id(p), p.data.detach().clone()) for p in own)
    prepared.destroy()  # removes the engine's module and gradient hooks
    if not full:  # ZeRO 1 and 2 keep every parameter whole
        return
    plain: dict[int, torch.nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                if id(param) not in plain:
                    plain[id(param)] = torch.nn.Parameter(full[id(param)], requires_grad=param.requires_grad)
                sub._parameters[name] = plain[id(param)]


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
        enable = getattr(child, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            child.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
