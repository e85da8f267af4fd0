"""Config system: include/inheritance (and cycles), dotted overrides, and one-line errors naming the
key for unknown sections/keys, wrong types and impossible parallel layouts; fp8 without TE."""

import dataclasses
import os

import pytest

from megatron_uni.config import ConfigError, load_config, parse_override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "model", "tiny.yaml")
BIG = os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml")


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _error(path=TINY, overrides=()):
    """The ConfigError text for ``path`` + ``overrides``; it must be one line."""
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert message and "\n" not in message, repr(message)
    return message


# ---------------------------------------------------------------------------------------------
# include / inheritance
# ---------------------------------------------------------------------------------------------
def test_include_merges_sections_and_the_including_file_wins(tmp_path):
    _write(tmp_path / "base" / "model.yaml",
           f"include: {TINY}\nmodel:\n  num_layers: 8\n  hidden_size: 128\noptimizer:\n  lr: 0.5\n")
    _write(tmp_path / "base" / "train.yaml", "optimizer:\n  lr: 0.25\n  clip_grad: 2.0\n")
    child = _write(tmp_path / "child.yaml",
                   "include: [base/model.yaml, base/train.yaml]\nmodel:\n  hidden_size: 256\n")
    cfg = load_config(child)
    assert cfg.model.num_layers == 8            # from the first include
    assert cfg.model.hidden_size == 256         # the including file wins
    assert cfg.optimizer.lr == 0.25             # a later include wins over an earlier one
    assert cfg.optimizer.clip_grad == 2.0
    assert cfg.data.seq_length == 256           # untouched keys keep their defaults


def test_include_chain_resolves_paths_relative_to_each_file(tmp_path):
    _write(tmp_path / "a" / "b" / "root.yaml", f"include: {TINY}\nschedule:\n  train_iters: 77\n")
    _write(tmp_path / "a" / "mid.yaml", "include: b/root.yaml\nschedule:\n  warmup_iters: 7\n")
    top = _write(tmp_path / "top.yaml", "include: a/mid.yaml\nlogging:\n  log_interval: 5\n")
    cfg = load_config(top)
    assert (cfg.schedule.train_iters, cfg.schedule.warmup_iters, cfg.logging.log_interval) == (77, 7, 5)


def test_recipe_including_the_tiny_model_inherits_it(tmp_path):
    child = _write(tmp_path / "run.yaml", f"include: {TINY}\nparallel:\n  expert: 2\n")
    cfg = load_config(child)
    assert (cfg.model.num_layers, cfg.model.num_experts, cfg.parallel.expert) == (4, 8, 2)


def test_include_cycle_is_one_line_naming_the_files(tmp_path):
    a = _write(tmp_path / "a.yaml", "include: b.yaml\n")
    _write(tmp_path / "b.yaml", "include: a.yaml\n")
    message = _error(a)
    assert "include cycle" in message and "a.yaml" in message and "b.yaml" in message


def test_missing_include_names_the_path(tmp_path):
    top = _write(tmp_path / "top.yaml", "include: nowhere.yaml\n")
    assert "nowhere.yaml" in _error(top)


# ---------------------------------------------------------------------------------------------
# dotted overrides
# ---------------------------------------------------------------------------------------------
def test_dotted_overrides_are_typed_and_applied_last(tmp_path):
    cfg = load_config(TINY, ["optimizer.lr=1e-4", "model.num_layers=8", "parallel.sequence_parallel=false",
                             "model.recompute_modules=[layernorm, moe_act]", "checkpoint.save=out/run1",
                             "optimizer.weight_decay=0", "model.fp8=null"])
    assert cfg.optimizer.lr == pytest.approx(1e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.num_layers == 8 and cfg.model.hidden_size == 64     # the rest of the recipe stays
    assert cfg.model.recompute_modules == ["layernorm", "moe_act"]
    assert cfg.checkpoint.save == "out/run1"
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.model.fp8 is None


def test_override_beats_the_recipe_value():
    assert load_config(TINY).model.vocab == 1280
    assert load_config(TINY, ["model.num_image_codes=512"]).model.vocab == 1536


def test_model_vocab_is_text_plus_image_codes_padded_to_128():
    assert load_config(TINY, ["model.text_vocab=1000", "model.num_image_codes=200"]).model.vocab == 1280
    assert load_config(BIG).model.vocab == 173568
    assert load_config(BIG, ["model.num_image_codes=0"]).model.vocab == 157184
    assert "model.vocab is derived, not set: " in _error(TINY, ["model.vocab=1536"])


def test_a_recipe_without_a_model_size_names_the_missing_keys(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "model:\n  num_layers: 2\noptimizer:\n  lr: 0.1\n")
    message = _error(recipe)
    assert message.startswith("model:") and "model.hidden_size" in message and "model.num_layers" not in message
    assert "recipes/model/tiny.yaml" in message
    assert "model.num_experts" in _error(None, ["optimizer.lr=0.1"])


@pytest.mark.parametrize("override, allowed", [
    ("model.params_dtype=float16", "float32, bfloat16"),
    ("model.transformer_impl=te", "auto, transformer_engine, local"),
    ("model.fp8=e5m2", "e4m3, hybrid or null"),
    ("model.recompute_granularity=some", "full, selective or null"),
    ("model.moe_token_dispatcher_type=flex", "alltoall, allgather"),
    ("schedule.decay_style=wsd", "constant, linear, cosine"),
    ("diffusion.weighting=sum", "mean, elbo, sqrt_masked"),
    ("logging.level=LOUD", "DEBUG, INFO"),
])
def test_a_value_outside_its_choices_names_the_key_and_the_allowed_values(override, allowed):
    key, value = override.split("=")
    message = _error(TINY, [override])
    assert message.startswith(f"{key}={value!r}") and allowed in message, message


def test_sections_built_in_code_are_checked_by_the_same_rules():
    from megatron_uni.config import DiffusionConfig, validate

    with pytest.raises(ConfigError, match=r"diffusion.weighting='sum' is not allowed: one of mean, elbo, sqrt_masked"):
        DiffusionConfig(weighting="sum")
    with pytest.raises(ConfigError, match="diffusion.t_min=0.9 / diffusion.t_max=0.5"):
        DiffusionConfig(t_min=0.9, t_max=0.5)
    cfg = load_config(TINY)
    cfg.model.params_dtype = "float16"
    with pytest.raises(ConfigError, match="model.params_dtype='float16'"):
        validate(cfg)


@pytest.mark.parametrize("text, fragment", [
    ("optimizer.lr", "section.key=value"),
    ("lr=1", "'lr'"),
    ("model.moe.topk=2", "'model.moe.topk'"),
])
def test_malformed_override_is_one_line(text, fragment):
    with pytest.raises(ConfigError) as err:
        parse_override(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# unknown keys and wrong types
# ---------------------------------------------------------------------------------------------
def test_unknown_section_names_it(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "trainer:\n  steps: 3\n")
    assert "unknown section 'trainer'" in _error(recipe)


def test_unknown_key_names_section_and_key(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "model:\n  num_layer: 3\n")
    assert "unknown key model.num_layer" in _error(recipe)
    assert "unknown key optimizer.learning_rate" in _error(TINY, ["optimizer.learning_rate=0.1"])


@pytest.mark.parametrize("override, key, rule", [
    ("model.num_layers=four", "model.num_layers", "expected an integer"),
    ("model.num_layers=2.5", "model.num_layers", "expected an integer"),
    ("model.num_layers=true", "model.num_layers", "expected an integer"),
    ("optimizer.lr=fast", "optimizer.lr", "expected float"),
    ("parallel.sequence_parallel=3", "parallel.sequence_parallel", "expected true/false"),
    ("model.recompute_modules=layernorm", "model.recompute_modules", "expected a list"),
    ("model.recompute_modules=[1]", "model.recompute_modules[0]", "expected str"),
    ("parallel.virtual_pipeline=two", "parallel.virtual_pipeline", "expected an integer"),
])
def test_wrong_type_names_the_key(override, key, rule):
    message = _error(TINY, [override])
    assert message.startswith(f"{key}:") and rule in message, message


def test_shared_expert_size_zero_is_rejected_and_null_means_none():
    key = "model.moe_shared_expert_intermediate_size"
    assert f"{key}=0" in _error(TINY, [f"{key}=0"])
    assert load_config(TINY, [f"{key}=null"]).model.moe_shared_expert_intermediate_size is None


def test_section_that_is_not_a_mapping_is_rejected(tmp_path):
    recipe = _write(tmp_path / "r.yaml", "model: 3\n")
    assert _error(recipe).startswith("model:")


# ---------------------------------------------------------------------------------------------
# impossible layouts
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, keys", [
    # world size not divisible by TP x PP x CP (a dense variant: no MoE-specific rule fires first)
    (["model.first_k_dense=4", "parallel.world_size=6", "parallel.tensor=2", "parallel.pipeline=2"],
     ["parallel.world_size=6", "parallel.tensor", "parallel.pipeline", "parallel.context"]),
    # experts not divisible by EP
    (["parallel.expert=3"], ["model.num_experts=8", "parallel.expert=3"]),
    # layers not divisible by PP x VPP
    (["parallel.pipeline=2", "parallel.virtual_pipeline=3"], ["model.num_layers=4", "parallel.pipeline",
                                                               "parallel.virtual_pipeline"]),
    (["parallel.pipeline=3"], ["model.num_layers=4", "parallel.pipeline"]),
    # VPP without PP
    (["parallel.virtual_pipeline=2"], ["parallel.virtual_pipeline", "parallel.pipeline > 1"]),
    # SP without TP
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel", "parallel.tensor > 1"]),
    # MoE under TP needs SP (megatron-core's MoE layers refuse TP without it)
    (["parallel.tensor=2", "parallel.expert_tensor=2"], ["parallel.sequence_parallel", "parallel.tensor=2"]),
    # EP 1 + expert-TP != TP: expert grads would be reduced over DP only (wrong under SP)
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], ["parallel.expert_tensor=1", "parallel.tensor=2"]),
    # heads not divisible by TP
    (["parallel.tensor=4", "parallel.sequence_parallel=true"], ["model.num_query_groups=2", "parallel.tensor=4"]),
])
def test_impossible_layout_is_one_line_naming_the_keys(overrides, keys):
    message = _error(TINY, overrides)
    for key in keys:
        assert key in message, (key, message)


def test_possible_layouts_are_accepted():
    cfg = load_config(BIG, ["parallel.world_size=64", "parallel.tensor=2", "parallel.sequence_parallel=true",
                            "parallel.pipeline=2", "parallel.virtual_pipeline=5", "parallel.expert=8"])
    assert (cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.virtual_pipeline) == (2, 2, 5)
    assert load_config(TINY, ["parallel.world_size=4", "parallel.expert=4"]).parallel.expert == 4


def test_16b_layout_rules_use_its_own_sizes():
    message = _error(BIG, ["parallel.expert=3"])
    assert "model.num_experts=256" in message
    message = _error(BIG, ["parallel.pipeline=3"])
    assert "model.num_layers=20" in message


# ---------------------------------------------------------------------------------------------
# fp8 without TransformerEngine
# ---------------------------------------------------------------------------------------------
def test_fp8_without_transformer_engine_fails_at_model_build():
    from megatron_uni.platform.te import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("TransformerEngine imports here: fp8 is allowed")
    from megatron_uni.model.builder import build_model

    cfg = load_config(TINY, ["model.fp8=hybrid", "model.fp8_recipe=blockwise", "model.transformer_impl=auto"])
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model, cfg.parallel)
    message = str(err.value)
    assert "model.fp8='hybrid'" in message and "TransformerEngine" in message and "\n" not in message


def test_fp8_bad_values_are_rejected_when_loading():
    assert "model.fp8='e5m2'" in _error(TINY, ["model.fp8=e5m2"])
    assert "model.fp8_recipe='mxfp8'" in _error(TINY, ["model.fp8_recipe=mxfp8"])


def test_parallel_megatron_kwargs_are_accepted_by_both_megatron_consumers():
    import inspect

    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = load_config(TINY, ["parallel.tensor=2", "parallel.sequence_parallel=true",
                                "parallel.expert_tensor=2"]).parallel.megatron_kwargs()
    assert kwargs["tensor_model_parallel_size"] == 2 and kwargs["expert_tensor_parallel_size"] == 2
    initialize = inspect.signature(parallel_state.initialize_model_parallel).parameters
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(kwargs) <= set(initialize) and set(kwargs) <= fields


def test_a_resolved_config_written_as_yaml_loads_back_unchanged(tmp_path):
    import yaml

    cfg = load_config(BIG, ["parallel.tensor=2", "parallel.expert_tensor=2", "parallel.sequence_parallel=true",
                            "diffusion.weighting=elbo"])
    recipe = _write(tmp_path / "resolved.yaml", yaml.safe_dump(cfg.to_dict()))
    assert load_config(recipe) == cfg


def test_rows_and_row_length_of_the_diffusion_layouts():
    plain = load_config(TINY).diffusion
    pairs = load_config(TINY, ["diffusion.complementary=true"]).diffusion
    shared = load_config(TINY, ["diffusion.complementary=true", "diffusion.shared_clean=true"]).diffusion
    assert (plain.rows_per_sample, plain.copies_per_row) == (1, 2)
    assert (pairs.rows_per_sample, pairs.copies_per_row) == (2, 2)   # the schedule must see 2 x mbs rows
    assert (shared.rows_per_sample, shared.copies_per_row) == (1, 3)
