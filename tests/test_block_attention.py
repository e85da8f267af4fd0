"""The block-diffusion core attention inside the real (tiny) megatron model."""

import copy

import pytest
import torch

from megatron_uni.config import load_config
from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.losses import combine, loss_sums
from megatron_uni.model import block_attention
from megatron_uni.model.block_attention import BlockDiffusionAttention, block_attention_spec
from megatron_uni.model.builder import build_model
from diffusion_helpers import random_batch, tiny_vocab

BLOCK = 8


@pytest.fixture(scope="module")
def models(single_process):
    cfg = load_config("recipes/model/tiny.yaml").model
    ours = build_model(cfg, core_attention=block_attention_spec())
    stock = build_model(cfg)  # megatron's own DotProductAttention, dense mask
    stock.load_state_dict(ours.state_dict())
    ours.eval(), stock.eval()
    return ours, stock


def make_inputs(seed=0, prefix_aware=False, length=64, prompt_blocks=1):
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(seed), 2, length, BLOCK, vocab, prompt_blocks=prompt_blocks)
    cfg = DiffusionConfig(t_min=0.3, t_max=0.8, prefix_aware=prefix_aware)
    return build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(seed + 100), block_size=BLOCK,
                        pad_multiple=16), vocab


def test_layout_descriptor_matches_megatron_attention_with_dense_mask(models, monkeypatch):
    ours, stock = models
    inputs, _ = make_inputs(1)
    # several uneven query chunks (128 positions by 24; the chunk is read at call time), counted
    allowed_from_codes, chunks = block_attention.allowed_from_codes, []
    monkeypatch.setattr(block_attention, "CPU_QUERY_CHUNK", 24)
    monkeypatch.setattr(block_attention, "allowed_from_codes",
                        lambda codes, start, stop: chunks.append(stop - start) or allowed_from_codes(codes, start, stop))
    with torch.no_grad():
        got = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        want = stock(inputs.input_ids, inputs.position_ids, inputs.dense_attention_mask())
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert inputs.attention_mask.shape[-1] == 128
    assert chunks == ([24] * 5 + [8]) * ours.config.num_layers, chunks


def test_rope_uses_position_ids(models):
    ours, _ = models
    inputs, _ = make_inputs(2)
    with torch.no_grad():
        base = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        shifted = ours(inputs.input_ids, inputs.position_ids + 5, inputs.attention_mask)  # relative: same
        scrambled = ours(inputs.input_ids, inputs.position_ids.flip(1), inputs.attention_mask)
    torch.testing.assert_close(base, shifted, atol=1e-4, rtol=1e-4)
    assert (base - scrambled).abs().max() > 1e-3


def _noisy_block_logits(model, inputs, ids, row, positions):
    with torch.no_grad():
        return model(ids, inputs.position_ids, inputs.attention_mask)[row, positions]


def test_no_leak_into_a_noisy_block(models):
    ours, _ = models
    inputs, vocab = make_inputs(3, length=64)
    layout = inputs.layout
    row = 0
    doc0 = (layout.doc[row] == 0)
    blocks = layout.block[row]
    target = int(blocks[doc0 & ~layout.clean[row]].max())  # last noisy block of document 0
    query = torch.nonzero(doc0 & ~layout.clean[row] & (blocks == target)).flatten()
    base = _noisy_block_logits(ours, inputs, inputs.input_ids, row, query)

    def changed(where):
        ids = inputs.input_ids.clone()
        ids[row, where] = (ids[row, where] + 7) % vocab.text_size
        return _noisy_block_logits(ours, inputs, ids, row, query)

    later_or_same_clean = torch.nonzero(layout.clean[row] & doc0 & (blocks >= target)).flatten()
    other_noisy = torch.nonzero(~layout.clean[row] & (blocks != target)).flatten()
    other_docs = torch.nonzero(layout.doc[row] != 0).flatten()
    earlier_clean = torch.nonzero(layout.clean[row] & doc0 & (blocks < target)).flatten()
    assert all(p.numel() for p in (later_or_same_clean, other_noisy, other_docs, earlier_clean))
    for unseen in (later_or_same_clean, other_noisy, other_docs):
        torch.testing.assert_close(changed(unseen), base, atol=1e-6, rtol=0)
    assert (changed(query[:1]) - base).abs().max() > 1e-4   # its own noisy block is seen
    assert (changed(earlier_clean) - base).abs().max() > 1e-4


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    ce = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels)
    loss = combine(loss_sums(ce, inputs)).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_prefix_aware_layout_gives_the_same_loss_and_gradients(models):
    ours, _ = models
    model = ours
    full, _ = make_inputs(4, length=128, prompt_blocks=6)
    compact, _ = make_inputs(4, prefix_aware=True, length=128, prompt_blocks=6)
    assert compact.num_tokens < full.num_tokens
    loss_full, grads_full = _loss_and_grads(model, full)
    loss_compact, grads_compact = _loss_and_grads(model, compact)
    torch.testing.assert_close(loss_compact, loss_full, atol=1e-5, rtol=1e-5)
    assert grads_full.keys() == grads_compact.keys() and len(grads_full) > 10
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_compact[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_context_parallel_is_refused(models):
    ours, _ = models
    config = copy.copy(ours.config)
    config.context_parallel_size = 2
    with pytest.raises(ValueError, match="context parallel"):
        BlockDiffusionAttention(config, 1, None, "self")


def test_missing_or_wrong_mask_is_refused(models):
    ours, _ = models
    inputs, _ = make_inputs(5)
    with pytest.raises(ValueError, match="needs an attention_mask"):
        ours(inputs.input_ids, inputs.position_ids, None)
    with pytest.raises(ValueError, match="covers"):
        ours(inputs.input_ids[:, :64], inputs.position_ids[:, :64], inputs.attention_mask)


def test_full_activation_recompute_passes_the_descriptor(models, monkeypatch):
    from megatron.core import tensor_parallel

    ours, _ = models
    calls = []
    original = tensor_parallel.checkpoint
    monkeypatch.setattr(tensor_parallel, "checkpoint", lambda *a: calls.append(1) or original(*a))
    cfg = load_config("recipes/model/tiny.yaml", ["model.recompute_granularity=full"]).model
    recomputed = build_model(cfg, core_attention=block_attention_spec())
    recomputed.load_state_dict(ours.state_dict())
    assert recomputed.config.recompute_granularity == "full"
    inputs, _ = make_inputs(6)
    recomputed.train()  # megatron recomputes only in training mode
    loss_re, grads_re = _loss_and_grads(recomputed, inputs)
    loss_plain, grads_plain = _loss_and_grads(ours, inputs)
    assert calls, "megatron's activation checkpoint was not used"
    torch.testing.assert_close(loss_re, loss_plain)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_re[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_ce_and_confidence_from_logits_match_the_model_loss(models):
    from megatron_uni.diffusion.losses import ce_and_confidence, confidence_entropy

    ours, _ = models
    inputs, _ = make_inputs(7)
    logits = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
    ce, (entropy, counted) = ce_and_confidence(logits, inputs.labels)
    with torch.no_grad():
        want = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels)
    torch.testing.assert_close(ce, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, confidence_entropy(logits, inputs.labels)[0])
    total = combine(loss_sums(ce, inputs, (entropy, counted)), confidence_beta=2.0).loss
    total.backward()  # CE's in-place max subtraction must not break the CAP graph
    assert ours.output_layer.weight.grad is not None
    ours.zero_grad(set_to_none=True)


def test_mask_embedding_noise_hook_on_the_megatron_embedding(models):
    from megatron_uni.model.embedding_noise import mask_embedding_noise_hook

    ours, _ = models
    inputs, vocab = make_inputs(8)
    step = [0]
    handle = ours.embedding.register_forward_hook(
        mask_embedding_noise_hook(vocab.mask_id, 1.0, 1, lambda: step[0]), with_kwargs=True)
    try:
        captured = []
        probe = ours.embedding.register_forward_hook(lambda m, a, k, out: captured.append(out), with_kwargs=True)
        with torch.no_grad():
            evaluated = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)  # eval mode: no noise
            ours.embedding.train()  # the hook acts in training only
            noisy = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
            step[0] = 1
            clean = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        probe.remove()
    finally:
        handle.remove()
        ours.embedding.eval()
    is_mask = (inputs.input_ids == vocab.mask_id).transpose(0, 1)       # [s, b]
    changed = (captured[1] - captured[2]).abs().sum(-1) > 0
    assert is_mask.any() and torch.equal(changed, is_mask)
    assert (noisy - clean).abs().max() > 1e-3
    assert torch.equal(evaluated, clean)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_path_in_the_model_matches_the_fallback(models, monkeypatch):
    from torch.nn.attention.flex_attention import flex_attention

    ours, _ = models
    inputs, _ = make_inputs(9, prefix_aware=True, length=128, prompt_blocks=4)
    with torch.no_grad():
        fallback = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        # the GPU code path, run eagerly on CPU (forward only): cached BlockMask, GQA, scale
        monkeypatch.setattr(block_attention, "FLEX_DEVICE_TYPES", ("cuda", "cpu"))
        monkeypatch.setattr(block_attention, "_COMPILED_FLEX", flex_attention)
        cache = block_attention.mask_cache()
        builds = cache.builds
        flex = ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
    assert cache.builds == builds + 1          # one BlockMask for all 4 layers
    torch.testing.assert_close(flex, fallback, atol=2e-5, rtol=2e-5)
