"""A real two-node Slurm cluster on localhost for the tests (not a mock).

Two ``slurmd`` daemons (nodes ``n1``, ``n2``, ``NodeAddr=127.0.0.1``, ports of their own) and one
``slurmctld``, with ``AuthType=auth/none`` / ``CredType=cred/none`` (no munge),
``SlurmdParameters=config_overrides`` (nodes claim 64 CPUs and 8 GPUs each, so GPU-shaped
``#SBATCH`` lines schedule unchanged) and fake GPUs: gres ``File=`` entries are symlinks to
/dev/null. Everything lives under one directory and is reached through ``SLURM_CONF``, so
/etc/slurm stays untouched; :meth:`stop` kills exactly the daemons :meth:`start` launched, by pid.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")


def slurm_available() -> Optional[str]:
    """None when every binary is on PATH, else the name of the first one missing."""
    for name in DAEMONS:
        if shutil.which(name) is None:
            return name
    return None


def _free_ports(count: int) -> List[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


# Slurm holds a requeued job for the job-credential lifetime (120 s by default) and refuses to
# start it earlier ("Job credential revoked": a released hold fails the job, measured); 10 s here.
CRED_EXPIRE_S = 10


def _config(root: str, host: str, nodes: int, gpus: int, ctld_port: int, node_ports: List[int],
            cred_expire: int = CRED_EXPIRE_S) -> str:
    names = ",".join(f"n{i + 1}" for i in range(nodes))
    node_lines = "\n".join(
        f"NodeName=n{i + 1} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=64 RealMemory=512000 "
        f"Gres=gpu:{gpus} State=UNKNOWN" for i, port in enumerate(node_ports))
    return f"""ClusterName=ci
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
AuthInfo=cred_expire={cred_expire}
MailProg=/bin/true
GresTypes=gpu
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
"""


class LocalSlurmCluster:
    def __init__(self, root: str, nodes: int = 2, gpus: int = 8) -> None:
        self.root, self.nodes, self.gpus = root, nodes, gpus
        self.conf = os.path.join(root, "slurm.conf")
        self.pids: Dict[str, int] = {}

    @property
    def env(self) -> Dict[str, str]:
        """The caller's environment pointed at this cluster (jobs inherit it: sbatch --export=ALL)."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def start(self, timeout: float = 30.0) -> "LocalSlurmCluster":
        for sub in ("state", "log", "dev"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        for i in range(self.gpus):
            link = os.path.join(self.root, "dev", f"gpu{i}")
            if not os.path.islink(link):
                os.symlink("/dev/null", link)
        host = socket.gethostname().split(".")[0]
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        with open(self.conf, "w") as f:
            f.write(_config(self.root, host, self.nodes, self.gpus, ctld_port, node_ports))
        with open(os.path.join(self.root, "gres.conf"), "w") as f:
            f.write(f"NodeName=n[1-{self.nodes}] Name=gpu File={self.root}/dev/gpu[0-{self.gpus - 1}]\n")
        # -i: ignore any saved state; both daemons fork and write their pid files
        self._daemon("slurmctld", ["slurmctld", "-i"], os.path.join(self.root, "slurmctld.pid"))
        for i in range(self.nodes):
            name = f"n{i + 1}"
            self._daemon(f"slurmd-{name}", ["slurmd", "-N", name], os.path.join(self.root, f"slurmd-{name}.pid"))
        self._wait_idle(timeout)
        return self

    def _daemon(self, name: str, argv: List[str], pid_file: str) -> None:
        subprocess.run(argv, env=self.env, check=True, timeout=30)
        deadline = time.time() + 10
        while not os.path.isfile(pid_file) or not open(pid_file).read().strip():
            if time.time() > deadline:
                raise RuntimeError(f"{name} wrote no pid file {pid_file}; see {self.root}/log")
            time.sleep(0.05)
        self.pids[name] = int(open(pid_file).read().strip())

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], check=False).stdout.strip()
            if out == str(self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"cluster not idle after {timeout} s; see {self.root}/log")

    def stop(self) -> None:
        """Kill the daemons this object started (and only those), by pid."""
        for name, pid in self.pids.items():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for pid in self.pids.values():
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()

    # ------------------------------------------------------------------ client helpers
    def run(self, argv: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        done = subprocess.run(argv, env=kwargs.pop("env", self.env), capture_output=True, text=True,
                              timeout=kwargs.pop("timeout", 60), **kwargs)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Reason, Restarts, StartTime ...)."""
        out = self.run(["scontrol", "-o", "show", "job", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                        "OUT_OF_MEMORY"), timeout: float = 600.0) -> Dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} ({info.get('Reason')}) "
                                   f"after {timeout} s")
            time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a killed daemon may linger as a zombie of init: count it as gone
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
