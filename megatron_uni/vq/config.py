"""Configuration of the SigLIP-VQ image tokenizer, in the layout of the HF `image_tokenizer/config.json`.

The HF file holds two sections, ``vision_config`` (the ViT) and ``vq_config`` (the quantizer). The real
values are GLM-Image's vision tokenizer, the one LLaDA2.0-Uni ships; they reproduce the exact parameter
count of the published export (488 tensors, 1,199,457,280 parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict

from megatron_uni.fileio import write_json

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_heads: int
    depth: int
    patch_size: int = 16
    image_size: int = 2048  # the learned position table covers image_size / patch_size squared
    in_channels: int = 3
    hidden_act: str = "gelu"
    attention_bias: bool = True
    layer_norm_eps: float = 1e-6

    @property
    def position_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class QuantizerConfig:
    num_embeddings: int
    embed_dim: int
    latent_channels: int


@dataclasses.dataclass(frozen=True)
class VQConfig:
    vision: VisionConfig
    quantizer: QuantizerConfig

    def __post_init__(self):
        if self.vision.hidden_size % self.vision.num_heads:
            raise ValueError(f"vision_config.hidden_size {self.vision.hidden_size} is not divisible by "
                             f"num_heads {self.vision.num_heads}")
        if self.quantizer.latent_channels != self.vision.hidden_size:
            raise ValueError(f"vq_config.latent_channels {self.quantizer.latent_channels} must equal "
                             f"vision_config.hidden_size {self.vision.hidden_size} (quant_conv input)")
        if self.vision.hidden_act != "gelu":
            raise ValueError(f"vision_config.hidden_act {self.vision.hidden_act!r} is not supported (only 'gelu')")

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_embeddings

    # ---- named configurations ------------------------------------------------------------------
    @classmethod
    def real(cls) -> "VQConfig":
        """LLaDA2.0-Uni / GLM-Image SigLIP-VQ: ViT 1536 x 40 layers, codebook 16384 x 2048."""
        return cls(VisionConfig(hidden_size=1536, intermediate_size=6144, num_heads=16, depth=40),
                   QuantizerConfig(num_embeddings=16384, embed_dim=2048, latent_channels=1536))

    @classmethod
    def tiny(cls, num_embeddings: int = 256) -> "VQConfig":
        """Same architecture at toy width for tests and the demo (256 codes as in recipes/model/tiny.yaml)."""
        return cls(VisionConfig(hidden_size=32, intermediate_size=64, num_heads=2, depth=2, image_size=1024),
                   QuantizerConfig(num_embeddings=num_embeddings, embed_dim=16, latent_channels=32))

    # ---- HF config.json ------------------------------------------------------------------------
    def to_hf_dict(self) -> Dict[str, Any]:
        vision = dataclasses.asdict(self.vision)
        vision["spatial_merge_size"] = 1  # one token per 16-px patch, no 2x2 merge
        return {"vision_config": vision, "vq_config": dataclasses.asdict(self.quantizer)}

    @classmethod
    def from_hf_dict(cls, raw: Dict[str, Any], source: str = "config") -> "VQConfig":
        vision_raw = _section(raw, "vision_config", source)
        vq_raw = _section(raw, "vq_config", source)
        merge = vision_raw.get("spatial_merge_size", 1)
        if merge != 1:
            raise ValueError(f"{source}: vision_config.spatial_merge_size {merge} is not supported (must be 1)")
        vision_fields = _pick(vision_raw, VisionConfig, source, "vision_config")
        for name in ("image_size", "patch_size"):  # transformers allows [h, w]; the tokenizer is square
            if name in vision_fields:
                vision_fields[name] = _square(vision_fields[name], f"{source}: vision_config.{name}")
        vision = VisionConfig(**vision_fields)
        quantizer = QuantizerConfig(**_pick(vq_raw, QuantizerConfig, source, "vq_config"))
        return cls(vision, quantizer)

    @classmethod
    def from_dir(cls, directory: str) -> "VQConfig":
        path = os.path.join(directory, CONFIG_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image tokenizer config not found: {path}")
        with open(path) as handle:
            return cls.from_hf_dict(json.load(handle), source=path)

    def save(self, directory: str) -> None:
        write_json(os.path.join(directory, CONFIG_FILE), self.to_hf_dict())


def _section(raw: Dict[str, Any], name: str, source: str) -> Dict[str, Any]:
    if name not in raw or not isinstance(raw[name], dict):
        raise ValueError(f"{source}: missing section {name!r}")
    return raw[name]


def _square(value, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{where} {value} is not square")
        return int(value[0])
    return int(value)


def _pick(raw: Dict[str, Any], klass, source: str, section: str) -> Dict[str, Any]:
    """Keep the fields our dataclass knows; a required one that is absent is an error naming it."""
    fields = {f.name: f for f in dataclasses.fields(klass)}
    picked = {name: raw[name] for name in fields if name in raw}
    missing = [name for name, f in fields.items()
               if name not in raw and f.default is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{source}: {section} lacks required field(s) {missing}")
    return picked
