"""The Checkpoint contract: one layout, written by training and conversion, read by everyone.

    ROOT/
      latest                 "iter_0000100"  -- names the newest COMPLETE iteration, written last
      iter_0000100/
        model/               megatron-core dist_checkpointing (torch_dist) of the model's sharded
                             state dict (+ "optimizer" when saved by training)
        metadata.json        resolved model config, vocabulary, iteration, parallel layout, extras

The model state is keyed by megatron's global sharded keys, so any TP/PP/VPP/EP layout loads any
other. ``metadata.json`` is written after every rank finished the model state, and ``latest``
after that (both via write-to-temp + rename): a crash mid-save leaves the previous ``latest``
intact and the loader never sees a half-written iteration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch

from megatron_uni.fileio import atomic_write_text

FORMAT = "megatron_uni.checkpoint/1"
LATEST = "latest"
METADATA = "metadata.json"
MODEL_DIR = "model"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(RuntimeError):
    pass


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def model_sharded_state_dict(model_chunks: Sequence[torch.nn.Module]) -> Dict[str, Any]:
    """One dict over all chunks of this rank (VPP chunks must be saved/loaded in one call)."""
    chunks = [getattr(chunk, "module", chunk) for chunk in model_chunks]  # unwrap DDP
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_checkpoint(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], model_config: Any,
                    vocabulary: Optional[dict], parallel_layout: Any,
                    extra_sharded: Optional[Dict[str, Any]] = None,
                    extra_metadata: Optional[Dict[str, Any]] = None, keep_last: int = 0) -> str:
    """Save the model (and ``extra_sharded`` items, e.g. the optimizer) collectively on all ranks.

    ``model_config`` / ``parallel_layout`` may be dataclasses or dicts. Returns the iteration dir.
    ``keep_last`` > 0: after ``latest`` names the new iteration, older ones beyond the newest
    ``keep_last`` are deleted (:func:`prune_iterations`).
    """
    from megatron.core import dist_checkpointing

    iter_dir = os.path.join(root, iteration_dir_name(iteration))
    model_dir = os.path.join(iter_dir, MODEL_DIR)
    if _rank() == 0:
        if os.path.exists(os.path.join(iter_dir, METADATA)):
            raise CheckpointError(f"{iter_dir} already holds a complete checkpoint; refusing to overwrite")
        if os.path.isdir(model_dir):  # leftovers of a crashed save of the same iteration
            import shutil

            shutil.rmtree(model_dir)
        os.makedirs(model_dir)
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    dist_checkpointing.save(state, model_dir)
    _barrier()
    if _rank() == 0:
        metadata = {
            "format": FORMAT,
            "iteration": iteration,
            "model_config": _as_dict(model_config),
            "vocabulary": vocabulary,
            "parallel": _as_dict(parallel_layout),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "model_keys": sorted(k for k in state if k.startswith("model")),
            "extra_keys": sorted(extra_sharded or {}),
            **(extra_metadata or {}),
        }
        atomic_write_text(os.path.join(iter_dir, METADATA), json.dumps(metadata, indent=2, sort_keys=True))
        atomic_write_text(os.path.join(root, LATEST), iteration_dir_name(iteration) + "\n")
        if keep_last > 0:
            prune_iterations(root, keep_last)
    _barrier()
    return iter_dir


def prune_iterations(root: str, keep_last: int) -> List[str]:
    """Delete all but the newest ``keep_last`` iteration dirs of ``root``; never the one ``latest``
    names. Returns the deleted paths. Call only after ``latest`` was published."""
    import shutil

    latest = latest_iteration_dir(root)
    iterations = sorted(name for name in os.listdir(root) if _ITER_RE.match(name))
    doomed = [os.path.join(root, name) for name in iterations[:-keep_last]]
    doomed = [path for path in doomed if latest is None or os.path.abspath(path) != os.path.abspath(latest)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def _as_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def latest_iteration_dir(root: str) -> Optional[str]:
    """The iteration named by ``root/latest``, or None when nothing complete was saved yet."""
    latest = os.path.join(root, LATEST)
    if not os.path.isfile(latest):
        return None
    name = open(latest).read().strip()
    if not _ITER_RE.match(name):
        raise CheckpointError(f"{latest} names {name!r}, not an iter_NNNNNNN directory")
    iter_dir = os.path.join(root, name)
    if not os.path.isfile(os.path.join(iter_dir, METADATA)):
        raise CheckpointError(f"{latest} names {name} but {iter_dir} has no {METADATA}")
    return iter_dir


def resolve_iteration_dir(path: str) -> str:
    """Accept a checkpoint root (uses ``latest``) or an ``iter_*`` directory."""
    if os.path.isfile(os.path.join(path, METADATA)):
        return path
    iter_dir = latest_iteration_dir(path)
    if iter_dir is None:
        raise CheckpointError(f"{path} is neither a checkpoint iteration (no {METADATA}) nor a root with a "
                              f"'{LATEST}' file")
    return iter_dir


def read_metadata(path: str) -> Dict[str, Any]:
    iter_dir = resolve_iteration_dir(path)
    with open(os.path.join(iter_dir, METADATA)) as f:
        metadata = json.load(f)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{iter_dir}/{METADATA}: format {metadata.get('format')!r}, expected {FORMAT!r}")
    return metadata


def check_model_config(metadata: Dict[str, Any], model_config: Any, keys: Sequence[str] = (
        "num_layers", "hidden_size", "ffn_hidden_size", "first_k_dense", "num_attention_heads",
        "num_query_groups", "kv_channels", "num_experts", "moe_ffn_hidden_size",
        "moe_shared_expert_intermediate_size", "vocab")) -> None:
    """Refuse to load weights into a model of another shape, naming every differing key."""
    saved = metadata.get("model_config") or {}
    wanted = _as_dict(model_config)
    diffs = [f"model.{k}: checkpoint {saved.get(k)!r} vs config {wanted.get(k)!r}"
             for k in keys if k in saved and saved.get(k) != wanted.get(k)]
    if diffs:
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(diffs))


def load_checkpoint(path: str, model_chunks: Sequence[torch.nn.Module], model_config: Any = None,
                    extra_sharded: Optional[Dict[str, Any]] = None, strict: bool = True) -> Dict[str, Any]:
    """Load model state (any saved layout) into ``model_chunks``; returns metadata + loaded extras.

    ``extra_sharded`` (e.g. the optimizer's sharded state dict) is loaded from the same checkpoint
    and returned under ``metadata["loaded_extra"]``.
    """
    from megatron.core import dist_checkpointing

    iter_dir = resolve_iteration_dir(path)
    metadata = read_metadata(iter_dir)
    if model_config is not None:
        check_model_config(metadata, model_config)
    state = model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    loaded = dist_checkpointing.load(state, os.path.join(iter_dir, MODEL_DIR))
    chunks: List[torch.nn.Module] = [getattr(c, "module", c) for c in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict(loaded[name], strict=strict)
    metadata["loaded_extra"] = {k: loaded[k] for k in (extra_sharded or {})}
    metadata["iteration_dir"] = iter_dir
    return metadata
