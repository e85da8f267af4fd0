"""The CPU attention (chunked SDPA) keeps training memory O(chunk x S): it saves no mask for
backward and rebuilds each chunk's mask from O(S) codes; same outputs and gradients as before."""

import pytest
import torch
import torch.nn.functional as F

from megatron_uni.diffusion.layout import full_layout
from megatron_uni.attention.masks import allowed_from_codes, allowed_rows, dense_mask, mask_codes
from megatron_uni.model.block_attention import chunked_sdpa
from test_diffusion_masks import brute_force, random_layouts


def test_codes_equal_the_rule_on_random_layouts():
    for i, layout in enumerate(random_layouts(12)):  # full and prefix-aware (filler doc -2), several documents
        codes, s = mask_codes(layout), layout.seq_length
        if i < 4:  # brute force is slow; allowed_rows is itself checked against it in test_diffusion_masks
            assert torch.equal(~allowed_from_codes(codes, 0, s), brute_force(layout))
        for start in range(0, s, 5):  # uneven chunks
            stop = min(start + 5, s)
            assert torch.equal(allowed_from_codes(codes, start, stop), allowed_rows(layout, start, stop))


def _autograd_chunked_sdpa(q, k, v, layout, scale, chunk):
    """The previous implementation: plain autograd over per-chunk SDPA (saves every chunk's mask)."""
    outs = [F.scaled_dot_product_attention(q[:, :, a:a + chunk], k, v, attn_mask=allowed_rows(layout, a, a + chunk),
                                           scale=scale, enable_gqa=True)
            for a in range(0, q.shape[2], chunk)]
    return torch.cat(outs, 2)


def _dense_sdpa(q, k, v, layout, scale, chunk):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_mask(layout), scale=scale, enable_gqa=True)


def _qkv(layout, heads=4, kv_heads=2, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (layout.batch_size, heads, layout.seq_length, dim)
    q = torch.randn(shape, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(shape[0], kv_heads, *shape[2:], generator=gen, dtype=torch.float64) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def _out_and_grads(fn, layout, chunk, seed=0):
    q, k, v = _qkv(layout, seed=seed)
    out = fn(q, k, v, layout, 0.3, chunk)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


@pytest.mark.parametrize("chunk", [9, 1024])
def test_outputs_and_gradients_equal_the_autograd_and_dense_versions(chunk):
    for i, layout in enumerate(random_layouts(4)):
        got = _out_and_grads(chunked_sdpa, layout, chunk, seed=i)
        for reference in (_autograd_chunked_sdpa, _dense_sdpa):
            want = _out_and_grads(reference, layout, chunk, seed=i)
            for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
                torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=f"{name} {reference.__name__}")


def _saved_bytes(fn, layout, chunk) -> tuple:
    """(total bytes, largest tensor numel) of what autograd saves for backward in ``fn``."""
    q, k, v = _qkv(layout)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(q, k, v, layout, 0.3, chunk)
    return sum(b for b, _ in saved.values()), max(n for _, n in saved.values())


def test_training_saves_no_mask():
    doc_ids = torch.arange(256, dtype=torch.int32).div(64, rounding_mode="floor")[None].repeat(2, 1)  # 4 docs
    layout = full_layout(doc_ids, 32)  # S = 512
    s, chunk = layout.seq_length, 64
    qkv_bytes = sum(t.numel() * t.element_size() for t in _qkv(layout))
    new_total, new_largest = _saved_bytes(chunked_sdpa, layout, chunk)
    old_total, _ = _saved_bytes(_autograd_chunked_sdpa, layout, chunk)
    # q, k, v and five [b, S] int64 code rows; the autograd version adds b*S^2 mask entries
    assert new_total <= qkv_bytes + 5 * 8 * layout.batch_size * s
    assert new_largest < layout.batch_size * s * s / 8
    assert old_total >= qkv_bytes + layout.batch_size * s * s
