"""SigLIP-VQ encoder: nearest-code lookup, position resampling, shapes, real-size parameter count."""

import pytest
import torch

from megatron_uni.vq.config import VQConfig
from megatron_uni.vq.encoder import Codebook, PositionTable, Quantizer, SigLIPVQ, build_seeded


def codebook_with(rows):
    cfg = VQConfig.tiny().quantizer
    book = Codebook(type(cfg)(num_embeddings=len(rows), embed_dim=len(rows[0]), latent_channels=32))
    with torch.no_grad():
        book.embedding.weight.copy_(torch.tensor(rows, dtype=torch.float32))
    return book


def test_lookup_picks_nearest_normalised_code_not_nearest_raw_code():
    # Raw Euclidean distance would pick code 1 (close in absolute terms); after L2 normalisation
    # the vector points almost exactly along code 0, which is the known answer.
    book = codebook_with([[10.0, 0.0], [0.5, 0.5], [-1.0, 0.0]])
    assert book.nearest(torch.tensor([[1.0, 0.2]])).tolist() == [0]
    assert book.nearest(torch.tensor([[0.3, 0.31], [-5.0, 0.1], [0.0, 2.0]])).tolist() == [1, 2, 1]


def test_lookup_matches_brute_force_distance_on_random_vectors():
    torch.manual_seed(0)
    codes = torch.randn(300, 8) * torch.rand(300, 1) * 5
    vectors = torch.randn(500, 8)
    book = codebook_with(codes.tolist())
    unit_v = vectors / vectors.norm(dim=-1, keepdim=True)
    unit_c = codes / codes.norm(dim=-1, keepdim=True)
    expected = torch.cdist(unit_v, unit_c).argmin(dim=-1)
    assert torch.equal(book.nearest(vectors), expected)


def test_quantizer_applies_quant_conv_and_keeps_row_major_grid_order():
    cfg = VQConfig.tiny(num_embeddings=4).quantizer
    quantizer = Quantizer(cfg)
    with torch.no_grad():
        quantizer.quant_conv.weight.zero_()
        quantizer.quant_conv.bias.zero_()
        # latent channel c -> codebook dimension c for the first 4 channels
        for c in range(4):
            quantizer.quant_conv.weight[c, c, 0, 0] = 1.0
        quantizer.quantize.embedding.weight.copy_(torch.eye(4, cfg.embed_dim))
    features = torch.zeros(1, cfg.latent_channels, 2, 3)
    wanted = [[3, 0, 1], [2, 2, 0]]
    for y in range(2):
        for x in range(3):
            features[0, wanted[y][x], y, x] = 1.0
    assert quantizer(features).tolist() == [wanted]


def test_position_table_at_native_grid_is_the_table_itself():
    cfg = VQConfig.tiny().vision
    table = PositionTable(cfg)
    grid = cfg.position_grid
    assert torch.allclose(table(grid, grid), table.position_embedding.weight, atol=1e-6)
    half = table(grid // 2, grid // 2)
    square = table.position_embedding.weight.view(grid, grid, -1)
    # Halving samples the midpoint of each 2x2 cell: the mean of its four entries.
    cell = square[0:2, 0:2].reshape(4, -1).mean(0)
    assert torch.allclose(half[0], cell, atol=1e-5)


def test_encode_gives_one_code_per_patch_and_is_seeded():
    cfg = VQConfig.tiny(num_embeddings=64)
    pixels = torch.rand(2, 3, 48, 80) * 2 - 1
    codes = build_seeded(cfg, 1).encode(pixels)
    assert codes.shape == (2, 3, 5) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 64
    assert torch.equal(codes, build_seeded(cfg, 1).encode(pixels))
    assert not torch.equal(build_seeded(cfg, 1).visual.patch_embed.proj.weight,
                           build_seeded(cfg, 2).visual.patch_embed.proj.weight)
    # Batched encoding equals one-by-one encoding (attention never mixes images).
    single = torch.cat([build_seeded(cfg, 1).encode(pixels[i:i + 1]) for i in range(2)])
    assert torch.equal(codes, single)


def test_encode_rejects_sizes_that_are_not_patch_multiples():
    model = build_seeded(VQConfig.tiny(), 0)
    with pytest.raises(ValueError, match="multiple of the 16-px patch"):
        model.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[batch, 3, H, W\]"):
        model.encode(torch.zeros(3, 32, 32))


def test_real_config_has_the_published_tensor_count_and_parameter_count():
    with torch.device("meta"):
        model = SigLIPVQ(VQConfig.real())
    state = model.state_dict()
    assert len(state) == 488
    assert sum(t.numel() for t in state.values()) == 1_199_457_280
    assert state["vqmodel.quantize.embedding.weight"].shape == (16384, 2048)
    assert state["visual.embeddings.position_embedding.weight"].shape == (128 * 128, 1536)
    assert state["visual.blocks.39.attn.qkv.weight"].shape == (3 * 1536, 1536)
