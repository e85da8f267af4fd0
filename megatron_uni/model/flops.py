"""Model FLOPs of LLaDA2.0-Uni: the one formula behind MFU, the benchmark and the scaling model.

*Model* FLOPs count the work the architecture needs, not what a kernel or recompute spends:

* linear layers, on every computed position of the model row (2L for ``[noisy | clean]``, 3L for
  the shared-clean ``[noisy_a | noisy_b | clean]`` row, fewer when compacted; the row's padding
  and filler positions are computed, so they count): 2 FLOPs per multiply-add with the *active*
  weights of a position -- attention projections (q, k, v, out), the dense SwiGLU FFN of the
  first ``first_k_dense`` layers, per MoE layer the router, the top-k routed experts and the
  shared expert, and the output layer. The input embedding is a lookup (0 FLOPs); norms, RoPE
  and softmax are ignored (O(hidden) per position).
* attention, only on the (query, key) pairs the block-diffusion rule allows
  (``attention/masks.py``), counted exactly from the row's ``AttentionLayout``:
  QK^T and AV are 2 x 2 FLOPs per pair, head and head dimension.
* training = 3 x forward (backward = 2 x forward); no credit for activation recompute.

``tools/scaling_model.py`` uses the same per-position weights and attention cost; it counts
attention by FlexAttention tiles (hardware work), which bounds the exact pair count from above.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.attention.masks import allowed_rows
from megatron_uni.config import ModelConfig

TRAIN_OVER_FORWARD = 3  # forward + backward (activation and weight gradients)


# ------------------------------------------------------------------------------------------------
# weights a position multiplies by
# ------------------------------------------------------------------------------------------------
def attention_weights(m: ModelConfig) -> int:
    """q, k, v (GQA) and output projections of one layer."""
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    return m.hidden_size * (q + 2 * kv) + q * m.hidden_size


def swiglu_weights(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # fc1 = [gate; up] (2 x ffn wide), fc2


def moe_active_weights(m: ModelConfig) -> int:
    """Router + top-k routed experts + shared expert of one MoE layer, per position."""
    shared = swiglu_weights(m.hidden_size, m.moe_shared_expert_intermediate_size or 0)
    return m.hidden_size * m.num_experts + m.moe_router_topk * swiglu_weights(m.hidden_size, m.moe_ffn_hidden_size) \
        + shared


def num_moe_layers(m: ModelConfig) -> int:
    return sum(m.moe_layer_pattern) if m.has_moe else 0


def linear_weights_per_position(m: ModelConfig) -> int:
    """Active weights one position is multiplied by, all layers and the output layer."""
    moe = num_moe_layers(m)
    dense = m.num_layers - moe
    return (m.num_layers * attention_weights(m) + dense * swiglu_weights(m.hidden_size, m.ffn_hidden_size)
            + moe * moe_active_weights(m) + m.hidden_size * m.vocab)


# ------------------------------------------------------------------------------------------------
# forward FLOPs
# ------------------------------------------------------------------------------------------------
def linear_forward_flops(m: ModelConfig, positions: int) -> int:
    return 2 * linear_weights_per_position(m) * positions


def attention_forward_flops(m: ModelConfig, pairs: int) -> int:
    """QK^T and AV over ``pairs`` attended (query, key) pairs, every head, every layer."""
    return 4 * pairs * m.num_attention_heads * m.kv_channels * m.num_layers


def attended_pairs(layout: AttentionLayout) -> int:
    """(query, key) pairs the mask rule allows, summed over the rows of ``layout``.

    The rule depends on a position only through (doc, block, clean, copy), so positions are
    grouped by that tuple and the rule is evaluated once per pair of groups: exact, and
    O(groups^2) instead of O(S^2) (a 2L = 16384 row has ~1,000 groups at block 32).
    """
    total = 0
    for row in range(layout.batch_size):
        keys = torch.stack([layout.doc[row].long(), layout.block[row].long(), layout.clean[row].long(),
                            layout.copy[row].long()], dim=1)
        groups, counts = torch.unique(keys, dim=0, return_counts=True)
        # one row whose positions are the groups: the rule, evaluated by the mask module itself
        grouped = AttentionLayout(doc=groups[None, :, 0], block=groups[None, :, 1], clean=groups[None, :, 2].bool(),
                                  copy=groups[None, :, 3])
        allowed = allowed_rows(grouped)[0, 0]
        total += int((allowed.long() * counts[:, None] * counts[None, :]).sum())
    return total


@dataclasses.dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of some model rows (a micro-batch, or a sum of them)."""

    positions: int       # computed positions (every row position, padding and filler included)
    attended_pairs: int
    linear_forward: int
    attention_forward: int

    @property
    def forward(self) -> int:
        return self.linear_forward + self.attention_forward

    @property
    def train(self) -> int:
        """Forward + backward, no recompute credit."""
        return TRAIN_OVER_FORWARD * self.forward

    def __add__(self, other: "ModelFlops") -> "ModelFlops":
        return ModelFlops(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


def model_flops(m: ModelConfig, layout: AttentionLayout) -> ModelFlops:
    """Model FLOPs of the rows described by ``layout`` (e.g. ``DiffusionInputs.layout``)."""
    positions = layout.batch_size * layout.seq_length
    pairs = attended_pairs(layout)
    return ModelFlops(positions=positions, attended_pairs=pairs,
                      linear_forward=linear_forward_flops(m, positions),
                      attention_forward=attention_forward_flops(m, pairs))
