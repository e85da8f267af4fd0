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
import struct
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np

from megatron_uni.data.blend import blend_order
from megatron_uni.data.packing import PackingSettings, PackingStats, Segment, pack

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
        if dist.get_rank() == 0:
            _read_or_build(path, key, inputs, rows)
        dist.barrier()                   # every rank passes here, whatever it found
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
                write_plan(path, key, build_plan(inputs, max(rows, 1)))
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
def build_plan(inputs: PlanInputs, rows: int) -> Dict[str, object]:
    """Arrays of the first ``rows`` rows, and the header facts (rows, stats, documents read)."""
    packing = inputs.packing
    mean_padded = _check_usable(inputs)
    share = np.asarray(inputs.weights, np.float64) / float(np.sum(inputs.weights))
    # documents to blend: enough for ``rows`` full rows, plus what one row may look ahead
    count = int(rows * packing.seq_length / float(share @ mean_padded) * 1.05) + packing.lookahead + 1024
    sizes = [len(lengths) for lengths in inputs.lengths]
    while True:
        dataset, document = blend_order(sizes, inputs.weights, inputs.seed, count)
        lengths = np.empty(count, np.int64)
        for d, per_dataset in enumerate(inputs.lengths):
            here = dataset == d
            lengths[here] = np.asarray(per_dataset)[document[here]]
        packed = pack(lengths, packing, max_rows=rows, complete_only=True)
        if packed.rows >= rows:
            break
        count *= 2                       # rare: a prefix shorter than estimated
    doc_dtype = np.int32 if max(sizes) < 2 ** 31 else np.int64
    return {"arrays": {"row_offsets": packed.row_offsets.astype(np.int64),
                       "dataset": dataset[packed.document].astype(np.int16),
                       "document": document[packed.document].astype(doc_dtype),
                       "start": packed.start.astype(np.int32), "end": packed.end.astype(np.int32)},
            "rows": packed.rows, "stats": dataclasses.asdict(packed.stats),
            "documents_read": int(packed.document.max(initial=-1)) + 1}


def _check_usable(inputs: PlanInputs) -> np.ndarray:
    """Mean padded length a blended document of each dataset brings (0 for dropped ones); raise
    naming the dataset when none of its documents can be packed (the blend would never end)."""
    packing = inputs.packing
    means = []
    for name, lengths in zip(inputs.names, inputs.lengths):
        lengths = np.asarray(lengths, np.int64)
        kept = np.where(lengths > packing.seq_length, 0 if packing.overlong == "drop" else packing.seq_length,
                        lengths)
        if not np.any(kept > 0):
            raise ValueError(f"dataset {name!r}: none of its {len(lengths)} documents can be packed: every one is "
                             f"empty or longer than seq_length {packing.seq_length} with data.overlong=drop "
                             f"(raise data.seq_length or set data.overlong=truncate)")
        means.append(float(packing.padded_lengths(kept).mean()))
    return np.asarray(means)


# ----------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------
def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _data_size(table: Dict[str, dict]) -> int:
    """Bytes from the first array's start to the last one's end."""
    return max((spec["offset"] + int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
                for spec in table.values()), default=0)


def _edges(buffer: memoryview) -> str:
    digest = hashlib.sha256(struct.pack("<q", len(buffer)))
    digest.update(buffer[:EDGE])
    digest.update(buffer[-EDGE:] if len(buffer) > EDGE else b"")
    return digest.hexdigest()


def write_plan(path: str, key: str, built: Dict[str, object]) -> None:
    """Write atomically: a temporary file, flushed to disk, renamed over ``path``."""
    arrays: Dict[str, np.ndarray] = {k: np.ascontiguousarray(v) for k, v in built["arrays"].items()}
    table, offset = {}, 0
    for name, array in arrays.items():
        table[name] = {"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                       "edges": _edges(memoryview(array).cast("B"))}
        offset = _aligned(offset + array.nbytes)
    header = {"version": FORMAT_VERSION, "key": key, "rows": built["rows"], "stats": built["stats"],
              "documents_read": built["documents_read"], "arrays": table}
    text = json.dumps(header, sort_keys=True).encode()
    data_start = _aligned(PREAMBLE + len(text))
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(text)) + hashlib.sha256(text).digest() + text)
        for name, array in arrays.items():
            f.seek(data_start + table[name]["offset"])
            f.write(memoryview(array).cast("B"))
        f.truncate(data_start + _data_size(table))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    log.info("row plan: wrote %d rows to %s (%.1f MB)", built["rows"], path, (data_start + offset) / 1e6)


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
            raise ValueError("not a row-plan file")
        (length,) = struct.unpack("<Q", preamble[len(MAGIC):len(MAGIC) + 8])
        if PREAMBLE + length > size:
            raise ValueError("header cut short")
        text = f.read(length)
    if hashlib.sha256(text).digest() != preamble[len(MAGIC) + 8:]:
        raise ValueError("header checksum differs")
    header = json.loads(text)
    if header.get("version") != FORMAT_VERSION or header.get("key") != key:
        raise ValueError("written for other inputs")
    data_start = _aligned(PREAMBLE + length)
    if data_start + _data_size(header["arrays"]) != size:
        raise ValueError(f"size {size} bytes, header says {data_start + _data_size(header['arrays'])}")
    arrays = {}
    for name, spec in header["arrays"].items():
        shape = tuple(spec["shape"])
        arrays[name] = (np.memmap(path, dtype=np.dtype(spec["dtype"]), mode="r", shape=shape,
                                  offset=data_start + spec["offset"]) if all(shape) else
                        np.empty(shape, np.dtype(spec["dtype"])))
        if _edges(memoryview(np.ascontiguousarray(arrays[name])).cast("B")) != spec["edges"]:
            raise ValueError(f"array {name} checksum differs")
    return header, arrays
