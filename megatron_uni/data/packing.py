"""Packing documents into rows of ``seq_length`` with block-aligned document boundaries.

Each document occupies a multiple of ``block_size`` positions (padded inside with ``<|endoftext|>``),
so no diffusion block ever holds two documents. A document that does not fit the room left in a
row starts the next row (``split_samples=False``) or fills the room and continues at the start of
the next row, cut at a block boundary (``split_samples=True``). A document longer than a row is
truncated or dropped (``overlong``), and counted; it is never wrapped.

Planning only needs lengths: :func:`pack` plans a whole prefix of documents at once (numpy, and
one tight loop per row for the lookahead window), deterministically; the run's plan is cached by
:mod:`megatron_uni.data.row_plan`, and rows are materialised from the stored samples when read.
"""

from __future__ import annotations

import array
import dataclasses
from typing import Callable, Hashable, List, Optional, Tuple

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

    def padded_lengths(self, lengths: np.ndarray) -> np.ndarray:
        return round_up(lengths, self.block_size)


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
    lost_tokens: int = 0          # tokens of dropped documents and cut from truncated ones

    @property
    def efficiency(self) -> float:
        """Packed tokens over (packed positions + tokens lost to ``overlong``): padding and
        dropped or truncated data both count against it."""
        total = self.real_tokens + self.document_pad_tokens + self.row_pad_tokens + self.lost_tokens
        return self.real_tokens / total if total else 0.0

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.documents} documents, efficiency {self.efficiency:.1%} "
                f"(block pad {self.document_pad_tokens}, row pad {self.row_pad_tokens}, "
                f"lost {self.lost_tokens}), {self.split} split, {self.truncated} truncated, "
                f"{self.dropped} dropped")


@dataclasses.dataclass
class PackedRows:
    """Rows as flat arrays: segments ``row_offsets[r]:row_offsets[r+1]`` form row ``r``; each
    segment is tokens ``[start, end)`` of input document ``document``."""

    row_offsets: np.ndarray   # int64 [rows + 1]
    document: np.ndarray      # int64 [segments], index into the packed lengths
    start: np.ndarray         # int32 [segments]
    end: np.ndarray           # int32 [segments]
    stats: PackingStats

    @property
    def rows(self) -> int:
        return len(self.row_offsets) - 1

    def row(self, index: int) -> List[Segment]:
        lo, hi = self.row_offsets[index], self.row_offsets[index + 1]
        return [Segment(int(d), int(s), int(e))
                for d, s, e in zip(self.document[lo:hi], self.start[lo:hi], self.end[lo:hi])]


def pack(lengths: np.ndarray, settings: PackingSettings, max_rows: Optional[int] = None,
         complete_only: bool = False) -> PackedRows:
    """Pack documents of ``lengths`` (in this order) into rows; at most ``max_rows`` rows.

    ``complete_only`` keeps only rows that no document after the last one could have changed
    (rows closed before the input ran out): the rows of an endless stream, planned from a prefix.
    Stats cover the rows returned and the documents read to plan them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    kept, truncated = _apply_overlong(lengths, settings)
    index = np.flatnonzero(kept > 0)                       # documents that take part
    kept = kept[index]
    padded = settings.padded_lengths(kept)
    if settings.split_samples:
        offsets, seg, start, end, complete = _pack_split(padded, kept, settings)
        exhausted = True
    else:
        offsets, seg, complete, exhausted = _pack_whole(padded, settings, max_rows)
        start = np.zeros(len(seg), np.int32)
        end = kept[seg].astype(np.int32)
    del kept, padded
    planned = len(offsets) - 1
    rows = min(planned, complete if complete_only else planned, planned if max_rows is None else max_rows)
    offsets, seg, start, end = offsets[:rows + 1], seg[:offsets[rows]], start[:offsets[rows]], end[:offsets[rows]]
    document = index[seg]
    # documents read: all of them when every row was kept, else up to the last one placed
    read = len(lengths) if exhausted and rows == planned else int(document.max(initial=-1)) + 1
    stats = row_stats(offsets, start, end, settings)
    stats.dropped, stats.truncated, stats.lost_tokens = overlong_counts(lengths[:read], settings)
    return PackedRows(offsets, document, start, end, stats)


def _apply_overlong(lengths: np.ndarray, settings: PackingSettings) -> Tuple[np.ndarray, np.ndarray]:
    """Lengths kept per document (0 = dropped) and the mask of truncated documents."""
    over = lengths > settings.seq_length
    if settings.overlong == "drop":
        return np.where(over, 0, lengths), np.zeros_like(over)
    return np.minimum(lengths, settings.seq_length), over


def _pack_whole(padded: np.ndarray, settings: PackingSettings,
                max_rows: Optional[int]) -> Tuple[np.ndarray, np.ndarray, int, bool]:
    """Never split: each row takes, in turn, the first of the next ``lookahead`` unplaced documents
    that fits the room left (lookahead 1 = strictly in order); a row closes when none fits.

    One forward scan per row over (documents left over by earlier rows) + (the stream): a
    document that did not fit never fits later in the same row, so nothing is scanned twice in a
    row. Returns row offsets, segment -> document, how many leading rows are complete, and
    whether every document was placed."""
    limit = settings.seq_length
    window = settings.lookahead
    horizon = window + limit // settings.block_size + 1    # stream documents one row may scan
    offsets, segments = array.array("q", [0]), array.array("q")
    left: List[Tuple[int, int]] = []                       # (document, padded) not yet placed
    stream = _Window(padded, horizon)
    complete = None
    while (left or stream.position < len(padded)) and (max_rows is None or len(offsets) <= max_rows):
        left, full = _fill_row(left, stream, limit, window, segments)
        offsets.append(len(segments))
        if not full and complete is None:
            complete = len(offsets) - 2
    complete = len(offsets) - 1 if complete is None else complete
    exhausted = not left and stream.position == len(padded)
    return np.frombuffer(offsets, np.int64), np.frombuffer(segments, np.int64), complete, exhausted


class _Window:
    """The stream of padded lengths, handed to the scan as Python ints a chunk at a time."""

    CHUNK = 1 << 16

    def __init__(self, padded: np.ndarray, horizon: int) -> None:
        self.padded, self.horizon = padded, horizon
        self.position, self.base, self.items = 0, 0, []

    def ensure(self) -> None:
        """Make ``items`` cover ``[position, position + horizon)`` (or the stream's end)."""
        have = self.base + len(self.items)
        if self.position + self.horizon > have and have < len(self.padded):
            upto = min(len(self.padded), self.position + self.horizon + self.CHUNK)
            self.items = self.items[self.position - self.base:] + self.padded[have:upto].tolist()
            self.base = self.position


def _fill_row(left: List[Tuple[int, int]], stream: _Window, room: int, window: int,
              segments: "array.array") -> Tuple[List[Tuple[int, int]], bool]:
    """Place documents into one row; return the documents left unplaced and whether the row
    closed for good (full, or ``window`` unplaced documents seen) rather than at the stream's end."""
    unplaced: List[Tuple[int, int]] = []
    for k, (doc, size) in enumerate(left):
        if len(unplaced) >= window:
            return unplaced + left[k:], True
        if size <= room:
            segments.append(doc)
            room -= size
            if room == 0:
                return unplaced + left[k + 1:], True
        else:
            unplaced.append((doc, size))
    stream.ensure()
    items, base, doc, end = stream.items, stream.base, stream.position, len(stream.padded)
    full = False
    while doc < end:
        if len(unplaced) >= window:
            full = True
            break
        size = items[doc - base]
        if size <= room:
            segments.append(doc)
            room -= size
            doc += 1
            if room == 0:
                full = True
                break
        else:
            unplaced.append((doc, size))
            doc += 1
    stream.position = doc
    return unplaced, full


def _pack_split(padded: np.ndarray, lengths: np.ndarray, settings: PackingSettings):
    """Split mode: documents lie end to end (each padded to blocks) and rows cut that line every
    ``seq_length`` positions; a document crossing a cut continues at the start of the next row."""
    limit = settings.seq_length
    ends = np.cumsum(padded)
    begins = ends - padded
    first_row, last_row = begins // limit, (ends - 1) // limit
    crossing = last_row > first_row                       # padded <= limit: at most one cut
    pieces = 1 + crossing.astype(np.int64)
    seg = np.repeat(np.arange(len(padded)), pieces)
    second = np.zeros(len(seg), bool)
    second[np.cumsum(pieces)[crossing] - 1] = True
    cut = (last_row * limit - begins)[seg]                # tokens before the cut
    start = np.where(second, cut, 0).astype(np.int32)
    end = np.where(crossing[seg] & ~second, cut, lengths[seg]).astype(np.int32)
    seg_row = np.where(second, last_row[seg], first_row[seg])
    rows = int(last_row[-1]) + 1 if len(padded) else 0
    offsets = np.searchsorted(seg_row, np.arange(rows + 1), side="left").astype(np.int64)
    # complete: rows up to the last cut that falls between two documents (nothing continues
    # past it, so the rows before it cannot change, and a later plan can resume there)
    complete = int((ends[ends % limit == 0] // limit).max(initial=0))
    return offsets, seg, start, end, complete


def row_stats(offsets: np.ndarray, start: np.ndarray, end: np.ndarray, settings: PackingSettings) -> PackingStats:
    """Statistics of packed rows (``overlong`` counts left at 0: see :func:`overlong_counts`)."""
    real = (end - start).astype(np.int64)
    used = int(settings.padded_lengths(real).sum())
    rows = len(offsets) - 1
    return PackingStats(rows=rows, documents=int(np.count_nonzero(start == 0)), real_tokens=int(real.sum()),
                        document_pad_tokens=used - int(real.sum()), row_pad_tokens=rows * settings.seq_length - used,
                        split=int(np.count_nonzero(start > 0)))


def overlong_counts(lengths: np.ndarray, settings: PackingSettings) -> Tuple[int, int, int]:
    """(dropped, truncated, tokens lost) among documents of ``lengths``."""
    over = lengths > settings.seq_length
    lost = int((lengths[over] - (0 if settings.overlong == "drop" else settings.seq_length)).sum())
    count = int(over.sum())
    return (count, 0, lost) if settings.overlong == "drop" else (0, count, lost)


def add_stats(a: PackingStats, b: PackingStats) -> PackingStats:
    return PackingStats(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(PackingStats)})


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
