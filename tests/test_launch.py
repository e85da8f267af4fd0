"""Launch detection: rank, world size, local rank and launcher from torchrun, Slurm, Open MPI and
MPICH environments, their precedence, and a rank outside the world rejected."""

import os
import subprocess
import sys

import pytest

from megatron_uni.platform.launch import detect_launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node7", "MASTER_PORT": "29611"}
SLURM = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2", "MASTER_ADDR": "node3"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "12", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}
MPICH = {"PMI_RANK": "9", "PMI_SIZE": "10", "MPI_LOCALRANKID": "1"}


def _where(info):
    return info.rank, info.world_size, info.local_rank, info.launcher


@pytest.mark.parametrize("env, expected", [
    (TORCHRUN, (3, 8, 1, "torchrun")),
    (SLURM, (5, 16, 2, "slurm")),
    (OPEN_MPI, (6, 12, 2, "mpi")),
    (MPICH, (9, 10, 1, "mpi")),
    ({}, (0, 1, 0, "single")),
])
def test_each_launcher_gives_rank_world_and_local_rank(env, expected):
    assert _where(detect_launch(env)) == expected


def test_torchrun_master_address_and_port_are_read():
    info = detect_launch(TORCHRUN)
    assert (info.master_addr, info.master_port) == ("node7", 29611)


def test_cpu_backend_is_gloo():
    import torch

    if torch.cuda.is_available():
        pytest.skip("GPU machine: the backend is NCCL there")
    assert detect_launch(TORCHRUN).backend == "gloo"


@pytest.mark.parametrize("env, expected", [
    ({**SLURM, **TORCHRUN}, (3, 8, 1, "torchrun")),   # torchrun started by srun: torchrun's ranks win
    ({**OPEN_MPI, **SLURM}, (5, 16, 2, "slurm")),      # srun --mpi: Slurm's ranks win over MPI's
    ({**MPICH, **OPEN_MPI}, (6, 12, 2, "mpi")),        # Open MPI's variables before MPICH's
])
def test_precedence_torchrun_then_slurm_then_mpi(env, expected):
    assert _where(detect_launch(env)) == expected


@pytest.mark.parametrize("env, key", [
    ({"RANK": "8", "WORLD_SIZE": "8"}, "RANK=8"),
    ({"SLURM_PROCID": "-1", "SLURM_NTASKS": "4"}, "SLURM_PROCID=-1"),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK=2"),
    ({"PMI_RANK": "0", "PMI_SIZE": "0"}, "PMI_RANK=0"),
])
def test_rank_outside_world_is_rejected_naming_the_variable(env, key):
    with pytest.raises(ValueError, match=key) as err:
        detect_launch(env)
    assert "\n" not in str(err.value)


def test_missing_local_rank_defaults_to_global_rank():
    assert detect_launch({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}).local_rank == 3


def test_slurm_master_is_the_first_host_of_the_nodelist(tmp_path, monkeypatch):
    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[017-018]' ] && printf 'gpu017\\ngpu018\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[017-018]"}
    assert detect_launch(env).master_addr == "gpu017"


def test_real_mpich_launch_is_detected():
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if not os.path.exists(mpiexec):
        pytest.skip("mpich's mpiexec is not installed (extra [mpi])")
    code = ("from megatron_uni.platform.launch import detect_launch; i = detect_launch(); "
            "print(i.rank, i.world_size, i.local_rank, i.launcher)")
    out = subprocess.run([mpiexec, "-n", "2", sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == ["0 2 0 mpi", "1 2 1 mpi"]


def test_vq_job_local_rank_reads_the_same_launcher_table(monkeypatch):
    from types import SimpleNamespace

    from megatron_uni.platform import launch
    from megatron_uni.vq.job import local_rank

    for _, *keys in launch._SOURCES:
        for key in keys:
            monkeypatch.delenv(key, raising=False)
    comm = SimpleNamespace(rank=5)
    assert local_rank(comm) == 5  # bare mpi4py without launcher variables: the MPI rank
    for key, value in {**SLURM, "PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0"}.items():
        monkeypatch.setenv(key, value)
    assert local_rank(comm) == 2  # srun over MPI: Slurm's entry wins, as in detect_launch
