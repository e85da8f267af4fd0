"""Token saving of the prefix-aware BDLM layout on SFT- and understanding-shaped samples.

A sample is one document: a clean prefix (never masked) then a maskable target, padded to a
multiple of the block size with maskable padding (dFactory supervises the pad/EOS tail). The
shapes are drawn from ranges given by the caller; :func:`measure` noises them like training
does and counts positions of the full layout (2L) and of the compacted one.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import torch

from megatron_uni.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.layout import full_layout, kept_positions
from megatron_uni.rounding import round_up
from megatron_uni.tokens import Vocabulary


@dataclasses.dataclass(frozen=True)
class SampleShape:
    """Token-count ranges (inclusive) of one sample format."""

    name: str
    prompt_text: Tuple[int, int]
    prompt_image: Tuple[int, int]   # image codes in the prompt (conditioning image), 0 = none
    target: Tuple[int, int]


SHAPES: Dict[str, SampleShape] = {
    # chat SFT: system + user turn, assistant answer
    "sft": SampleShape("sft", prompt_text=(64, 1024), prompt_image=(0, 0), target=(32, 1024)),
    # understanding: one image (27x27 .. 50x50 codes) + question, short text answer
    "understanding": SampleShape("understanding", prompt_text=(16, 128), prompt_image=(729, 2500),
                                 target=(8, 256)),
}


def _draw(gen: torch.Generator, bounds: Tuple[int, int]) -> int:
    low, high = bounds
    return int(torch.randint(low, high + 1, (1,), generator=gen)) if high > low else low


def shaped_sample(shape: SampleShape, block_size: int, vocab: Vocabulary, gen: torch.Generator) -> Batch:
    """One document ``[1, L]``: image codes and prompt text (clean), then target + padding (maskable)."""
    image, prompt, target = _draw(gen, shape.prompt_image), _draw(gen, shape.prompt_text), _draw(gen, shape.target)
    used = image + prompt + target
    length = round_up(used, block_size)
    modality = torch.full((1, length), MODALITY_TEXT, dtype=torch.int8)
    modality[0, :image] = MODALITY_IMAGE
    tokens = torch.randint(0, vocab.text_size, (1, length), generator=gen)
    tokens[0, :image] = vocab.image_offset + tokens[0, :image] % vocab.num_image_codes
    tokens[0, used:] = vocab.pad_id
    maskable = torch.zeros(1, length, dtype=torch.bool)
    maskable[0, image + prompt:] = True
    return Batch(tokens=tokens, maskable=maskable, modality=modality,
                 doc_ids=torch.zeros(1, length, dtype=torch.int32),
                 position_ids=torch.arange(length).unsqueeze(0))


def measure(shape: SampleShape, samples: int, cfg: DiffusionConfig, block_size: int, vocab: Vocabulary,
            seed: int = 0) -> Dict[str, float]:
    """Positions of the full (2L) and prefix-aware layouts summed over ``samples`` samples."""
    gen = torch.Generator().manual_seed(seed)
    full = kept = 0
    for _ in range(samples):
        batch = shaped_sample(shape, block_size, vocab, gen)
        inputs = build_inputs(batch, vocab, cfg, gen, block_size=block_size)
        supervised = inputs.loss_weights > 0
        full += inputs.num_tokens
        kept += int(kept_positions(full_layout(batch.doc_ids, block_size), supervised).sum())
    return {"samples": samples, "full_tokens": full, "prefix_aware_tokens": kept,
            "saving": 1.0 - kept / full if full else 0.0}
