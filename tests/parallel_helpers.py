"""Run the tiny model under one parallel layout and write what the equivalence tests compare.

A single-process reference (world 1, TP1) saves the weights once as a torch_dist checkpoint; every
layout loads that checkpoint (resharded on load), runs the same BDLM micro-batches through
megatron's forward-backward schedule with DDP-wrapped chunks and ``finalize_model_grads``, and
writes, under ``OUT/<layout>/``:

- ``rank<r>.pt``: ``{"logits": {micro-batch index: [b, S, vocab]}, "loss": float}``; logits are
  gathered over TP and only written by ranks of the last pipeline stage with TP rank 0;
- ``grads.pt``: every parameter gradient as a full tensor keyed by the checkpoint's global sharded
  key. The gradients are written *through dist_checkpointing*: each rank's sharded state dict with
  every parameter swapped for its gradient is saved and read back whole, so TP shards, pipeline
  stages, virtual chunks and expert-parallel experts land in the same full tensors as the weights.
  Buffers (the router's expert bias, updated by ``finalize_model_grads``) keep their values;
- ``params_before.pt`` / ``params.pt`` (layouts with ``optimizer_step``): the full parameters
  before and after one optimizer step.

Layouts sharing a world size run one after the other in the same spawned processes (imports cost
~5 s per child); a failure in any child raises in the parent.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Sequence, Tuple

import torch
import torch.multiprocessing as mp

RECIPE = "recipes/model/tiny.yaml"
BLOCK_SIZE = 8
SEQ_LENGTH = 32            # clean tokens per row; the BDLM row [noisy | clean] holds 2x
MICRO_BATCH_SIZE = 2
NUM_MICROBATCHES = 4       # global batch = 4 micro-batches, split over data-parallel ranks

# Model variants. MoE layers refuse TP without sequence parallelism in training (megatron-core
# MoELayer.forward), so plain TP2 runs the same family with every layer dense.
VARIANTS: Dict[str, Tuple[str, ...]] = {
    "moe": (),
    "dense": ("model.first_k_dense=4",),
}
# One optimizer step is compared for the distributed optimizer; the same settings on both sides.
OPTIMIZER_OVERRIDES = ("optimizer.lr=1.0e-3", "optimizer.clip_grad=1.0", "optimizer.weight_decay=0.1")


@dataclasses.dataclass(frozen=True)
class Layout:
    world: int
    overrides: Tuple[str, ...]          # dotted recipe keys on top of RECIPE (and the variant)
    variant: str = "moe"
    optimizer_step: bool = False
    # Negative control: force batched p2p on interleaved PP=2 over gloo, the silent-gradient trap
    # that model/transformer_config.py avoids (results expected to DIFFER from the reference).
    batched_p2p: bool = False


REFERENCES: Dict[str, Layout] = {
    "reference_moe": Layout(1, (), "moe", optimizer_step=True),
    "reference_dense": Layout(1, (), "dense"),
}

LAYOUTS: Dict[str, Layout] = {
    "tp2": Layout(2, ("parallel.tensor=2",), "dense"),
    # expert_tensor=2 (= TP, megatron's own default): with EP=1 megatron-core treats expert weights
    # as dense and all-reduces their grads over DP only, so ETP=1 < TP would leave each TP rank's
    # expert grads partial (its own sequence-parallel tokens only): measured up to 12% off.
    "tp2_sp": Layout(2, ("parallel.tensor=2", "parallel.expert_tensor=2", "parallel.sequence_parallel=true")),
    "pp2": Layout(2, ("parallel.pipeline=2",)),
    "pp2_vpp2": Layout(2, ("parallel.pipeline=2", "parallel.virtual_pipeline=2")),
    "dp2_distopt": Layout(2, ("parallel.distributed_optimizer=true",), optimizer_step=True),
    "ep2": Layout(2, ("parallel.expert=2",)),
    "pp2_vpp2_batched_p2p": Layout(2, ("parallel.pipeline=2", "parallel.virtual_pipeline=2"), batched_p2p=True),
    "ep4": Layout(4, ("parallel.expert=4",)),
    "tp2_ep2_sp": Layout(4, ("parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1",
                             "parallel.sequence_parallel=true")),
    "pp2_ep2": Layout(4, ("parallel.pipeline=2", "parallel.expert=2")),
}


def reference_of(layout: Layout) -> str:
    return f"reference_{layout.variant}"


def checkpoint_dir(out_dir: str, variant: str) -> str:
    return os.path.join(out_dir, f"weights_{variant}")


# ----------------------------------------------------------------------------------------------
# spawning
# ----------------------------------------------------------------------------------------------
def spawn(out_dir: str, names: Sequence[str], world: int) -> None:
    """Run the named layouts (all of world size ``world``) in ``world`` gloo processes."""
    from megatron_uni.platform.distributed import file_rendezvous

    mp.start_processes(_worker, args=(world, file_rendezvous(out_dir), out_dir, list(names)), nprocs=world,
                       start_method="spawn")


def _worker(rank: int, world: int, init_method: str, out_dir: str, names: List[str]) -> None:
    from megatron_uni.config import ParallelConfig
    from megatron_uni.platform.distributed import destroy, init_distributed
    from megatron_uni.platform.launch import LaunchInfo

    torch.set_num_threads(1)
    launch = LaunchInfo(rank=rank, world_size=world, local_rank=rank, launcher="single")
    init_distributed(ParallelConfig(), launch=launch, init_method=init_method)
    try:
        for name in names:
            layout = REFERENCES.get(name) or LAYOUTS[name]
            if name in REFERENCES:
                _save_reference_weights(out_dir, layout)
            _run_layout(out_dir, name, layout, rank)
    finally:
        destroy()


# ----------------------------------------------------------------------------------------------
# one layout
# ----------------------------------------------------------------------------------------------
def _config(layout: Layout):
    from megatron_uni.config import load_config

    return load_config(RECIPE, VARIANTS[layout.variant] + OPTIMIZER_OVERRIDES + layout.overrides)


def _build_chunks(cfg):
    from megatron_uni.model.block_attention import block_attention_spec
    from megatron_uni.model.builder import build_model_chunks
    from megatron_uni.platform.distributed import init_model_parallel

    init_model_parallel(cfg.parallel)
    return build_model_chunks(cfg.model, cfg.parallel, block_attention_spec())


def _save_reference_weights(out_dir: str, layout: Layout) -> None:
    """Fresh random weights of the single-process model, saved once for every layout to load."""
    from megatron_uni.checkpoint import save_checkpoint
    from diffusion_helpers import tiny_vocab

    cfg = _config(layout)
    chunks = _build_chunks(cfg)
    save_checkpoint(checkpoint_dir(out_dir, layout.variant), 1, chunks, cfg.model, tiny_vocab().layout(),
                    cfg.parallel)


def _run_layout(out_dir: str, name: str, layout: Layout, rank: int) -> None:
    from megatron.core import parallel_state

    from megatron_uni.training.optim import build_optimizer

    cfg = _config(layout)
    chunks = _loaded_ddp_chunks(cfg, layout, out_dir)
    optimizer = build_optimizer(cfg, chunks) if layout.optimizer_step else None
    indices = local_microbatch_indices(parallel_state.get_data_parallel_rank(),
                                       parallel_state.get_data_parallel_world_size())
    inputs = [microbatch(i, cfg.diffusion.weighting) for i in indices]

    layout_dir = os.path.join(out_dir, name)
    os.makedirs(layout_dir, exist_ok=True)
    result = {"logits": forward_logits(chunks, indices, inputs),
              "loss": train_pass(chunks, inputs, cfg.diffusion.weighting)}
    if cfg.parallel.distributed_optimizer:
        gather_distributed_grads(chunks)
    result["shard_error"] = {"grads": save_full_tensors(grads_sharded_state_dict(chunks),
                                                         os.path.join(layout_dir, "grads"), rank)}
    if optimizer is not None:
        result.update(_optimizer_step(chunks, optimizer, layout_dir, rank))
    torch.save(result, os.path.join(layout_dir, f"rank{rank}.pt"))


def _loaded_ddp_chunks(cfg, layout: Layout, out_dir: str):
    """This rank's chunks with the reference weights (resharded on load), wrapped as in training."""
    from megatron_uni.checkpoint import load_checkpoint
    from megatron_uni.training.loop import wrap_ddp

    chunks = _build_chunks(cfg)
    if layout.batched_p2p:
        for chunk in chunks:
            chunk.config.batch_p2p_comm, chunk.config.overlap_p2p_comm = True, False
    load_checkpoint(checkpoint_dir(out_dir, layout.variant), chunks, cfg.model)
    return wrap_ddp(cfg, chunks)


def _optimizer_step(chunks, optimizer, layout_dir: str, rank: int) -> dict:
    """One step on the gradients of the training pass; full parameters saved before and after."""
    from megatron_uni.checkpoint import model_sharded_state_dict
    from megatron_uni.platform.cpu import cpu_optimizer_scope

    before = save_full_tensors(model_sharded_state_dict(chunks), os.path.join(layout_dir, "params_before"), rank)
    with cpu_optimizer_scope():
        update_ok, grad_norm, _ = optimizer.step()
    after = save_full_tensors(model_sharded_state_dict(chunks), os.path.join(layout_dir, "params"), rank)
    return {"update_ok": bool(update_ok), "grad_norm": float(grad_norm),
            "params_shard_error": {"params_before": before, "params": after}}


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def local_microbatch_indices(dp_rank: int, dp_size: int) -> List[int]:
    """This data-parallel rank's micro-batches, as the training sampler assigns them: index g
    holds global rows ``[g * MICRO_BATCH_SIZE, (g + 1) * MICRO_BATCH_SIZE)`` of iteration 0."""
    from megatron_uni.data.sampler import microbatch_plan

    per_rank = NUM_MICROBATCHES // dp_size
    return [microbatch_plan(0, k, dp_rank, dp_size, MICRO_BATCH_SIZE, NUM_MICROBATCHES * MICRO_BATCH_SIZE)[0]
            // MICRO_BATCH_SIZE for k in range(per_rank)]


def microbatch(index: int, weighting: str):
    """Micro-batch ``index`` of the fixed global batch: identical in every process."""
    from megatron_uni.config import DiffusionConfig
    from megatron_uni.diffusion.inputs import build_inputs
    from megatron_uni.diffusion.noising import RowKeys
    from diffusion_helpers import random_batch, tiny_vocab

    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(1000 + index), MICRO_BATCH_SIZE, SEQ_LENGTH,
                         BLOCK_SIZE, vocab)
    first = index * MICRO_BATCH_SIZE  # noise keyed by global row, as in training
    keys = RowKeys(seed=2000, rows=tuple(range(first, first + MICRO_BATCH_SIZE)),
                   global_batch_size=NUM_MICROBATCHES * MICRO_BATCH_SIZE)
    return build_inputs(batch, vocab, DiffusionConfig(weighting=weighting), block_size=BLOCK_SIZE, keys=keys)


def _iterators(chunks, items) -> list:
    """One iterator per model chunk: every (virtual) stage reads the same micro-batches."""
    items = list(items)
    iterators = [iter(items) for _ in chunks]
    return iterators if len(iterators) > 1 else iterators[0]


# ----------------------------------------------------------------------------------------------
# passes
# ----------------------------------------------------------------------------------------------
def _schedule(chunks, step, iterators, num_microbatches: int, forward_only: bool, collect: bool = False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iterators, model=chunks, num_microbatches=num_microbatches,
        seq_length=2 * SEQ_LENGTH, micro_batch_size=MICRO_BATCH_SIZE, forward_only=forward_only,
        collect_non_loss_data=collect)


def forward_logits(chunks, indices: Sequence[int], inputs) -> Dict[int, torch.Tensor]:
    """Forward-only schedule; logits gathered over TP, kept on (last stage, TP rank 0)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    def step(data_iterator, model):
        index, x = next(data_iterator)
        output = model(x.input_ids, x.position_ids, x.attention_mask)

        def collect(output_tensor, non_loss_data=False):
            return index, gather_from_tensor_model_parallel_region(output_tensor)

        return output, collect

    # no_grad: the router counts tokens for the expert-bias update only when grad is enabled
    with torch.no_grad():
        collected = _schedule(chunks, step, _iterators(chunks, zip(indices, inputs)), len(inputs),
                              forward_only=True, collect=True)
    keep = parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0
    return {index: logits.detach().clone() for index, logits in collected} if keep else {}


def train_pass(chunks, inputs, weighting: str) -> float:
    """Forward-backward with the training step; returns the global loss (same on every rank)."""
    from megatron_uni.training.loop import step_losses
    from megatron_uni.training.step import make_forward_step

    for chunk in chunks:
        chunk.zero_grad_buffer()
    reports = _schedule(chunks, make_forward_step(weighting), _iterators(chunks, inputs), len(inputs),
                        forward_only=False)
    return step_losses(reports).loss


# ----------------------------------------------------------------------------------------------
# gradients as full tensors
# ----------------------------------------------------------------------------------------------
def gather_distributed_grads(chunks) -> None:
    """With the distributed optimizer each DP rank holds only its shard of the reduce-scattered grad
    buffer; all-gather the shards so every ``main_grad`` is whole again (the optimizer reads only
    its own shard, which this leaves unchanged)."""
    from megatron.core.distributed.param_and_grad_buffer import shard_buffer

    for chunk in chunks:
        for group in list(chunk.bucket_groups) + list(chunk.expert_parallel_bucket_groups):
            size = group.intra_distributed_optimizer_instance_size
            rank = group.intra_distributed_optimizer_instance_rank
            for bucket in group.buckets:
                shards = shard_buffer(bucket.grad_data, size)
                gathered = [torch.empty_like(shard) for shard in shards]
                torch.distributed.all_gather(gathered, shards[rank].clone(),
                                             group=group.intra_distributed_optimizer_instance_group)
                for shard, whole in zip(shards, gathered):
                    shard.copy_(whole)


def grads_sharded_state_dict(chunks) -> dict:
    """The model's sharded state dict with every parameter replaced by its (DDP main) gradient.

    Extra-state objects are dropped; buffers (expert bias) keep their values.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_uni.checkpoint import model_sharded_state_dict

    def swap(state: dict) -> dict:
        swapped = {}
        for key, value in state.items():
            if isinstance(value, dict):
                swapped[key] = swap(value)
            elif isinstance(value, (ShardedTensor, ShardedTensorFactory)):
                if isinstance(value.data, torch.nn.Parameter):
                    if getattr(value.data, "main_grad", None) is None:
                        raise RuntimeError(f"parameter {value.key} has no main_grad: is the chunk DDP-wrapped?")
                    value.data = value.data.main_grad
                swapped[key] = value
        return swapped

    return swap(model_sharded_state_dict(chunks))


def save_full_tensors(sharded: dict, directory: str, rank: int) -> float:
    """Save a sharded state dict collectively, read it back whole, write ``<directory>.pt`` on rank 0.

    The checkpoint keeps one replica of each shard; returns how far *this* rank's shards (replicas
    included) are from the assembled tensors, so a rank whose copy went wrong is not hidden.
    """
    from megatron.core import dist_checkpointing

    if rank == 0:
        os.makedirs(directory)
    torch.distributed.barrier()
    dist_checkpointing.save(sharded, directory)
    torch.distributed.barrier()
    full = dist_checkpointing.load_plain_tensors(directory)
    if rank == 0:
        torch.save({key: value.detach().clone() for key, value in full.items()}, directory + ".pt")
    torch.distributed.barrier()
    return local_shard_error(sharded, full)


def local_shard_error(sharded: dict, full: Dict[str, torch.Tensor]) -> float:
    """Largest difference between a local shard and its region of the full tensor, relative to the
    full tensor's largest magnitude."""
    worst = 0.0
    for item in _sharded_tensors(sharded):
        whole = full[item.key]
        # global_offset also covers the axes prepended for stacked layers/experts (one index each)
        sizes = (1,) * (len(item.global_offset) - len(item.local_shape)) + tuple(item.local_shape)
        region = whole[tuple(slice(o, o + n) for o, n in zip(item.global_offset, sizes))]
        diff = (region.reshape(item.data.shape) - item.data.detach()).abs().max().item()
        scale = whole.abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _sharded_tensors(value):
    """Every ShardedTensor under ``value`` (dicts, lists, factories such as the SwiGLU fc1 halves)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    if isinstance(value, dict):
        for item in value.values():
            yield from _sharded_tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _sharded_tensors(item)
    elif isinstance(value, ShardedTensorFactory):
        yield from _sharded_tensors(value.build())
    elif isinstance(value, ShardedTensor):
        yield value


# ----------------------------------------------------------------------------------------------
# reading results (test process: torch only)
# ----------------------------------------------------------------------------------------------
def read_layout(out_dir: str, name: str, world: int) -> dict:
    """Logits of all micro-batches merged over ranks, the loss of rank 0, and the full tensors."""
    layout_dir = os.path.join(out_dir, name)
    ranks = [torch.load(os.path.join(layout_dir, f"rank{r}.pt")) for r in range(world)]
    logits: Dict[int, torch.Tensor] = {}
    for result in ranks:
        for index, value in result["logits"].items():
            if index in logits:
                raise AssertionError(f"{name}: micro-batch {index} has logits from two ranks")
            logits[index] = value
    merged = {"logits": logits, "losses": [r["loss"] for r in ranks], "ranks": ranks,
              "grads": torch.load(os.path.join(layout_dir, "grads.pt"))}
    for state in ("params", "params_before"):
        if os.path.exists(os.path.join(layout_dir, f"{state}.pt")):
            merged[state] = torch.load(os.path.join(layout_dir, f"{state}.pt"))
    return merged
