"""The packer of the first release (a Python generator), kept as the specification that the
vectorised planner of megatron_uni/data/packing.py must reproduce exactly (row for row)."""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterator, List, Tuple

from megatron_uni.data.packing import PackingSettings, Segment


@dataclasses.dataclass
class ReferenceStats:
    FIELDS = ("rows", "documents", "real_tokens", "document_pad_tokens", "row_pad_tokens", "truncated",
              "dropped", "split")
    rows: int = 0
    documents: int = 0
    real_tokens: int = 0
    document_pad_tokens: int = 0
    row_pad_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0


def reference_plan_rows(documents: Iterator[Tuple[Hashable, int]], settings: PackingSettings,
                        stats: ReferenceStats) -> Iterator[List[Segment]]:
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
            elif room > 0:
                row.append(Segment(ref, start, start + room))
                used, start = settings.seq_length, start + room
                stats.split += 1
            if used == settings.seq_length or (start < length and need > room):
                yield _close_row(row, used, settings, stats)
                row, used = [], 0
    if row:
        yield _close_row(row, used, settings, stats)


def _plan_whole(documents, settings, stats):
    """Each row takes, in turn, the first of the next ``lookahead`` documents that fits."""
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


def _apply_overlong(length, settings, stats):
    if length <= settings.seq_length:
        return length
    if settings.overlong == "drop":
        stats.dropped += 1
        return 0
    stats.truncated += 1
    return settings.seq_length


def _close_row(row, used, settings, stats):
    stats.rows += 1
    real = sum(s.end - s.start for s in row)
    stats.real_tokens += real
    stats.document_pad_tokens += used - real
    stats.row_pad_tokens += settings.seq_length - used
    return row


def reference_blended_documents(lengths, weights, seed):
    """Endless stream of ``((dataset, document), length)`` of the first release's blend."""
    import numpy as np

    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    drawn = np.zeros(len(lengths), dtype=np.int64)
    orders = {}
    k = 0
    while True:
        d = int(np.argmax(share * (k + 1) - drawn))
        n = len(lengths[d])
        epoch, offset = divmod(int(drawn[d]), n)
        if (d, epoch) not in orders:
            orders.pop((d, epoch - 1), None)
            orders[(d, epoch)] = np.random.default_rng([seed, d, epoch]).permutation(n)
        doc = int(orders[(d, epoch)][offset])
        drawn[d] += 1
        k += 1
        yield (d, doc), int(lengths[d][doc])
