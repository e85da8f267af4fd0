"""The mapping table and its transforms, shard planning, and the reference model's building blocks."""

from __future__ import annotations

import os

import pytest
import torch

from convert_helpers import REPO, TINY_OVERRIDES, batch, tiny_config
from megatron_uni.convert import mapping
from megatron_uni.convert.hf_io import ConversionError, plan_shards
from megatron_uni.convert.hf_reference import LLaDA2Reference, apply_partial_rope, rope_cos_sin
from megatron_uni.convert.tiny_hf import tiny_hf_weights


def test_qkv_regroup_puts_each_groups_q_k_v_together():
    m = tiny_config().model  # 4 query heads, 2 groups, head dim 16
    d, rows = m.kv_channels, (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    hf = torch.arange(rows, dtype=torch.float32)[:, None].expand(rows, 3).clone()
    meg = mapping.QKV.to_megatron([hf], m)[:, 0].long().tolist()
    q_rows, k_rows = m.num_attention_heads * d, m.num_query_groups * d
    expected = []
    for group in range(m.num_query_groups):
        expected += list(range(group * 2 * d, (group + 1) * 2 * d))           # its 2 query heads
        expected += list(range(q_rows + group * d, q_rows + (group + 1) * d))  # its key head
        expected += list(range(q_rows + k_rows + group * d, q_rows + k_rows + (group + 1) * d))
    assert meg == expected
    assert torch.equal(mapping.QKV.to_hf(mapping.QKV.to_megatron([hf], m), m)[0], hf)


def test_gate_up_both_ways():
    m = tiny_config().model
    entry = next(e for e in mapping.entries(m) if e.transform == mapping.GATE_UP)
    gate, up = torch.randn(8, 4), torch.randn(8, 4)
    fc1 = entry.transform.to_megatron([gate, up], m)
    assert torch.equal(fc1[:8], gate) and torch.equal(fc1[8:], up)
    back = entry.transform.to_hf(fc1, m)
    assert torch.equal(back[0], gate) and torch.equal(back[1], up)


def test_every_entry_round_trips_with_its_shapes():
    """Each table entry: HF tensors of its HF shape -> megatron tensor of its shape -> the same HF tensors."""
    m = tiny_config().model
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for entry in mapping.entries(m, vocab_rows=m.text_vocab):
        hf = [torch.randn(entry.hf_shape, generator=generator) for _ in entry.hf]
        megatron = entry.to_megatron(hf)
        assert tuple(megatron.shape) == entry.shape, entry.name
        back = entry.to_hf(megatron)
        assert list(back) == list(entry.hf)
        assert all(torch.equal(back[name], tensor) for name, tensor in zip(entry.hf, hf)), entry.name
        seen.add(type(entry.transform).__name__)
    assert seen == {"Identity", "QKVRegroup", "GatedMLP"}


def test_entry_shapes_come_from_the_rule():
    m = tiny_config().model
    by_key = mapping.entries_by_key(m, vocab_rows=m.text_vocab)
    qkv = by_key[("decoder.layers.0.self_attention.linear_qkv.weight", None)]
    assert qkv.hf_shape == qkv.shape == ((m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels,
                                         m.hidden_size)
    fc1 = by_key[("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", 3)]
    assert fc1.hf == ("model.layers.1.mlp.experts.3.gate_proj.weight", "model.layers.1.mlp.experts.3.up_proj.weight")
    assert fc1.hf_shape == (m.moe_ffn_hidden_size, m.hidden_size)
    assert fc1.shape == (2 * m.moe_ffn_hidden_size, m.hidden_size)
    head = by_key[("output_layer.weight", None)]
    assert head.vocab and head.hf_shape == head.shape == (m.text_vocab, m.hidden_size)


def test_wrong_shape_is_refused_naming_the_tensor():
    m = tiny_config().model
    by_key = mapping.entries_by_key(m)
    qkv = by_key[("decoder.layers.1.self_attention.linear_qkv.weight", None)]
    with pytest.raises(ConversionError, match=r"tensor model\.layers\.1\.attention\.query_key_value\.weight has "
                                              r"shape \[3, 64\], expected \[128, 64\]"):
        qkv.to_megatron([torch.zeros(3, 64)])
    fc2 = by_key[("decoder.layers.2.mlp.experts.experts.linear_fc2.weight", 5)]
    with pytest.raises(ConversionError, match=r"tensor decoder\.layers\.2\.mlp\.experts\.experts\.linear_fc2\.weight"
                                              r"\[5\] has shape \[64, 31\], expected \[64, 32\]"):
        fc2.to_hf(torch.zeros(64, 31))
    fc1 = by_key[("decoder.layers.0.mlp.linear_fc1.weight", None)]
    with pytest.raises(ConversionError, match=r"needs 2 HF tensors"):
        fc1.to_megatron([torch.zeros(fc1.hf_shape)])


def test_a_rule_must_fit_its_transform():
    with pytest.raises(ValueError, match="mapping rule x.weight: 1 HF names for GatedMLP"):
        mapping.Rule("x.weight", ("a.weight",), ("hidden",), mapping.GATE_UP, "all")
    with pytest.raises(ValueError, match="mapping rule y.weight"):
        mapping.Rule("y.weight", ("b.weight",), ("no_such_dim",), mapping.IDENTITY, "all")


def test_moe_layers_follow_the_config_pattern():
    from megatron_uni.config import load_config

    tiny = os.path.join(REPO, "recipes", "model", "tiny.yaml")
    m = load_config(tiny, TINY_OVERRIDES + ["model.first_k_dense=2"]).model
    routed = {e.layer for e in mapping.entries(m) if e.megatron.endswith("router.weight")}
    assert routed == {layer for layer, moe in enumerate(m.moe_layer_pattern) if moe} == {2, 3}
    for layer, moe in enumerate(m.moe_layer_pattern):
        key, _ = mapping.canonical_key(f"decoder.layers.{layer}.pre_mlp_layernorm.weight", m)
        assert (key, None) in mapping.entries_by_key(m)
        assert key.endswith("pre_mlp_layernorm.weight") == bool(moe)


def test_only_the_expert_bias_keeps_fp32():
    assert mapping.keeps_fp32("model.layers.7.mlp.gate.expert_bias")
    assert not mapping.keeps_fp32("model.layers.7.mlp.gate.weight")
    assert not mapping.keeps_fp32("model.layers.x.mlp.gate.expert_bias")


@pytest.mark.parametrize("name, offset, expected", [
    ("decoder.layers.2.mlp.experts.local_experts.3.linear_fc1.weight", 8,
     ("decoder.layers.2.mlp.experts.experts.linear_fc1.weight", 11)),
    ("decoder.layers.2.mlp.experts.linear_fc2.weight5", 8, ("decoder.layers.2.mlp.experts.experts.linear_fc2.weight", 13)),
    ("decoder.layers.2.mlp.linear_fc1.layer_norm_weight", 0, ("decoder.layers.2.pre_mlp_layernorm.weight", None)),
    ("decoder.layers.2.pre_mlp_layernorm.weight", 0, ("decoder.layers.2.pre_mlp_layernorm.weight", None)),
    ("decoder.layers.0.pre_mlp_layernorm.weight", 0, ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", None)),
    ("decoder.layers.1.input_layernorm.weight", 0,
     ("decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", None)),
])
def test_canonical_key_folds_module_names_and_aliases(name, offset, expected):
    m = tiny_config().model
    assert mapping.canonical_key(name, m, expert_offset=offset) == expected
    assert expected in mapping.entries_by_key(m)


def test_entries_name_every_hf_tensor_once():
    m = tiny_config().model
    names = [n for e in mapping.entries(m) for n in e.hf]
    dense, moe = m.first_k_dense, m.num_layers - m.first_k_dense
    per_layer = 5                                    # input norm, qkv, q/k norms, dense
    expected = 3 + m.num_layers * per_layer + dense * 4 + moe * (1 + 2 + 3 + 3 * m.num_experts)
    assert len(names) == len(set(names)) == expected
    stacked = mapping.stacked_megatron_keys(m)
    assert stacked["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"] == (
        m.num_experts, 2 * m.moe_ffn_hidden_size, m.hidden_size)
    assert stacked["embedding.word_embeddings.weight"] == (m.vocab, m.hidden_size)


def test_plan_shards_respects_bound_and_names_files():
    plans = plan_shards([("a", 40), ("b", 50), ("c", 200), ("d", 10)], max_shard_bytes=100)
    assert [p.names for p in plans] == [["a", "b"], ["c"], ["d"]]
    assert [p.file for p in plans] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def test_partial_rope_rotates_first_half_only():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5)[None], rotary_dim=8, theta=600000.0)
    y = apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    assert not torch.allclose(y[..., 1:, :8], x[..., 1:, :8])
    pairs = lambda t: t[..., :4] ** 2 + t[..., 4:8] ** 2  # noqa: E731  rotate-half pairs keep their norm
    assert torch.allclose(pairs(y), pairs(x), atol=1e-5)


def _reference():
    cfg = tiny_config().model
    from megatron_uni.convert.hf_config import uni_config

    # the very HF weights of the round-trip test's tiny folder (text-only, seed 3)
    return LLaDA2Reference(tiny_hf_weights(cfg, text_only=True, seed=3), uni_config(cfg, None)), cfg


def _recorded_router_inputs(reference):
    seen = []
    original = reference.route
    reference.route = lambda x, prefix: seen.append((x, prefix)) or original(x, prefix)
    ids, positions, mask = batch(vocab=tiny_config().model.text_vocab)
    reference(ids, positions, ~mask)
    reference.route = original
    return seen


def test_routing_weights_use_unbiased_scores_and_groups_limit_choice():
    reference, cfg = _reference()
    x, prefix = _recorded_router_inputs(reference)[0]
    chosen, weights = reference.route(x, prefix)
    scores = torch.sigmoid(x.float() @ reference.w[f"{prefix}.gate.weight"].float().T)
    unbiased = scores.gather(1, chosen)
    assert torch.allclose(weights, unbiased / unbiased.sum(-1, keepdim=True) * cfg.moe_router_topk_scaling_factor)
    group_size = cfg.num_experts // cfg.moe_router_num_groups
    assert all(len(set((row // group_size).tolist())) <= cfg.moe_router_group_topk for row in chosen)


def test_parity_batch_exercises_expert_bias_and_group_limit():
    """On the tokens of the parity test the bias and the group limit both change the choice,
    so logits parity really covers them."""
    reference, cfg = _reference()
    bias_changes = group_changes = 0
    for x, prefix in _recorded_router_inputs(reference):
        chosen = reference.route(x, prefix)[0].sort(-1).values
        bias_name = f"{prefix}.gate.expert_bias"
        saved = reference.w[bias_name]
        reference.w[bias_name] = torch.zeros_like(saved)
        bias_changes += int((reference.route(x, prefix)[0].sort(-1).values != chosen).any(-1).sum())
        reference.w[bias_name] = saved
        reference.c["topk_group"] = cfg.moe_router_num_groups  # all groups kept = no limit
        group_changes += int((reference.route(x, prefix)[0].sort(-1).values != chosen).any(-1).sum())
        reference.c["topk_group"] = cfg.moe_router_group_topk
    assert bias_changes > 0 and group_changes > 0


def test_router_facts_reach_megatron_and_hf_from_one_statement():
    from megatron_uni.config import ParallelConfig
    from megatron_uni.convert.hf_config import uni_config
    from megatron_uni.model.router_facts import ROUTER
    from megatron_uni.model.transformer_config import build_transformer_config

    m = tiny_config().model
    megatron, hf = build_transformer_config(m, ParallelConfig()), uni_config(m, pad_token_id=None)
    assert megatron.moe_router_score_function == hf["score_function"] == ROUTER.score_function == "sigmoid"
    assert (megatron.moe_router_dtype, hf["router_dtype"]) == ("fp32", "fp32")
    assert megatron.moe_router_enable_expert_bias is hf["moe_router_enable_expert_bias"] is True
    assert hf["norm_topk_prob"] is True and megatron.moe_aux_loss_coeff == 0.0


@pytest.mark.parametrize("overrides", [[], ["model.first_k_dense=2"],
                                       ["model.moe_shared_expert_intermediate_size=null"]])
def test_table_names_exactly_the_built_models_checkpoint_keys(overrides):
    """The expanded table and megatron's sharded state dict of a built model agree key for key,
    shape for shape (experts stacked), also with two dense layers or without a shared expert."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_uni.config import load_config
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import destroy, init_single_process

    m = load_config(os.path.join(REPO, "recipes", "model", "tiny.yaml"), TINY_OVERRIDES + overrides).model
    init_single_process()
    try:
        items = list(nested_values(build_model(m).sharded_state_dict()))
    finally:
        destroy()
    pieces = [p for i in items for p in (i.build() if isinstance(i, ShardedTensorFactory) else [i])]
    built = {mapping.canonical_key(p.key, m)[0]: tuple(p.global_shape) for p in pieces
             if isinstance(p, ShardedTensor)}
    assert built == mapping.stacked_megatron_keys(m)
