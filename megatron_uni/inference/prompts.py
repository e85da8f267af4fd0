"""Prompts of each task as :class:`GenerationRequest` s, in the layout the model was trained on.

Chat template (the same as ``data/formats.py`` builds for training)::

    <role>SYSTEM</role> {system} <role>HUMAN</role>{image blocks}{text}<role>ASSISTANT</role>

Text-to-image and editing end the prompt with the output header ``<|image|> <H> <W> <boi>``; the
sampler fills H*W positions restricted to image codes and the canvas ends with ``<|/image|>``.
CFG branches replace the text with ``<uncondition>`` (and, editing, drop the source image).
Prompt text may be a string (encoded as plain text, like training data) or a list of token ids.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple, Union

from megatron_uni.data.formats import SYSTEM_EDITING, SYSTEM_T2I, SYSTEM_UNDERSTANDING
from megatron_uni.inference.generate import GenerationError, GenerationRequest
from megatron_uni.inference.guidance import ClassifierFreeGuidance
from megatron_uni.tokens import Vocabulary

TextOrIds = Union[str, Sequence[int]]
Image = Tuple[int, int, Sequence[int]]  # (grid_h, grid_w, 0-based codes row-major)

PIXELS_PER_CODE = 16   # one VQ code per 16x16 patch
DECODER_UPSAMPLE = 2   # the diffusion decoder renders each code as 32x32 output pixels
# anything spelled like a special token: <|name|> or <role>NAME</role> or <name>
SPECIAL_LIKE = re.compile(r"<\|[^<>|\s]+\|>|<role>[A-Z]+</role>|<[a-z_]+>")


def special(vocabulary: Vocabulary, name: str) -> int:
    """Id of a named special token; a clear error when this vocabulary lacks it."""
    try:
        return vocabulary.special(name)
    except KeyError as err:
        raise GenerationError(str(err.args[0])) from None


def encode_text(vocabulary: Vocabulary, text: TextOrIds, allow_special: bool = False) -> List[int]:
    """Token ids of prompt text. With ``allow_special`` special-token strings in the text become
    specials, and one the tokenizer does not know is an error (instead of silently being text)."""
    if not isinstance(text, str):
        ids = [int(t) for t in text]
        bad = [t for t in ids if not 0 <= t < vocabulary.size]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} outside the vocabulary [0, {vocabulary.size})")
        return ids
    if allow_special:
        unknown = sorted({s for s in SPECIAL_LIKE.findall(text) if vocabulary.tokenizer.token_to_id(s) is None})
        if unknown:
            raise GenerationError(f"unknown special token(s) {unknown} in the prompt: the tokenizer has no such token")
    return vocabulary.encode(text, parse_special=allow_special)


def chat_prompt(vocabulary: Vocabulary, system: Optional[str], human: Sequence[int]) -> List[int]:
    ids: List[int] = []
    if system:
        ids += [special(vocabulary, "role_system")] + encode_text(vocabulary, f" {system} ")
    return ids + [special(vocabulary, "role_human")] + list(human) + [special(vocabulary, "role_assistant")]


def image_header(vocabulary: Vocabulary, grid_h: int, grid_w: int) -> List[int]:
    try:
        sizes = [vocabulary.size_token(grid_h), vocabulary.size_token(grid_w)]
    except KeyError as err:
        raise GenerationError(f"image grid {grid_h}x{grid_w}: {err.args[0]}") from None
    return [special(vocabulary, "image_start"), *sizes, special(vocabulary, "boi")]


def image_tokens(vocabulary: Vocabulary, image: Image) -> List[int]:
    grid_h, grid_w, codes = image
    image_header(vocabulary, grid_h, grid_w)  # checks the size tokens
    try:
        return vocabulary.image_block(grid_h, grid_w, codes)
    except ValueError as err:
        raise GenerationError(f"source image: {err}") from None


def grid_from_pixels(height: int, width: int) -> Tuple[int, int]:
    """Output pixels -> code grid; the sides must be whole numbers of (upsampled) codes."""
    unit = PIXELS_PER_CODE * DECODER_UPSAMPLE
    if height <= 0 or width <= 0 or height % unit or width % unit:
        raise GenerationError(f"image size {height}x{width} px is not a whole number of codes: each side must be "
                              f"a positive multiple of {unit} px ({PIXELS_PER_CODE} px per code, decoder "
                              f"upsamples {DECODER_UPSAMPLE}x)")
    return height // unit, width // unit


def text_request(vocabulary: Vocabulary, prompt: TextOrIds, length: int, system: Optional[str] = None,
                 chat: bool = True, allow_special: bool = False) -> GenerationRequest:
    ids = encode_text(vocabulary, prompt, allow_special)
    return GenerationRequest([chat_prompt(vocabulary, system, ids) if chat else ids], length)


def understanding_request(vocabulary: Vocabulary, images: Sequence[Image], question: TextOrIds, length: int,
                          system: str = SYSTEM_UNDERSTANDING) -> GenerationRequest:
    human = [t for image in images for t in image_tokens(vocabulary, image)] + encode_text(vocabulary, question)
    return GenerationRequest([chat_prompt(vocabulary, system, human)], length)


def _image_output(vocabulary: Vocabulary, branches: List[List[int]], grid_h: int, grid_w: int,
                  guidance: ClassifierFreeGuidance) -> GenerationRequest:
    header = image_header(vocabulary, grid_h, grid_w)
    return GenerationRequest([b + header for b in branches], grid_h * grid_w, image_span=True,
                             suffix=[special(vocabulary, "image_end")], pad_to_block=False, stop_at_eos=False,
                             guidance=guidance if len(branches) > 1 else (lambda logits: logits[0]))


def text_to_image_request(vocabulary: Vocabulary, prompt: TextOrIds, grid_h: int, grid_w: int,
                          cfg_scale: float = 1.0, cfg_rescale: float = 0.0, system: str = SYSTEM_T2I,
                          force_cfg: bool = False) -> GenerationRequest:
    """Branches: conditional, and ``<uncondition>`` unless guidance is the identity (scale 1)."""
    branches = [chat_prompt(vocabulary, system, encode_text(vocabulary, prompt))]
    if force_cfg or cfg_scale != 1.0 or cfg_rescale:
        branches.append(chat_prompt(vocabulary, system, [special(vocabulary, "uncondition")]))
    return _image_output(vocabulary, branches, grid_h, grid_w, ClassifierFreeGuidance(cfg_scale, 0.0, cfg_rescale))


def editing_request(vocabulary: Vocabulary, source: Image, instruction: TextOrIds, text_scale: float = 4.0,
                    image_scale: float = 0.0, cfg_rescale: float = 0.0,
                    system: str = SYSTEM_EDITING) -> GenerationRequest:
    """Output grid = source grid. Branches: conditional; no text (``<uncondition>``) unless both
    scales are the identity; no image (``<|image|>`` + instruction, the source codes dropped, as
    the released serving code builds it) only when ``image_scale`` is non-zero."""
    block, text = image_tokens(vocabulary, source), encode_text(vocabulary, instruction)
    branches = [chat_prompt(vocabulary, system, block + text)]
    if text_scale != 1.0 or image_scale or cfg_rescale:
        branches.append(chat_prompt(vocabulary, system, block + [special(vocabulary, "uncondition")]))
    if image_scale:
        branches.append(chat_prompt(vocabulary, system, [special(vocabulary, "image_start")] + text))
    guidance = ClassifierFreeGuidance(text_scale, image_scale, cfg_rescale)
    return _image_output(vocabulary, branches, source[0], source[1], guidance)
