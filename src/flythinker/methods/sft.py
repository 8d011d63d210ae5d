"""SFT baseline: the generator fine-tuned on (profile + query -> target), FlyThinker's prompt form.

FlyThinker with lambda 0 is exactly this model; the paper's main comparison.
"""

from __future__ import annotations

import copy

from flythinker.methods.costs import (
    NEVER_STOP,
    STEP_OPTIONS,
    BenchEntry,
    BenchTrainer,
    module_bytes,
)
from flythinker.methods.lm import LMMethod
from flythinker.model.decoding import generate_plain


class SFT(LMMethod):
    name = "sft"
    style = "profile"
    trainable = True
    baseline = True

    @classmethod
    def bench_entries(cls, bench, floors):
        g = bench.generator
        return [
            BenchEntry(cls.name, None, [g], lambda ids, mask, n, on_token, options=STEP_OPTIONS[steps]: generate_plain(
                g, ids, mask, max_new_tokens=n, on_token=on_token, **options, **NEVER_STOP),
                floors.relative(), steps, baseline=True)
            for steps in bench.steps
        ]

    @classmethod
    def bench_trainers(cls, bench):
        return [BenchTrainer(cls.name, lambda: copy.deepcopy(bench.generator), module_bytes(bench.generator))]
