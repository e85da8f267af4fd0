"""Interleaved generation: text, and an image wherever the model writes an image header.

Phases alternate on one growing context (each phase prefills it again):

1. text: generate up to ``text_length`` positions; stop at EOS, or at the first well-formed
   header ``<|image|> <H> <W> <boi>`` the model wrote (what follows it in that phase is dropped);
2. image: the H*W positions after the header, restricted to image codes, then ``<|/image|>``;
   back to 1 with the image in the context, until EOS, ``max_images`` or ``max_phases``.

Images are conditional only (no CFG branch): the released serving code's interleaved mode
applies guidance per frame, which is not built here.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

from megatron_uni.inference.generate import GenerationError, GenerationRequest, generate
from megatron_uni.inference.sampling import SamplerSettings
from megatron_uni.tokens import Vocabulary


@dataclasses.dataclass
class InterleavedGeneration:
    tokens: List[int]                       # everything generated after the prompt
    images: List[Tuple[int, int, List[int]]]  # (H, W, 0-based codes) in order
    finished: bool                          # EOS generated
    refinement_forwards: int = 0


def find_header(vocabulary: Vocabulary, ids: Sequence[int]) -> Optional[Tuple[int, int, int]]:
    """(index just past the header, H, W) of the first well-formed image header in ``ids``."""
    start, boi = vocabulary.special("image_start"), vocabulary.special("boi")
    for i in range(len(ids) - 3):
        if ids[i] != start or ids[i + 3] != boi:
            continue
        try:
            return i + 4, vocabulary.size_of_token(ids[i + 1]), vocabulary.size_of_token(ids[i + 2])
        except ValueError:
            continue
    return None


def generate_interleaved(runner, vocabulary: Vocabulary, prompt: Sequence[int], text_length: int = 256,
                         settings: SamplerSettings = SamplerSettings(),
                         image_settings: Optional[SamplerSettings] = None, max_images: int = 10,
                         max_phases: int = 32) -> InterleavedGeneration:
    image_settings = image_settings or settings
    context, out = list(prompt), InterleavedGeneration([], [], False)
    for _ in range(max_phases):
        text = generate(runner, vocabulary, GenerationRequest([context], text_length), settings)
        out.refinement_forwards += text.refinement_forwards
        header = find_header(vocabulary, text.tokens)
        if header is None or len(out.images) >= max_images:
            out.tokens += text.tokens
            out.finished = text.finished
            return out
        end, grid_h, grid_w = header
        context += text.tokens[:end]
        out.tokens += text.tokens[:end]
        if grid_h * grid_w == 0:
            raise GenerationError(f"the model wrote an empty image header {grid_h}x{grid_w}")
        image = generate(runner, vocabulary, GenerationRequest(
            [context], grid_h * grid_w, image_span=True, suffix=[vocabulary.special("image_end")],
            pad_to_block=False, stop_at_eos=False), image_settings)
        out.refinement_forwards += image.refinement_forwards
        context += image.tokens
        out.tokens += image.tokens
        out.images.append((grid_h, grid_w, [vocabulary.image_code(t) for t in image.tokens[:-1]]))
    return out
