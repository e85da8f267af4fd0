"""HF ``config.json`` of LLaDA2 models <-> our ``ModelConfig``: checked on import, written on export.

One table (:data:`FIELDS`) pairs each HF key with the ModelConfig field it must equal; import
refuses a config that differs in any of them, export writes them. The vocabulary is special: an
HF LLaDA2.0-mini checkpoint has ``vocab_size`` = the text vocabulary (expanded on import), a Uni
checkpoint has the model vocabulary (copied).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

from megatron_uni.convert.hf_io import ConversionError
from megatron_uni.model.router_facts import ROUTER

# HF key -> (ModelConfig value getter, description for messages)
FIELDS: Dict[str, Tuple[Callable[[Any], Any], str]] = {
    "num_hidden_layers": (lambda m: m.num_layers, "model.num_layers"),
    "hidden_size": (lambda m: m.hidden_size, "model.hidden_size"),
    "intermediate_size": (lambda m: m.ffn_hidden_size, "model.ffn_hidden_size"),
    "first_k_dense_replace": (lambda m: m.first_k_dense, "model.first_k_dense"),
    "num_attention_heads": (lambda m: m.num_attention_heads, "model.num_attention_heads"),
    "num_key_value_heads": (lambda m: m.num_query_groups, "model.num_query_groups"),
    "head_dim": (lambda m: m.kv_channels, "model.kv_channels"),
    "num_experts": (lambda m: m.num_experts, "model.num_experts"),
    "num_experts_per_tok": (lambda m: m.moe_router_topk, "model.moe_router_topk"),
    "n_group": (lambda m: m.moe_router_num_groups, "model.moe_router_num_groups"),
    "topk_group": (lambda m: m.moe_router_group_topk, "model.moe_router_group_topk"),
    "moe_intermediate_size": (lambda m: m.moe_ffn_hidden_size, "model.moe_ffn_hidden_size"),
    "routed_scaling_factor": (lambda m: m.moe_router_topk_scaling_factor, "model.moe_router_topk_scaling_factor"),
    "rope_theta": (lambda m: m.rotary_base, "model.rotary_base"),
    "partial_rotary_factor": (lambda m: m.rotary_percent, "model.rotary_percent"),
    "rms_norm_eps": (lambda m: m.norm_epsilon, "model.norm_epsilon"),
}

# Keys the Uni inference code reads whose defaults in the remote config class are not what the
# model uses; written explicitly. The router's come from the one statement of its facts.
EXPLICIT = {**ROUTER.hf_config(), "tie_word_embeddings": False}


# Architecture switches our model has exactly one way: a checkpoint stating another value is
# refused; an absent key takes the config class default, which is this value (the Uni config omits most).
FIXED = {
    "score_function": ROUTER.score_function,
    "norm_topk_prob": ROUTER.normalise_top_k,
    "tie_word_embeddings": EXPLICIT["tie_word_embeddings"],
    "use_qk_norm": True,
    "use_qkv_bias": False,
    "use_bias": False,
    "hidden_act": "silu",
}


def _num_shared_experts(model_cfg) -> int:
    shared = model_cfg.moe_shared_expert_intermediate_size or 0
    if shared % model_cfg.moe_ffn_hidden_size:
        raise ConversionError(f"model.moe_shared_expert_intermediate_size={shared} is not a multiple of "
                              f"model.moe_ffn_hidden_size={model_cfg.moe_ffn_hidden_size}; HF LLaDA2 cannot express it")
    return shared // model_cfg.moe_ffn_hidden_size


def with_derived_defaults(hf: Dict[str, Any]) -> Dict[str, Any]:
    """Fill keys older LLaDA2 configs leave to the config class: ``head_dim`` = hidden / heads,
    ``partial_rotary_factor`` = ``rotary_dim`` / ``head_dim``."""
    hf = dict(hf)
    if "head_dim" not in hf and "hidden_size" in hf and "num_attention_heads" in hf:
        hf["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    if "partial_rotary_factor" not in hf and "rotary_dim" in hf and hf.get("head_dim"):
        hf["partial_rotary_factor"] = hf["rotary_dim"] / hf["head_dim"]
    return hf


def check_hf_config(hf: Dict[str, Any], model_cfg, source: str) -> int:
    """Refuse a config that does not describe ``model_cfg``; returns the HF vocabulary rows."""
    hf = with_derived_defaults(hf)
    problems = []
    for key, (getter, field) in FIELDS.items():
        if key not in hf:
            problems.append(f"{key} missing (expected {getter(model_cfg)!r} from {field})")
        elif not _same(hf[key], getter(model_cfg)):
            problems.append(f"{key}={hf[key]!r} but {field}={getter(model_cfg)!r}")
    problems += [f"{key}={hf[key]!r} but this model supports only {key}={want!r}"
                 for key, want in FIXED.items() if key in hf and hf[key] != want]
    shared = hf.get("num_shared_experts") or 0
    if shared != _num_shared_experts(model_cfg):
        problems.append(f"num_shared_experts={shared!r} but model.moe_shared_expert_intermediate_size / "
                        f"model.moe_ffn_hidden_size={_num_shared_experts(model_cfg)}")
    rows = hf.get("vocab_size")
    allowed = (model_cfg.text_vocab, model_cfg.text_vocab + model_cfg.num_image_codes, model_cfg.vocab)
    if rows not in allowed:
        problems.append(f"vocab_size={rows!r} but expected model.text_vocab={model_cfg.text_vocab} (text-only "
                        f"checkpoint) or {model_cfg.text_vocab + model_cfg.num_image_codes} / model.vocab="
                        f"{model_cfg.vocab} (Uni checkpoint)")
    offset = hf.get("image_token_offset")
    if offset is not None and offset != model_cfg.text_vocab:
        problems.append(f"image_token_offset={offset!r} but model.text_vocab={model_cfg.text_vocab}")
    if problems:
        raise ConversionError(f"{source}: HF config does not match the model config: " + "; ".join(problems))
    return int(rows)


def _same(hf_value: Any, ours: Any) -> bool:
    if isinstance(ours, float) or isinstance(hf_value, float):
        return abs(float(hf_value) - float(ours)) <= 1e-12 * max(1.0, abs(float(ours)))
    return hf_value == ours


def uni_config(model_cfg, pad_token_id: Optional[int], transformers_version: str = "4.51.0") -> Dict[str, Any]:
    """``config.json`` of an HF LLaDA2.0-Uni folder for ``model_cfg`` (every key its code reads)."""
    config: Dict[str, Any] = {key: getter(model_cfg) for key, (getter, _) in FIELDS.items()}
    config.update(EXPLICIT)
    config.update({
        "architectures": ["LLaDA2MoeModelLM"],
        "auto_map": {
            "AutoConfig": "configuration_llada2uni_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2uni_moe.LLaDA2MoeModelLM",
            "AutoModelForCausalLM": "modeling_llada2uni_moe.LLaDA2MoeModelLM",
        },
        "model_type": "llada2_moe",
        "torch_dtype": "bfloat16",
        "transformers_version": transformers_version,
        "vocab_size": model_cfg.vocab,
        "image_token_offset": model_cfg.text_vocab,
        "num_shared_experts": _num_shared_experts(model_cfg),
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "attention_dropout": 0.0,
        "initializer_range": model_cfg.init_method_std,
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rotary_base,
                            "partial_rotary_factor": model_cfg.rotary_percent},
        "rope_scaling": None,
        "use_cache": False,
        "sliding_window": None,
        "output_router_logits": False,
        "pad_token_id": pad_token_id,
    })
    return config


def generation_config(eos_id: Optional[int], mask_id: Optional[int], transformers_version: str = "4.51.0") -> dict:
    config = {"_from_model_config": True, "transformers_version": transformers_version}
    if eos_id is not None:
        config.update(eos_token_id=eos_id, pad_token_id=eos_id)
    if mask_id is not None:
        config["mask_token_id"] = mask_id
    return config
