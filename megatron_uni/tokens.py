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
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from megatron_uni.errors import MegatronUniError
from megatron_uni.rounding import round_up

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
SIZE_TOKEN_PATTERN = re.compile(r"^<\|reserved_token_(\d+)\|>$")
TOKENIZER_FILE = "tokenizer.json"
# Optional file next to tokenizer.json overriding entries of SPECIAL_TOKEN_STRINGS, e.g.
# {"mask": "<|mask|>"}: the mask string of the released tokenizer (id 156895) is not confirmed.
SPECIAL_OVERRIDES_FILE = "special_tokens.json"


class VocabularyError(MegatronUniError, ValueError):
    """The tokenizer directory does not provide what the vocabulary layout needs."""


def pad_vocab_size(size: int, tensor_parallel: int = 1, divisor: int = VOCAB_DIVISOR) -> int:
    """Smallest multiple of ``divisor * tensor_parallel`` that holds ``size`` rows."""
    return round_up(size, divisor * tensor_parallel)


class _Sizes:
    """Sizes both vocabulary types derive from their ``text_size`` and ``num_image_codes``."""

    text_size: int
    num_image_codes: int

    @property
    def image_offset(self) -> int:
        """Id of image code 0: image codes follow the text ids."""
        return self.text_size

    @property
    def size(self) -> int:
        """Unpadded model vocabulary: text + image codes."""
        return self.text_size + self.num_image_codes


@dataclasses.dataclass(frozen=True)
class VocabularyLayout(_Sizes):
    """The vocabulary facts that travel with checkpoints and datasets (no tokenizer).

    ``padded_size`` is the model's vocabulary rows (``ModelConfig.vocab``): ``size`` padded by
    :func:`pad_vocab_size`. ``special_ids`` / ``special_strings`` are empty when unknown (an HF
    import without a tokenizer).
    """

    text_size: int
    num_image_codes: int
    padded_size: int
    special_ids: Mapping[str, int] = dataclasses.field(default_factory=dict)
    special_strings: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def of_sizes(cls, text_size: int, num_image_codes: int, **specials: Any) -> "VocabularyLayout":
        """The layout of ``text_size`` text rows and ``num_image_codes`` codes, padded by the rule."""
        return cls(text_size, num_image_codes, pad_vocab_size(text_size + num_image_codes), **specials)


    @property
    def mask_id(self) -> int:
        return self.special_ids["mask"]

    def to_dict(self) -> Dict[str, Any]:
        """JSON form; ``image_offset`` and ``size`` are written for readers of the file."""
        return {"text_size": self.text_size, "image_offset": self.image_offset,
                "num_image_codes": self.num_image_codes, "size": self.size, "padded_size": self.padded_size,
                "special_ids": dict(self.special_ids), "special_strings": dict(self.special_strings)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "VocabularyLayout":
        """Inverse of :meth:`to_dict`; files written before ``padded_size`` existed get the rule's."""
        text_size, codes = int(raw["text_size"]), int(raw["num_image_codes"])
        padded = int(raw.get("padded_size") or pad_vocab_size(text_size + codes))
        return cls(text_size, codes, padded, dict(raw.get("special_ids") or {}),
                   dict(raw.get("special_strings") or {}))


@dataclasses.dataclass(frozen=True)
class Vocabulary(_Sizes):
    """Token-id layout. Build with :meth:`from_tokenizer_dir` (real) or :meth:`synthetic` (tests)."""

    text_size: int
    special_ids: Mapping[str, int]
    size_token_ids: Mapping[int, int]  # integer N -> id of <|reserved_token_N|>
    num_image_codes: int = NUM_IMAGE_CODES
    # HF ``tokenizers.Tokenizer`` for text; None for synthetic vocabularies (no text encoding).
    tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
    special_strings: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(SPECIAL_TOKEN_STRINGS), compare=False)

    # ---- sizes (image_offset and size come from _Sizes) -------------------------------------------
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

    # ---- text ----------------------------------------------------------------------------------
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise RuntimeError("this Vocabulary has no text tokenizer (synthetic); build it with from_tokenizer_dir")
        return self.tokenizer

    def encode(self, text: str, parse_special: bool = True) -> List[int]:
        """Text -> token ids, no BOS/EOS added. With ``parse_special`` special-token strings inside
        ``text`` become specials; without, they are spelled as ordinary text (for data text, so a
        sample containing ``<|image|>`` cannot forge structure)."""
        tokenizer = self._require_tokenizer()
        previous = tokenizer.encode_special_tokens
        tokenizer.encode_special_tokens = not parse_special
        try:
            return list(tokenizer.encode(text, add_special_tokens=False).ids)
        finally:
            tokenizer.encode_special_tokens = previous

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text; image blocks are rendered as ``[image HxW]``."""
        tokenizer = self._require_tokenizer()
        pieces: List[str] = []
        text_run: List[int] = []
        ids = [int(i) for i in ids]
        i = 0
        while i < len(ids):
            if ids[i] == self.special("image_start") and i + 3 < len(ids):
                end = self._image_block_end(ids, i)
                if end is not None:
                    pieces.append(tokenizer.decode(text_run, skip_special_tokens=False))
                    text_run = []
                    grid_h, grid_w, _ = self.parse_image_block(ids[i:end])
                    pieces.append(f"[image {grid_h}x{grid_w}]")
                    i = end
                    continue
            if ids[i] >= self.text_size:
                raise ValueError(f"token id {ids[i]} at position {i} is not a text token and not inside an image block")
            text_run.append(ids[i])
            i += 1
        pieces.append(tokenizer.decode(text_run, skip_special_tokens=False))
        return "".join(pieces)

    def _image_block_end(self, ids: Sequence[int], start: int) -> Optional[int]:
        """Index one past the ``<|/image|>`` of a well-formed block starting at ``start``, else None."""
        try:
            grid_h, grid_w = self.size_of_token(ids[start + 1]), self.size_of_token(ids[start + 2])
        except ValueError:
            return None
        end = start + 4 + grid_h * grid_w + 1
        if end > len(ids) or ids[start + 3] != self.special("boi") or ids[end - 1] != self.special("image_end"):
            return None
        return end

    # ---- the layout stored with checkpoints and datasets -----------------------------------------
    def layout(self) -> VocabularyLayout:
        return VocabularyLayout(self.text_size, self.num_image_codes, self.padded_size(),
                                dict(self.special_ids), dict(self.special_strings))

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

    @classmethod
    def from_tokenizer_dir(cls, path: str, text_size: Optional[int] = None,
                           num_image_codes: int = NUM_IMAGE_CODES,
                           special_strings: Optional[Mapping[str, str]] = None) -> "Vocabulary":
        """Load ``path/tokenizer.json`` (local file only) and resolve every special token by string.

        The string table is :data:`SPECIAL_TOKEN_STRINGS`, updated by ``path/special_tokens.json``
        when present, then by ``special_strings``. ``text_size`` (the model's ``text_vocab``)
        defaults to the tokenizer size and may exceed it (the released model pads text rows).
        """
        from tokenizers import Tokenizer  # local import: tests of synthetic vocabularies skip it

        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in tokenizer directory {path!r}")
        strings = resolve_special_strings(path, special_strings)
        tokenizer = Tokenizer.from_file(tokenizer_file)
        special_ids = _resolve_specials(tokenizer, strings, tokenizer_file)
        size_ids = _size_tokens(tokenizer, tokenizer_file)
        tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
        text_size = tokenizer_size if text_size is None else int(text_size)
        highest = max(tokenizer.get_vocab(with_added_tokens=True).values())
        if highest >= text_size:
            raise VocabularyError(
                f"{tokenizer_file}: token id {highest} does not fit the text vocabulary of size {text_size}")
        return cls(text_size=text_size, special_ids=special_ids, size_token_ids=size_ids,
                   num_image_codes=num_image_codes, tokenizer=tokenizer, special_strings=strings)


def resolve_special_strings(path: Optional[str], overrides: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Default special strings, then ``path/special_tokens.json``, then ``overrides``."""
    strings = dict(SPECIAL_TOKEN_STRINGS)
    override_file = os.path.join(path, SPECIAL_OVERRIDES_FILE) if path else None
    if override_file and os.path.isfile(override_file):
        with open(override_file) as f:
            strings.update(_checked_overrides(json.load(f), override_file))
    if overrides:
        strings.update(_checked_overrides(dict(overrides), "special_strings argument"))
    return strings


def _checked_overrides(raw: Any, source: str) -> Dict[str, str]:
    if not isinstance(raw, dict):
        raise VocabularyError(f"{source}: expected a JSON object name -> token string")
    unknown = sorted(set(raw) - set(SPECIAL_TOKEN_STRINGS))
    if unknown:
        raise VocabularyError(f"{source}: unknown special token names {unknown}; known: {sorted(SPECIAL_TOKEN_STRINGS)}")
    bad = sorted(k for k, v in raw.items() if not isinstance(v, str) or not v)
    if bad:
        raise VocabularyError(f"{source}: token strings must be non-empty strings, bad entries: {bad}")
    return raw


def _resolve_specials(tokenizer: Any, strings: Mapping[str, str], source: str) -> Dict[str, int]:
    """Name -> id, looking each string up as ONE token; one error lists every missing string."""
    ids = {name: tokenizer.token_to_id(string) for name, string in strings.items()}
    missing = [f"{name}={strings[name]!r}" for name, tid in ids.items() if tid is None]
    if missing:
        raise VocabularyError(
            f"{source}: special tokens missing from the tokenizer: {', '.join(missing)} "
            f"(override the strings in {SPECIAL_OVERRIDES_FILE} next to {TOKENIZER_FILE})")
    return ids


def _size_tokens(tokenizer: Any, source: str) -> Dict[int, int]:
    sizes = {}
    for string, tid in tokenizer.get_vocab(with_added_tokens=True).items():
        match = SIZE_TOKEN_PATTERN.match(string)
        if match:
            sizes[int(match.group(1))] = tid
    if not sizes:
        raise VocabularyError(f"{source}: no size tokens {SIZE_TOKEN_FORMAT.format('N')} in the tokenizer")
    return sizes
