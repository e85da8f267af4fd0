"""One tokenized sample: token ids plus the per-token masks that travel with them.

``maskable``  the noiser may mask this position (a target: response text, generated image codes);
              every masked target is scored, so this is also the loss mask
``modality``  MODALITY_TEXT / MODALITY_IMAGE / MODALITY_SPECIAL of :mod:`megatron_uni.data.batch`
"""

from __future__ import annotations

import dataclasses
from typing import List, Sequence

import numpy as np

from megatron_uni.data.batch import MODALITY_IMAGE, MODALITY_SPECIAL, MODALITY_TEXT
from megatron_uni.tokens import Vocabulary


@dataclasses.dataclass
class TokenizedSample:
    tokens: np.ndarray    # int64 [n]
    maskable: np.ndarray  # bool  [n]
    modality: np.ndarray  # int8  [n]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class SequenceBuilder:
    """Appends text, special tokens and image blocks, recording masks as it goes."""

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self._tokens: List[int] = []
        self._maskable: List[bool] = []
        self._modality: List[int] = []

    def _append(self, ids: Sequence[int], target: bool, modality: int) -> None:
        self._tokens.extend(int(i) for i in ids)
        self._maskable.extend([target] * len(ids))
        self._modality.extend([modality] * len(ids))

    def text(self, text: str, target: bool = False) -> "SequenceBuilder":
        # special strings in sample text stay text: structure comes only from special()/image()
        self._append(self.vocab.encode(text, parse_special=False), target, MODALITY_TEXT)
        return self

    def special(self, name: str, target: bool = False) -> "SequenceBuilder":
        self._append([self.vocab.special(name)], target, MODALITY_SPECIAL)
        return self

    def image(self, grid_h: int, grid_w: int, codes: Sequence[int], target: bool = False) -> "SequenceBuilder":
        """Image block. As a target only the codes and ``<|/image|>`` are maskable: the header
        ``<|image|> <H> <W> <boi>`` is given, as at inference where the prompt fixes the size."""
        block = self.vocab.image_block(grid_h, grid_w, codes)
        self._append(block[:4], False, MODALITY_SPECIAL)
        self._append(block[4:-1], target, MODALITY_IMAGE)
        self._append(block[-1:], target, MODALITY_SPECIAL)
        return self

    def build(self) -> TokenizedSample:
        return TokenizedSample(
            tokens=np.asarray(self._tokens, dtype=np.int64),
            maskable=np.asarray(self._maskable, dtype=bool),
            modality=np.asarray(self._modality, dtype=np.int8),
        )
