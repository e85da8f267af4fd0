"""Where am I in the job? Rank, world size and local rank from torchrun, Slurm or MPI.

Order of precedence: torchrun's variables (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), then Slurm's
(``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, one task per GPU under ``srun``), then MPI's
(Open MPI ``OMPI_COMM_WORLD_*``, MPICH/Hydra ``PMI_*``/``MPI_LOCALRANKID``). A bare ``python`` is
rank 0 of 1.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Mapping, NamedTuple, Optional


@dataclasses.dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "mpi" | "single"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def backend(self) -> str:
        import torch

        return "nccl" if torch.cuda.is_available() else "gloo"


_SOURCES = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ("mpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("mpi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
)


def _first_slurm_host(env: Mapping[str, str]) -> Optional[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


class LauncherRanks(NamedTuple):
    launcher: str
    rank: int
    world_size: int
    local_rank: int


def launcher_ranks(env: Optional[Mapping[str, str]] = None) -> Optional[LauncherRanks]:
    """Ranks from the first launcher of :data:`_SOURCES` whose variables are set; None under a bare
    ``python``. No rendezvous address: jobs that only pick a device (``vq/job.py``) stop here."""
    env = os.environ if env is None else env
    for launcher, rank_key, world_key, local_key in _SOURCES:
        if rank_key in env and world_key in env:
            rank, world = int(env[rank_key]), int(env[world_key])
            if not 0 <= rank < world:
                raise ValueError(f"{launcher}: {rank_key}={rank} is outside {world_key}={world}")
            return LauncherRanks(launcher, rank, world, int(env.get(local_key, rank)))
    return None


def detect_launch(env: Optional[Mapping[str, str]] = None) -> LaunchInfo:
    """Read the launcher's environment. Pure function of ``env`` (default ``os.environ``)."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", 29500))
    ranks = launcher_ranks(env)
    if ranks is None:
        return LaunchInfo(rank=0, world_size=1, local_rank=0, launcher="single",
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=port)
    addr = env.get("MASTER_ADDR")
    if addr is None and ranks.launcher == "slurm":
        addr = _first_slurm_host(env)
    return LaunchInfo(rank=ranks.rank, world_size=ranks.world_size, local_rank=ranks.local_rank,
                      launcher=ranks.launcher, master_addr=addr or "127.0.0.1", master_port=port)
