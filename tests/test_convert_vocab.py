"""Vocabulary expansion on import, and HF config keys older LLaDA2 configs leave implicit."""

from __future__ import annotations

import torch

from convert_helpers import tiny_config
from megatron_uni.convert.hf_config import check_hf_config, uni_config
from megatron_uni.convert.importer import expand_vocab_rows

KEY = "embedding.word_embeddings.weight"


def test_text_only_rows_expand_to_seeded_image_rows_and_zero_padding():
    m = tiny_config().model
    text = torch.randn(m.text_vocab, m.hidden_size)
    full = expand_vocab_rows(text, KEY, m, seed=5, std=0.02)
    image_end = m.text_vocab + m.num_image_codes
    assert full.shape == (m.vocab, m.hidden_size)
    assert torch.equal(full[:m.text_vocab], text)
    assert torch.equal(full, expand_vocab_rows(text, KEY, m, seed=5, std=0.02))        # same on every rank
    assert not torch.equal(full[m.text_vocab:image_end], expand_vocab_rows(text, KEY, m, 6, 0.02)[m.text_vocab:image_end])
    assert not torch.equal(full[m.text_vocab:image_end],
                           expand_vocab_rows(text, "output_layer.weight", m, 5, 0.02)[m.text_vocab:image_end])
    assert 0.015 < full[m.text_vocab:image_end].std().item() < 0.025
    assert torch.count_nonzero(full[image_end:]) == 0


def test_a_ranks_rows_in_bf16_equal_the_whole_fp32_matrix_rounded_once():
    m = tiny_config().model
    text = torch.randn(m.text_vocab, m.hidden_size).bfloat16()
    whole = expand_vocab_rows(text, KEY, m, seed=5, std=0.02).bfloat16()
    for rows in (slice(0, 640), slice(640, 1280), slice(1000, 1230)):  # text | image | padding boundaries
        piece = expand_vocab_rows(text, KEY, m, seed=5, std=0.02, rows=rows, dtype=torch.bfloat16)
        assert piece.dtype == torch.bfloat16 and torch.equal(piece.view(torch.int16), whole[rows].view(torch.int16))


def test_uni_rows_are_copied_whole():
    m = tiny_config().model
    uni = torch.randn(m.vocab, m.hidden_size)
    assert torch.equal(expand_vocab_rows(uni, KEY, m, seed=5, std=0.02), uni)
    unpadded = uni[:m.text_vocab + m.num_image_codes]
    out = expand_vocab_rows(unpadded, KEY, m, seed=5, std=0.02)
    assert torch.equal(out[:len(unpadded)], unpadded) and torch.count_nonzero(out[len(unpadded):]) == 0


def test_head_dim_and_rotary_fraction_derived_when_absent():
    m = tiny_config().model
    hf = uni_config(m, None)
    hf.pop("head_dim")
    hf.pop("partial_rotary_factor")
    hf["rotary_dim"] = m.kv_channels // 2           # LLaDA2.0-mini spelling of the rotary fraction
    assert check_hf_config(hf, m, "config.json") == m.vocab
