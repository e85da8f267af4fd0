"""The Checkpoint contract: one layout, written by training and conversion, read by everyone.

    ROOT/
      latest                 "iter_0000100"  -- names the newest COMPLETE iteration, written last
      iter_0000100/
        model/               megatron-core dist_checkpointing (torch_dist) of the model's sharded
                             state dict (+ "optimizer" when saved by training)
        metadata.json        CheckpointMetadata: model config, vocabulary layout, iteration,
                             parallel layout, scheduler state and resolved recipe (training)

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_uni.config import ConfigError, ModelConfig, ParallelConfig
from megatron_uni.errors import MegatronUniError
from megatron_uni.fileio import atomic_write_text
from megatron_uni.tokens import VocabularyLayout

FORMAT = "megatron_uni.checkpoint/1"
LATEST = "latest"
METADATA = "metadata.json"
MODEL_DIR = "model"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


class CheckpointError(MegatronUniError, RuntimeError):
    pass


@dataclasses.dataclass
class CheckpointMetadata:
    """What ``metadata.json`` records about one saved iteration."""

    iteration: int
    model_config: ModelConfig
    vocabulary: Optional[VocabularyLayout]     # None when the writer knew no vocabulary
    parallel: ParallelConfig                   # the layout it was saved with (any layout loads it)
    world_size: int = 1
    model_keys: List[str] = dataclasses.field(default_factory=list)   # "model" or "model0".. (VPP)
    extra_keys: List[str] = dataclasses.field(default_factory=list)   # e.g. "optimizer"
    scheduler: Optional[Dict[str, Any]] = None         # megatron's OptimizerParamScheduler state
    config: Optional[Dict[str, Any]] = None            # the resolved recipe of a training run
    converted_from: Optional[Dict[str, Any]] = None    # HF import facts (convert/importer.py)
    format: str = FORMAT
    # where it was read from; not written
    iteration_dir: Optional[str] = dataclasses.field(default=None, compare=False)

    def to_json(self) -> str:
        raw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "iteration_dir"}
        raw.update(model_config=self.model_config.to_dict(), parallel=dataclasses.asdict(self.parallel),
                   vocabulary=self.vocabulary.to_dict() if self.vocabulary else None)
        return json.dumps({k: v for k, v in raw.items() if v is not None or k == "vocabulary"},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = METADATA) -> "CheckpointMetadata":
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise CheckpointError(f"{where}: format {raw.get('format')!r}, expected {FORMAT!r}")
        try:
            model = ModelConfig.from_dict(raw["model_config"])
            parallel_fields = {f.name for f in dataclasses.fields(ParallelConfig)}
            parallel = ParallelConfig(**{k: v for k, v in (raw.get("parallel") or {}).items() if k in parallel_fields})
            vocabulary = VocabularyLayout.from_dict(raw["vocabulary"]) if raw.get("vocabulary") else None
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{where}: unreadable metadata: {err}") from None
        known = {f.name for f in dataclasses.fields(cls)} - {"model_config", "parallel", "vocabulary", "iteration_dir"}
        return cls(model_config=model, parallel=parallel, vocabulary=vocabulary,
                   **{k: v for k, v in raw.items() if k in known})


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


def save_checkpoint(root: str, iteration: int, model_chunks: Sequence[torch.nn.Module], model_config: ModelConfig,
                    vocabulary: Optional[VocabularyLayout], parallel_layout: ParallelConfig,
                    extra_sharded: Optional[Dict[str, Any]] = None, keep_last: int = 0, **extras: Any) -> str:
    """Save the model (and ``extra_sharded`` items, e.g. the optimizer) collectively on all ranks.

    ``extras`` fill the optional fields of :class:`CheckpointMetadata` (``scheduler``, ``config``,
    ``converted_from``). Returns the iteration dir. ``keep_last`` > 0: after ``latest`` names the
    new iteration, older ones beyond the newest ``keep_last`` are deleted (:func:`prune_iterations`).
    """
    from megatron.core import dist_checkpointing

    iter_dir = os.path.join(root, iteration_dir_name(iteration))
    model_dir = os.path.join(iter_dir, MODEL_DIR)
    if _rank() == 0:
        if is_published(root, iteration):
            raise CheckpointError(f"{iter_dir} already holds a published checkpoint; refusing to overwrite")
        if os.path.isdir(iter_dir):  # a crashed save of this iteration, killed before 'latest' named it
            import shutil

            shutil.rmtree(iter_dir)
        os.makedirs(model_dir)
    _barrier()
    state = model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    dist_checkpointing.save(state, model_dir)
    _barrier()
    if _rank() == 0:
        metadata = CheckpointMetadata(
            iteration=iteration, model_config=model_config, vocabulary=vocabulary, parallel=parallel_layout,
            world_size=torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            model_keys=sorted(k for k in state if k.startswith("model")), extra_keys=sorted(extra_sharded or {}),
            **extras)
        atomic_write_text(os.path.join(iter_dir, METADATA), metadata.to_json())
        atomic_write_text(os.path.join(root, LATEST), iteration_dir_name(iteration) + "\n")
        if keep_last > 0:
            prune_iterations(root, keep_last)
    _barrier()
    return iter_dir


def is_published(root: str, iteration: int) -> bool:
    """True when ``iteration`` under ``root`` is complete and ``latest`` names it or a later one.
    An iteration past ``latest`` was never published (a kill between its metadata.json and
    ``latest``): it is garbage that a resumed run redoes, never a checkpoint to protect."""
    if not os.path.isfile(os.path.join(root, iteration_dir_name(iteration), METADATA)):
        return False
    latest = os.path.join(root, LATEST)
    if not os.path.isfile(latest):
        return False
    named = _ITER_RE.match(open(latest).read().strip())
    return named is None or iteration <= int(named.group(1))


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


def read_metadata(path: str) -> CheckpointMetadata:
    """The metadata of a checkpoint root (its ``latest``) or of an ``iter_*`` directory."""
    iter_dir = resolve_iteration_dir(path)
    where = os.path.join(iter_dir, METADATA)
    with open(where) as f:
        metadata = CheckpointMetadata.from_json(f.read(), where)
    metadata.iteration_dir = iter_dir
    return metadata


SHAPE_KEYS = ("num_layers", "hidden_size", "ffn_hidden_size", "first_k_dense", "num_attention_heads",
              "num_query_groups", "kv_channels", "num_experts", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "vocab")


def check_model_config(metadata: CheckpointMetadata, model_config: ModelConfig,
                       keys: Sequence[str] = SHAPE_KEYS) -> None:
    """Refuse to load weights into a model of another shape, naming every differing key."""
    saved = metadata.model_config
    diffs = [f"model.{k}: checkpoint {getattr(saved, k)!r} vs config {getattr(model_config, k)!r}"
             for k in keys if getattr(saved, k) != getattr(model_config, k)]
    if diffs:
        raise CheckpointError("checkpoint does not match the model config: " + "; ".join(diffs))


def load_checkpoint(path: str, model_chunks: Sequence[torch.nn.Module], model_config: Optional[ModelConfig] = None,
                    extra_sharded: Optional[Dict[str, Any]] = None,
                    strict: bool = True) -> Tuple[CheckpointMetadata, Dict[str, Any]]:
    """Load model state (any saved layout) into ``model_chunks``; returns ``(metadata, extras)``.

    ``extra_sharded`` (e.g. the optimizer's sharded state dict) is loaded from the same checkpoint;
    ``extras`` maps each of its keys to the loaded state.
    """
    from megatron.core import dist_checkpointing

    metadata = read_metadata(path)
    if model_config is not None:
        check_model_config(metadata, model_config)
    state = model_sharded_state_dict(model_chunks)
    state.update(extra_sharded or {})
    loaded = dist_checkpointing.load(state, os.path.join(metadata.iteration_dir, MODEL_DIR))
    chunks: List[torch.nn.Module] = [getattr(c, "module", c) for c in model_chunks]
    names = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for name, chunk in zip(names, chunks):
        chunk.load_state_dict(loaded[name], strict=strict)
    return metadata, {k: loaded[k] for k in (extra_sharded or {})}
