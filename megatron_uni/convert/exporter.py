"""torch_dist checkpoint (any saved layout) -> HF LLaDA2.0-Uni folder, on CPU, one shard at a time.

No model is built: the checkpoint's global tensors are read by key with megatron-core's
``dist_checkpointing`` (whatever TP/PP/EP wrote them), only those of the HF shard being written,
and turned into HF tensors through :mod:`megatron_uni.convert.mapping`. Output: bf16
``model-0000i-of-0000n.safetensors`` (size-bounded) + index, router expert bias in fp32,
``config.json`` / ``generation_config.json``, the tokenizer files, and the ``image_tokenizer/``,
``decoder/``, ``decoder-turbo/``, ``vae/`` folders and remote-code files of a base HF Uni folder.

The folder is written into a temporary sibling (``OUT.partial-PID``) and renamed to ``OUT`` at the
end, so ``OUT`` holds either nothing new or the whole export; a non-empty ``OUT`` is refused unless
``overwrite`` (then it is replaced whole, never mixed with new shards).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
from typing import Dict, List, Optional, Tuple

import torch

from megatron_uni.convert import mapping
from megatron_uni.convert.hf_config import generation_config, uni_config
from megatron_uni.convert.hf_io import (
    CONFIG_FILE, ConversionError, ShardPlan, iter_plans_with_progress, plan_shards, write_index, write_json,
    write_shard,
)
from megatron_uni.shapes import shape_problems, summary

CARRIED_DIRS = ("image_tokenizer", "decoder", "decoder-turbo", "vae")
REMOTE_CODE_FILES = ("configuration_llada2uni_moe.py", "modeling_llada2uni_moe.py")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "special_tokens.json")
DEFAULT_SHARD_BYTES = 5 * 2 ** 30


@dataclasses.dataclass
class ExportPlan:
    model_cfg: object
    model_dir: str                          # torch_dist directory of the model state
    ckpt_keys: Dict[str, object]            # canonical key -> checkpoint ShardedTensor metadata
    shards: List[ShardPlan]
    dtype: torch.dtype
    special_ids: Dict[str, int]
    copies: List[Tuple[str, str]]           # (source path, name in the output folder)

    def describe(self) -> List[str]:
        lines = [f"{len(self.shards)} safetensors shard(s), {sum(s.nbytes for s in self.shards) / 2 ** 20:.1f} MiB, "
                 f"weights {str(self.dtype).replace('torch.', '')}, router expert bias float32"]
        for shard in self.shards:
            lines.append(f"{shard.file}: {len(shard.names)} tensors, {shard.nbytes / 2 ** 20:.1f} MiB")
        lines += [f"{CONFIG_FILE}, generation_config.json, model.safetensors.index.json"]
        if "eos" not in self.special_ids:
            lines.append("warning: no special token ids in the checkpoint's vocabulary; pass --tokenizer to set "
                         "pad_token_id / eos_token_id / mask_token_id")
        lines += [f"copy {src} -> {name}" for src, name in self.copies]
        return lines


def check_checkpoint_tensors(tensors_meta: Dict[str, object], model_cfg, where: str) -> Dict[str, object]:
    """Canonicalise the checkpoint's keys and refuse missing / extra / wrongly shaped tensors."""
    found = {mapping.canonical_key(key, model_cfg)[0]: meta for key, meta in tensors_meta.items()}
    expected = mapping.stacked_megatron_keys(model_cfg)
    problems = shape_problems(expected, {key: meta.global_shape for key, meta in found.items()})
    if problems:
        raise ConversionError(f"{where}: checkpoint tensors do not match its model config: " + summary(problems))
    return {k: found[k] for k in expected}


def _special_ids(metadata, tokenizer_dir: Optional[str], model_cfg) -> Dict[str, int]:
    special = dict(metadata.vocabulary.special_ids) if metadata.vocabulary else {}
    if not special and tokenizer_dir:
        from megatron_uni.tokens import Vocabulary

        vocabulary = Vocabulary.from_tokenizer_dir(tokenizer_dir, text_size=model_cfg.text_vocab,
                                                   num_image_codes=model_cfg.num_image_codes)
        special = dict(vocabulary.special_ids)
    return special


def _copies(tokenizer_dir: Optional[str], base_dir: Optional[str]) -> List[Tuple[str, str]]:
    copies: List[Tuple[str, str]] = []
    if tokenizer_dir:
        found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
        if "tokenizer.json" not in found:
            raise ConversionError(f"tokenizer directory {tokenizer_dir} has no tokenizer.json")
        copies += [(os.path.join(tokenizer_dir, n), n) for n in found]
    if base_dir:
        missing = [d for d in CARRIED_DIRS if not os.path.isdir(os.path.join(base_dir, d))]
        if missing:
            raise ConversionError(f"base HF folder {base_dir} lacks {', '.join(d + '/' for d in missing)} "
                                  f"(needed by the decoder and image pipeline)")
        copies += [(os.path.join(base_dir, d), d) for d in CARRIED_DIRS]
        copies += [(os.path.join(base_dir, n), n) for n in REMOTE_CODE_FILES if os.path.isfile(os.path.join(base_dir, n))]
    return copies


def _hf_sizes(model_cfg, dtype: torch.dtype) -> List[Tuple[str, int]]:
    width = torch.empty((), dtype=dtype).element_size()
    sizes = []
    for entry in mapping.entries(model_cfg):
        for name, shape in entry.hf_shapes().items():
            numel = int(torch.Size(shape).numel())
            sizes.append((name, numel * (4 if entry.keep_fp32 else width)))
    return sizes


_OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer\.")


def plan_export(checkpoint: str, tokenizer_dir: Optional[str] = None, base_dir: Optional[str] = None,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype = torch.bfloat16) -> ExportPlan:
    """Validate everything an export needs and decide its files; reads no tensor data."""
    from megatron.core import dist_checkpointing

    from megatron_uni.checkpoint import MODEL_DIR, read_metadata, resolve_iteration_dir

    ensure_process_group()
    iter_dir = resolve_iteration_dir(checkpoint)
    metadata = read_metadata(iter_dir)
    model_cfg = metadata.model_config
    model_dir = os.path.join(iter_dir, MODEL_DIR)
    # a training checkpoint also holds the optimizer state ("optimizer.*", "chained_N.optimizer.*"): not exported
    tensors = {k: m for k, m in dist_checkpointing.load_tensors_metadata(model_dir).items()
               if not _OPTIMIZER_KEY.match(k)}
    keys = check_checkpoint_tensors(tensors, model_cfg, model_dir)
    shards = plan_shards(_hf_sizes(model_cfg, dtype), max_shard_bytes)
    return ExportPlan(model_cfg, model_dir, keys, shards, dtype, _special_ids(metadata, tokenizer_dir, model_cfg),
                      _copies(tokenizer_dir, base_dir))


def _read_keys(plan: ExportPlan, keys: List[str]) -> Dict[str, torch.Tensor]:
    """Whole global tensors of ``keys`` (canonical) from the checkpoint. Stacked expert keys are
    read whole: megatron's torch_dist reader expects every fragment of a key a call asks for."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    request = {}
    for key in keys:
        meta = plan.ckpt_keys[key]
        request[key] = ShardedTensor.from_rank_offsets(meta.key, torch.empty(meta.global_shape, dtype=meta.dtype),
                                                       replica_id=0)
    return dist_checkpointing.load(request, plan.model_dir, validate_access_integrity=False) if request else {}


def ensure_process_group() -> None:
    """dist_checkpointing reads through a process group; a lone CPU export makes a gloo one of 1."""
    if not torch.distributed.is_initialized():  # an in-memory store: no port to race for
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)


PARTIAL_SUFFIX = ".partial-"


def check_target(out_dir: str, overwrite: bool, sources: List[Optional[str]]) -> None:
    """Refuse an output folder that holds anything (unless ``overwrite``) or that is, or holds, a
    source folder (replacing it would delete what is being exported)."""
    target = os.path.realpath(out_dir)
    for source in filter(None, sources):
        source = os.path.realpath(source)
        if source == target or source.startswith(target + os.sep):
            raise ConversionError(f"output folder {out_dir} is or holds the source {source}; "
                                  f"export into a folder of its own")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConversionError(f"output {out_dir} exists and is not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ConversionError(f"output folder {out_dir} is not empty ({len(os.listdir(out_dir))} entries); "
                              f"pass --overwrite to replace it whole, or choose an empty folder")


def _partial_dir(out_dir: str) -> str:
    return os.path.normpath(out_dir) + PARTIAL_SUFFIX + str(os.getpid())


def remove_stale_partials(out_dir: str) -> None:
    """Temporary siblings of exports that were killed (one export per output folder at a time)."""
    for stale in glob.glob(glob.escape(os.path.normpath(out_dir)) + PARTIAL_SUFFIX + "*"):
        if stale[len(os.path.normpath(out_dir) + PARTIAL_SUFFIX):].isdigit():
            shutil.rmtree(stale, ignore_errors=True)


def _publish(partial: str, out_dir: str) -> None:
    """Move the finished folder into place; an old ``out_dir`` (overwrite) goes only after that."""
    old = None
    if os.path.lexists(out_dir):
        old = partial + ".old"
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    if old:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def write_export(plan: ExportPlan, out_dir: str, link: bool = False, progress: bool = True) -> None:
    """Write the planned folder into a temporary sibling, then rename it to ``out_dir``. Under a
    process group of several ranks every rank must call it (the reads are collective) and rank 0
    writes the files. A failure removes the partial folder and names the file being written."""
    ensure_process_group()
    partial = _partial_dir(out_dir)
    if torch.distributed.get_rank() != 0:
        _write_files(plan, partial, link, progress, writer=False)
        return
    remove_stale_partials(out_dir)
    os.makedirs(partial)
    try:
        _write_files(plan, partial, link, progress, writer=True)
        _publish(partial, out_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _write_files(plan: ExportPlan, out_dir: str, link: bool, progress: bool, writer: bool) -> None:
    cfg = plan.model_cfg
    by_hf_name = {name: e for e in mapping.entries(cfg) for name in e.hf}
    shard_entries = [list({by_hf_name[n].name: by_hf_name[n] for n in s.names}.values()) for s in plan.shards]
    cache: Dict[str, torch.Tensor] = {}
    for i, shard in enumerate(iter_plans_with_progress(plan.shards, "export HF shards", progress)):
        needed = shard_entries[i]
        keys = list(dict.fromkeys(e.megatron for e in needed))
        cache.update(_read_keys(plan, [k for k in keys if k not in cache]))
        tensors: Dict[str, torch.Tensor] = {}
        for entry in needed:
            whole = cache[entry.megatron]
            piece = whole[entry.expert] if entry.expert is not None else whole
            out_dtype = torch.float32 if entry.keep_fp32 else plan.dtype
            for name, tensor in entry.to_hf(piece).items():
                tensors[name] = tensor.to(out_dtype)
        if writer:
            write_shard(out_dir, shard, tensors)
        # keep only a stacked expert tensor that the next shard continues
        upcoming = {e.megatron for e in shard_entries[i + 1]} if i + 1 < len(shard_entries) else set()
        cache = {k: v for k, v in cache.items() if k in upcoming}
    if writer:
        _write_side_files(plan, out_dir, link)


def _write_side_files(plan: ExportPlan, out_dir: str, link: bool) -> None:
    cfg = plan.model_cfg
    write_index(out_dir, plan.shards)
    eos, mask = plan.special_ids.get("eos"), plan.special_ids.get("mask")
    write_json(os.path.join(out_dir, CONFIG_FILE), uni_config(cfg, pad_token_id=eos))
    write_json(os.path.join(out_dir, "generation_config.json"), generation_config(eos, mask))
    for source, name in plan.copies:
        try:
            _carry(source, os.path.join(out_dir, name), link)
        except OSError as err:
            raise ConversionError(f"copying {source} into the export failed: {err}") from None


def _carry(source: str, target: str, link: bool) -> None:
    if os.path.lexists(target):
        shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
    if link:
        os.symlink(os.path.abspath(source), target)
    elif os.path.isdir(source):
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def export_hf(checkpoint: str, out_dir: str, tokenizer_dir: Optional[str] = None, base_dir: Optional[str] = None,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype = torch.bfloat16, link: bool = False,
              dry_run: bool = False, progress: bool = True, overwrite: bool = False) -> ExportPlan:
    check_target(out_dir, overwrite, [tokenizer_dir, base_dir, checkpoint])
    plan = plan_export(checkpoint, tokenizer_dir, base_dir, max_shard_bytes, dtype)
    if not dry_run:
        write_export(plan, out_dir, link, progress)
    return plan
