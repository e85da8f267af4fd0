"""SigLIP-VQ image encoder: pixels -> grid of 0-based codebook indices (one per 16x16 patch).

Architecture (LLaDA2.0-Uni / GLM-Image vision tokenizer): a ViT with a 16-px convolutional patch embed,
a learned square position table resampled bilinearly to the image's patch grid, pre-LayerNorm blocks
(fused-qkv attention with bias, GELU MLP), no final norm; then a 1x1 ``quant_conv`` into the codebook
space and a nearest-code lookup on L2-normalised vectors.

Submodule names mirror the HF checkpoint (``model.visual.*``, ``model.vqmodel.*``) so a state dict maps
onto the safetensors names by prefixing ``model.`` (see ``weights.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_uni.vq.config import QuantizerConfig, VisionConfig, VQConfig

# Rows of (patches x codebook) similarities scored at once: bounds memory to ~rows*codes*4 bytes.
_LOOKUP_CHUNK_ROWS = 4096


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.proj(pixels.to(self.proj.weight.dtype))  # [b, d, gh, gw]
        return patches.flatten(2).transpose(1, 2)  # [b, gh*gw, d], row-major patch order


class PositionTable(nn.Module):
    """Learned (G x G) table, bilinearly resampled to any (gh x gw) grid at patch centres."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.grid = cfg.position_grid
        self.position_embedding = nn.Embedding(self.grid * self.grid, cfg.hidden_size)

    def forward(self, grid_h: int, grid_w: int) -> torch.Tensor:
        table = self.position_embedding.weight
        square = table.view(self.grid, self.grid, -1).permute(2, 0, 1).unsqueeze(0).float()
        # Patch centres in normalised [-1, 1] coordinates (align_corners=False convention).
        ys = (torch.arange(grid_h, device=table.device, dtype=torch.float32) + 0.5) / grid_h * 2 - 1
        xs = (torch.arange(grid_w, device=table.device, dtype=torch.float32) + 0.5) / grid_w * 2 - 1
        mesh_y, mesh_x = torch.meshgrid(ys, xs, indexing="ij")
        sample_at = torch.stack((mesh_x, mesh_y), dim=-1).unsqueeze(0)  # grid_sample wants (x, y)
        resampled = F.grid_sample(square, sample_at, mode="bilinear", align_corners=False, padding_mode="border")
        return resampled[0].flatten(1).transpose(0, 1).to(table.dtype)  # [gh*gw, d]


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        # Fused rows are [q heads | k heads | v heads].
        qkv = self.qkv(hidden).view(batch, seq, 3, self.num_heads, width // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [b, heads, seq, head_dim]
        out = F.scaled_dot_product_attention(query, key, value, is_causal=False)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attn(self.norm1(hidden))
        return hidden + self.mlp(self.norm2(hidden))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.embeddings = PositionTable(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [b, 3, H, W] (normalised, H and W multiples of the patch) -> features [b, d, gh, gw]."""
        grid_h, grid_w = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        hidden = self.patch_embed(pixels)
        hidden = hidden + self.embeddings(grid_h, grid_w).to(hidden.dtype)
        for block in self.blocks:
            hidden = block(hidden)
        return hidden.transpose(1, 2).reshape(hidden.shape[0], -1, grid_h, grid_w)


class Codebook(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.num_embeddings, cfg.embed_dim)

    def nearest(self, vectors: torch.Tensor) -> torch.Tensor:
        """vectors [n, e] -> index [n] of the nearest code, both sides L2-normalised (cosine argmax).

        For unit vectors |a - b|^2 = 2 - 2 a.b, so the argmin distance of the reference equals this argmax;
        computed in fp32 so bf16 rounding cannot reorder near-ties.
        """
        codes = F.normalize(self.embedding.weight.float(), dim=-1)
        vectors = F.normalize(vectors.float(), dim=-1)
        picks = [torch.argmax(chunk @ codes.t(), dim=-1) for chunk in vectors.split(_LOOKUP_CHUNK_ROWS)]
        return torch.cat(picks) if picks else torch.empty(0, dtype=torch.long, device=vectors.device)


class Quantizer(nn.Module):
    def __init__(self, cfg: QuantizerConfig):
        super().__init__()
        self.quantize = Codebook(cfg)
        self.quant_conv = nn.Conv2d(cfg.latent_channels, cfg.embed_dim, 1)
        # Used only by the pixel decoder path; kept so the checkpoint layout round-trips unchanged.
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.latent_channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [b, latent, gh, gw] -> codes [b, gh, gw] (int64, 0-based)."""
        latent = self.quant_conv(features)
        batch, dim, grid_h, grid_w = latent.shape
        flat = latent.permute(0, 2, 3, 1).reshape(-1, dim)
        return self.quantize.nearest(flat).view(batch, grid_h, grid_w)


class SigLIPVQ(nn.Module):
    """The image tokenizer. ``encode(pixels)`` -> 0-based codes; add the Vocabulary's image offset for ids."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg.vision)
        self.vqmodel = Quantizer(cfg.quantizer)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [b, 3, H, W] normalised to [-1, 1] -> codes [b, H/16, W/16]."""
        patch = self.config.patch_size
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [batch, 3, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[-2] % patch or pixels.shape[-1] % patch:
            raise ValueError(f"pixel size {tuple(pixels.shape[-2:])} is not a multiple of the {patch}-px patch")
        return self.vqmodel(self.visual(pixels))


def build_seeded(cfg: VQConfig, seed: int) -> SigLIPVQ:
    """A randomly initialised encoder that is identical for a given seed (tests, demo)."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = SigLIPVQ(cfg)
        with torch.no_grad():
            # Spread the position table and codebook like trained ones would be (nn.Embedding is N(0,1)).
            model.visual.embeddings.position_embedding.weight.mul_(0.02)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()
