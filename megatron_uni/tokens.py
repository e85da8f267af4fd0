"""The Vocabulary contract: one object that knows every token id the stack uses.

Layout of the model vocabulary (LLaDA2.0-Uni):

    [0, text_size)                          text tokens of the HF tokenizer (specials included)
    [image_offset, image_offset + codes)    SigLIP-VQ image codes, image_offset == text_size
    [size, padded_size)                     padding rows so the embedding divides by 128 x TP

Nothing else in the code base writes a token id as a literal: ask this object.
An image is written as ``<|image|> <H> <W> <boi>`` + H*W codes (row-major) + ``<|/image|>``
where ``<H>`` / ``<W>`` are the size tokens ``<|reserved_token_N|>``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

NUM_IMAGE_CODES = 16384
VOCAB_DIVISOR = 128  # Megatron's --make-vocab-size-divisible-by used by Ling / LLaDA2

# name -> token string in the Uni tokenizer. Resolved by string, never by id.
SPECIAL_TOKEN_STRINGS: Dict[str, str] = {
    "image_start": "<|image|>",
    "image_end": "<|/image|>",
    "boi": "<boi>",
    "mask": "<|mask|>",
    "eos": "<|endoftext|>",
    "uncondition": "<uncondition>",
    "role_system": "<role>SYSTEM</role>",
    "role_human": "<role>HUMAN</role>",
    "role_assistant": "<role>ASSISTANT</role>",
}
SIZE_TOKEN_FORMAT = "<|reserved_token_{}|>"


def pad_vocab_size(size: int, tensor_parallel: int = 1, divisor: int = VOCAB_DIVISOR) -> int:
    """Smallest multiple of ``divisor * tensor_parallel`` that holds ``size`` rows."""
    multiple = divisor * tensor_parallel
    return -(-size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token-id layout. Build with :meth:`from_tokenizer_dir` (real) or :meth:`synthetic` (tests)."""

    text_size: int
    special_ids: Mapping[str, int]
    size_token_ids: Mapping[int, int]  # integer N -> id of <|reserved_token_N|>
    num_image_codes: int = NUM_IMAGE_CODES

    # ---- sizes -------------------------------------------------------------------------------
    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def size(self) -> int:
        """Unpadded model vocabulary: text + image codes."""
        return self.text_size + self.num_image_codes

    def padded_size(self, tensor_parallel: int = 1) -> int:
        return pad_vocab_size(self.size, tensor_parallel)

    # ---- special tokens ----------------------------------------------------------------------
    def special(self, name: str) -> int:
        try:
            return self.special_ids[name]
        except KeyError:
            raise KeyError(f"vocabulary has no special token {name!r}; known: {sorted(self.special_ids)}")

    @property
    def mask_id(self) -> int:
        return self.special("mask")

    @property
    def eos_id(self) -> int:
        return self.special("eos")

    @property
    def pad_id(self) -> int:
        return self.special("eos")  # LLaDA2 pads with <|endoftext|>

    def size_token(self, n: int) -> int:
        try:
            return self.size_token_ids[n]
        except KeyError:
            raise KeyError(
                f"no size token {SIZE_TOKEN_FORMAT.format(n)} in the vocabulary "
                f"(have sizes {min(self.size_token_ids)}..{max(self.size_token_ids)})"
            )

    def size_of_token(self, token_id: int) -> int:
        for n, tid in self.size_token_ids.items():
            if tid == token_id:
                return n
        raise ValueError(f"token id {token_id} is not a size token")

    # ---- image codes -------------------------------------------------------------------------
    def image_token(self, code: int) -> int:
        if not 0 <= code < self.num_image_codes:
            raise ValueError(f"image code {code} outside [0, {self.num_image_codes})")
        return self.image_offset + code

    def image_code(self, token_id: int) -> int:
        if not self.is_image_token(token_id):
            raise ValueError(f"token id {token_id} is not an image code token")
        return token_id - self.image_offset

    def is_image_token(self, token_id: int) -> bool:
        return self.image_offset <= token_id < self.image_offset + self.num_image_codes

    def image_block(self, grid_h: int, grid_w: int, codes: Sequence[int]) -> List[int]:
        """Token span of one image: header, H*W codes row-major, end marker."""
        if len(codes) != grid_h * grid_w:
            raise ValueError(f"image block {grid_h}x{grid_w} needs {grid_h * grid_w} codes, got {len(codes)}")
        header = [self.special("image_start"), self.size_token(grid_h), self.size_token(grid_w), self.special("boi")]
        return header + [self.image_token(int(c)) for c in codes] + [self.special("image_end")]

    def parse_image_block(self, ids: Sequence[int]) -> Tuple[int, int, List[int]]:
        """Inverse of :meth:`image_block`: returns ``(grid_h, grid_w, codes)``."""
        ids = [int(i) for i in ids]
        if len(ids) < 5 or ids[0] != self.special("image_start") or ids[3] != self.special("boi"):
            raise ValueError("not an image block: expected <|image|> <H> <W> <boi> ...")
        grid_h, grid_w = self.size_of_token(ids[1]), self.size_of_token(ids[2])
        body = ids[4:]
        if len(body) != grid_h * grid_w + 1 or body[-1] != self.special("image_end"):
            raise ValueError(f"image block {grid_h}x{grid_w}: expected {grid_h * grid_w} codes then <|/image|>")
        return grid_h, grid_w, [self.image_code(t) for t in body[:-1]]

    # ---- description stored with checkpoints -------------------------------------------------
    def describe(self) -> dict:
        return {
            "text_size": self.text_size,
            "image_offset": self.image_offset,
            "num_image_codes": self.num_image_codes,
            "size": self.size,
            "special_ids": dict(self.special_ids),
        }

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def synthetic(cls, text_size: int, num_image_codes: int, max_size_token: int = 64) -> "Vocabulary":
        """A vocabulary with specials placed at the top of the text range (tests, tiny recipes)."""
        names = list(SPECIAL_TOKEN_STRINGS)
        needed = len(names) + max_size_token + 1
        if text_size <= needed:
            raise ValueError(f"synthetic text_size {text_size} must exceed {needed} reserved ids")
        first = text_size - needed
        special_ids = {name: first + i for i, name in enumerate(names)}
        base = first + len(names)
        size_ids = {n: base + n for n in range(max_size_token + 1)}
        return cls(text_size=text_size, special_ids=special_ids, size_token_ids=size_ids,
                   num_image_codes=num_image_codes)
