"""The store of tokenized images: shard files of VQ codes plus one index, read with ``ImageCodeStore``.

Layout of a store directory::

    job.json          parameters of the job that wrote it (a rerun with other parameters is refused)
    shards/shard-NNNNNN.vqc   one file per chunk of the manifest, written atomically (temp + rename)
    index.json        key -> (shard, item), written by rank 0 after every shard exists
    report.json       images that could not be tokenized, with the reason

A shard file is ``MAGIC``, a little-endian uint64 header length, a JSON header (keys, grids, offsets,
bad images) and the codes as little-endian uint16 (codes are < 65536). Its bytes depend only on its
content, so two runs that encode the same images write identical shards.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np

from megatron_uni.errors import DataError
from megatron_uni.fileio import atomic_write_bytes, write_json

MAGIC = b"MUVQCODE"
FORMAT_VERSION = 1
SHARD_DIR = "shards"
INDEX_FILE = "index.json"
REPORT_FILE = "report.json"
JOB_FILE = "job.json"
CODE_DTYPE = np.dtype("<u2")
_HEADER_LEN = struct.Struct("<Q")


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.vqc"


def shard_path(directory: str, index: int) -> str:
    return os.path.join(directory, SHARD_DIR, shard_name(index))


def write_store_json(path: str, value) -> None:
    """The store's JSON files (index, report, job): compact indentation, one format for all."""
    write_json(path, value, indent=1)


# ---- shards -----------------------------------------------------------------------------------------
def encode_shard(entries: Sequence[Tuple[str, int, int, np.ndarray]], bad: Sequence[dict]) -> bytes:
    """Serialise ``(key, grid_h, grid_w, codes)`` entries and the shard's bad-image records."""
    offsets, chunks, total = [], [], 0
    for key, grid_h, grid_w, codes in entries:
        flat = np.asarray(codes).reshape(-1)
        if flat.size != grid_h * grid_w:
            raise DataError(f"image {key!r}: {flat.size} codes for a {grid_h}x{grid_w} grid")
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(CODE_DTYPE).max):
            raise DataError(f"image {key!r}: codes outside [0, {np.iinfo(CODE_DTYPE).max}]")
        offsets.append(total)
        total += flat.size
        chunks.append(flat.astype(CODE_DTYPE).tobytes())
    header = {"version": FORMAT_VERSION, "keys": [e[0] for e in entries],
              "grids": [[int(e[1]), int(e[2])] for e in entries], "offsets": offsets, "bad": list(bad)}
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return MAGIC + _HEADER_LEN.pack(len(header_bytes)) + header_bytes + b"".join(chunks)


def write_shard(path: str, entries: Sequence[Tuple[str, int, int, np.ndarray]], bad: Sequence[dict]) -> None:
    atomic_write_bytes(path, encode_shard(entries, bad))


def read_shard_header(path: str) -> Tuple[dict, int]:
    """Header dict and the byte offset where the codes start; a damaged file is an error naming it."""
    with open(path, "rb") as handle:
        magic = handle.read(len(MAGIC))
        if magic != MAGIC:
            raise DataError(f"{path} is not an image-code shard (bad magic {magic!r})")
        (length,) = _HEADER_LEN.unpack(handle.read(_HEADER_LEN.size))
        header = json.loads(handle.read(length))
    if header.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format version {header.get('version')} != {FORMAT_VERSION}")
    return header, len(MAGIC) + _HEADER_LEN.size + length


# ---- index and report (rank 0) ------------------------------------------------------------------------
def merge_index(directory: str, shard_indices: Iterable[int], meta: dict) -> dict:
    """Build index.json from the headers of the given shards; a key in two shards is an error."""
    shards, entries, bad = [], {}, []
    for position, index in enumerate(sorted(shard_indices)):
        path = shard_path(directory, index)
        header, _ = read_shard_header(path)
        shards.append(shard_name(index))
        for item, key in enumerate(header["keys"]):
            if key in entries:
                raise DataError(f"image key {key!r} appears in {shards[entries[key][0]]} and {shard_name(index)}")
            entries[key] = [position, item]
        bad.extend(header["bad"])
    index = {"version": FORMAT_VERSION, "meta": meta, "shards": shards, "num_images": len(entries),
             "entries": entries}
    write_store_json(os.path.join(directory, INDEX_FILE), index)
    write_store_json(os.path.join(directory, REPORT_FILE), summarize_bad(bad))
    return index


def summarize_bad(bad: List[dict]) -> dict:
    counts: Dict[str, int] = {}
    for record in bad:
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    return {"num_bad": len(bad), "counts": dict(sorted(counts.items())), "images": bad}


# ---- reader -------------------------------------------------------------------------------------------
class ImageCodeStore:
    """Read-only access to a finished store: ``store.get(key) -> (grid_h, grid_w, codes)``.

    ``codes`` is an int64 numpy array of the grid_h * grid_w 0-based codes in row-major order; add the
    Vocabulary's image offset to turn them into token ids.
    """

    def __init__(self, directory: str):
        self.directory = directory
        path = os.path.join(directory, INDEX_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image-code store {directory} has no {INDEX_FILE} (job unfinished?)")
        with open(path) as handle:
            index = json.load(handle)
        if index.get("version") != FORMAT_VERSION:
            raise DataError(f"{path}: store version {index.get('version')} != {FORMAT_VERSION}")
        self.meta = index["meta"]
        self._shards: List[str] = index["shards"]
        self._entries: Dict[str, List[int]] = index["entries"]
        self._opened: Dict[int, Tuple[dict, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> List[str]:
        return list(self._entries)

    def get(self, key: str) -> Tuple[int, int, np.ndarray]:
        if key not in self._entries:
            raise KeyError(f"image {key!r} is not in the image-code store {self.directory}")
        shard, item = self._entries[key]
        header, codes = self._shard(shard)
        grid_h, grid_w = header["grids"][item]
        start = header["offsets"][item]
        return grid_h, grid_w, codes[start:start + grid_h * grid_w].astype(np.int64)

    def _shard(self, shard: int) -> Tuple[dict, np.ndarray]:
        if shard not in self._opened:
            path = os.path.join(self.directory, SHARD_DIR, self._shards[shard])
            header, data_start = read_shard_header(path)
            count = (os.path.getsize(path) - data_start) // CODE_DTYPE.itemsize
            codes = np.memmap(path, dtype=CODE_DTYPE, mode="r", offset=data_start, shape=(count,)) if count \
                else np.zeros(0, dtype=CODE_DTYPE)
            self._opened[shard] = (header, codes)
        return self._opened[shard]
