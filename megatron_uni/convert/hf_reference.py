"""An independent plain-PyTorch forward of the HF ``LLaDA2MoeModelLM``, used to prove conversion.

Written from the architecture facts with HF tensor names and no megatron import (only which
tensors stay fp32 is read from the mapping table), so that equal logits from this and from our
megatron model on the imported checkpoint show the mapping right:
pre-norm RMSNorm blocks; fused ``query_key_value`` rows [all Q | all K | all V]; per-head
RMSNorm on q and k BEFORE rotary; NeoX rotate-half RoPE on the first ``partial_rotary_factor``
of each head; bidirectional attention (or an explicit mask); SwiGLU MLPs; MoE layers with a
sigmoid router in fp32, expert bias added for *selection only*, group-limited top-k (group
score = sum of the 2 best biased scores of the group), weights = unbiased scores of the chosen
experts normalised by their sum and scaled by ``routed_scaling_factor``, plus a shared expert.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from megatron_uni.convert.hf_config import with_derived_defaults
from megatron_uni.convert.mapping import keeps_fp32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float):
    """cos/sin ``[b, s, rotary_dim]`` for integer positions ``[b, s]`` (fp32)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` is ``[b, heads, s, d]``; rotate the first ``cos.shape[-1]`` dims, pass the rest."""
    rotary_dim = cos.shape[-1]
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + rotate_half(rot) * sin, passthrough], dim=-1)


def swiglu(x: torch.Tensor, w: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    gate = F.linear(x, w[f"{prefix}.gate_proj.weight"])
    up = F.linear(x, w[f"{prefix}.up_proj.weight"])
    return F.linear(F.silu(gate) * up, w[f"{prefix}.down_proj.weight"])


class LLaDA2Reference:
    """Forward of the HF model from a ``{hf name: tensor}`` dict and the HF ``config.json`` dict."""

    def __init__(self, weights: Mapping[str, torch.Tensor], config: Mapping, dtype: torch.dtype = torch.float32):
        self.w: Dict[str, torch.Tensor] = {k: v.to(dtype) for k, v in weights.items()}
        # the router's expert bias stays fp32 whatever the compute dtype
        for name, tensor in weights.items():
            if keeps_fp32(name):
                self.w[name] = tensor.float()
        self.c = with_derived_defaults(config)
        self.heads = self.c["num_attention_heads"]
        self.kv_heads = self.c["num_key_value_heads"]
        self.head_dim = self.c["head_dim"]
        self.rotary_dim = int(self.head_dim * self.c.get("partial_rotary_factor", 1.0))
        self.eps = self.c["rms_norm_eps"]

    # ---- attention -----------------------------------------------------------------------------
    def attention(self, x, prefix, cos, sin, allowed):
        q, k, v = self.project_qkv(x, prefix, cos, sin)
        k, v = self.keys_values(prefix, k, v)
        return self.attend(q, k, v, prefix, allowed)

    def project_qkv(self, x, prefix, cos, sin):
        """Queries, keys and values ``[b, heads, s, d]``: QK RMSNorm, then partial RoPE."""
        b, s, _ = x.shape
        qkv = F.linear(x, self.w[f"{prefix}.query_key_value.weight"])
        qkv = qkv.view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = torch.split(qkv, [self.heads, self.kv_heads, self.kv_heads], dim=2)
        q = rms_norm(q, self.w[f"{prefix}.query_layernorm.weight"], self.eps)
        k = rms_norm(k, self.w[f"{prefix}.key_layernorm.weight"], self.eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin), v

    def keys_values(self, prefix, k, v):
        """The keys and values attended to: this forward's own (a KV cache prepends its prefix)."""
        return k, v

    def attend(self, q, k, v, prefix, allowed):
        b, _, s, _ = q.shape
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(-1, -2)) / (self.head_dim ** 0.5)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return F.linear(out, self.w[f"{prefix}.dense.weight"])

    # ---- mixture of experts --------------------------------------------------------------------
    def route(self, x: torch.Tensor, prefix: str):
        """Top-k expert ids and weights per token (``x`` is ``[tokens, hidden]``)."""
        logits = F.linear(x.float(), self.w[f"{prefix}.gate.weight"].float())
        scores = torch.sigmoid(logits)
        biased = scores + self.w[f"{prefix}.gate.expert_bias"]
        groups, keep, top_k = self.c["n_group"], self.c["topk_group"], self.c["num_experts_per_tok"]
        tokens, experts = biased.shape
        group_scores = biased.view(tokens, groups, -1).topk(2, dim=-1).values.sum(-1)
        chosen_groups = group_scores.topk(keep, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen_groups, True)
        expert_mask = group_mask[:, :, None].expand(tokens, groups, experts // groups).reshape(tokens, experts)
        chosen = biased.masked_fill(~expert_mask, float("-inf")).topk(top_k, dim=-1).indices
        weights = scores.gather(1, chosen)
        if top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return chosen, weights * self.c["routed_scaling_factor"]

    def moe(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        b, s, h = x.shape
        flat = x.reshape(-1, h)
        chosen, weights = self.route(flat, prefix)
        out = torch.zeros_like(flat)
        for expert in chosen.unique().tolist():
            token_idx, slot = (chosen == expert).nonzero(as_tuple=True)
            expert_out = swiglu(flat[token_idx], self.w, f"{prefix}.experts.{expert}")
            out.index_add_(0, token_idx, expert_out * weights[token_idx, slot, None].to(flat.dtype))
        if self.c.get("num_shared_experts"):
            out = out + swiglu(flat, self.w, f"{prefix}.shared_experts")
        return out.view(b, s, h)

    # ---- model ---------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                 allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[b, s, vocab]``. ``allowed``: bool ``[b, 1, s, s]``, True = may attend (HF
        convention); None = full bidirectional attention."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s)[None].expand(b, s)
        cos, sin = rope_cos_sin(position_ids, self.rotary_dim, self.c["rope_theta"])
        x = F.embedding(input_ids, self.w["model.word_embeddings.weight"])
        for layer in range(self.c["num_hidden_layers"]):
            p = f"model.layers.{layer}"
            x = x + self.attention(rms_norm(x, self.w[f"{p}.input_layernorm.weight"], self.eps),
                                   f"{p}.attention", cos, sin, allowed)
            normed = rms_norm(x, self.w[f"{p}.post_attention_layernorm.weight"], self.eps)
            dense = layer < self.c["first_k_dense_replace"]
            x = x + (swiglu(normed, self.w, f"{p}.mlp") if dense else self.moe(normed, f"{p}.mlp"))
        x = rms_norm(x, self.w["model.norm.weight"], self.eps)
        return F.linear(x, self.w["lm_head.weight"])
