"""Where the CPU time of one training step goes (forward + backward), SFT vs FlyThinker, by torch op.

SmolLM2-135M-Instruct as every model, batch 4 x 256 tokens, 2 threads, torch.profiler self CPU
time. Usage: python bench/train_profile_cpu.py > bench/results/cpu_train_profile_smollm2.txt
"""

import copy

import torch
from torch.profiler import ProfilerActivity, profile

from flythinker.model.decoding import position_ids_from_mask
from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import load_causal_lm

torch.set_num_threads(2)
lm = load_causal_lm("smollm2-135m", dtype="float32")
ids = torch.randint(3, lm.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
mask = torch.ones_like(ids); pos = position_ids_from_mask(mask)
for name, model in [("sft", copy.deepcopy(lm).train()), ("flythinker", FlyThinker.from_models(copy.deepcopy(lm), copy.deepcopy(lm), lam=0.5, fusion="pad").train())]:
    model(input_ids=ids, attention_mask=mask, labels=ids, position_ids=pos).loss.backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, attention_mask=mask, labels=ids, position_ids=pos).loss.backward()
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev)
    print(f"== {name}: total self CPU {total/1e6:.2f} s")
    for e in sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]:
        print(f"{e.key[:45]:45} {e.self_cpu_time_total/1e6:7.3f} s  calls {e.count}")
