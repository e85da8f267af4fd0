"""Process-group and model-parallel setup for every launcher (torchrun, Slurm, MPI, tests).

gloo on CPU, NCCL on GPU. The CPU patches are applied here, before megatron-core builds anything.
"""

from __future__ import annotations

import datetime
import random
import socket
from typing import Optional

import numpy as np
import torch

from megatron_uni.config import ParallelConfig
from megatron_uni.platform.cpu import apply_cpu_patches
from megatron_uni.platform.launch import LaunchInfo, detect_launch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    init_method = init_method or f"tcp://{launch.master_addr}:{launch.master_port}"
    torch.distributed.init_process_group(
        backend=launch.backend, rank=launch.rank, world_size=launch.world_size,
        init_method=init_method, timeout=datetime.timedelta(minutes=timeout_minutes),
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
    """World size 1 on a free local port: tests, ``info`` and single-process tools."""
    launch = LaunchInfo(rank=0, world_size=1, local_rank=0, launcher="single", master_port=free_port())
    return init_distributed(parallel or ParallelConfig(), seed=seed, launch=launch)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
