"""Each refusal of the conversion tools, triggered once, with the message naming what is wrong."""

from __future__ import annotations

import json
import os
import types

import pytest
import torch

from convert_helpers import TINY_OVERRIDES, run_tool, tiny_config
from megatron_uni.convert import importer
from megatron_uni.convert.exporter import _copies, check_checkpoint_tensors
from megatron_uni.convert.hf_io import ConversionError, plan_shards, write_index, write_shard
from megatron_uni.convert.mapping import stacked_megatron_keys
from megatron_uni.convert.tiny_hf import write_tiny_hf

EXPERT0_UP = "model.layers.1.mlp.experts.0.up_proj.weight"


@pytest.fixture
def hf_dir(tmp_path):
    folder = str(tmp_path / "hf")
    write_tiny_hf(folder, tiny_config().model, seed=1, shards=1)
    return folder


def _rewrite(folder, change):
    from convert_helpers import read_hf_folder

    weights = read_hf_folder(folder)
    change(weights)
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            os.remove(os.path.join(folder, name))
    plans = plan_shards([(n, t.numel() * t.element_size()) for n, t in weights.items()], 10 ** 9)
    write_shard(folder, plans[0], weights)
    write_index(folder, plans)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def test_import_refuses_mismatched_config_via_cli(hf_dir, tmp_path):
    _edit_config(hf_dir, num_hidden_layers=5, num_experts=32)
    done = run_tool("convert_hf_to_megatron.py", [hf_dir, str(tmp_path / "ckpt"), "--dry-run", "--recipe",
                                                  os.path.join("recipes", "model", "tiny.yaml"), "--override",
                                                  *TINY_OVERRIDES])
    assert done.returncode == 2
    assert "num_hidden_layers=5 but model.num_layers=4" in done.stderr
    assert "num_experts=32 but model.num_experts=16" in done.stderr


def test_import_refuses_wrong_vocab(hf_dir):
    _edit_config(hf_dir, vocab_size=999)
    with pytest.raises(ConversionError, match=r"vocab_size=999 but expected model.text_vocab=1024"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_refuses_missing_tensor(hf_dir):
    _rewrite(hf_dir, lambda w: w.pop(EXPERT0_UP))
    with pytest.raises(ConversionError, match=rf"missing tensor {EXPERT0_UP} \(expected shape \[32, 64\]\)"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_refuses_unexpected_tensor(hf_dir):
    _rewrite(hf_dir, lambda w: w.update({"model.layers.9.extra.weight": w["model.norm.weight"].clone()}))
    with pytest.raises(ConversionError, match=r"unexpected tensor model.layers.9.extra.weight \[64\]"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_refuses_wrong_shape(hf_dir):
    _rewrite(hf_dir, lambda w: w.update({EXPERT0_UP: w[EXPERT0_UP][:16]}))
    with pytest.raises(ConversionError, match=rf"tensor {EXPERT0_UP} in model-00001-of-00001.safetensors has "
                                              r"shape \[16, 64\], expected \[32, 64\]"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_dry_run_lists_checkpoint_keys(hf_dir):
    lines = importer.dry_run_report(hf_dir, tiny_config().model)
    assert "HF vocab rows 1024 -> model vocab 1280" in lines[0]
    assert "write decoder.layers.1.mlp.experts.experts.linear_fc1.weight [16, 64, 64]" in lines


def _fake_meta(shapes):
    return {key: types.SimpleNamespace(key=key, global_shape=shape) for key, shape in shapes.items()}


def test_export_refuses_checkpoint_tensor_problems():
    m = tiny_config().model
    shapes = dict(stacked_megatron_keys(m))
    shapes.pop("decoder.layers.2.mlp.router.expert_bias")
    shapes["decoder.layers.1.mlp.router.weight"] = (8, 64)
    shapes["decoder.layers.1.mlp.mystery.weight"] = (3,)
    with pytest.raises(ConversionError) as err:
        check_checkpoint_tensors(_fake_meta(shapes), m, "ckpt/model")
    message = str(err.value)
    assert "missing tensor decoder.layers.2.mlp.router.expert_bias (expected shape [16])" in message
    assert "tensor decoder.layers.1.mlp.router.weight has shape [8, 64], expected [16, 64]" in message
    assert "unexpected tensor decoder.layers.1.mlp.mystery.weight [3]" in message


def test_export_accepts_te_and_local_spec_keys():
    m = tiny_config().model
    shapes = dict(stacked_megatron_keys(m))
    shapes["decoder.layers.1.mlp.linear_fc1.layer_norm_weight"] = shapes.pop("decoder.layers.1.pre_mlp_layernorm.weight")
    found = check_checkpoint_tensors(_fake_meta(shapes), m, "ckpt/model")
    assert found["decoder.layers.1.pre_mlp_layernorm.weight"].key == "decoder.layers.1.mlp.linear_fc1.layer_norm_weight"


def test_export_refuses_incomplete_base_folder(tmp_path):
    for sub in ("image_tokenizer", "vae", "decoder-turbo"):
        os.makedirs(tmp_path / "base" / sub)
    with pytest.raises(ConversionError, match=r"lacks decoder/ \(needed by the decoder"):
        _copies(None, str(tmp_path / "base"))


def test_export_refuses_tokenizer_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(ConversionError, match="has no tokenizer.json"):
        _copies(str(tmp_path), None)


@pytest.mark.parametrize("key,value,want", [("score_function", "softmax", "'sigmoid'"),
                                            ("norm_topk_prob", False, "True"), ("use_qk_norm", False, "True"),
                                            ("tie_word_embeddings", True, "False")])
def test_import_refuses_architecture_switches_naming_both_values(hf_dir, key, value, want):
    _edit_config(hf_dir, **{key: value})
    with pytest.raises(ConversionError, match=rf"{key}={value!r} but this model supports only {key}={want}"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_refuses_quantized_tensor_dtype(hf_dir):
    _rewrite(hf_dir, lambda w: w.update({EXPERT0_UP: w[EXPERT0_UP].to(torch.int8)}))
    with pytest.raises(ConversionError, match=rf"tensor {EXPERT0_UP} has dtype I8, expected one of"):
        importer.dry_run_report(hf_dir, tiny_config().model)


def test_import_cli_bad_override_is_one_line(hf_dir, tmp_path):
    done = run_tool("convert_hf_to_megatron.py", [hf_dir, str(tmp_path / "ckpt"), "--dry-run", "--recipe",
                                                  os.path.join("recipes", "model", "tiny.yaml"), "--override",
                                                  "model.no_such_key=1"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "no_such_key" in done.stderr
