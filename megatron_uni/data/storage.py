"""Tokenized samples on disk: megatron-core ``IndexedDataset`` (.bin/.idx), one document per sample.

Each position is ONE int32 holding the token id and its masks (one read, one file pair):

    bits  0..23  token id            (< 16.7M; the Uni vocabulary is 173568)
    bit   24     maskable
    bit   25     loss: written equal to bit 24 and ignored on read (every target is scored); kept
                 so datasets stay byte-identical and a separate loss mask can come back without
                 a format change
    bits 26..27  modality            (0 text, 1 image code, 2 structural/special)

Values stay non-negative, so megatron-core tools (merging, inspection of lengths) work unchanged;
a plain GPT reader must apply :data:`TOKEN_MASK` to get token ids.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from megatron_uni.data.sequence import TokenizedSample

TOKEN_BITS = 24
TOKEN_MASK = (1 << TOKEN_BITS) - 1
MASKABLE_BIT = 1 << 24
LOSS_BIT = 1 << 25  # on-disk format only; see the module docstring
MODALITY_SHIFT = 26
STORAGE_DTYPE = np.int32


def encode_positions(sample: TokenizedSample) -> np.ndarray:
    tokens = sample.tokens.astype(np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > TOKEN_MASK):
        raise ValueError(f"token ids must lie in [0, {TOKEN_MASK}] to be stored, got {tokens.min()}..{tokens.max()}")
    packed = (tokens | sample.maskable.astype(np.int64) * (MASKABLE_BIT | LOSS_BIT)
              | sample.modality.astype(np.int64) << MODALITY_SHIFT)
    return packed.astype(STORAGE_DTYPE)


def decode_positions(packed: np.ndarray) -> TokenizedSample:
    packed = packed.astype(np.int64)
    return TokenizedSample(tokens=packed & TOKEN_MASK, maskable=(packed & MASKABLE_BIT) != 0,
                           modality=((packed >> MODALITY_SHIFT) & 3).astype(np.int8))


def _indexed():
    # megatron-core import is slow (~6 s on CPU): only modules that touch files pay it
    from megatron.core.datasets import indexed_dataset
    return indexed_dataset


class SampleWriter:
    """Writes ``prefix.bin`` / ``prefix.idx`` atomically: files appear under their name on finalize."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._builder = _indexed().IndexedDatasetBuilder(self._tmp + ".bin", dtype=STORAGE_DTYPE)
        self.count = 0

    def add(self, sample: TokenizedSample) -> None:
        self.add_packed(encode_positions(sample))

    def add_packed(self, packed: np.ndarray) -> None:
        """One document already encoded by :func:`encode_positions`."""
        self._builder.add_document(packed.astype(STORAGE_DTYPE), [int(packed.shape[0])])
        self.count += 1

    def finalize(self) -> None:
        self._builder.finalize(self._tmp + ".idx")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")


class SampleDataset:
    """Random access to stored samples; ``lengths`` comes from the memory-mapped index."""

    def __init__(self, prefix: str) -> None:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(f"dataset {prefix!r}: {prefix}.bin / {prefix}.idx not found")
        self.prefix = prefix
        self._data = _indexed().IndexedDataset(prefix, mmap=True)
        if self._data.index.dtype != STORAGE_DTYPE:
            raise ValueError(f"dataset {prefix!r} stores {self._data.index.dtype}, expected {STORAGE_DTYPE} "
                             f"(written by tools/build_dataset.py?)")
        self.lengths = np.asarray(self._data.sequence_lengths, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def get(self, index: int, offset: int = 0, length: Optional[int] = None) -> TokenizedSample:
        return decode_positions(np.asarray(self._data.get(int(index), offset=offset, length=length)))
