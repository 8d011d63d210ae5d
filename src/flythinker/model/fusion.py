"""How a reasoning vector enters the generator: ``lam * rescale(h)`` and the start-at-SFT options.

The published formula adds ``lam * h * mean||E_G|| / ||h||`` to the generator's input embedding.
With a same-family reasoner that term points at the *next* token in the generator's own
embedding space (`flythinker.evaluation.diagnose` measures it), so a pretrained generator first reads that
token as already present and its loss jumps (SmolLM2-135M, lambda 0.5: 3.75 -> 8.97). The options
here let the fusion start exactly at SFT and learn how much of the signal to use:

- ``lam_warmup``: lambda rises from 0 to ``lam`` over a fraction of the optimizer steps;
- ``gate``: a learned multiplier on the signal (one scalar or one per dimension), zero at start;
- ``projection_init="zero"``: a learned projection that starts at zero, so its first direction is
  learned from the loss rather than inherited from the reasoner's next-token direction.

Every one of them leaves the published behaviour (the defaults) unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flythinker.config import FlyThinkerConfig
from flythinker.errors import FlyThinkerError

FUSION_WEIGHTS = "fusion.safetensors"
# Checkpoints written before the gate existed kept the linear projection in a file of its own.
LEGACY_PROJECTION_WEIGHTS = "projection.safetensors"


class Fusion(nn.Module):
    """The term added to the generator's input embedding at each position, from ``h_{i-1}``.

    Holds the learned parts (a projection for ``fusion="linear"``, a gate) and the lambda warm-up
    factor, which the training loop sets from the optimizer step (`set_training_step`) and which
    is 1 everywhere else (evaluation, decoding, a loaded checkpoint).
    """

    def __init__(
        self, config: FlyThinkerConfig, d_r: int, d_g: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        super().__init__()
        if config.fusion == "pad" and d_r > d_g:
            raise FlyThinkerError(
                f"fusion='pad' adds the reasoner's {d_r}-dim vector into the generator's {d_g}-dim "
                "embedding and needs d_R <= d_G; use fusion='linear' for a wider reasoner"
            )
        self.config = config
        self.d_g = d_g
        self.projection: nn.Linear | None = None
        if config.fusion == "linear":
            self.projection = nn.Linear(d_r, d_g, bias=False, dtype=dtype, device=device)
            if config.projection_init == "zero":
                nn.init.zeros_(self.projection.weight)
        self.gate: nn.Parameter | None = None
        if config.gate != "none":
            # Stored divided by gate_scale: AdamW moves every parameter by about lr per step
            # whatever its gradient, so a gate stored as is would need ~1/lr steps to open.
            shape = (1,) if config.gate == "scalar" else (d_g,)
            self.gate = nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=device))
        self.lam_scale = 1.0

    # ------------------------------------------------------------------ schedule
    def set_training_step(self, step: int, total_steps: int) -> None:
        """Lambda warm-up: the factor is a function of the optimizer step only (exact on resume)."""
        self.lam_scale = warmup_factor(step, total_steps, self.config.lam_warmup)

    def lam(self) -> float:
        """The lambda in force now: ``lam`` times the warm-up factor."""
        return self.config.lam * self.lam_scale

    def projection_weight(self) -> torch.Tensor:
        """The projection in force: the stored weight times ``projection_scale``."""
        assert self.projection is not None
        weight = self.projection.weight
        return weight if self.config.projection_scale == 1.0 else weight * self.config.projection_scale

    def gate_value(self) -> torch.Tensor | None:
        return None if self.gate is None else self.gate * self.config.gate_scale

    def log_values(self) -> dict[str, float]:
        """What a training log records of the fusion at this step."""
        values = {"lam": self.lam()}
        gate = self.gate_value()
        if gate is not None:
            values["gate_abs_mean"] = float(gate.detach().abs().mean())
        if self.projection is not None:
            # How far a zero-initialised projection has opened: its spectral norm bounds how much
            # it can scale the rescaled vector (norm = the embedding norm) on its way in.
            values["projection_spectral_norm"] = float(torch.linalg.matrix_norm(self.projection_weight().detach().float(), ord=2))
        return values

    # ------------------------------------------------------------------ formula
    def forward(self, h: torch.Tensor, target_norm: torch.Tensor | None) -> torch.Tensor:
        """``lam * gate * rescale(h)`` in the generator's embedding space (README, "The method, as implemented").

        ``target_norm`` is the mean row norm of the generator's embedding table (None when
        ``rescale`` is off). A zero-initialised projection rescales ``h`` *before* projecting:
        rescaling its zero output would divide by zero and give the projection an infinite
        gradient at the first step.
        """
        rescale_first = self.projection is not None and self.config.projection_init == "zero"
        if rescale_first and target_norm is not None:
            h = _rescale(h, target_norm)
        if self.projection is not None:
            h = F.linear(h.to(self.projection.weight.dtype), self.projection_weight())
        elif h.shape[-1] < self.d_g:
            h = F.pad(h, (0, self.d_g - h.shape[-1]))
        if not rescale_first and target_norm is not None:
            h = _rescale(h, target_norm)
        gate = self.gate_value()
        if gate is not None:
            h = h * gate.to(h.dtype)
        if self.training and self.config.signal_dropout:
            p = self.config.signal_dropout
            keep = torch.rand(h.shape[:-1] + (1,), device=h.device) >= p
            h = h * keep.to(h.dtype) / (1 - p)
        return self.lam() * h


def _rescale(h: torch.Tensor, target_norm: torch.Tensor) -> torch.Tensor:
    """Each vector to ``target_norm``; both norms detached, as published."""
    scale = target_norm / h.detach().float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return h * scale.to(h.dtype)


def warmup_factor(step: int, total_steps: int, fraction: float) -> float:
    """Linear 0 -> 1 over the first ``fraction`` of ``total_steps`` optimizer steps.

    Step ``s`` (0-based, the step about to run) gets ``s / (fraction * total_steps)``, capped at
    1: the first update is computed at lambda 0, i.e. exactly as SFT would.
    """
    if fraction <= 0 or total_steps <= 0:
        return 1.0
    return min(1.0, step / (fraction * total_steps))


def embedding_row_norm_mean(weight: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the rows of an embedding table, from the *full* table on every engine.

    - DeepSpeed ZeRO-3 leaves a parameter as an empty placeholder outside its module's forward
      under the engine; it is gathered here for the computation (and released after).
    - FSDP2 holds a DTensor sharded by rows; each process sums the norms of its rows and the sums
      are all-reduced.
    - Anything else (one process, DDP) holds the whole table.

    Computed in float32 a block of rows at a time: a float32 copy of a whole bf16 table (152k x
    2048 for Qwen2.5-3B) would add 1.2 GB to the peak memory of every decode call. A result that
    is zero or not finite is an error: it would silently zero the reasoning signal and the
    reasoner's gradient.
    """
    if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 parameter
        import deepspeed
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if weight.ds_status == ZeroParamStatus.AVAILABLE:
            # Already gathered by an enclosing module's forward; gathering again would release it
            # on exit while that module still uses it (DeepSpeed refuses).
            return _checked(_mean_row_norm(weight.detach()), weight)
        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return _checked(_mean_row_norm(weight.detach()), weight)
    local, world = weight.detach(), None
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # pragma: no cover - torch without DTensor
        DTensor = None  # type: ignore[assignment]
    if DTensor is not None and isinstance(weight, DTensor):
        local = weight.to_local().detach()
        if any(isinstance(p, Shard) for p in weight.placements):
            world = weight.device_mesh.get_group()
    if world is None:
        return _checked(_mean_row_norm(local), weight)
    import torch.distributed as dist

    totals = torch.stack([_row_norms(local).sum(), torch.tensor(float(local.shape[0]), device=local.device)])
    dist.all_reduce(totals, group=world)
    return _checked(totals[0] / totals[1].clamp_min(1.0), weight)


def _row_norms(rows: torch.Tensor) -> torch.Tensor:
    if rows.numel() == 0:
        return rows.new_zeros(0, dtype=torch.float32)
    return torch.cat([block.float().norm(dim=-1) for block in rows.split(16384)])


def _mean_row_norm(rows: torch.Tensor) -> torch.Tensor:
    norms = _row_norms(rows)
    return norms.mean() if norms.numel() else norms.new_zeros(())


def _checked(norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # Inside a compiled forward a host-side test would split the graph at every call (and
        # sync); this assertion runs inside the compiled code and raises just the same.
        torch._assert_async(
            torch.isfinite(norm) & (norm > 0),
            "the generator's embedding table gives a zero or non-finite mean row norm: the rescale would "
            "zero the reasoning signal",
        )
        return norm
    if not bool(torch.isfinite(norm)) or float(norm) <= 0:
        raise FlyThinkerError(
            f"the generator's embedding table gives a mean row norm of {float(norm)} (weight of "
            f"shape {tuple(weight.shape)}): the rescale would zero the reasoning signal. An empty "
            "weight is a sharded parameter read outside its engine (DeepSpeed ZeRO-3 releases it "
            "outside the module's forward); call the model through the engine, or gather it first"
        )
    return norm
