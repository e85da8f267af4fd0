"""Strict HF-layout loading of the SigLIP-VQ weights (model.visual.* / model.vqmodel.*)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_uni.vq.config import VQConfig
from megatron_uni.vq.encoder import build_seeded
from megatron_uni.vq.weights import WEIGHTS_FILE, WeightMismatchError, load_encoder, save_encoder


@pytest.fixture()
def saved(tmp_path):
    model = build_seeded(VQConfig.tiny(num_embeddings=32), seed=7)
    directory = str(tmp_path / "image_tokenizer")
    save_encoder(model, directory)
    return model, directory


def rewrite(directory, edit):
    path = os.path.join(directory, WEIGHTS_FILE)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_round_trip_in_hf_layout(saved):
    model, directory = saved
    with open(os.path.join(directory, "config.json")) as handle:
        config = json.load(handle)
    assert config["vision_config"]["hidden_size"] == 32 and config["vq_config"]["num_embeddings"] == 32
    names = load_file(os.path.join(directory, WEIGHTS_FILE)).keys()
    assert all(n.startswith(("model.visual.", "model.vqmodel.")) for n in names)
    assert "model.visual.blocks.1.attn.qkv.weight" in names and "model.vqmodel.quant_conv.weight" in names
    loaded = load_encoder(directory)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    pixels = torch.rand(1, 3, 64, 32) * 2 - 1
    assert torch.equal(model.encode(pixels), loaded.encode(pixels))
    with open(os.path.join(directory, "preprocessor_config.json")) as handle:
        assert json.load(handle)["image_mean"] == [0.5, 0.5, 0.5]


def test_sharded_index_layout_loads_and_ignores_other_prefixes(saved):
    model, directory = saved
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    os.remove(os.path.join(directory, WEIGHTS_FILE))
    visual = {k: v for k, v in tensors.items() if k.startswith("model.visual.")}
    rest = {k: v for k, v in tensors.items() if k not in visual}
    rest["model.language_model.unrelated"] = torch.zeros(3)
    save_file(visual, os.path.join(directory, "part-1.safetensors"))
    save_file(rest, os.path.join(directory, "part-2.safetensors"))
    weight_map = {**{k: "part-1.safetensors" for k in visual}, **{k: "part-2.safetensors" for k in rest}}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as handle:
        json.dump({"weight_map": weight_map}, handle)
    loaded = load_encoder(directory)
    assert torch.equal(loaded.vqmodel.quantize.embedding.weight, model.vqmodel.quantize.embedding.weight)


def test_missing_tensor_is_refused_by_name(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.pop("model.visual.blocks.1.mlp.fc2.bias"))
    with pytest.raises(WeightMismatchError, match=r"lacks tensor\(s\): model\.visual\.blocks\.1\.mlp\.fc2\.bias"):
        load_encoder(directory)


def test_wrong_shape_is_refused_by_name(saved):
    _, directory = saved

    def shrink(tensors):
        tensors["model.vqmodel.quantize.embedding.weight"] = torch.zeros(31, 16)

    rewrite(directory, shrink)
    with pytest.raises(WeightMismatchError,
                       match=r"model\.vqmodel\.quantize\.embedding\.weight .* shape \[31, 16\], expected \[32, 16\]"):
        load_encoder(directory)


def test_unexpected_tensor_under_our_prefix_is_refused(saved):
    _, directory = saved
    rewrite(directory, lambda t: t.update({"model.visual.post_layernorm.weight": torch.zeros(32)}))
    with pytest.raises(WeightMismatchError, match=r"unexpected tensor model\.visual\.post_layernorm\.weight"):
        load_encoder(directory)


def test_config_missing_field_is_named(tmp_path):
    directory = tmp_path / "bad"
    directory.mkdir()
    raw = VQConfig.tiny().to_hf_dict()
    del raw["vision_config"]["depth"]
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"vision_config lacks required field\(s\) \['depth'\]"):
        VQConfig.from_dir(str(directory))


def test_transformers_style_config_with_pair_sizes_and_extra_keys_loads(tmp_path):
    raw = VQConfig.real().to_hf_dict()
    raw["vision_config"].update(image_size=[2048, 2048], patch_size=[16, 16], model_type="glm_image_vision",
                                initializer_range=0.02)
    raw["vq_config"]["in_channels"] = 3
    assert VQConfig.from_hf_dict(raw) == VQConfig.real()
    raw["vision_config"]["image_size"] = [2048, 1024]
    with pytest.raises(ValueError, match=r"vision_config.image_size \[2048, 1024\] is not square"):
        VQConfig.from_hf_dict(raw)


def test_real_checkpoint_names_are_the_hf_image_tokenizer_names():
    from megatron_uni.vq.encoder import SigLIPVQ
    from megatron_uni.vq.weights import expected_shapes

    with torch.device("meta"):
        names = set(expected_shapes(SigLIPVQ(VQConfig.real())))
    per_block = [f"{part}.{kind}" for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
                 for kind in ("weight", "bias")]
    wanted = {"model.visual.embeddings.position_embedding.weight", "model.visual.patch_embed.proj.weight",
              "model.visual.patch_embed.proj.bias", "model.vqmodel.quantize.embedding.weight",
              "model.vqmodel.quant_conv.weight", "model.vqmodel.quant_conv.bias",
              "model.vqmodel.post_quant_conv.weight", "model.vqmodel.post_quant_conv.bias"}
    wanted |= {f"model.visual.blocks.{i}.{name}" for i in range(40) for name in per_block}
    assert names == wanted
