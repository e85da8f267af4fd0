"""Configuration: dataclasses, YAML recipes with ``include``, dotted CLI overrides, validation.

A recipe is a YAML mapping whose top-level keys are the sections of :class:`Config`. A recipe may
``include:`` one path or a list of paths (relative to itself); included files are merged first,
in order, and the including file wins. Overrides ``section.key=value`` (values parsed as YAML)
are applied last. Every unknown key, wrong type and impossible parallel layout is rejected with a
one-line :class:`ConfigError` naming the key and the rule.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from typing import Any, Dict, List, Literal, Optional, Sequence

import yaml

from megatron_uni.errors import MegatronUniError
from megatron_uni.tokens import VocabularyLayout, pad_vocab_size


class ConfigError(MegatronUniError, ValueError):
    """A recipe or override is invalid. The message names the key and the rule."""


# ----------------------------------------------------------------------------------------------
# sections
# ----------------------------------------------------------------------------------------------
ParamsDtype = Literal["float32", "bfloat16"]
TransformerImpl = Literal["auto", "transformer_engine", "local"]   # auto: TE if importable
# flex: FlexAttention on CUDA, chunked SDPA elsewhere; te_fused: TE/cuDNN with an additive mask bias
AttentionBackend = Literal["flex", "te_fused"]
Fp8Format = Literal["e4m3", "hybrid"]
Fp8Recipe = Literal["delayed", "tensorwise", "blockwise"]
RecomputeGranularity = Literal["full", "selective"]
Dispatcher = Literal["alltoall", "allgather"]
ExpertImpl = Literal["sequential", "grouped"]   # model/experts.py; same checkpoint keys
DecayStyle = Literal["constant", "linear", "cosine"]
Overlong = Literal["drop", "truncate"]       # what packing does with a document longer than seq_length
Weighting = Literal["mean", "elbo", "sqrt_masked"]   # diffusion loss weighting, see diffusion/inputs.py
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """LLaDA2.0-Uni backbone (LLaDA2.0-mini / Ling-mini-2.0 architecture, Uni vocabulary).

    The sizes have no defaults: every recipe includes one of recipes/model/*.yaml. The defaults
    below are the family's constants, shared by all sizes.
    """

    # ---- sizes (required) ----
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int                   # dense SwiGLU FFN of the first `first_k_dense` layers
    first_k_dense: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int                       # head dim
    num_experts: int
    moe_ffn_hidden_size: int
    moe_router_topk: int
    moe_router_num_groups: int
    moe_router_group_topk: int
    moe_shared_expert_intermediate_size: Optional[int]   # null: no shared expert
    text_vocab: int                        # = image_offset
    num_image_codes: int
    max_position_embeddings: int
    # ---- family constants and switches ----
    moe_router_topk_scaling_factor: float = 2.5
    moe_router_bias_update_rate: float = 1e-3
    moe_router_bias_zero_mean: bool = True  # Ling-V2's zero-mean bias update (training/expert_balance.py)
    moe_z_loss_coeff: Optional[float] = None
    moe_token_dispatcher_type: Dispatcher = "alltoall"
    moe_grouped_gemm: bool = False         # TE grouped GEMM experts (GPU only)
    expert_impl: ExpertImpl = "sequential"
    rotary_base: int = 600000
    rotary_percent: float = 0.5
    norm_epsilon: float = 1e-6
    init_method_std: float = 0.02
    params_dtype: ParamsDtype = "float32"
    transformer_impl: TransformerImpl = "auto"
    attention_backend: AttentionBackend = "flex"   # block-diffusion core attention (model/spec.py)
    fp8: Optional[Fp8Format] = None
    fp8_recipe: Fp8Recipe = "delayed"
    recompute_granularity: Optional[RecomputeGranularity] = None
    recompute_modules: Optional[List[str]] = None

    @property
    def vocab(self) -> int:
        """Model vocabulary rows: text + image codes, padded by the rule of ``tokens.pad_vocab_size``."""
        return pad_vocab_size(self.text_vocab + self.num_image_codes)

    @property
    def vocabulary_layout(self) -> VocabularyLayout:
        """The layout this model's sizes imply (no special ids: they come from a tokenizer)."""
        return VocabularyLayout.of_sizes(self.text_vocab, self.num_image_codes)

    @property
    def has_moe(self) -> bool:
        return bool(self.num_experts) and self.first_k_dense < self.num_layers

    @property
    def moe_layer_pattern(self) -> List[int]:
        return [0] * self.first_k_dense + [1] * (self.num_layers - self.first_k_dense)

    def to_dict(self) -> Dict[str, Any]:
        """The fields plus the derived ``vocab`` (what checkpoints and ``info`` record)."""
        return {**dataclasses.asdict(self), "vocab": self.vocab}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "ModelConfig":
        """From a recorded :meth:`to_dict`, ignoring keys this version does not know; a recorded
        ``vocab`` must match the one derived from the sizes."""
        known = {f.name for f in dataclasses.fields(cls)}
        model = cls(**{k: v for k, v in raw.items() if k in known})
        if "vocab" in raw and raw["vocab"] != model.vocab:
            raise ConfigError(f"model.vocab={raw['vocab']} does not equal model.text_vocab={model.text_vocab} + "
                              f"model.num_image_codes={model.num_image_codes} padded to {model.vocab}")
        return model


@dataclasses.dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    expert: int = 1
    expert_tensor: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    world_size: Optional[int] = None       # None: taken from the launcher at run time

    def megatron_kwargs(self) -> Dict[str, Any]:
        """The group sizes under the argument names shared by megatron-core's
        ``parallel_state.initialize_model_parallel`` and ``TransformerConfig``."""
        return dict(
            tensor_model_parallel_size=self.tensor,
            pipeline_model_parallel_size=self.pipeline,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline,
            context_parallel_size=self.context,
            expert_model_parallel_size=self.expert,
            expert_tensor_parallel_size=self.expert_tensor,
        )


@dataclasses.dataclass
class DataConfig:
    path: Optional[str] = None             # dataset prefix (PREFIX.idx/.bin) or blend YAML; required to train
    tokenizer: Optional[str] = None        # directory holding tokenizer.json
    seq_length: int = 256
    block_size: int = 32
    micro_batch_size: int = 2
    global_batch_size: int = 4
    num_workers: int = 0                   # >0: build micro-batches in this many worker processes per rank
    prefetch: int = 2                      # micro-batches each worker keeps in flight (num_workers > 0)
    seed: int = 1234
    stage: Optional[str] = None            # entry of a blend file's `stages:` mapping (e.g. align, sft)
    lookahead: int = 8                     # fill a row with the first fitting of the next N documents (1: in order)
    split_samples: bool = False            # continue a document that does not fit on the next row
    overlong: Overlong = "drop"            # documents longer than seq_length
    cache_dir: Optional[str] = None        # row-plan cache; None: row_plans/ beside the first dataset


@dataclasses.dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    max_consecutive_skips: int = 10        # non-finite steps in a row that abort the run (0: never)


@dataclasses.dataclass
class ScheduleConfig:
    train_iters: int = 10
    warmup_iters: int = 2
    decay_style: DecayStyle = "cosine"
    exit_interval: int = 0                 # >0: save and exit when iteration % exit_interval == 0


@dataclasses.dataclass
class DiffusionConfig:
    """Block-diffusion objective, the recipe section ``diffusion:`` (see docs/diffusion.md).

    Read by the noiser (``t_*``, ``per_block``, ``antithetic``, ``complementary``), the input
    builder (``weighting``, ``prefix_aware``, ``shared_clean``) and the training loop
    (``mask_noise_*``). The block size lives in ``data.block_size`` (the packer pads documents
    to it too).
    """

    t_min: float = 0.3                     # mask-ratio bandwidth (SFT 0.3-0.8; pretraining ~[1e-3, 1])
    t_max: float = 0.8
    per_block: bool = False                # one t per block instead of per document
    antithetic: bool = False               # stratified t across the global batch (layout-independent)
    # each sample followed by its complement-masked copy: DOUBLES the rows the model sees (2 x
    # micro_batch_size rows of 2L, or micro_batch_size rows of 3L with shared_clean); t is then drawn
    # from [max(t_min, 1-t_max), min(t_max, 1-t_min)] so 1-t stays in the band (needs t_min <= 0.5 <= t_max)
    complementary: bool = False
    shared_clean: bool = False             # complementary pair as one [noisy_a | noisy_b | clean] 3L row
    weighting: Weighting = "mean"
    prefix_aware: bool = False
    mask_noise_std: float = 0.0            # Gaussian noise on mask-token embeddings ...
    mask_noise_steps: int = 0              # ... for the first N steps (LLaDA2 stability fix)
    confidence_beta: float = 0.0           # >0: add beta x the CAP confidence term (docs/diffusion.md)

    def __post_init__(self) -> None:
        validate_diffusion(self)

    @property
    def rows_per_sample(self) -> int:
        """Model rows per sample: 2 for two-row complementary pairs, else 1."""
        return 2 if self.complementary and not self.shared_clean else 1

    @property
    def copies_per_row(self) -> int:
        """Row length in clean lengths: 3 for ``[noisy_a | noisy_b | clean]``, else 2."""
        return 3 if self.shared_clean else 2


@dataclasses.dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: int = 0                 # 0: save only at the end
    finetune: bool = False                 # load model weights only, reset iteration/optimizer
    keep_last: int = 0                     # >0: keep only the newest K iterations (never the one `latest` names)


@dataclasses.dataclass
class LoggingConfig:
    log_interval: int = 1
    level: LogLevel = "INFO"
    run_dir: Optional[str] = None          # metrics.jsonl (+ tensorboard/) here; default: checkpoint.save's parent


@dataclasses.dataclass
class EvalConfig:
    """Validation on held-out data (``training/validation.py``) and samples during training
    (``training/samples.py``: every ``sample_interval`` steps rank 0 generates greedily from fixed
    prompts with the model being trained into ``RUN_DIR/samples/iter_NNNNNNN.jsonl``); docs/training.md."""

    interval: int = 0                      # >0: evaluate every `interval` iterations (0: never)
    path: Optional[str] = None             # held-out dataset prefix or blend YAML (tokenizer, packing: data.*)
    iters: int = 1                         # global batches per evaluation (the same ones every time)
    seed: int = 0                          # noise seed: every evaluation masks the same positions
    sample_interval: int = 0               # >0: write samples every `sample_interval` iterations (0: off)
    sample_prompts: List[str] = dataclasses.field(      # plain-text continuations
        default_factory=lambda: ["A small red house stands"])
    sample_image_prompts: List[str] = dataclasses.field(  # text-to-image (chat template, no CFG)
        default_factory=lambda: ["a red circle on a blue background"])
    sample_image_grid: List[int] = dataclasses.field(default_factory=lambda: [4, 4])  # [H, W] codes
    sample_length: int = 32                # text positions generated per prompt
    sample_steps: int = 8                  # refinement forwards per block at most (block: data.block_size)


@dataclasses.dataclass
class Config:
    model: ModelConfig
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        """Every key of every section: written as YAML it loads back as the same recipe."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------
def _read_yaml(path: str, stack: Sequence[str] = ()) -> Dict[str, Any]:
    path = os.path.abspath(path)
    if path in stack:
        raise ConfigError(f"{path}: include cycle through {' -> '.join(stack)}")
    if not os.path.isfile(path):
        raise ConfigError(f"recipe not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    includes = raw.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    merged: Dict[str, Any] = {}
    for inc in includes:
        inc_path = inc if os.path.isabs(inc) else os.path.join(os.path.dirname(path), inc)
        _deep_merge(merged, _read_yaml(inc_path, (*stack, path)))
    _deep_merge(merged, raw)
    return merged


def _deep_merge(base: Dict[str, Any], update: Dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def parse_override(text: str) -> tuple:
    """``section.key=value`` -> (["section", "key"], parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, value = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) != 2 or not all(keys):
        raise ConfigError(f"override {dotted!r} must name section.key (e.g. optimizer.lr=1e-4)")
    return keys, yaml.safe_load(value) if value.strip() else None


# YAML 1.1 (PyYAML) reads an exponent without a dot, ``1e-4``, as a string.
_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(key: str, value: Any, annotation: Any, nullable: bool = False) -> Any:
    """Check ``value`` against a field's type, accepting int for float. Raise naming ``key``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], nullable=type(None) in args)
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            allowed = ", ".join(str(a) for a in args) + (" or null" if nullable else "")
            raise ConfigError(f"{key}={value!r} is not allowed: one of {allowed}")
        return value
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _required(cls: type) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]


def _section(name: str, cls: type, values: Any) -> Any:
    """One recipe section: known keys, typed values, required keys present; then the dataclass."""
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {type(values).__name__}")
    fields = typing.get_type_hints(cls)
    for key in values:
        derived = getattr(cls, key, None)
        if isinstance(derived, property):  # e.g. model.vocab
            reason = (derived.__doc__ or "computed from the other keys").splitlines()[0]
            raise ConfigError(f"{name}.{key} is derived, not set: {reason}")
        if key not in fields:
            raise ConfigError(f"unknown key {name}.{key}; known: {', '.join(fields)}")
    coerced = {key: _coerce(f"{name}.{key}", value, fields[key]) for key, value in values.items()}
    missing = [f"{name}.{key}" for key in _required(cls) if key not in coerced]
    if missing:
        raise ConfigError(f"{name}: the recipe does not set {', '.join(missing)} (include a model size, e.g. "
                          f"recipes/model/tiny.yaml or recipes/model/llada2_uni_16b.yaml)")
    return cls(**coerced)


def config_from_dict(raw: Dict[str, Any]) -> Config:
    hints = typing.get_type_hints(Config)
    for section in raw:
        if section not in hints:
            raise ConfigError(f"unknown section {section!r}; known: {', '.join(hints)}")
    cfg = Config(**{section: _section(section, cls, raw.get(section, {})) for section, cls in hints.items()})
    validate(cfg)
    return cfg


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> Config:
    """Read a recipe (or nothing: then the overrides must set the model size), apply
    ``section.key=value`` overrides, validate."""
    raw = _read_yaml(path) if path else {}
    for text in overrides:
        (section, key), value = parse_override(text)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected a mapping of keys")
        raw[section][key] = value
    return config_from_dict(raw)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choices(section: str, obj: Any) -> None:
    """Every ``Literal`` field of ``obj`` holds one of its allowed values (for sections built in code)."""
    for name, hint in typing.get_type_hints(type(obj)).items():
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if typing.get_origin(hint) is Literal or typing.get_origin(inner[0]) is Literal:
            _coerce(f"{section}.{name}", getattr(obj, name), hint)


def validate_diffusion(d: DiffusionConfig) -> None:
    _check_choices("diffusion", d)
    _require(0.0 <= d.t_min <= d.t_max <= 1.0,
             f"diffusion.t_min={d.t_min} / diffusion.t_max={d.t_max} must satisfy 0 <= t_min <= t_max <= 1")
    _require(not d.complementary or d.t_min <= 0.5 <= d.t_max,
             f"diffusion.complementary=true needs diffusion.t_min={d.t_min} <= 0.5 <= diffusion.t_max={d.t_max}: "
             f"t is drawn from the band's symmetric part [max(t_min, 1-t_max), min(t_max, 1-t_min)] so the "
             f"complement's ratio 1-t stays in the band")
    _require(d.complementary or not d.shared_clean,
             "diffusion.shared_clean=true needs diffusion.complementary=true (it shares the clean copy of a "
             "complementary pair)")


def validate_model(m: ModelConfig) -> None:
    _check_choices("model", m)
    _require(m.num_layers > 0, f"model.num_layers must be > 0, got {m.num_layers}")
    _require(0 <= m.first_k_dense <= m.num_layers,
             f"model.first_k_dense={m.first_k_dense} must lie in [0, model.num_layers={m.num_layers}]")
    _require(m.num_attention_heads % m.num_query_groups == 0,
             f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
             f"model.num_query_groups={m.num_query_groups}")
    _require(m.moe_router_topk <= m.num_experts,
             f"model.moe_router_topk={m.moe_router_topk} exceeds model.num_experts={m.num_experts}")
    _require(m.num_experts % m.moe_router_num_groups == 0,
             f"model.num_experts={m.num_experts} must be divisible by "
             f"model.moe_router_num_groups={m.moe_router_num_groups}")
    _require(m.moe_router_group_topk <= m.moe_router_num_groups,
             f"model.moe_router_group_topk={m.moe_router_group_topk} exceeds "
             f"model.moe_router_num_groups={m.moe_router_num_groups}")
    shared = m.moe_shared_expert_intermediate_size
    _require(shared is None or shared > 0,
             f"model.moe_shared_expert_intermediate_size={shared} must be > 0, or null for no shared expert")
    _require(m.text_vocab > 0 and m.num_image_codes >= 0,
             f"model.text_vocab={m.text_vocab} must be > 0 and model.num_image_codes={m.num_image_codes} >= 0")
    _require(0.0 < m.rotary_percent <= 1.0, f"model.rotary_percent={m.rotary_percent} must be in (0, 1]")
    _require(not (m.expert_impl == "grouped" and m.moe_grouped_gemm),
             "model.expert_impl=grouped and model.moe_grouped_gemm=true both pick the experts; set one")


def validate_parallel(m: ModelConfig, p: ParallelConfig) -> None:
    for key in ("tensor", "pipeline", "context", "expert", "expert_tensor"):
        _require(getattr(p, key) >= 1, f"parallel.{key} must be >= 1, got {getattr(p, key)}")
    _require(m.num_attention_heads % p.tensor == 0,
             f"model.num_attention_heads={m.num_attention_heads} must be divisible by parallel.tensor={p.tensor}")
    _require(m.num_query_groups % p.tensor == 0,
             f"model.num_query_groups={m.num_query_groups} must be divisible by parallel.tensor={p.tensor}")
    _require(m.vocab % p.tensor == 0,
             f"model.vocab={m.vocab} must be divisible by parallel.tensor={p.tensor}")
    _require(m.num_experts % p.expert == 0,
             f"model.num_experts={m.num_experts} must be divisible by parallel.expert={p.expert}")
    chunks = p.pipeline * (p.virtual_pipeline or 1)
    _require(m.num_layers % chunks == 0,
             f"model.num_layers={m.num_layers} must be divisible by parallel.pipeline x "
             f"parallel.virtual_pipeline={chunks}")
    if p.virtual_pipeline is not None:
        _require(p.pipeline > 1, "parallel.virtual_pipeline needs parallel.pipeline > 1")
    if p.sequence_parallel:
        _require(p.tensor > 1, "parallel.sequence_parallel needs parallel.tensor > 1")
    if m.has_moe and p.expert == 1:
        # with EP 1 megatron reduces expert grads over DP only: under SP each TP rank's expert
        # grads would cover only its own part of the sequence
        _require(p.expert_tensor == p.tensor, f"parallel.expert_tensor={p.expert_tensor} must equal "
                                              f"parallel.tensor={p.tensor} when parallel.expert=1")
    if m.has_moe and p.tensor > 1:
        # megatron-core's MoELayer refuses TP without SP in training
        _require(p.sequence_parallel, f"parallel.sequence_parallel must be true with parallel.tensor={p.tensor} "
                                      f"for an MoE model (megatron-core MoE layers require it under TP)")
    if p.world_size is not None:
        model_parallel = p.tensor * p.pipeline * p.context
        _require(p.world_size % model_parallel == 0,
                 f"parallel.world_size={p.world_size} must be divisible by parallel.tensor x parallel.pipeline "
                 f"x parallel.context={model_parallel}")
        expert_parallel = p.expert * p.expert_tensor * p.pipeline
        _require(p.world_size % expert_parallel == 0,
                 f"parallel.world_size={p.world_size} must be divisible by parallel.expert x "
                 f"parallel.expert_tensor x parallel.pipeline={expert_parallel}")


def validate(cfg: Config) -> None:
    validate_model(cfg.model)
    validate_parallel(cfg.model, cfg.parallel)
    d = cfg.data
    _require(d.seq_length % d.block_size == 0,
             f"data.seq_length={d.seq_length} must be a multiple of data.block_size={d.block_size}")
    _require(d.global_batch_size % d.micro_batch_size == 0,
             f"data.global_batch_size={d.global_batch_size} must be divisible by "
             f"data.micro_batch_size={d.micro_batch_size}")
    _require(d.block_size >= 1, f"data.block_size={d.block_size} must be >= 1")
    _require(d.num_workers >= 0 and d.prefetch >= 1,
             f"data.num_workers={d.num_workers} must be >= 0 and data.prefetch={d.prefetch} >= 1")
    validate_diffusion(cfg.diffusion)
    validate_eval(cfg.eval)
    _check_choices("schedule", cfg.schedule)
    _check_choices("logging", cfg.logging)


def validate_eval(e: EvalConfig) -> None:
    _require(e.interval >= 0 and e.iters >= 1, f"eval.interval={e.interval} must be >= 0 and eval.iters={e.iters} >= 1")
    _require(not e.interval or bool(e.path),
             f"eval.interval={e.interval} needs eval.path (a held-out dataset prefix or blend YAML)")
    _require(e.sample_interval >= 0, f"eval.sample_interval={e.sample_interval} must be >= 0 (0: off)")
    _require(e.sample_length >= 1 and e.sample_steps >= 1,
             f"eval.sample_length={e.sample_length} and eval.sample_steps={e.sample_steps} must be >= 1")
    _require(len(e.sample_image_grid) == 2 and min(e.sample_image_grid) >= 1,
             f"eval.sample_image_grid={e.sample_image_grid} must be [H, W] with positive sides (in codes)")


def validate_world_size(cfg: Config, world_size: int) -> None:
    """Check the layout against the actual number of ranks (called at launch)."""
    p = dataclasses.replace(cfg.parallel, world_size=world_size)
    validate_parallel(cfg.model, p)
    _require(cfg.data.global_batch_size % (cfg.data.micro_batch_size * data_parallel_size(p)) == 0,
             f"data.global_batch_size={cfg.data.global_batch_size} must be divisible by data.micro_batch_size x "
             f"data-parallel size={cfg.data.micro_batch_size * data_parallel_size(p)}")


def data_parallel_size(p: ParallelConfig) -> int:
    world = p.world_size or 1
    return world // (p.tensor * p.pipeline * p.context)
