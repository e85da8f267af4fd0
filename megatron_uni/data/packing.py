"""Packing documents into rows of ``seq_length`` with block-aligned document boundaries.

Each document occupies a multiple of ``block_size`` positions (padded inside with ``<|endoftext|>``),
so no diffusion block ever holds two documents. A document that does not fit the room left in a
row starts the next row (``split_samples=False``) or fills the room and continues at the start of
the next row, cut at a block boundary (``split_samples=True``). A document longer than a row is
truncated or dropped (``overlong``), and counted; it is never wrapped.

Planning only needs lengths, so the plan of a whole run is cheap and deterministic; rows are
materialised from the stored samples when a batch is read.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Hashable, Iterator, List, Tuple

import numpy as np

from megatron_uni.data.batch import MODALITY_SPECIAL
from megatron_uni.data.sequence import TokenizedSample
from megatron_uni.rounding import round_up

OVERLONG_POLICIES = ("truncate", "drop")


@dataclasses.dataclass(frozen=True)
class PackingSettings:
    seq_length: int
    block_size: int
    split_samples: bool = False
    overlong: str = "drop"
    lookahead: int = 1  # without split: fill a row with the first fitting of the next N documents

    def __post_init__(self) -> None:
        if self.lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {self.lookahead}")
        if self.block_size <= 0 or self.seq_length % self.block_size:
            raise ValueError(f"seq_length {self.seq_length} must be a positive multiple of block_size {self.block_size}")
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong policy {self.overlong!r}; expected one of {OVERLONG_POLICIES}")

    def padded(self, length: int) -> int:
        return round_up(length, self.block_size)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Tokens ``[start, end)`` of document ``ref``, placed as one document of a row."""

    ref: Hashable
    start: int
    end: int


@dataclasses.dataclass
class PackingStats:
    rows: int = 0
    documents: int = 0
    real_tokens: int = 0
    document_pad_tokens: int = 0  # padding inside documents up to a block multiple
    row_pad_tokens: int = 0       # padding at the end of rows
    truncated: int = 0
    dropped: int = 0
    split: int = 0                # documents continued on the next row

    @property
    def efficiency(self) -> float:
        """Non-pad fraction of all packed positions."""
        total = self.real_tokens + self.document_pad_tokens + self.row_pad_tokens
        return self.real_tokens / total if total else 0.0

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.documents} documents, efficiency {self.efficiency:.1%} "
                f"(block pad {self.document_pad_tokens}, row pad {self.row_pad_tokens}), "
                f"{self.split} split, {self.truncated} truncated, {self.dropped} dropped")


def plan_rows(documents: Iterator[Tuple[Hashable, int]], settings: PackingSettings,
              stats: PackingStats) -> Iterator[List[Segment]]:
    """Greedy in-order packing of ``(ref, length)`` documents into rows of segments."""
    if not settings.split_samples:
        yield from _plan_whole(documents, settings, stats)
        return
    row: List[Segment] = []
    used = 0
    for ref, length in documents:
        length = _apply_overlong(length, settings, stats)
        if length == 0:
            continue
        stats.documents += 1
        start = 0
        while start < length:
            room = settings.seq_length - used
            need = settings.padded(length - start)
            if need <= room:
                row.append(Segment(ref, start, length))
                used += need
                start = length
            elif settings.split_samples and room > 0:
                row.append(Segment(ref, start, start + room))  # room is a block multiple
                used, start = settings.seq_length, start + room
                stats.split += 1
            if used == settings.seq_length or (start < length and need > room):
                yield _close_row(row, used, settings, stats)
                row, used = [], 0
    if row:
        yield _close_row(row, used, settings, stats)


def _plan_whole(documents: Iterator[Tuple[Hashable, int]], settings: PackingSettings,
                stats: PackingStats) -> Iterator[List[Segment]]:
    """Never split: each row takes, in turn, the first of the next ``lookahead`` documents that
    fits the room left (lookahead 1 = strictly in order); a row closes when none fits."""
    pending: List[Tuple[Hashable, int]] = []
    documents = iter(documents)
    row: List[Segment] = []
    used = 0
    exhausted = False
    while True:
        while not exhausted and len(pending) < settings.lookahead:
            ref, length = next(documents, (None, -1))
            if length < 0:
                exhausted = True
                continue
            kept = _apply_overlong(length, settings, stats)
            if kept:
                pending.append((ref, kept))
        if not pending:
            break
        room = settings.seq_length - used
        pick = next((i for i, (_, n) in enumerate(pending) if settings.padded(n) <= room), None)
        if pick is None:
            yield _close_row(row, used, settings, stats)
            row, used = [], 0
            continue
        ref, length = pending.pop(pick)
        row.append(Segment(ref, 0, length))
        used += settings.padded(length)
        stats.documents += 1
        if used == settings.seq_length:
            yield _close_row(row, used, settings, stats)
            row, used = [], 0
    if row:
        yield _close_row(row, used, settings, stats)


def _apply_overlong(length: int, settings: PackingSettings, stats: PackingStats) -> int:
    if length <= settings.seq_length:
        return length
    if settings.overlong == "drop":
        stats.dropped += 1
        return 0
    stats.truncated += 1
    return settings.seq_length


def _close_row(row: List[Segment], used: int, settings: PackingSettings, stats: PackingStats) -> List[Segment]:
    stats.rows += 1
    real = sum(s.end - s.start for s in row)
    stats.real_tokens += real
    stats.document_pad_tokens += used - real
    stats.row_pad_tokens += settings.seq_length - used
    return row


def materialize_row(row: List[Segment], fetch: Callable[[Hashable, int, int], TokenizedSample],
                    settings: PackingSettings, pad_id: int) -> dict:
    """Numpy arrays ``[seq_length]`` of one row: the Batch fields (documents padded to blocks).

    Block padding inside a document is maskable when the document's last token is (the model
    learns to fill the rest of a response block with ``<|endoftext|>``, as LLaDA SFT does)."""
    n = settings.seq_length
    out = {"tokens": np.full(n, pad_id, np.int64), "maskable": np.zeros(n, bool),
           "modality": np.full(n, MODALITY_SPECIAL, np.int8), "doc_ids": np.full(n, -1, np.int32),
           "position_ids": np.zeros(n, np.int64)}
    pos = 0
    for doc_id, seg in enumerate(row):
        sample = fetch(seg.ref, seg.start, seg.end)
        length, padded = len(sample), settings.padded(len(sample))
        out["tokens"][pos:pos + length] = sample.tokens
        out["maskable"][pos:pos + length] = sample.maskable
        out["maskable"][pos + length:pos + padded] = bool(sample.maskable[-1])
        out["modality"][pos:pos + length] = sample.modality
        out["doc_ids"][pos:pos + padded] = doc_id
        out["position_ids"][pos:pos + padded] = np.arange(padded)
        pos += padded
    return out
