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


def prepack_linears(model: nn.Module, rows: int = 1) -> int:
    """Replace every fp32 `nn.Linear` inside ``model`` (but tiny ones) by a `PackedLinear`, in
    place; count them.

    ``rows``: the rows each matmul sees in the decode that matters (batch-1 decoding: 1 for a
    plain LM, 2 for FlyThinker-shared's two roles). For decoding only: the result has no
    trainable linear weights, and a later ``save_pretrained`` would not find them.
    """
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if (
                type(child) is nn.Linear
                and child.weight.dtype == torch.float32
                and min(child.in_features, child.out_features) >= MIN_PACKED_FEATURES
            ):
                setattr(module, child_name, PackedLinear(child, rows))
                count += 1
    return count
