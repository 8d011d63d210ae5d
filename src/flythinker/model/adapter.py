"""The adapter that turns the generator into its own reasoner (FlyThinker-shared).

One causal LM plays both roles: the reasoner role runs it with a LoRA adapter, the generator role
without (`flythinker.model.reasoners.AdapterReasoner`). The adapter is hand-written
(`RoleLoRALinear`) rather than peft's module, because a decode batch mixes roles: peft's
mixed-adapter path splits every batch in Python at each of the ~170 adapted layers, which cost
more than the matmuls themselves at batch 1 on a CPU. Here each layer adds the low-rank update to a
contiguous row range in one slice. The files are peft's own (``adapter_config.json`` +
``adapter_model.safetensors``), so ``peft.PeftModel.from_pretrained`` on the saved generator
reproduces the reasoner.

`stack_adapter_weights` lays each layer's LoRA A under its base weight in one tensor, so a mixed
decode step computes the base output of every row and the reasoner rows' low-rank input in one
GEMM instead of two. On a GPU a batch-1 step costs about what its kernels do, and an adapter on
every linear layer adds two small GEMMs to each of them (docs/efficiency.md). Measured on an H200
with CUDA graphs (3B shapes, bf16), stacking made the step slower, not faster (1.60x SFT against
1.43x apart), so it stays an opt-in for measurement, off in every decoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from flythinker.errors import FlyThinkerError


class AdapterRows:
    """Which batch rows the adapter applies to, shared by every adapted layer of one model.

    ``None``: no rows (the generator role). ``slice(None)``: all rows (the reasoner role).
    ``slice(b, None)``: rows from ``b`` on, the reasoner half of a mixed decode batch.
    """

    def __init__(self) -> None:
        self.rows: slice | None = None

    @contextlib.contextmanager
    def active(self, rows: slice) -> Iterator[None]:
        previous, self.rows = self.rows, rows
        try:
            yield
        finally:
            self.rows = previous


class RoleLoRALinear(nn.Module):
    """``base_layer(x)``, plus ``alpha/r * B A x`` on the rows the adapter is active for.

    Parameter names follow peft (``base_layer``, ``lora_A``, ``lora_B``) so the adapter's
    state dict maps one to one onto peft's files. A starts random and B at zero (peft's default),
    so a fresh reasoner equals the generator until training moves B.
    """

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, rows: AdapterRows) -> None:
        super().__init__()
        self.base_layer = base_layer
        kwargs = {"bias": False, "dtype": base_layer.weight.dtype, "device": base_layer.weight.device}
        self.lora_A = nn.Linear(base_layer.in_features, rank, **kwargs)
        self.lora_B = nn.Linear(rank, base_layer.out_features, **kwargs)
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha / rank
        self._rows = rows  # a plain attribute, not a submodule: every layer shares the one switch
        # (base weight; A) in one tensor, the base weight and A then being views of it (`stack`).
        self.stacked_weight: torch.Tensor | None = None
        self.stacked_bias: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        rows = self._rows.rows
        if rows is None:
            return y
        if rows == slice(None):
            return y + self.lora_B(self.lora_A(x)) * self.scaling
        # A mixed decode batch (inference): only the selected rows move, in place on the base output.
        # A plain B accumulates into those rows in the GEMM itself; each kernel saved counts, since
        # a batch-1 step on a GPU costs about what its kernel count does.
        if self.stacked_weight is not None:
            return self._stacked_mixed(x, rows)
        target, low_rank = y[rows], self.lora_A(x[rows])
        if type(self.lora_B) is nn.Linear and target.is_contiguous():
            target.view(-1, target.shape[-1]).addmm_(
                low_rank.view(-1, low_rank.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling
            )
        else:  # e.g. an inference-only packed layer (`flythinker.model.prepack`): no plain weight
            target.add_(self.lora_B(low_rank), alpha=self.scaling)
        return y

    def _stacked_mixed(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """The mixed-rows output from one GEMM over (W; A): its first ``out`` columns are every
        row's base output, the last ``rank`` the low-rank input of all rows (only ``rows``' used).
        The result is a strided view (rows ``out + rank`` apart): what follows a linear layer in
        a decoder block (a head split of the last dim, elementwise ops) reads it as it is."""
        out = self.base_layer.out_features
        both = nn.functional.linear(x, self.stacked_weight, self.stacked_bias)
        y = both[..., :out]
        target, low_rank = y[rows], both[rows][..., out:]
        target.view(-1, out).addmm_(low_rank.reshape(-1, low_rank.shape[-1]), self.lora_B.weight.t(), alpha=self.scaling)
        return y

    def stack(self) -> bool:
        """Lay A under the base weight in one tensor, the two parameters becoming views of it (no
        extra memory; training, loading and saving see the same parameters). False where the
        layer has no plain weights to stack (a pre-packed base, an A with a bias)."""
        base, lora_a = self.base_layer, self.lora_A
        if not (type(base) is nn.Linear and type(lora_a) is nn.Linear and type(self.lora_B) is nn.Linear
                and lora_a.bias is None and base.weight.dtype == lora_a.weight.dtype):
            return False
        out = base.out_features
        with torch.no_grad():
            self.stacked_weight = torch.cat([base.weight, lora_a.weight])
            base.weight.data, lora_a.weight.data = self.stacked_weight[:out], self.stacked_weight[out:]
            if base.bias is not None:
                self.stacked_bias = torch.cat([base.bias, base.bias.new_zeros(lora_a.out_features)])
                base.bias.data = self.stacked_bias[:out]
        return True

    def _apply(self, fn, recurse=True):
        # Moving or casting the module gives the parameters new tensors, no longer views of the
        # stacked one: stack them again afterwards.
        stacked = self.stacked_weight is not None
        self.stacked_weight = self.stacked_bias = None
        module = super()._apply(fn, recurse)
        if stacked:
            self.stack()
        return module


def stack_adapter_weights(model: nn.Module) -> int:
    """`RoleLoRALinear.stack` every adapted layer of ``model``; return how many were stacked."""
    return sum(module.stack() for module in model.modules() if isinstance(module, RoleLoRALinear))


def attach_adapter(
    model: PreTrainedModel, rank: int, alpha: float, rows: AdapterRows, targets: Sequence[str] = ()
) -> list[str]:
    """Wrap linear layers of the decoder blocks in `RoleLoRALinear`; return their paths.

    ``targets``: layer names (the last path component, as peft's ``target_modules``) to adapt;
    empty adapts every linear layer. The embeddings and the LM head stay plain: the reasoner's
    output is the final hidden state, and its input embedding is the generator's (no signal is
    added on the reasoner side).
    """
    blocks = model.get_decoder().layers
    prefix = _decoder_layers_path(model)
    paths: list[str] = []
    seen: set[str] = set()
    for index, block in enumerate(blocks):
        for name, module in list(block.named_modules()):
            if type(module) is not nn.Linear:
                continue
            parent_name, _, attr = name.rpartition(".")
            seen.add(attr)
            if targets and attr not in targets:
                continue
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, attr, RoleLoRALinear(module, rank, alpha, rows))
            paths.append(f"{prefix}.{index}.{name}")
    unknown = sorted(set(targets) - seen)
    if unknown:
        raise FlyThinkerError(
            f"lora_targets {', '.join(unknown)} name no linear layer of {type(model).__name__}'s decoder blocks "
            f"(they have: {', '.join(sorted(seen))})"
        )
    if not paths:
        raise FlyThinkerError(f"{type(model).__name__} has no linear layers in its decoder blocks to adapt")
    return paths


def _decoder_layers_path(model: PreTrainedModel) -> str:
    blocks = model.get_decoder().layers
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise FlyThinkerError(f"cannot locate the decoder blocks of {type(model).__name__}")
