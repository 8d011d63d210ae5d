"""CPU inference weights pre-packed for oneDNN: one weight format for every method of a benchmark.

Stock fp32 ``F.linear`` on a CPU takes a matrix-vector path for one row and a GEMM path for two or
more, and on small-core machines the GEMM path for 2-8 rows costs about twice the single row
(it does not reuse the weight reads across rows). Weights reordered once into oneDNN's blocked
layout make a row cheaper and extra rows nearly free, which is what decoding needs: a decode step
is a few rows against every weight. Packing is inference-only (no gradients) and must be applied
to every model of a comparison alike, so that a speed-up never comes from one side's format.
"""

from __future__ import annotations

import torch
from torch import nn

from flythinker.model.adapter import RoleLoRALinear


def prepack_available(device: torch.device) -> bool:
    """oneDNN packing exists for fp32 weights on CPUs built with it."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight lives in oneDNN's blocked layout.

    The original weight is dropped, so a packed model takes the memory of the plain one; a weight
    shared with another module (a tied LM head) is copied, since the embedding lookup still needs
    the plain table.
    """

    def __init__(self, linear: nn.Linear, rows: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        # ``rows`` only tunes the blocking (any number of rows works), and it matters: on a 2-core
        # EPYC a layout tuned for 1 row ran 2 rows at 1.21x one row, one tuned for 2 at 1.09x.
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(weight, rows), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads the LM head's weight for its dtype and device; the packed buffer has both.
        return self.packed_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")


# Below this many input or output features a matmul is mostly fixed cost, and oneDNN's per-call
# cost is the larger: a rank-16 LoRA pair took 46 us packed and 20 us plain (2-core EPYC).
MIN_PACKED_FEATURES = 128


class PackedAdaptedLinear(nn.Module):
    """An inference-only `RoleLoRALinear` whose base weight and LoRA A are packed as one matrix.

    One oneDNN call then computes ``W x`` and ``A x`` for every row of a mixed decode batch, where
    the plain layer makes two calls (the rank-16 A alone costs ~20 us on a 2-core EPYC, once per
    adapted layer per token). The generator's rows compute ``A x`` too and drop it: rank/out more
    work (16/896 at the 0.5B shape) to save a call. B stays a plain, unpacked matmul on the
    adapter's rows, in place on the base output, as in `RoleLoRALinear`.
    """

    def __init__(self, layer: RoleLoRALinear, rows: int = 1) -> None:
        super().__init__()
        base = layer.base_layer
        self.out_features = base.out_features
        stacked = torch.cat([base.weight.detach(), layer.lora_A.weight.detach()])
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(stacked, rows), persistent=False)
        bias = None
        if base.bias is not None:  # A has none: zeros for its columns
            bias = torch.cat([base.bias.detach(), base.bias.new_zeros(layer.lora_A.out_features)])
        self.register_buffer("bias", bias, persistent=False)
        self.lora_B, self.scaling, self._rows = layer.lora_B, layer.scaling, layer._rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        both = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")
        # The base output is a strided view of ``both``; the next layer reshapes it, so it is made
        # contiguous (a copy of a few rows, against a call saved).
        y, low_rank = both[..., : self.out_features].contiguous(), both[..., self.out_features :]
        rows = self._rows.rows
        if rows is None:
            return y
        y[rows] += self.lora_B(low_rank[rows]) * self.scaling
        return y


def _packable(linear: nn.Module) -> bool:
    return (
        type(linear) is nn.Linear
        and linear.weight.dtype == torch.float32
        and min(linear.in_features, linear.out_features) >= MIN_PACKED_FEATURES
    )


def prepack_linears(model: nn.Module, rows: int = 1, fuse_adapters: bool = True) -> int:
    """Replace every fp32 `nn.Linear` inside ``model`` (but tiny ones) by a `PackedLinear`, in
    place; count them.

    ``rows``: the rows each matmul sees in the decode that matters (batch-1 decoding: 1 for a
    plain LM, 2 for FlyThinker-shared's two roles). ``fuse_adapters``: an adapted layer
    (`RoleLoRALinear`) becomes one `PackedAdaptedLinear` (base and A in one call); False packs
    its base alone and leaves A and B plain. For decoding only: the result has no trainable
    linear weights, and a later ``save_pretrained`` would not find them.
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if fuse_adapters and type(child) is RoleLoRALinear and _packable(child.base_layer):
                setattr(module, child_name, PackedAdaptedLinear(child, rows))
                count += 1
            elif _packable(child) and not (fuse_adapters and type(module) is RoleLoRALinear):
                setattr(module, child_name, PackedLinear(child, rows))
                count += 1
    return count
