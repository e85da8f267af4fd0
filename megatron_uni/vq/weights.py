"""Strict load/save of the SigLIP-VQ weights in the HF ``image_tokenizer/`` layout.

The directory holds ``config.json`` (vision_config / vq_config), ``preprocessor_config.json`` and either one
``*.safetensors`` file or shards listed by ``model.safetensors.index.json``. Tensor names are
``model.visual.*`` and ``model.vqmodel.*``; every tensor the encoder needs must be present with its exact
shape, and no other tensor under those prefixes may appear: a mismatch is an error that names it.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_uni.errors import MegatronUniError
from megatron_uni.fileio import write_json
from megatron_uni.shapes import summary, unexpected, wrong_shape
from megatron_uni.vq.config import VQConfig
from megatron_uni.vq.encoder import SigLIPVQ

HF_PREFIX = "model."
OWNED_PREFIXES = ("model.visual.", "model.vqmodel.")
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "preprocessor_config.json"


class WeightMismatchError(MegatronUniError, ValueError):
    """The checkpoint does not hold exactly the tensors the encoder expects."""


def hf_name(module_name: str) -> str:
    return HF_PREFIX + module_name


def expected_shapes(model: SigLIPVQ) -> Dict[str, torch.Size]:
    return {hf_name(name): tensor.shape for name, tensor in model.state_dict().items()}


def _files_holding_weights(directory: str) -> Dict[str, List[str]]:
    """file -> tensor names under our prefixes, from the shard index or by opening every safetensors file."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as handle:
            weight_map = json.load(handle)["weight_map"]
        files: Dict[str, List[str]] = {}
        for name, filename in weight_map.items():
            if name.startswith(OWNED_PREFIXES):
                files.setdefault(filename, []).append(name)
        return files
    names = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors file in image tokenizer directory {directory}")
    files = {}
    for filename in names:
        with safe_open(os.path.join(directory, filename), framework="pt") as handle:
            files[filename] = [k for k in handle.keys() if k.startswith(OWNED_PREFIXES)]
    return files


def read_state_dict(directory: str, expected: Dict[str, torch.Size]) -> Dict[str, torch.Tensor]:
    """Read our tensors, checking names and shapes against ``expected`` before anything is copied."""
    found: Dict[str, torch.Tensor] = {}
    for filename, names in sorted(_files_holding_weights(directory).items()):
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{INDEX_FILE} in {directory} names missing shard {filename}")
        with safe_open(path, framework="pt") as handle:
            for name in names:
                shape = handle.get_slice(name).get_shape()
                if name not in expected:
                    raise WeightMismatchError(unexpected(name, shape, where=f" in {path}"))
                if tuple(shape) != tuple(expected[name]):
                    raise WeightMismatchError(wrong_shape(name, shape, expected[name], where=f" in {path}"))
                found[name] = handle.get_tensor(name)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise WeightMismatchError(f"image tokenizer checkpoint {directory} lacks tensor(s): {summary(missing, 5)}")
    return found


def load_weights(model: SigLIPVQ, directory: str) -> None:
    tensors = read_state_dict(directory, expected_shapes(model))
    local = {name[len(HF_PREFIX):]: tensor for name, tensor in tensors.items()}
    model.load_state_dict(local, strict=True)


def load_encoder(directory: str, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> SigLIPVQ:
    """Build the encoder from ``directory/config.json`` and load its weights strictly."""
    cfg = VQConfig.from_dir(directory)
    with torch.device("meta"):
        model = SigLIPVQ(cfg)
    model = model.to_empty(device="cpu")
    load_weights(model, directory)
    return model.to(device=device, dtype=dtype).eval()


def save_encoder(model: SigLIPVQ, directory: str) -> None:
    """Write config.json, preprocessor_config.json and model.safetensors in the HF layout."""
    os.makedirs(directory, exist_ok=True)
    model.config.save(directory)
    tensors = {hf_name(name): t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
    write_json(os.path.join(directory, PREPROCESSOR_FILE), preprocessor_config(model.config))


def preprocessor_config(cfg: VQConfig) -> dict:
    """Values of the HF preprocessor_config.json; images are resized by the caller (do_resize false)."""
    return {"do_rescale": True, "rescale_factor": 1.0 / 255.0, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_resize": False,
            "patch_size": cfg.patch_size, "temporal_patch_size": 1, "merge_size": 1,
            "image_processor_type": "GlmImageImageProcessor"}
