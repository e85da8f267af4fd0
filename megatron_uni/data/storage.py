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

The pair is published as one unit through ``prefix.seal.json`` (sizes and sha256 of both files):
the seal is first marked "publishing", then ``.bin`` and ``.idx`` are renamed into place, then the
seal is completed. A kill in between leaves a "publishing" seal, or a seal that does not match the
files, and :class:`SampleDataset` refuses the pair by name instead of decoding a new ``.bin``
through an old ``.idx``. A pair without any seal (written before seals existed) is still read.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import List, Optional

import numpy as np

from megatron_uni.data.sequence import TokenizedSample
from megatron_uni.errors import DataError
from megatron_uni.fileio import atomic_write_text

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


SEAL_SUFFIX = ".seal.json"
_TEMP_RE = re.compile(r"\.tmp\d+\.(bin|idx)$")


def remove_stale_temporaries(prefix: str) -> List[str]:
    """Delete ``prefix.tmpPID.bin/.idx`` left by killed builds (one build per prefix at a time)."""
    removed = []
    for path in glob.glob(glob.escape(prefix) + ".tmp*"):
        if _TEMP_RE.search(path[len(prefix):]):
            os.remove(path)
            removed.append(path)
    return removed


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class SampleWriter:
    """Writes ``prefix.bin`` / ``prefix.idx`` to temporaries and publishes them as one unit on
    :meth:`finalize` (see the module docstring); :meth:`discard` leaves any existing pair untouched."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        remove_stale_temporaries(prefix)
        self._tmp = f"{prefix}.tmp{os.getpid()}"
        self._builder = _indexed().IndexedDatasetBuilder(self._tmp + ".bin", dtype=STORAGE_DTYPE)
        self._bin_digest = hashlib.sha256()  # hashed while written: no second pass over a large .bin
        self.count = 0

    def add(self, sample: TokenizedSample) -> None:
        self.add_packed(encode_positions(sample))

    def add_packed(self, packed: np.ndarray) -> None:
        """One document already encoded by :func:`encode_positions`."""
        packed = np.ascontiguousarray(packed, dtype=STORAGE_DTYPE)
        self._builder.add_document(packed, [int(packed.shape[0])])
        self._bin_digest.update(packed.tobytes(order="C"))
        self.count += 1

    def finalize(self) -> None:
        self._builder.finalize(self._tmp + ".idx")
        seal = {"bin_bytes": os.path.getsize(self._tmp + ".bin"), "bin_sha256": self._bin_digest.hexdigest(),
                "idx_bytes": os.path.getsize(self._tmp + ".idx"), "idx_sha256": _file_sha256(self._tmp + ".idx"),
                "documents": self.count}
        seal_path = self.prefix + SEAL_SUFFIX
        atomic_write_text(seal_path, json.dumps({"state": "publishing"}) + "\n")
        os.replace(self._tmp + ".bin", self.prefix + ".bin")
        os.replace(self._tmp + ".idx", self.prefix + ".idx")
        atomic_write_text(seal_path, json.dumps({"state": "published", **seal}, indent=1) + "\n")

    def discard(self) -> None:
        """Drop what was written; an existing dataset under the prefix stays as it was."""
        for suffix in (".bin", ".idx"):
            if os.path.exists(self._tmp + suffix):
                os.remove(self._tmp + suffix)


def check_seal(prefix: str, verify_content: bool = False) -> None:
    """Refuse a ``.bin/.idx`` pair that was not published as one unit (a kill mid-publish)."""
    path = prefix + SEAL_SUFFIX
    if not os.path.isfile(path):
        return  # written before seals existed
    with open(path) as handle:
        seal = json.load(handle)
    if seal.get("state") != "published":
        raise DataError(f"dataset {prefix!r}: its build was killed while publishing ({path} says "
                        f"{seal.get('state')!r}); rebuild it with tools/build_dataset.py")
    for suffix in ("bin", "idx"):
        size = os.path.getsize(f"{prefix}.{suffix}")
        if size != seal[f"{suffix}_bytes"]:
            raise DataError(f"dataset {prefix!r}: {prefix}.{suffix} holds {size} bytes, its seal {path} "
                            f"records {seal[f'{suffix}_bytes']} (files of two builds); rebuild it")
    for suffix in ("bin", "idx") if verify_content else ():  # a full read: on request only
        if _file_sha256(f"{prefix}.{suffix}") != seal[f"{suffix}_sha256"]:
            raise DataError(f"dataset {prefix!r}: {prefix}.{suffix} checksum differs from its seal {path} "
                            f"(files of two builds, or damaged); rebuild it")


class SampleDataset:
    """Random access to stored samples; ``lengths`` comes from the memory-mapped index."""

    def __init__(self, prefix: str) -> None:
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(f"dataset {prefix!r}: {prefix}.bin / {prefix}.idx not found")
        check_seal(prefix)
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
