"""The row plan of a run: which document pieces fill packed row ``i``, for every row, cached on disk.

Rows are a pure function of (dataset lengths, weights, seed, packing settings) and the row index:
the plan is built once (blend order, then packing, both vectorised over the whole prefix), written
to one file, and memory-mapped by every process, so reading row 50,000,000 costs a few page reads
and resuming costs nothing (the idea of megatron's GPTDataset/BlendedDataset index caches).

The file is ``CACHE_DIR/rowplan-<key>.bin``; ``key`` hashes everything that changes the plan
(every document length of every dataset, weights, seed, packing settings, format version). It is
written under a temporary name, flushed and renamed, by one process while the others wait
(a ``torch.distributed`` barrier when a process group is up, and a file lock in every case), and
it is validated before use: magic, header checksum, key, exact size, and checksums of each array's
first and last 64 KiB. A file that fails any check, or holds fewer rows than asked, is rebuilt,
never read. Layout::

    b"MUROWPLN" | u64 header length | sha256(header) | header (JSON) | arrays (64-byte aligned)
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megatron_uni.data.blend import BlendCursor
from megatron_uni.data.packing import PackingSettings, PackingStats, Segment, add_stats, pack, row_stats
from megatron_uni.errors import DataError
from megatron_uni.rounding import round_up

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAGIC = b"MUROWPLN"
PREAMBLE = len(MAGIC) + 8 + 32           # magic, header length, header sha256
ALIGN = 64
EDGE = 1 << 16                           # bytes checksummed at each end of each array


@dataclasses.dataclass(frozen=True)
class PlanInputs:
    """Everything the plan depends on; ``names`` only label errors."""

    lengths: Sequence[np.ndarray]        # document lengths per dataset
    weights: Sequence[float]
    seed: int
    packing: PackingSettings
    names: Sequence[str]

    def key(self) -> str:
        digest = hashlib.sha256(json.dumps({
            "version": FORMAT_VERSION, "weights": [float(w) for w in self.weights], "seed": int(self.seed),
            "packing": dataclasses.asdict(self.packing)}, sort_keys=True).encode())
        for lengths in self.lengths:
            lengths = np.ascontiguousarray(lengths, dtype=np.int64)
            digest.update(struct.pack("<q", len(lengths)))
            digest.update(memoryview(lengths).cast("B"))
        return digest.hexdigest()[:32]


class RowPlan:
    """A validated, memory-mapped plan: ``row(i)`` lists the segments of row ``i``."""

    def __init__(self, path: str, header: dict, arrays: Dict[str, np.ndarray]) -> None:
        self.path, self.header = path, header
        self.rows = int(header["rows"])
        self.stats = PackingStats(**header["stats"])
        self._offsets, self._dataset = arrays["row_offsets"], arrays["dataset"]
        self._document, self._start, self._end = arrays["document"], arrays["start"], arrays["end"]

    def row(self, index: int) -> List[Segment]:
        if not 0 <= index < self.rows:
            raise IndexError(f"row {index} outside the plan of {self.rows} rows ({self.path})")
        lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
        return [Segment((int(d), int(doc)), int(s), int(e)) for d, doc, s, e in
                zip(self._dataset[lo:hi], self._document[lo:hi], self._start[lo:hi], self._end[lo:hi])]


def open_row_plan(inputs: PlanInputs, cache_dir: str, rows: int, collective: bool = True) -> RowPlan:
    """The cached plan of at least ``rows`` rows, built (by one process) when missing or stale.

    ``collective``: when a process group is up, every rank calls this together; rank 0 builds
    while the others wait at a barrier. Otherwise the file lock alone serialises the builders."""
    key = inputs.key()
    path = os.path.join(cache_dir, f"rowplan-{key}.bin")
    if collective and _distributed():
        import torch.distributed as dist
        failure = None
        if dist.get_rank() == 0:
            try:
                _read_or_build(path, key, inputs, rows)
            except Exception as err:     # raised after the barrier: the other ranks must not hang
                failure = err
        dist.barrier()
        if failure is not None:
            raise failure
    return _read_or_build(path, key, inputs, rows)


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _read_or_build(path: str, key: str, inputs: PlanInputs, rows: int) -> RowPlan:
    plan = read_plan(path, key, rows)
    if plan is not None:
        return plan
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _file_lock(path + ".lock"):
            plan = read_plan(path, key, rows)       # another process may have built it meanwhile
            if plan is None:
                build_plan(inputs, max(rows, 1), path, key)
                plan = read_plan(path, key, rows)
    except PermissionError as err:
        raise PermissionError(f"cannot write the row-plan cache {path!r} ({err.strerror}): "
                              f"set data.cache_dir to a writable directory") from err
    if plan is None:
        raise RuntimeError(f"row plan {path!r} was written but does not read back")
    return plan


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------
CHUNK_DOCUMENTS = 1 << 22                # documents blended and packed at a time (bounds memory)
ARRAYS = {"row_offsets": np.int64, "dataset": np.int16, "document": np.int32, "start": np.int32,
          "end": np.int32}          # document: int64 when a dataset holds 2**31 documents or more


def build_plan(inputs: PlanInputs, rows: int, path: str, key: str) -> None:
    """Plan the first ``rows`` rows and write them to ``path``, a chunk of the blend at a time.

    Each chunk is packed after the documents the previous chunks left unplaced (in stream order:
    the packer sees the same sequence as in one pass), and only rows that later documents cannot
    change are kept, so the plan does not depend on the chunk size."""
    per_row = _documents_per_row(inputs)
    packing = inputs.packing
    cursor = BlendCursor([len(lengths) for lengths in inputs.lengths], inputs.weights, inputs.seed)
    tmp = f"{path}.tmp{os.getpid()}"
    dtypes = dict(ARRAYS, document=np.int32 if max(len(x) for x in inputs.lengths) < 2 ** 31 else np.int64)
    sidecars = {name: open(f"{tmp}.{name}", "wb") for name in dtypes}
    try:
        sidecars["row_offsets"].write(np.zeros(1, np.int64).tobytes())
        planned, placed_segments, stats, blended, read, overlong = 0, 0, PackingStats(), 0, 0, []
        carry = _Documents.empty()
        while planned < rows:
            count = min(CHUNK_DOCUMENTS, int((rows - planned) * per_row * 1.05) + packing.lookahead + 256)
            chunk = _Documents.blended(cursor, inputs.lengths, blended, count)
            overlong.append(chunk.overlong(packing))
            blended += count
            docs = carry.then(chunk)
            packed = pack(docs.length, packing, max_rows=rows - planned, complete_only=True)
            for name, values in (("row_offsets", packed.row_offsets[1:] + placed_segments),
                                 ("dataset", docs.dataset[packed.document]),
                                 ("document", docs.document[packed.document]),
                                 ("start", packed.start), ("end", packed.end)):
                sidecars[name].write(np.ascontiguousarray(values, dtypes[name]).tobytes())
            stats = add_stats(stats, row_stats(packed.row_offsets, packed.start, packed.end, packing))
            planned += packed.rows
            placed_segments += len(packed.document)
            read = max(read, int(docs.position[packed.document].max(initial=-1)) + 1)
            carry = docs.unplaced(packed.document, packing)
        for f in sidecars.values():
            f.close()
        # like pack(): dropped / truncated among the documents up to the last one placed
        stats.dropped, stats.truncated, stats.lost_tokens = _overlong_before(overlong, read, packing)
        _assemble(path, tmp, key, dtypes, {"rows": planned, "stats": dataclasses.asdict(stats), "documents_read": read})
    finally:                             # nothing temporary stays behind, built or not
        for f in sidecars.values():
            f.close()
        for leftover in [f"{tmp}.{name}" for name in sidecars] + [tmp]:
            if os.path.exists(leftover):
                os.remove(leftover)


@dataclasses.dataclass
class _Documents:
    """A run of blended documents: stream position, length, dataset, document (all [n])."""

    position: np.ndarray
    length: np.ndarray
    dataset: np.ndarray
    document: np.ndarray

    @classmethod
    def empty(cls) -> "_Documents":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0, np.int64))

    @classmethod
    def blended(cls, cursor: BlendCursor, lengths: Sequence[np.ndarray], first: int, count: int) -> "_Documents":
        dataset, document = cursor.take(count)
        length = np.empty(count, np.int64)
        for d, per_dataset in enumerate(lengths):
            here = dataset == d
            length[here] = np.asarray(per_dataset)[document[here]]
        return cls(np.arange(first, first + count, dtype=np.int64), length, dataset, document)

    def then(self, other: "_Documents") -> "_Documents":
        return _Documents(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)])
                            for f in dataclasses.fields(self)))

    def unplaced(self, placed: np.ndarray, packing: PackingSettings) -> "_Documents":
        """Documents not placed in the kept rows that the packer would still place (in order)."""
        keep = np.ones(len(self.length), bool)
        keep[placed] = False
        keep &= (self.length > 0) & ((self.length <= packing.seq_length) | (packing.overlong == "truncate"))
        return _Documents(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

    def overlong(self, packing: PackingSettings) -> Tuple[np.ndarray, np.ndarray]:
        """Stream positions of documents longer than a row, and the tokens each loses."""
        over = self.length > packing.seq_length
        kept = 0 if packing.overlong == "drop" else packing.seq_length
        return self.position[over], self.length[over] - kept


def _overlong_before(overlong: List[Tuple[np.ndarray, np.ndarray]], read: int,
                     packing: PackingSettings) -> Tuple[int, int, int]:
    """(dropped, truncated, tokens lost) among the documents before stream position ``read``."""
    count = sum(int(np.count_nonzero(position < read)) for position, _ in overlong)
    lost = sum(int(tokens[position < read].sum()) for position, tokens in overlong)
    return (count, 0, lost) if packing.overlong == "drop" else (0, count, lost)


def _documents_per_row(inputs: PlanInputs) -> float:
    """Blended documents a full row takes, on average (sizes the chunks); raise naming the dataset
    when none of its documents can be packed (the blend would read it forever, placing nothing)."""
    packing = inputs.packing
    share = np.asarray(inputs.weights, np.float64) / float(np.sum(inputs.weights))
    positions = 0.0                      # packed positions a blended document brings, on average
    for name, lengths, weight in zip(inputs.names, inputs.lengths, share):
        lengths = np.asarray(lengths, np.int64)
        usable = (lengths > 0) & ((lengths <= packing.seq_length) | (packing.overlong == "truncate"))
        positions += weight * float(packing.padded_lengths(np.where(usable, np.minimum(lengths, packing.seq_length),
                                                                     0)).mean())
        if not usable.any():
            raise DataError(f"dataset {name!r}: none of its {len(lengths)} documents can be packed: every one is "
                             f"empty or longer than seq_length {packing.seq_length} with data.overlong=drop "
                             f"(raise data.seq_length or set data.overlong=truncate)")
    return packing.seq_length / positions


# ----------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------
def _aligned(n: int) -> int:
    return round_up(n, ALIGN)


def _data_size(table: Dict[str, dict]) -> int:
    """Bytes from the first array's start to the last one's end."""
    return max((spec["offset"] + int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
                for spec in table.values()), default=0)


def _edges(head: bytes, tail: bytes, size: int) -> str:
    digest = hashlib.sha256(struct.pack("<q", size))
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


def _file_edges(path: str, size: int) -> str:
    with open(path, "rb") as f:
        head = f.read(EDGE)
        f.seek(max(EDGE, size - EDGE))
        return _edges(head, f.read(), size)


def _assemble(path: str, tmp: str, key: str, dtypes: Dict[str, type], facts: dict) -> None:
    """One file from the arrays written beside it: header, then each array; flushed, then renamed
    over ``path`` (a reader sees the old file, or the whole new one)."""
    table, offset = {}, 0
    for name, dtype in dtypes.items():
        size = os.path.getsize(f"{tmp}.{name}")
        table[name] = {"dtype": np.dtype(dtype).str, "shape": [size // np.dtype(dtype).itemsize], "offset": offset,
                       "edges": _file_edges(f"{tmp}.{name}", size)}
        offset = _aligned(offset + size)
    text = json.dumps({"version": FORMAT_VERSION, "key": key, "arrays": table, **facts}, sort_keys=True).encode()
    data_start = _aligned(PREAMBLE + len(text))
    with open(tmp, "wb") as out:
        out.write(MAGIC + struct.pack("<Q", len(text)) + hashlib.sha256(text).digest() + text)
        for name in dtypes:
            out.seek(data_start + table[name]["offset"])
            with open(f"{tmp}.{name}", "rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)
        out.truncate(data_start + _data_size(table))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    log.info("row plan: wrote %d rows to %s (%.1f MB)", facts["rows"], path, (data_start + offset) / 1e6)


def read_plan(path: str, key: str, rows: int) -> Optional[RowPlan]:
    """The plan at ``path`` if it is whole, has ``key`` and at least ``rows`` rows; else None."""
    if not os.path.isfile(path):
        return None
    try:
        header, arrays = _read_valid(path, key)
    except ValueError as why:
        log.warning("row plan %s is not usable (%s): rebuilding it", path, why)
        return None
    if header["rows"] < rows:
        log.info("row plan %s holds %d rows, %d needed: extending it", path, header["rows"], rows)
        return None
    return RowPlan(path, header, arrays)


def _read_valid(path: str, key: str):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        preamble = f.read(PREAMBLE)
        if len(preamble) < PREAMBLE or preamble[:len(MAGIC)] != MAGIC:
            raise DataError("not a row-plan file")
        (length,) = struct.unpack("<Q", preamble[len(MAGIC):len(MAGIC) + 8])
        if PREAMBLE + length > size:
            raise DataError("header cut short")
        text = f.read(length)
    if hashlib.sha256(text).digest() != preamble[len(MAGIC) + 8:]:
        raise DataError("header checksum differs")
    header = json.loads(text)
    if header.get("version") != FORMAT_VERSION or header.get("key") != key:
        raise DataError("written for other inputs")
    data_start = _aligned(PREAMBLE + length)
    if data_start + _data_size(header["arrays"]) != size:
        raise DataError(f"size {size} bytes, header says {data_start + _data_size(header['arrays'])}")
    arrays = {}
    for name, spec in header["arrays"].items():
        shape = tuple(spec["shape"])
        arrays[name] = (np.memmap(path, dtype=np.dtype(spec["dtype"]), mode="r", shape=shape,
                                  offset=data_start + spec["offset"]) if all(shape) else
                        np.empty(shape, np.dtype(spec["dtype"])))
        raw = memoryview(np.ascontiguousarray(arrays[name])).cast("B")
        tail = raw[max(EDGE, len(raw) - EDGE):] if len(raw) > EDGE else b""
        if _edges(raw[:EDGE], tail, len(raw)) != spec["edges"]:
            raise DataError(f"array {name} checksum differs")
    return header, arrays
