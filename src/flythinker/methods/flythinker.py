"""FlyThinker: a reasoner's per-token vectors steer the generator (`flythinker.model.flythinker`)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from flythinker.methods.base import Method
from flythinker.methods.costs import (
    NEVER_STOP,
    STEP_OPTIONS,
    BenchEntry,
    BenchTrainer,
    decode_bytes,
    module_bytes,
    param_count,
    unique_bytes,
)
from flythinker.model.adapter import stack_adapter_weights
from flythinker.model.flythinker import FlyThinker
from flythinker.model.prepack import prepack_linears
from flythinker.model.reasoners import AdapterReasoner

# The benchmark times the published method (pad fusion), as every recorded result in bench/results
# was: the start-at-SFT projection adds one d_R x d_G product per token.
BENCH_FUSION = {"fusion": "pad"}


class FlyThinkerMethod(Method):
    name = "flythinker"
    style = "profile"
    trainable = True

    @classmethod
    def bench_entries(cls, bench, floors):
        """A separate reasoner in every overlap mode this machine has (one copy of both models
        for the one-device modes, a moved copy for "devices"), and the shared reasoner; each in
        every step mode, except that static caches need both models on one device. Floors: the
        reasoner's decoder is read once more per step (its LM head never runs); the shared
        variant reads only the adapter more, and runs the generator's decoder twice at prefill."""
        g, r = bench.generator, bench.reasoner
        r_extra = param_count(r, embeddings=False)
        separate_floors = floors.relative(decode_bytes(r, with_head=False), r_extra, r_extra, module_bytes(r))
        models: dict[str, FlyThinker] = {}
        for overlap in bench.overlaps:
            where = "devices" if overlap == "devices" else "one-device"
            if where not in models:
                reasoner = copy.deepcopy(r)
                if overlap == "devices":
                    reasoner = reasoner.to(torch.device("cuda", 1))
                models[where] = FlyThinker.from_models(reasoner, copy.deepcopy(g), **BENCH_FUSION).eval()
                if bench.packed:
                    prepack_linears(models[where].reasoner.get_decoder())  # its LM head is never run
                    prepack_linears(models[where].generator)
        shared = FlyThinker.shared(copy.deepcopy(g), lora_targets=list(bench.lora_targets), **BENCH_FUSION).eval()
        adapter = unique_bytes(shared.reasoner_component.adapter_state().values())
        g_extra = param_count(g, embeddings=False)  # the reasoner pass is the generator's decoder again
        shared_floors = floors.relative(adapter, g_extra, g_extra, adapter)
        # With plain weights, also the shared variant with each LoRA A stacked under its base
        # weight (one GEMM fewer per adapted layer and step), timed at batch 1 next to it, in the
        # step modes that do not compile (a GPU check cannot spare a third compilation).
        stacked = None
        if bench.packed:  # each matmul in the layout for the rows it sees at batch 1: the shared
            prepack_linears(shared.generator.get_decoder(), rows=2)  # decoder's two
            prepack_linears(shared.generator)  # the LM head, which reads the generator's row only
        else:
            stacked = copy.deepcopy(shared)
            stack_adapter_weights(stacked.generator)

        def run(model, overlap, steps):
            return lambda ids, mask, n, on_token: model.generate(
                ids, mask, max_new_tokens=n, overlap=overlap, on_token=on_token, **STEP_OPTIONS[steps], **NEVER_STOP)

        entries = []
        for steps in bench.steps:
            for overlap in bench.overlaps:
                if steps != "dynamic" and overlap == "devices":
                    continue  # static caches need both models on one device
                model = models["devices" if overlap == "devices" else "one-device"]
                entries.append(BenchEntry(cls.name, overlap, [model], run(model, overlap, steps), dict(separate_floors), steps))
            entries.append(BenchEntry(shared.reasoner_component.label, None, [shared], run(shared, "none", steps),
                                      dict(shared_floors), steps))
            if stacked is not None and not STEP_OPTIONS[steps].get("compile"):
                entries.append(BenchEntry(f"{shared.reasoner_component.label}-stacked", None, [stacked],
                                          run(stacked, "none", steps), dict(shared_floors), steps, batched=False))
        return entries

    @classmethod
    def bench_trainers(cls, bench):
        g, r = bench.generator, bench.reasoner
        targets = list(bench.lora_targets)
        return [
            BenchTrainer(cls.name, lambda: FlyThinker.from_models(copy.deepcopy(r), copy.deepcopy(g), **BENCH_FUSION),
                         module_bytes(g) + module_bytes(r)),
            BenchTrainer(AdapterReasoner.label, lambda: FlyThinker.shared(copy.deepcopy(g), lora_targets=targets, **BENCH_FUSION),
                         module_bytes(g)),
        ]

    def build(self, checkpoint: Path | None = None) -> None:
        if checkpoint is not None:
            self.flythinker = FlyThinker.from_pretrained(checkpoint, dtype=self.context.dtype)
        else:
            self.flythinker = FlyThinker.from_config(self.config.flythinker_config(self.context.dtype))
        self.tokenizer = self.flythinker.tokenizer

    def model(self) -> torch.nn.Module:
        return self.flythinker

    def decode(self, input_ids, attention_mask, generation, on_token):
        return self.flythinker.generate(input_ids, attention_mask, config=generation, on_token=on_token)
