"""The one table HF LLaDA2 name <-> megatron checkpoint key, with its transform, used both ways.

Megatron names here are the *checkpoint keys* of megatron-core's sharded state dict: global
(layer numbers across pipeline stages, experts stacked along a leading expert axis) and the same
for every TP/PP/EP layout, SequentialMLP and TE grouped-GEMM experts alike. Module state-dict
names (``local_experts.{e}``, ``weight{e}``, the local spec's separate norms) are folded onto
these keys by :func:`canonical_key`.

Transforms:
  identity   one HF tensor <-> one megatron tensor
  qkv        HF rows [all Q heads | all K heads | all V heads] <-> megatron rows grouped per
             query group [q heads of the group, k, v] x groups
  gate_up    HF gate_proj, up_proj <-> megatron linear_fc1 = [gate; up]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

IDENTITY, QKV, GATE_UP = "identity", "qkv", "gate_up"


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table; ``{L}`` is the layer, ``{E}`` the expert (HF side only)."""

    megatron: str
    hf: Tuple[str, ...]
    transform: str = IDENTITY
    layers: str = "global"        # global (no layer) | all | dense | moe
    expert: bool = False          # megatron key stacks experts on axis 0
    keep_fp32: bool = False       # stays fp32 in bf16 exports (router expert bias)
    vocab: bool = False           # rows are the model vocabulary (expanded on import)


_ATT = "decoder.layers.{L}.self_attention"
_MLP = "decoder.layers.{L}.mlp"
_HF = "model.layers.{L}"

RULES: Tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.word_embeddings.weight",), vocab=True),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",), vocab=True),
    # attention, every layer
    Rule(f"{_ATT}.linear_qkv.layer_norm_weight", (f"{_HF}.input_layernorm.weight",), layers="all"),
    Rule(f"{_ATT}.linear_qkv.weight", (f"{_HF}.attention.query_key_value.weight",), QKV, layers="all"),
    Rule(f"{_ATT}.q_layernorm.weight", (f"{_HF}.attention.query_layernorm.weight",), layers="all"),
    Rule(f"{_ATT}.k_layernorm.weight", (f"{_HF}.attention.key_layernorm.weight",), layers="all"),
    Rule(f"{_ATT}.linear_proj.weight", (f"{_HF}.attention.dense.weight",), layers="all"),
    # dense FFN layers (the first `first_k_dense`)
    Rule(f"{_MLP}.linear_fc1.layer_norm_weight", (f"{_HF}.post_attention_layernorm.weight",), layers="dense"),
    Rule(f"{_MLP}.linear_fc1.weight", (f"{_HF}.mlp.gate_proj.weight", f"{_HF}.mlp.up_proj.weight"), GATE_UP,
         layers="dense"),
    Rule(f"{_MLP}.linear_fc2.weight", (f"{_HF}.mlp.down_proj.weight",), layers="dense"),
    # MoE layers
    Rule("decoder.layers.{L}.pre_mlp_layernorm.weight", (f"{_HF}.post_attention_layernorm.weight",), layers="moe"),
    Rule(f"{_MLP}.router.weight", (f"{_HF}.mlp.gate.weight",), layers="moe"),
    Rule(f"{_MLP}.router.expert_bias", (f"{_HF}.mlp.gate.expert_bias",), layers="moe", keep_fp32=True),
    Rule(f"{_MLP}.shared_experts.linear_fc1.weight",
         (f"{_HF}.mlp.shared_experts.gate_proj.weight", f"{_HF}.mlp.shared_experts.up_proj.weight"), GATE_UP,
         layers="moe"),
    Rule(f"{_MLP}.shared_experts.linear_fc2.weight", (f"{_HF}.mlp.shared_experts.down_proj.weight",), layers="moe"),
    Rule(f"{_MLP}.experts.experts.linear_fc1.weight",
         (f"{_HF}.mlp.experts.{{E}}.gate_proj.weight", f"{_HF}.mlp.experts.{{E}}.up_proj.weight"), GATE_UP,
         layers="moe", expert=True),
    Rule(f"{_MLP}.experts.experts.linear_fc2.weight", (f"{_HF}.mlp.experts.{{E}}.down_proj.weight",),
         layers="moe", expert=True),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A rule expanded for one layer (and expert): concrete names on both sides."""

    megatron: str
    expert: Optional[int]
    hf: Tuple[str, ...]
    transform: str
    keep_fp32: bool
    vocab: bool
    layer: Optional[int]

    @property
    def name(self) -> str:
        """Readable id for messages: the key, plus ``[e]`` for one expert of a stacked key."""
        return self.megatron if self.expert is None else f"{self.megatron}[{self.expert}]"


def _layer_kinds(model_cfg) -> List[str]:
    return ["dense" if i < model_cfg.first_k_dense else "moe" for i in range(model_cfg.num_layers)]


def _expand(rule: Rule, layer: Optional[int], expert: Optional[int]) -> Entry:
    fmt = {"L": layer, "E": expert}
    return Entry(megatron=rule.megatron.format(**fmt), expert=expert,
                 hf=tuple(h.format(**fmt) for h in rule.hf), transform=rule.transform,
                 keep_fp32=rule.keep_fp32, vocab=rule.vocab, layer=layer)


def entries(model_cfg) -> List[Entry]:
    """Every tensor of the model in HF file order: embeddings, layers (experts inside), norm, head."""
    first = [_expand(r, None, None) for r in RULES if r.layers == "global" and r.hf[0].startswith("model.word")]
    last = [_expand(r, None, None) for r in RULES if r.layers == "global" and not r.hf[0].startswith("model.word")]
    layered: List[Entry] = []
    for layer, kind in enumerate(_layer_kinds(model_cfg)):
        for rule in RULES:
            if rule.layers not in ("all", kind):
                continue
            experts = range(model_cfg.num_experts) if rule.expert else [None]
            layered.extend(_expand(rule, layer, e) for e in experts)
    return first + layered + last


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
def _qkv_sizes(model_cfg) -> Tuple[int, int, int]:
    groups = model_cfg.num_query_groups
    return groups, model_cfg.num_attention_heads // groups, model_cfg.kv_channels


def qkv_hf_to_megatron(weight: torch.Tensor, model_cfg) -> torch.Tensor:
    groups, heads_per_group, dim = _qkv_sizes(model_cfg)
    q_rows = groups * heads_per_group * dim
    hidden = weight.shape[1]
    q = weight[:q_rows].reshape(groups, heads_per_group * dim, hidden)
    k = weight[q_rows:q_rows + groups * dim].reshape(groups, dim, hidden)
    v = weight[q_rows + groups * dim:].reshape(groups, dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_megatron_to_hf(weight: torch.Tensor, model_cfg) -> torch.Tensor:
    groups, heads_per_group, dim = _qkv_sizes(model_cfg)
    hidden = weight.shape[1]
    grouped = weight.reshape(groups, (heads_per_group + 2) * dim, hidden)
    q, k, v = torch.split(grouped, [heads_per_group * dim, dim, dim], dim=1)
    return torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)], dim=0)


def to_megatron(entry: Entry, hf_tensors: Sequence[torch.Tensor], model_cfg) -> torch.Tensor:
    """HF tensors (in ``entry.hf`` order) -> the megatron tensor (one expert's slice if stacked)."""
    if entry.transform == QKV:
        return qkv_hf_to_megatron(hf_tensors[0], model_cfg)
    if entry.transform == GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    return hf_tensors[0]


def to_hf(entry: Entry, tensor: torch.Tensor, model_cfg) -> Dict[str, torch.Tensor]:
    """The megatron tensor (one expert's slice if stacked) -> ``{hf name: tensor}``."""
    if entry.transform == QKV:
        return {entry.hf[0]: qkv_megatron_to_hf(tensor, model_cfg)}
    if entry.transform == GATE_UP:
        gate, up = torch.chunk(tensor, 2, dim=0)
        return {entry.hf[0]: gate, entry.hf[1]: up}
    return {entry.hf[0]: tensor}


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def hf_shapes(entry: Entry, model_cfg, vocab_rows: int) -> Dict[str, Tuple[int, ...]]:
    """Expected HF shape of every tensor of ``entry`` (``vocab_rows`` rows for vocab matrices)."""
    shape = megatron_shape(entry, model_cfg, vocab_rows)
    if entry.transform == GATE_UP:
        half = (shape[0] // 2,) + shape[1:]
        return {entry.hf[0]: half, entry.hf[1]: half}
    return {entry.hf[0]: shape}


def megatron_shape(entry: Entry, model_cfg, vocab_rows: int) -> Tuple[int, ...]:
    """Shape of the megatron tensor of ``entry`` (one expert's slice for stacked keys)."""
    m = model_cfg
    h = m.hidden_size
    key = entry.megatron
    if entry.vocab:
        return (vocab_rows, h)
    if key.endswith("linear_qkv.weight"):
        return ((m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels, h)
    if key.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return (m.kv_channels,)
    if key.endswith("linear_proj.weight"):
        return (h, m.num_attention_heads * m.kv_channels)
    if key.endswith("router.weight"):
        return (m.num_experts, h)
    if key.endswith("router.expert_bias"):
        return (m.num_experts,)
    ffn = _ffn_width(key, m)
    if key.endswith("linear_fc1.weight"):
        return (2 * ffn, h)
    if key.endswith("linear_fc2.weight"):
        return (h, ffn)
    return (h,)  # the norms of width hidden


def _ffn_width(key: str, m) -> int:
    if ".shared_experts." in key:
        return m.moe_shared_expert_intermediate_size
    if ".experts." in key:
        return m.moe_ffn_hidden_size
    return m.ffn_hidden_size


# ----------------------------------------------------------------------------------------------
# module names and checkpoint-key aliases -> canonical keys
# ----------------------------------------------------------------------------------------------
_SEQUENTIAL_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(linear_fc[12])\.weight(\d+)$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def canonical_key(name: str, model_cfg, expert_offset: int = 0) -> Tuple[str, Optional[int]]:
    """Module state-dict name or checkpoint-key alias -> (canonical checkpoint key, expert index).

    Handles SequentialMLP ``experts.local_experts.{e}.linear_fc1.weight`` and TE grouped GEMM
    ``experts.linear_fc1.weight{e}`` (local expert ``e`` + ``expert_offset`` of this EP rank), the
    local spec's separate ``input_layernorm``/``pre_mlp_layernorm`` and its MoE-layer checkpoint
    alias ``mlp.linear_fc1.layer_norm_weight`` (TE MoE layers save ``pre_mlp_layernorm.weight``).
    """
    match = _SEQUENTIAL_EXPERT.match(name)
    if match:
        return f"{match.group(1)}.experts.{match.group(3)}", int(match.group(2)) + expert_offset
    match = _GROUPED_EXPERT.match(name)
    if match:
        return f"{match.group(1)}.experts.{match.group(2)}.weight", int(match.group(3)) + expert_offset
    match = _LAYER.match(name)
    if not match:
        return name, None
    layer, rest = int(match.group(1)), match.group(2)
    moe = layer >= model_cfg.first_k_dense
    prefix = f"decoder.layers.{layer}."
    if rest == "input_layernorm.weight":
        return prefix + "self_attention.linear_qkv.layer_norm_weight", None
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return prefix + ("pre_mlp_layernorm.weight" if moe else "mlp.linear_fc1.layer_norm_weight"), None
    return name, None


def entries_by_key(model_cfg) -> Dict[Tuple[str, Optional[int]], Entry]:
    return {(e.megatron, e.expert): e for e in entries(model_cfg)}


def stacked_megatron_keys(model_cfg) -> Dict[str, Tuple[int, ...]]:
    """Canonical checkpoint key -> global shape, experts stacked (what a checkpoint must hold)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for entry in entries(model_cfg):
        shape = megatron_shape(entry, model_cfg, model_cfg.vocab)
        shapes[entry.megatron] = ((model_cfg.num_experts,) + shape) if entry.expert is not None else shape
    return shapes
