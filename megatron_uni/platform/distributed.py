"""Process-group and model-parallel setup for every launcher (torchrun, Slurm, MPI, tests).

gloo on CPU, NCCL on GPU. The CPU patches are applied here, before megatron-core builds anything.
"""

from __future__ import annotations

import datetime
import os
import random
import uuid
from typing import Optional

import numpy as np
import torch

from megatron_uni.config import ParallelConfig
from megatron_uni.platform.cpu import apply_cpu_patches
from megatron_uni.platform.launch import LaunchInfo, detect_launch


def file_rendezvous(directory: str) -> str:
    """``init_method`` for ranks of one machine: a new FileStore file in ``directory``.

    Nothing is chosen before the ranks start, so nothing can be taken meanwhile -- unlike a free
    port picked by the parent and handed to spawned ranks, which another process may bind first.
    """
    return "file://" + os.path.join(os.path.abspath(directory), f"rendezvous-{uuid.uuid4().hex}")


def seed_everything(seed: int) -> None:
    """Python, numpy and torch seeds plus megatron's per-TP/EP-rank RNG tracker."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def init_process_group(launch: LaunchInfo, init_method: Optional[str] = None, timeout_minutes: int = 30) -> None:
    if torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    if init_method is None and launch.world_size == 1:
        # one process needs no rendezvous: an in-memory store binds no port, so concurrent
        # single-process runs on one machine cannot collide on MASTER_PORT
        rendezvous = {"store": torch.distributed.HashStore()}
    else:
        rendezvous = {"init_method": init_method or f"tcp://{launch.master_addr}:{launch.master_port}"}
    torch.distributed.init_process_group(
        backend=launch.backend, rank=launch.rank, world_size=launch.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes), **rendezvous,
    )


def init_model_parallel(parallel: ParallelConfig, seed: int = 1234) -> None:
    """Create megatron-core's TP/PP/CP/EP/DP groups on an initialised process group."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(**parallel.megatron_kwargs())
    seed_everything(seed)


def init_distributed(parallel: ParallelConfig, seed: int = 1234, launch: Optional[LaunchInfo] = None,
                     init_method: Optional[str] = None) -> LaunchInfo:
    """Apply CPU patches, join the job's process group and build the parallel groups."""
    apply_cpu_patches()
    launch = launch or detect_launch()
    init_process_group(launch, init_method)
    init_model_parallel(parallel, seed)
    return launch


def init_single_process(parallel: Optional[ParallelConfig] = None, seed: int = 1234) -> LaunchInfo:
    """World size 1 (an in-memory store, no port): tests, ``info`` and single-process tools."""
    launch = LaunchInfo(rank=0, world_size=1, local_rank=0, launcher="single")
    return init_distributed(parallel or ParallelConfig(), seed=seed, launch=launch)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
