"""HF safetensors folders: index reading, shape inspection, streaming reads, size-bounded writes.

Reads never load more than the tensors asked for from one shard at a time (safetensors maps the
file; ``get_tensor`` copies only that tensor). Writes plan the shard split from shapes first, so
the file names ``model-0000i-of-0000n.safetensors`` are known before any byte is written and
``--dry-run`` can print the plan.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Dict, Iterable, Iterator, List, Mapping, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_uni.errors import MegatronUniError
from megatron_uni.fileio import write_json  # also the writer of exporter.py and tiny_hf.py

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class ConversionError(MegatronUniError, ValueError):
    """Bad conversion input; the message names the file / tensor and what was expected."""


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"missing file {path}")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ConversionError(f"{path}: invalid JSON: {err}") from None


@contextlib.contextmanager
def open_shard(path: str):
    """``safe_open`` whose failures (truncated or garbage file) name the file."""
    try:
        with safe_open(path, "pt") as handle:
            yield handle
    except SafetensorError as err:
        raise ConversionError(f"{path}: not a readable safetensors file ({err}); truncated download?") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shard: str                    # file name inside the folder
    shape: Tuple[int, ...]
    dtype: str                    # safetensors dtype string, e.g. BF16


class HFCheckpoint:
    """An HF folder's tensors: name -> shard, shape, dtype, read shard by shard."""

    def __init__(self, folder: str):
        self.folder = folder
        self.weight_map = self._weight_map()
        self.infos = self._inspect()

    def _weight_map(self) -> Dict[str, str]:
        index_path = os.path.join(self.folder, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path}: no 'weight_map' object")
            return dict(weight_map)
        single = os.path.join(self.folder, SINGLE_FILE)
        if not os.path.isfile(single):
            raise ConversionError(f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        with open_shard(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def _inspect(self) -> Dict[str, TensorInfo]:
        infos: Dict[str, TensorInfo] = {}
        for shard in self.shards:
            path = os.path.join(self.folder, shard)
            if not os.path.isfile(path):
                raise ConversionError(f"{self.folder}/{INDEX_FILE} names shard {shard}, which does not exist")
            with open_shard(path) as f:
                present = set(f.keys())
                for name in (n for n, s in self.weight_map.items() if s == shard):
                    if name not in present:
                        raise ConversionError(f"{path}: index lists tensor {name} but the shard does not hold it")
                    piece = f.get_slice(name)
                    if piece.get_dtype() not in _DTYPES:
                        raise ConversionError(f"{path}: tensor {name} has dtype {piece.get_dtype()}, expected one of "
                                              f"{sorted(_DTYPES)} (quantized checkpoints are not supported)")
                    infos[name] = TensorInfo(shard, tuple(piece.get_shape()), piece.get_dtype())
        return infos

    @property
    def shards(self) -> List[str]:
        return sorted(set(self.weight_map.values()))

    def read_shard(self, shard: str, names: Iterable[str]) -> Dict[str, torch.Tensor]:
        """Only ``names`` (all in ``shard``) from one shard file."""
        with open_shard(os.path.join(self.folder, shard)) as f:
            return {name: f.get_tensor(name) for name in names}

    def read_all(self) -> Dict[str, torch.Tensor]:
        """Every tensor of the folder, one shard at a time (small models: tests, the reference runner)."""
        tensors: Dict[str, torch.Tensor] = {}
        for shard in self.shards:
            tensors.update(self.read_shard(shard, [n for n, info in self.infos.items() if info.shard == shard]))
        return tensors


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ShardPlan:
    file: str
    names: List[str]
    nbytes: int


def plan_shards(sizes: Sequence[Tuple[str, int]], max_shard_bytes: int) -> List[ShardPlan]:
    """Split ``(name, nbytes)`` in order into shards of at most ``max_shard_bytes`` (a tensor
    bigger than the bound gets a shard of its own)."""
    groups: List[Tuple[List[str], int]] = []
    for name, nbytes in sizes:
        if not groups or (groups[-1][1] + nbytes > max_shard_bytes and groups[-1][0]):
            groups.append(([], 0))
        groups[-1][0].append(name)
        groups[-1] = (groups[-1][0], groups[-1][1] + nbytes)
    total = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{total:05d}.safetensors", names, nbytes)
            for i, (names, nbytes) in enumerate(groups)]


def write_shard(folder: str, plan: ShardPlan, tensors: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in plan.names if n not in tensors]
    if missing:
        raise ConversionError(f"shard {plan.file}: tensors not produced: {missing[:5]}")
    ordered = {name: tensors[name].contiguous() for name in plan.names}
    path = os.path.join(folder, plan.file)
    try:
        save_file(ordered, path, metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:
        raise ConversionError(f"{path}: writing the shard failed: {err}") from None


def write_index(folder: str, plans: Sequence[ShardPlan]) -> None:
    weight_map = {name: plan.file for plan in plans for name in plan.names}
    total = sum(plan.nbytes for plan in plans)
    write_json(os.path.join(folder, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})


def iter_plans_with_progress(plans: Sequence[ShardPlan], desc: str, enabled: bool) -> Iterator[ShardPlan]:
    from tqdm import tqdm

    yield from tqdm(plans, desc=desc, unit="shard", disable=not enabled)


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    try:
        return _DTYPES[safetensors_dtype]
    except KeyError:
        raise ConversionError(f"unsupported safetensors dtype {safetensors_dtype}") from None
