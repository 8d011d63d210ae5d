"""oneDNN pre-packed weights decode exactly what plain weights decode, for every model family."""

from __future__ import annotations

import copy

import pytest
import torch
from test_shared import randomize_adapter

from flythinker.model.adapter import RoleLoRALinear
from flythinker.model.decoding import generate_plain
from flythinker.model.flythinker import FlyThinker
from flythinker.model.prepack import (
    MIN_PACKED_FEATURES,
    PackedLinear,
    prepack_available,
    prepack_linears,
)
from flythinker.model.sources import build_tiny

pytestmark = pytest.mark.skipif(not prepack_available(torch.device("cpu")), reason="needs oneDNN")
NEW_TOKENS = 8


def test_packed_plain_lm_decodes_the_same(prompt_batch):
    plain = build_tiny(128, seed=2)
    packed = copy.deepcopy(plain)
    assert prepack_linears(packed) > 0
    # k/v projections (64 outputs here) stay plain: tiny matmuls run faster unpacked.
    assert type(packed.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert type(packed.model.layers[0].self_attn.q_proj) is PackedLinear
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    a = generate_plain(plain, *args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0, output_scores=True)
    b = generate_plain(packed, *args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, pad_token_id=0, output_scores=True)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) <= 1e-4


def test_packed_shared_variant_decodes_the_same(tokenizer, prompt_batch):
    torch.manual_seed(3)
    plain = randomize_adapter(FlyThinker.shared(build_tiny(128, seed=2), tokenizer, lam=1.0, fusion="pad")).eval()
    packed = copy.deepcopy(plain)
    assert prepack_linears(packed.generator.get_decoder(), rows=2) > 0
    prepack_linears(packed.generator)
    lora = next(m for m in packed.modules() if isinstance(m, RoleLoRALinear))
    assert type(lora.lora_B) is torch.nn.Linear and lora.lora_A.out_features < MIN_PACKED_FEATURES
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    a = plain.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
    b = packed.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) <= 1e-4
