"""Which examples each process trains on at each optimizer step: a pure function of the step.

Deriving the data position from the step number alone is what makes resuming exact: a run
restarted at step k rebuilds the same epoch order and skips exactly the examples steps 0..k-1
consumed, with no sampler or iterator state to save.

One optimizer step consumes the next ``global_batch = batch_size * processes * grad_accum``
examples of the epoch's shuffled order (the last step of an epoch takes what is left). Those are
dealt into ``grad_accum`` micro-batches and each micro-batch across the processes. Because the
loss is normalised by the labelled tokens of the whole step (see `flythinker.training.train`), how the
step is split does not change the update: 2 processes x 2 examples give the same weights as
1 process x 4 examples, up to float summation order.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class StepPlan:
    examples: int
    batch_size: int  # per process and micro-batch
    processes: int
    grad_accum: int
    epochs: float
    max_steps: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.processes * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.examples / self.global_batch)

    @property
    def total_steps(self) -> int:
        if self.max_steps:
            return self.max_steps
        return max(1, math.ceil(self.steps_per_epoch * self.epochs))

    def epoch_of(self, step: int) -> float:
        """Fractional epochs completed after ``step`` (1-based) optimizer steps, as logged."""
        return step / self.steps_per_epoch

    def step_examples(self, step: int) -> list[int]:
        """Indices of the examples optimizer step ``step`` (0-based) trains on, all processes."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return list(
            _epoch_order(self.examples, self.seed, epoch)[start : start + self.global_batch]
        )

    def micro_batches(self, step: int, process: int) -> list[list[int]]:
        """This process's ``grad_accum`` micro-batches of ``step``; a short step may leave some empty.

        Every process gets the same number of micro-batches, so all of them take part in every
        gradient synchronisation even when the last step of an epoch has fewer examples than
        processes (the trainer gives an empty micro-batch a row that carries no loss).
        """
        indices = self.step_examples(step)
        per_micro = [indices[j :: self.grad_accum] for j in range(self.grad_accum)]
        return [micro[process :: self.processes] for micro in per_micro]


@lru_cache(maxsize=4)
def _epoch_order(examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    # random.Random with a string seed is stable across platforms and Python versions, unlike a
    # torch generator's stream, so a run resumed elsewhere still sees the same order.
    order = list(range(examples))
    random.Random(f"flythinker-epoch-{seed}-{epoch}").shuffle(order)
    return tuple(order)
