"""attention/bias.py (the additive mask bias of the TE fused backend) and the backend selection."""

import os

import pytest
import torch

from megatron_uni.attention.bias import BiasCache, additive_bias, finite_masked_value
from megatron_uni.attention.masks import dense_mask
from megatron_uni.config import ConfigError, DiffusionConfig, load_config
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.model import spec, te_attention
from diffusion_helpers import complementary_layouts, random_batch, tiny_vocab

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "model", "tiny.yaml")


@pytest.mark.parametrize("shared_clean,prefix_aware", [(False, False), (True, False), (False, True), (True, True)])
def test_bias_is_zero_exactly_where_the_mask_rule_allows(shared_clean, prefix_aware):
    for layout in complementary_layouts(shared_clean, prefix_aware):
        masked_out = dense_mask(layout)
        for dtype in (torch.float32, torch.bfloat16):
            bias = additive_bias(layout, dtype)
            assert bias.dtype == dtype and bias.shape == masked_out.shape
            assert torch.equal(bias == 0, ~masked_out)
            assert torch.equal(torch.isneginf(bias), masked_out)
        # the same softmax as a boolean mask in SDPA
        q, k, v = (torch.randn(layout.batch_size, 2, layout.seq_length, 8, generator=torch.Generator().manual_seed(s))
                   for s in range(3))
        with_bias = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive_bias(layout))
        with_mask = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=~masked_out)
        torch.testing.assert_close(with_bias, with_mask)
        # the finite variant (what the TE backend passes) gives the same softmax
        finite = additive_bias(layout, masked_value=finite_masked_value(torch.float32))
        assert torch.equal(finite == 0, ~masked_out) and finite.isfinite().all()
        with_finite = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=finite)
        torch.testing.assert_close(with_finite, with_mask)


def test_bias_cache_builds_once_per_descriptor_and_dtype():
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(0), 2, 32, 8, vocab)
    inputs = build_inputs(batch, vocab, DiffusionConfig(), torch.Generator().manual_seed(0), block_size=8)
    cache = BiasCache()
    first = cache.get(inputs.attention_mask, torch.bfloat16)
    assert cache.get(inputs.attention_mask, torch.bfloat16) is first and cache.builds == 1
    cache.get(inputs.attention_mask, torch.float32)
    assert cache.builds == 2
    finite = BiasCache(finite=True).get(inputs.attention_mask, torch.bfloat16)
    assert finite.isfinite().all() and finite.min().item() == -(2.0 ** 50)
    assert te_attention.bias_cache().finite


def test_backend_selection(monkeypatch):
    model = load_config(TINY).model
    from megatron_uni.model.block_attention import BlockDiffusionAttention

    assert model.attention_backend == "flex"
    assert spec.core_attention_spec(model).module is BlockDiffusionAttention
    model.attention_backend = "te_fused"
    monkeypatch.setattr("megatron_uni.platform.te.transformer_engine_available", lambda: False)
    with pytest.raises(ConfigError, match="model.attention_backend=te_fused needs TransformerEngine"):
        spec.core_attention_spec(model)
    sentinel = type("FakeTEAttention", (), {})
    monkeypatch.setattr("megatron_uni.platform.te.transformer_engine_available", lambda: True)
    monkeypatch.setattr(te_attention, "te_fused_block_attention", lambda: sentinel)
    assert spec.core_attention_spec(model).module is sentinel
    with pytest.raises(ConfigError, match="model.attention_backend='sdpa' is not allowed"):
        load_config(TINY, ["model.attention_backend=sdpa"])
