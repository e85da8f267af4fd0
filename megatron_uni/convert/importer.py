"""HF LLaDA2 folder -> torch_dist checkpoint of our model, at any TP/PP/EP layout.

Runs on every rank of a job launched at the *target* layout (torchrun / Slurm / MPI / spawned
gloo ranks; one process is TP1/PP1/EP1). Each rank builds its own model chunks with the
project's builder, asks megatron for their sharded state dict (the checkpoint keys, global
offsets and local views of every parameter), fills each local view from the HF tensors through
:mod:`megatron_uni.convert.mapping`, and all ranks save together with the Checkpoint contract.
So the written layout is exactly what training writes, and each rank holds its own shard of
the model plus the HF tensors it needs from ONE shard file at a time (never the model twice).

Vocabulary expansion: text rows are copied; image-code rows (absent in a text-only HF model)
get N(0, std^2) from a generator seeded per matrix, identical on every layout; padding rows
beyond text + image codes are zero.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

import torch

from megatron_uni.convert import mapping
from megatron_uni.convert.hf_config import check_hf_config
from megatron_uni.convert.hf_io import CONFIG_FILE, ConversionError, HFCheckpoint, read_json
from megatron_uni.shapes import shape_problems, summary, wrong_shape

EMBEDDING_SEED_OFFSET = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 1}


@dataclasses.dataclass
class Target:
    """One local piece of a model parameter that a checkpoint key covers."""

    entry: mapping.Entry
    view: torch.Tensor                  # local view into the parameter (written in place)
    region: Tuple[slice, ...]           # where the view sits in the full (per-expert) tensor


def check_hf_tensors(hf: HFCheckpoint, model_cfg, vocab_rows: int) -> None:
    """Refuse missing, unexpected or wrongly shaped tensors, naming each with both shapes."""
    expected: Dict[str, Tuple[int, ...]] = {}
    for entry in mapping.entries(model_cfg, vocab_rows):
        expected.update(entry.hf_shapes())
    found = {name: info.shape for name, info in hf.infos.items()}
    problems = shape_problems(expected, found, where=lambda name: f" in {hf.infos[name].shard}")
    if problems:
        raise ConversionError(f"{hf.folder}: HF tensors do not match the model config: " + summary(problems))


def expand_vocab_rows(hf_rows: torch.Tensor, key: str, model_cfg, seed: int, std: float,
                      rows: Optional[slice] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``rows`` (default all) of the ``[model.vocab, h]`` matrix in ``dtype``: copied rows,
    seeded image-code rows, zero padding. A rank builds only its own rows, never the whole
    matrix in fp32; each value is rounded to ``dtype`` once, so every layout writes the same bytes."""
    first, stop, _ = (rows or slice(None)).indices(model_cfg.vocab)
    hf_count, hidden = hf_rows.shape
    out = torch.zeros(stop - first, hidden, dtype=dtype)
    copied_stop = min(stop, hf_count)
    if copied_stop > first:
        out[:copied_stop - first] = hf_rows[first:copied_stop]
    image_end = model_cfg.text_vocab + model_cfg.num_image_codes
    fresh_first, fresh_stop = max(first, hf_count), min(stop, image_end)
    if fresh_stop > fresh_first:  # image-code rows absent in the HF model
        generator = torch.Generator().manual_seed(seed + EMBEDDING_SEED_OFFSET[key])
        image = torch.randn(model_cfg.num_image_codes, hidden, generator=generator) * std
        out[fresh_first - first:fresh_stop - first] = image[fresh_first - model_cfg.text_vocab:
                                                            fresh_stop - model_cfg.text_vocab]
    return out


def local_targets(model_chunks, model_cfg, vocab_rows: int) -> List[Target]:
    """Every tensor piece this rank owns, keyed by canonical checkpoint key (+ expert); the
    entries expect vocabulary matrices of ``vocab_rows`` HF rows."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    known = mapping.entries_by_key(model_cfg, vocab_rows)
    targets: List[Target] = []
    for chunk in model_chunks:
        for item in nested_values(getattr(chunk, "module", chunk).sharded_state_dict()):
            pieces = item.build() if isinstance(item, ShardedTensorFactory) else [item]
            for piece in pieces:
                if isinstance(piece, ShardedTensor):
                    targets.append(_target(piece, known, model_cfg))
    return targets


def _target(piece, known, model_cfg) -> Target:
    key, _ = mapping.canonical_key(piece.key, model_cfg)
    lead = piece.prepend_axis_num
    expert = piece.global_offset[0] if lead == 1 else None
    entry = known.get((key, expert))
    if entry is None:
        raise ConversionError(f"model tensor {piece.key} (expert {expert}) has no HF counterpart in "
                              f"megatron_uni/convert/mapping.py RULES")
    region = tuple(slice(off, off + size) for off, size in zip(piece.global_offset[lead:], piece.data.shape))
    return Target(entry, piece.data, region)


def fill_from_hf(targets: List[Target], hf: HFCheckpoint, model_cfg, seed: int, std: float,
                 progress: bool) -> None:
    """Stream the HF shards once; fill each target as soon as all its HF tensors were read."""
    from tqdm import tqdm

    pending: Dict[str, List[Target]] = {}
    for target in targets:
        pending.setdefault(target.entry.hf[-1], []).append(target)
    waiting_sources = {name for t in targets for name in t.entry.hf}
    loaded: Dict[str, torch.Tensor] = {}
    for shard in tqdm(hf.shards, desc="import HF shards", unit="shard", disable=not progress):
        wanted = [n for n in waiting_sources if hf.infos[n].shard == shard]
        loaded.update(hf.read_shard(shard, wanted))
        for name in list(pending):
            group = pending[name]
            if all(source in loaded for source in group[0].entry.hf):
                for target in group:
                    _fill(target, loaded, model_cfg, seed, std)
                del pending[name]
        still_needed = {source for group in pending.values() for t in group for source in t.entry.hf}
        loaded = {n: t for n, t in loaded.items() if n in still_needed}   # free what is done
    if pending:
        raise ConversionError(f"{hf.folder}: never found HF tensors for {sorted(pending)[:5]}")


def _fill(target: Target, loaded: Dict[str, torch.Tensor], model_cfg, seed: int, std: float) -> None:
    entry = target.entry
    full = entry.to_megatron([loaded[n] for n in entry.hf])
    if entry.vocab:  # only this rank's rows are expanded
        rows, columns = target.region
        piece = expand_vocab_rows(full, entry.megatron, model_cfg, seed, std, rows, target.view.dtype)[:, columns]
    else:
        piece = full[target.region]
    if piece.shape != target.view.shape:
        raise ConversionError(wrong_shape(f"{entry.name} (local piece)", piece.shape, target.view.shape))
    with torch.no_grad():
        target.view.copy_(piece.to(target.view.dtype))


def vocabulary_layout(model_cfg, vocabulary=None):
    """The tokenizer's layout when given, else the one the model sizes imply (no special ids)."""
    return vocabulary.layout() if vocabulary is not None else model_cfg.vocabulary_layout


def check_target(out_root: str, iteration: int) -> None:
    """Refuse, before anything is built, a target that the save would refuse only after the whole
    model was built and filled: a root under a file, one we cannot write, or an iteration published there."""
    from megatron_uni.checkpoint import is_published, iteration_dir_name  # the save's own rule

    existing = os.path.abspath(out_root)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConversionError(f"{out_root}: cannot write a checkpoint there, {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise ConversionError(f"{out_root}: cannot write a checkpoint there, {existing} is not writable")
    if is_published(out_root, iteration):
        iter_dir = os.path.join(out_root, iteration_dir_name(iteration))
        raise ConversionError(f"{iter_dir} already holds a published checkpoint; import into another root "
                              f"or --iteration, or remove it first")


def import_hf(hf_dir: str, model_cfg, parallel, out_root: str, seed: int = 1234,
              image_init_std: Optional[float] = None, iteration: int = 0, vocabulary=None,
              progress: bool = True) -> str:
    """Collective on all ranks (process groups already initialised at ``parallel``).

    The model is built without initialisation (every weight is then filled from the HF tensors or
    the seeded vocabulary rows), so a rank holds one copy of its shard, not a random one first.
    Returns the written iteration directory.
    """
    from megatron_uni.checkpoint import save_checkpoint
    from megatron_uni.model.builder import build_model_chunks

    check_target(out_root, iteration)
    hf = HFCheckpoint(hf_dir)
    vocab_rows = check_hf_config(read_json(f"{hf_dir}/{CONFIG_FILE}"), model_cfg, f"{hf_dir}/{CONFIG_FILE}")
    check_hf_tensors(hf, model_cfg, vocab_rows)
    std = model_cfg.init_method_std if image_init_std is None else image_init_std
    chunks = build_model_chunks(model_cfg, parallel, initialize=False)
    fill_from_hf(local_targets(chunks, model_cfg, vocab_rows), hf, model_cfg, seed, std, progress)
    converted_from = {"hf_vocab_rows": vocab_rows, "image_init_std": std, "image_init_seed": seed}
    return save_checkpoint(out_root, iteration, chunks, model_cfg, vocabulary_layout(model_cfg, vocabulary),
                           parallel, converted_from=converted_from)


def dry_run_report(hf_dir: str, model_cfg) -> List[str]:
    """What an import would read and write, after the same validation (no model is built)."""
    hf = HFCheckpoint(hf_dir)
    vocab_rows = check_hf_config(read_json(f"{hf_dir}/{CONFIG_FILE}"), model_cfg, f"{hf_dir}/{CONFIG_FILE}")
    check_hf_tensors(hf, model_cfg, vocab_rows)
    lines = [f"read {len(hf.infos)} tensors from {len(hf.shards)} shard(s); HF vocab rows {vocab_rows} -> "
             f"model vocab {model_cfg.vocab} (text {model_cfg.text_vocab}, image codes {model_cfg.num_image_codes})"]
    for key, shape in mapping.stacked_megatron_keys(model_cfg).items():
        lines.append(f"write {key} {list(shape)}")
    return lines
