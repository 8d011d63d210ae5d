"""A real DeepSpeed ZeRO-3 run on CPU: is the rescale norm the full table's on every call path?

Under ZeRO-3 a parameter is an empty placeholder except while its own module runs forward
(the engine gathers it there). The rescale norm reads the generator's embedding table from
*outside* the embedding's forward, so a plain ``weight.norm(dim=-1).mean()`` sees nothing. This
script builds a tiny FlyThinker, hands it to `deepspeed.initialize` with ZeRO stage 3 (one
process, gloo, ``DS_ACCELERATOR=cpu``) and measures each call path against the unsharded model:

- the naive read of the placeholder (what the published formula does);
- `FlyThinker.target_norm()` outside any forward (decoding after training calls it this way);
- a training step through the engine: loss equal to the unsharded model's, reasoner gradient
  non-zero;
- the module's own forward called directly (bypassing the engine), and greedy decoding.

Prints one JSON object; exits 1 if any check fails. Needs ``pip install deepspeed`` (with
``DS_BUILD_OPS=0`` nothing is compiled). Run: ``python tools/zero3_norm_check.py``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)
if "MASTER_PORT" not in os.environ:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(s.getsockname()[1])

import deepspeed
import torch
from deepspeed.utils import safe_get_full_grad

from flythinker.model.flythinker import FlyThinker
from flythinker.model.sources import build_tiny, load_tokenizer


def main() -> int:
    deepspeed.init_distributed(dist_backend="gloo")
    tokenizer = load_tokenizer("tiny")
    model = FlyThinker.from_models(build_tiny(32, seed=1), build_tiny(64, seed=2), tokenizer, lam=0.5, fusion="pad")
    reference = copy.deepcopy(model)
    batch = tokenizer(["Write a review of the blue kettle.", "An abstract, please."], return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    expected_norm = float(reference.target_norm())
    expected_loss = float(reference(batch.input_ids, batch.attention_mask, labels).loss)
    expected_tokens = reference.generate(batch.input_ids, batch.attention_mask, max_new_tokens=6, eos_token_id=-1).sequences

    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3},
                "zero_allow_untested_optimizer": True},
    )
    module = engine.module
    weight = module.generator.get_input_embeddings().weight
    checks: dict[str, object] = {"deepspeed": deepspeed.__version__, "unsharded_norm": expected_norm}

    checks["placeholder_numel_outside_forward"] = weight.numel()
    checks["naive_norm_outside_forward"] = float(weight.detach().float().norm(dim=-1).mean()) if weight.numel() else 0.0
    checks["target_norm_outside_forward"] = float(module.target_norm())

    out = engine(batch.input_ids, batch.attention_mask, labels)
    engine.backward(out.loss)
    reasoner_grad = sum(float(safe_get_full_grad(p).abs().sum()) for p in module.reasoner.parameters()
                        if safe_get_full_grad(p) is not None)
    engine.step()
    checks["engine_loss"], checks["unsharded_loss"] = float(out.loss), expected_loss
    checks["reasoner_grad_abs_sum"] = reasoner_grad

    with torch.no_grad():
        checks["direct_forward_loss"] = float(module(batch.input_ids, batch.attention_mask, labels).loss)
        tokens = module.generate(batch.input_ids, batch.attention_mask, max_new_tokens=6, eos_token_id=-1).sequences
    checks["decoding_after_training_matches"] = bool(torch.equal(tokens, expected_tokens))  # lr 0: same weights

    close = lambda a, b: abs(a - b) <= 1e-4 * max(1.0, abs(b))
    passed = {
        "target_norm is the full table's outside forward": close(checks["target_norm_outside_forward"], expected_norm),
        "engine loss equals the unsharded loss": close(checks["engine_loss"], expected_loss),
        "reasoner gets a gradient through the engine": reasoner_grad > 0,
        "direct forward equals the unsharded loss": close(checks["direct_forward_loss"], expected_loss),
        "decoding after training matches the unsharded model": checks["decoding_after_training_matches"],
    }
    checks["passed"] = passed
    print(json.dumps(checks, indent=2))
    return 0 if all(passed.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
