"""The one table HF LLaDA2 name <-> megatron checkpoint key, with its transform, used both ways.

Megatron names here are the *checkpoint keys* of megatron-core's sharded state dict: global
(layer numbers across pipeline stages, experts stacked along a leading expert axis) and the same
for every TP/PP/EP layout, SequentialMLP and TE grouped-GEMM experts alike. Module state-dict
names (``local_experts.{e}``, ``weight{e}``, the local spec's separate norms) are folded onto
these keys by :func:`canonical_key`.

Each rule of :data:`RULES` names the HF tensor(s), the megatron key, the shape of each HF
tensor (in the dimension names of :data:`DIMS`), and a :class:`Transform` object that owns both
directions and the megatron shape it makes:
  IDENTITY   one HF tensor <-> one megatron tensor
  QKV        HF rows [all Q heads | all K heads | all V heads] <-> megatron rows grouped per
             query group [q heads of the group, k, v] x groups
  GATE_UP    HF gate_proj, up_proj <-> megatron linear_fc1 = [gate; up]
:func:`entries` expands the table for a model config into :class:`Entry` objects (concrete names
and shapes, HF file order); their ``to_megatron`` / ``to_hf`` refuse a tensor of the wrong shape,
naming it. The importer, the exporter and the tiny HF writer take names, shapes, file order and
dtypes from these only; the HF reference asks the table which tensors stay fp32.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_uni.convert.hf_io import ConversionError
from megatron_uni.shapes import wrong_shape

Shape = Tuple[int, ...]

# dimension name -> its size for (model config, rows of the vocabulary matrices: the HF file's on
# import, model.vocab otherwise)
DIMS: Dict[str, Callable[[Any, int], int]] = {
    "vocab": lambda m, rows: rows,
    "hidden": lambda m, rows: m.hidden_size,
    "head_dim": lambda m, rows: m.kv_channels,
    "qkv_rows": lambda m, rows: (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels,
    "attention_width": lambda m, rows: m.num_attention_heads * m.kv_channels,
    "experts": lambda m, rows: m.num_experts,
    "ffn": lambda m, rows: m.ffn_hidden_size,
    "expert_ffn": lambda m, rows: m.moe_ffn_hidden_size,
    "shared_ffn": lambda m, rows: m.moe_shared_expert_intermediate_size,   # None: no shared expert
}


# ----------------------------------------------------------------------------------------------
# transforms: each owns both directions and the megatron shape it makes
# ----------------------------------------------------------------------------------------------
class Transform(abc.ABC):
    """``sources`` HF tensors of one shape <-> one megatron tensor. No TP logic: both sides are
    whole (per-expert) tensors; the importer slices the megatron one into local views."""

    sources = 1

    def megatron_shape(self, hf_shape: Shape) -> Shape:
        return hf_shape

    @abc.abstractmethod
    def to_megatron(self, hf: Sequence[torch.Tensor], model_cfg) -> torch.Tensor:
        """The megatron tensor from the rule's HF tensors."""

    @abc.abstractmethod
    def to_hf(self, tensor: torch.Tensor, model_cfg) -> Tuple[torch.Tensor, ...]:
        """The rule's HF tensors from the megatron tensor."""


class Identity(Transform):
    def to_megatron(self, hf, model_cfg):
        return hf[0]

    def to_hf(self, tensor, model_cfg):
        return (tensor,)


class QKVRegroup(Transform):
    """HF ``[all Q | all K | all V]`` rows <-> megatron ``[q heads, k, v]`` per query group."""

    @staticmethod
    def _sizes(model_cfg) -> Tuple[int, int, int]:
        groups = model_cfg.num_query_groups
        return groups, model_cfg.num_attention_heads // groups, model_cfg.kv_channels

    def to_megatron(self, hf, model_cfg):
        weight = hf[0]
        groups, heads_per_group, dim = self._sizes(model_cfg)
        q_rows = groups * heads_per_group * dim
        hidden = weight.shape[1]
        q = weight[:q_rows].reshape(groups, heads_per_group * dim, hidden)
        k = weight[q_rows:q_rows + groups * dim].reshape(groups, dim, hidden)
        v = weight[q_rows + groups * dim:].reshape(groups, dim, hidden)
        return torch.cat([q, k, v], dim=1).reshape(-1, hidden)

    def to_hf(self, tensor, model_cfg):
        groups, heads_per_group, dim = self._sizes(model_cfg)
        hidden = tensor.shape[1]
        grouped = tensor.reshape(groups, (heads_per_group + 2) * dim, hidden)
        q, k, v = torch.split(grouped, [heads_per_group * dim, dim, dim], dim=1)
        return (torch.cat([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)], dim=0),)


class GatedMLP(Transform):
    """HF ``gate_proj``, ``up_proj`` (each ``[ffn, h]``) <-> megatron ``linear_fc1`` = ``[gate; up]``."""

    sources = 2

    def megatron_shape(self, hf_shape):
        return (2 * hf_shape[0],) + tuple(hf_shape[1:])

    def to_megatron(self, hf, model_cfg):
        return torch.cat(list(hf), dim=0)

    def to_hf(self, tensor, model_cfg):
        return tuple(torch.chunk(tensor, 2, dim=0))


IDENTITY, QKV, GATE_UP = Identity(), QKVRegroup(), GatedMLP()


# ----------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the table; ``{L}`` is the layer, ``{E}`` the expert (HF side only)."""

    megatron: str
    hf: Tuple[str, ...]
    shape: Tuple[str, ...]        # of each HF tensor, in DIMS names (one expert's for expert rules)
    transform: Transform
    layers: str                   # before | after (the layers, in HF file order) | all | dense | moe
    expert: bool = False          # megatron key stacks experts on axis 0
    keep_fp32: bool = False       # stays fp32 in bf16 exports (router expert bias)

    def __post_init__(self):
        if len(self.hf) != self.transform.sources or not set(self.shape) <= set(DIMS):
            raise ValueError(f"mapping rule {self.megatron}: {len(self.hf)} HF names for "
                             f"{type(self.transform).__name__}, shape {self.shape}")

    @property
    def vocab(self) -> bool:
        """Rows are the model vocabulary (expanded on import)."""
        return self.shape[0] == "vocab"


_ATT = "decoder.layers.{L}.self_attention"
_MLP = "decoder.layers.{L}.mlp"
_HF = "model.layers.{L}"
_GATE_UP = ("gate_proj.weight", "up_proj.weight")


def _gate_up(prefix: str) -> Tuple[str, str]:
    return tuple(f"{prefix}.{name}" for name in _GATE_UP)


RULES: Tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.word_embeddings.weight",), ("vocab", "hidden"), IDENTITY,
         "before"),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), ("hidden",), IDENTITY, "after"),
    Rule("output_layer.weight", ("lm_head.weight",), ("vocab", "hidden"), IDENTITY, "after"),
    # attention, every layer
    Rule(f"{_ATT}.linear_qkv.layer_norm_weight", (f"{_HF}.input_layernorm.weight",), ("hidden",), IDENTITY, "all"),
    Rule(f"{_ATT}.linear_qkv.weight", (f"{_HF}.attention.query_key_value.weight",), ("qkv_rows", "hidden"), QKV,
         "all"),
    Rule(f"{_ATT}.q_layernorm.weight", (f"{_HF}.attention.query_layernorm.weight",), ("head_dim",), IDENTITY, "all"),
    Rule(f"{_ATT}.k_layernorm.weight", (f"{_HF}.attention.key_layernorm.weight",), ("head_dim",), IDENTITY, "all"),
    Rule(f"{_ATT}.linear_proj.weight", (f"{_HF}.attention.dense.weight",), ("hidden", "attention_width"), IDENTITY,
         "all"),
    # dense FFN layers (ModelConfig.moe_layer_pattern 0)
    Rule(f"{_MLP}.linear_fc1.layer_norm_weight", (f"{_HF}.post_attention_layernorm.weight",), ("hidden",), IDENTITY,
         "dense"),
    Rule(f"{_MLP}.linear_fc1.weight", _gate_up(f"{_HF}.mlp"), ("ffn", "hidden"), GATE_UP, "dense"),
    Rule(f"{_MLP}.linear_fc2.weight", (f"{_HF}.mlp.down_proj.weight",), ("hidden", "ffn"), IDENTITY, "dense"),
    # MoE layers (ModelConfig.moe_layer_pattern 1)
    Rule("decoder.layers.{L}.pre_mlp_layernorm.weight", (f"{_HF}.post_attention_layernorm.weight",), ("hidden",),
         IDENTITY, "moe"),
    Rule(f"{_MLP}.router.weight", (f"{_HF}.mlp.gate.weight",), ("experts", "hidden"), IDENTITY, "moe"),
    Rule(f"{_MLP}.router.expert_bias", (f"{_HF}.mlp.gate.expert_bias",), ("experts",), IDENTITY, "moe",
         keep_fp32=True),
    Rule(f"{_MLP}.shared_experts.linear_fc1.weight", _gate_up(f"{_HF}.mlp.shared_experts"), ("shared_ffn", "hidden"),
         GATE_UP, "moe"),
    Rule(f"{_MLP}.shared_experts.linear_fc2.weight", (f"{_HF}.mlp.shared_experts.down_proj.weight",),
         ("hidden", "shared_ffn"), IDENTITY, "moe"),
    Rule(f"{_MLP}.experts.experts.linear_fc1.weight", _gate_up(f"{_HF}.mlp.experts.{{E}}"), ("expert_ffn", "hidden"),
         GATE_UP, "moe", expert=True),
    Rule(f"{_MLP}.experts.experts.linear_fc2.weight", (f"{_HF}.mlp.experts.{{E}}.down_proj.weight",),
         ("hidden", "expert_ffn"), IDENTITY, "moe", expert=True),
)


@dataclasses.dataclass(frozen=True)
class Entry:
    """A rule expanded for one model config, layer (and expert): concrete names and shapes."""

    megatron: str
    expert: Optional[int]
    hf: Tuple[str, ...]
    hf_shape: Shape               # of each HF tensor
    shape: Shape                  # of the megatron tensor (one expert's slice if stacked)
    transform: Transform
    keep_fp32: bool
    vocab: bool
    layer: Optional[int]
    model_cfg: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        """Readable id for messages: the key, plus ``[e]`` for one expert of a stacked key."""
        return self.megatron if self.expert is None else f"{self.megatron}[{self.expert}]"

    def hf_shapes(self) -> Dict[str, Shape]:
        return {name: self.hf_shape for name in self.hf}

    def to_megatron(self, hf_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """HF tensors (in ``hf`` order) -> the megatron tensor; a wrong shape is refused by name."""
        if len(hf_tensors) != len(self.hf):
            raise ConversionError(f"{self.name}: needs {len(self.hf)} HF tensors {list(self.hf)}, "
                                  f"got {len(hf_tensors)}")
        for name, tensor in zip(self.hf, hf_tensors):
            _check_shape(name, tensor, self.hf_shape)
        return self.transform.to_megatron(hf_tensors, self.model_cfg)

    def to_hf(self, tensor: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The megatron tensor -> ``{hf name: tensor}``; a wrong shape is refused by name."""
        _check_shape(self.name, tensor, self.shape)
        return dict(zip(self.hf, self.transform.to_hf(tensor, self.model_cfg)))


def _check_shape(name: str, tensor: torch.Tensor, expected: Shape) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise ConversionError(wrong_shape(name, tensor.shape, expected))


def _expand(rule: Rule, sizes: Dict[str, int], model_cfg, layer: Optional[int], expert: Optional[int]) -> Entry:
    fmt = {"L": layer, "E": expert}
    hf_shape = tuple(sizes[dim] for dim in rule.shape)
    return Entry(megatron=rule.megatron.format(**fmt), expert=expert, hf=tuple(h.format(**fmt) for h in rule.hf),
                 hf_shape=hf_shape, shape=rule.transform.megatron_shape(hf_shape), transform=rule.transform,
                 keep_fp32=rule.keep_fp32, vocab=rule.vocab, layer=layer, model_cfg=model_cfg)


def entries(model_cfg, vocab_rows: Optional[int] = None) -> List[Entry]:
    """Every tensor of the model in HF file order: embeddings, layers (experts inside), norm, head.
    Vocabulary matrices have ``vocab_rows`` rows (default ``model_cfg.vocab``)."""
    rows = model_cfg.vocab if vocab_rows is None else vocab_rows
    sizes = {dim: size(model_cfg, rows) for dim, size in DIMS.items()}
    rules = [r for r in RULES if all(sizes[dim] is not None for dim in r.shape)]  # null: no such tensor
    before = [_expand(r, sizes, model_cfg, None, None) for r in rules if r.layers == "before"]
    after = [_expand(r, sizes, model_cfg, None, None) for r in rules if r.layers == "after"]
    layered: List[Entry] = []
    for layer, moe in enumerate(model_cfg.moe_layer_pattern):
        kind = "moe" if moe else "dense"
        for rule in rules:
            if rule.layers not in ("all", kind):
                continue
            experts = range(model_cfg.num_experts) if rule.expert else [None]
            layered.extend(_expand(rule, sizes, model_cfg, layer, e) for e in experts)
    return before + layered + after


def keeps_fp32(hf_name: str) -> bool:
    """Whether the table keeps this HF tensor in fp32 whatever the weights' dtype."""
    return any(_template_regex(h).fullmatch(hf_name) for rule in RULES if rule.keep_fp32 for h in rule.hf)


def _template_regex(template: str) -> "re.Pattern":
    return re.compile(re.escape(template).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+"))


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
    pattern = model_cfg.moe_layer_pattern
    moe = layer < len(pattern) and pattern[layer] == 1
    prefix = f"decoder.layers.{layer}."
    if rest == "input_layernorm.weight":
        return prefix + "self_attention.linear_qkv.layer_norm_weight", None
    if rest in ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight"):
        return prefix + ("pre_mlp_layernorm.weight" if moe else "mlp.linear_fc1.layer_norm_weight"), None
    return name, None


def entries_by_key(model_cfg, vocab_rows: Optional[int] = None) -> Dict[Tuple[str, Optional[int]], Entry]:
    return {(e.megatron, e.expert): e for e in entries(model_cfg, vocab_rows)}


def stacked_megatron_keys(model_cfg) -> Dict[str, Tuple[int, ...]]:
    """Canonical checkpoint key -> global shape, experts stacked (what a checkpoint must hold)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for entry in entries(model_cfg):
        stack = (model_cfg.num_experts,) if entry.expert is not None else ()
        shapes[entry.megatron] = stack + entry.shape
    return shapes
