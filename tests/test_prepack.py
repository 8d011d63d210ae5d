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
    PackedAdaptedLinear,
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


@pytest.mark.parametrize("fuse_adapters", [True, False])
def test_packed_shared_variant_decodes_the_same(tokenizer, prompt_batch, fuse_adapters):
    """Packed with the base weight alone, or with LoRA A stacked under it (one call for both)."""
    torch.manual_seed(3)
    plain = randomize_adapter(FlyThinker.shared(build_tiny(128, seed=2), tokenizer, lam=1.0)).eval()
    packed = copy.deepcopy(plain)
    assert prepack_linears(packed.generator.get_decoder(), rows=2, fuse_adapters=fuse_adapters) > 0
    prepack_linears(packed.generator)
    adapted = [m for m in packed.modules() if isinstance(m, (RoleLoRALinear, PackedAdaptedLinear))]
    fused = [m for m in adapted if isinstance(m, PackedAdaptedLinear)]
    assert bool(fused) == fuse_adapters
    for layer in adapted:
        assert type(layer.lora_B) is torch.nn.Linear  # B stays plain (rank-16 input)
        if isinstance(layer, RoleLoRALinear):
            assert layer.lora_A.out_features < MIN_PACKED_FEATURES
    args = (prompt_batch.input_ids, prompt_batch.attention_mask)
    a = plain.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
    b = packed.generate(*args, max_new_tokens=NEW_TOKENS, eos_token_id=-1, output_scores=True)
    assert torch.equal(a.sequences, b.sequences)
    assert max((x - y).abs().max().item() for x, y in zip(a.scores, b.scores)) <= 1e-4
