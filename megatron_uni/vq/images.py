"""Image preprocessing for the SigLIP-VQ tokenizer: resolution rules, resize-and-crop, normalisation.

Every rule answers one question: given an image of (height, width) pixels, at what (h, w) does the
encoder see it? Both sides are multiples of the 16-px patch, so the code grid is (h/16, w/16).
The image is then scaled (aspect kept) to cover (h, w) and centre-cropped to it.

- understanding: Qwen2.5-VL smart resize to multiples of 32 px inside a pixel budget of
  [128^2, 800^2] (one image) or [128^2, 448^2] (several images in one sample);
- generation: square targets of 256/512/1024 px; the pixel decoder upsamples 2x, so the encoder sees
  target/2 px and the grid is (target/2/16)^2 (1024 -> 32x32 codes);
- editing: the crop size of area 512^2 with sides multiple of 32 and aspect <= 4 closest to the
  image's aspect.

Pixels are normalised as the HF preprocessor does: rescale 1/255, then (x - 0.5) / 0.5.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch

PATCH = 16
UNDERSTANDING_FACTOR = 32
UNDERSTANDING_MIN_PIXELS = 128 * 128
UNDERSTANDING_MAX_PIXELS = 800 * 800
MULTI_IMAGE_MAX_PIXELS = 448 * 448
GENERATION_TARGETS = (256, 512, 1024)
DECODER_UPSAMPLE = 2
EDIT_AREA_SIDE = 512
EDIT_FACTOR = 32
EDIT_MAX_ASPECT = 4.0
MEAN = 0.5
STD = 0.5
MODES = ("understanding", "generation", "editing")


def smart_resize(height: int, width: int, min_pixels: int = UNDERSTANDING_MIN_PIXELS,
                 max_pixels: int = UNDERSTANDING_MAX_PIXELS, factor: int = UNDERSTANDING_FACTOR) -> Tuple[int, int]:
    """Sides rounded to ``factor``, rescaled (aspect kept) into [min_pixels, max_pixels]."""
    _check_size(height, width)
    h_bar = max(round(height / factor) * factor, factor)
    w_bar = max(round(width / factor) * factor, factor)
    if h_bar * w_bar > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        h_bar = max(math.floor(height * scale / factor) * factor, factor)
        w_bar = max(math.floor(width * scale / factor) * factor, factor)
    elif h_bar * w_bar < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * scale / factor) * factor
        w_bar = math.ceil(width * scale / factor) * factor
    return h_bar, w_bar


def understanding_size(height: int, width: int, multi_image: bool = False) -> Tuple[int, int]:
    max_pixels = MULTI_IMAGE_MAX_PIXELS if multi_image else UNDERSTANDING_MAX_PIXELS
    return smart_resize(height, width, UNDERSTANDING_MIN_PIXELS, max_pixels)


def generation_size(target: int) -> Tuple[int, int]:
    """Encoder input size for a generation target of ``target`` px (square)."""
    if target not in GENERATION_TARGETS:
        raise ValueError(f"generation target {target} px is not one of {GENERATION_TARGETS}")
    side = target // DECODER_UPSAMPLE
    return side, side


def generation_grid(target: int) -> Tuple[int, int]:
    side = generation_size(target)[0] // PATCH
    return side, side


def editing_crop_sizes(area_side: int = EDIT_AREA_SIDE, factor: int = EDIT_FACTOR,
                       max_aspect: float = EDIT_MAX_ASPECT) -> List[Tuple[int, int]]:
    """All (width, height) with sides multiple of ``factor``, about area_side^2 area and aspect <= max_aspect.

    Walks (wp, hp) patch counts from wide to tall keeping wp * hp <= (area_side/factor)^2, as the
    reference ``generate_crop_size_list`` does.
    """
    budget = (area_side // factor) ** 2
    sizes, wide, tall = [], budget, 1
    while wide > 0:
        if max(wide, tall) / min(wide, tall) <= max_aspect:
            sizes.append((wide * factor, tall * factor))
        if (tall + 1) * wide <= budget:
            tall += 1
        else:
            wide -= 1
    return sizes


def editing_size(height: int, width: int) -> Tuple[int, int]:
    """The editing crop (h, w) that keeps most of the image: the best min/max ratio of the two scales."""
    _check_size(height, width)

    def kept_fraction(size: Tuple[int, int]) -> float:
        crop_w, crop_h = size
        return min(crop_w / width, crop_h / height) / max(crop_w / width, crop_h / height)

    best_w, best_h = max(editing_crop_sizes(), key=lambda size: (kept_fraction(size), size))
    return best_h, best_w


def target_size(mode: str, height: int, width: int, generation_target: Optional[int] = None,
                multi_image: bool = False) -> Tuple[int, int]:
    """(h, w) the encoder sees for an image of (height, width) under the rule of ``mode``."""
    if mode == "understanding":
        return understanding_size(height, width, multi_image)
    if mode == "generation":
        if generation_target is None:
            raise ValueError("generation mode needs a target size (256, 512 or 1024)")
        return generation_size(generation_target)
    if mode == "editing":
        return editing_size(height, width)
    raise ValueError(f"unknown resolution mode {mode!r}; expected one of {MODES}")


def cover_size(height: int, width: int, target_h: int, target_w: int) -> Tuple[int, int]:
    """Size (aspect kept) that just covers (target_h, target_w); never smaller than the target."""
    scale = max(target_h / height, target_w / width)
    return max(round(height * scale), target_h), max(round(width * scale), target_w)


def center_crop_origin(height: int, width: int, target_h: int, target_w: int) -> Tuple[int, int]:
    return (height - target_h) // 2, (width - target_w) // 2


def resize_and_crop(image, target_h: int, target_w: int):
    """PIL path: bicubic resize to cover the target, then centre crop. Returns an RGB PIL image."""
    from PIL import Image

    width, height = image.size
    cover_h, cover_w = cover_size(height, width, target_h, target_w)
    resized = image.convert("RGB").resize((cover_w, cover_h), resample=Image.BICUBIC)
    top, left = center_crop_origin(cover_h, cover_w, target_h, target_w)
    return resized.crop((left, top, left + target_w, top + target_h))


def normalize(pixels) -> torch.Tensor:
    """uint8 [H, W, 3] (numpy or torch) -> float32 [3, H, W] in [-1, 1] (rescale 1/255, mean = std = 0.5)."""
    array = torch.as_tensor(np.array(pixels))  # a copy: decoders may hand out read-only buffers
    if array.dim() != 3 or array.shape[-1] != 3 or array.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels [H, W, 3], got {array.dtype} {tuple(array.shape)}")
    scaled = array.permute(2, 0, 1).float() / 255.0
    return (scaled - MEAN) / STD


def code_grid(height: int, width: int) -> Tuple[int, int]:
    if height % PATCH or width % PATCH:
        raise ValueError(f"image size {height}x{width} is not a multiple of the {PATCH}-px patch")
    return height // PATCH, width // PATCH


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
