"""The offline tokenization job: images -> VQ codes in an ``ImageCodeStore``, distributed with MPI.

The manifest is cut into chunks of ``shard_size`` consecutive images; chunk i becomes shard i and is
done by rank i % world_size. Shard contents therefore do not depend on the number of ranks, a finished
shard is skipped on a rerun (resume), and a killed run leaves no partial shard (atomic writes).
After a barrier rank 0 merges the index and the bad-image report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from megatron_uni.data import image_codes as store
from megatron_uni.platform.launch import launcher_ranks
from megatron_uni.vq import images as rules
from megatron_uni.errors import DataError, MegatronUniError
from megatron_uni.vq.config import VQConfig
from megatron_uni.vq.decoding import BadImage, ImageItem, Probed, make_decoder, probe
from megatron_uni.vq.encoder import SigLIPVQ, build_seeded
from megatron_uni.vq.weights import WEIGHTS_FILE, load_encoder

# Test hook: a process exits abruptly (like a killed job) after encoding this many images.
EXIT_AFTER_ENV = "MEGATRON_UNI_TOKENIZE_EXIT_AFTER"
KILLED_EXIT_CODE = 75


@dataclasses.dataclass
class JobSpec:
    inputs: List[str]
    output: str
    mode: str = "understanding"
    generation_target: Optional[int] = None
    multi_image: bool = False
    min_side: int = 32
    shard_size: int = 256
    batch_size: int = 16
    decoder: str = "auto"
    device: str = "auto"
    encoder_dir: Optional[str] = None
    tiny: bool = False
    tiny_seed: int = 0
    tiny_codes: int = 256
    key_style: str = "path"
    threads: Optional[int] = None
    progress: bool = True


# ---- communicator -----------------------------------------------------------------------------------
class SingleProcess:
    rank, size = 0, 1

    def barrier(self):
        return None

    def bcast(self, value, root=0):
        return value

    def gather(self, value, root=0):
        return [value]


_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def get_communicator():
    """MPI.COMM_WORLD under mpirun/srun; a single-process stand-in when not launched by MPI."""
    launched = any(int(os.environ.get(v, "1")) > 1 for v in _MPI_SIZE_VARS) or \
        int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as error:
        if launched:
            raise RuntimeError(f"launched with several ranks but mpi4py is unusable: {error} "
                               "(pip install mpi4py mpich)") from None
        return SingleProcess()
    return MPI.COMM_WORLD


def local_size() -> int:
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return max(1, int(os.environ[name]))
    return 1


def local_rank(comm) -> int:
    """The launcher's local rank (``platform/launch.py`` reads every launcher's variables), else the MPI rank."""
    ranks = launcher_ranks()
    return comm.rank if ranks is None else ranks.local_rank


# ---- job parameters -----------------------------------------------------------------------------------
def describe_encoder(spec: JobSpec, model: SigLIPVQ) -> dict:
    """What decides the codes besides the pixels: weights (by content), config, compute dtype."""
    cfg, dtype = model.config.to_hf_dict(), str(next(model.parameters()).dtype).replace("torch.", "")
    if spec.tiny:
        return {"kind": "tiny", "seed": spec.tiny_seed, "config": cfg, "dtype": dtype}
    return {"kind": "hf", "name": os.path.basename(os.path.normpath(spec.encoder_dir)), "config": cfg,
            "dtype": dtype}


def weights_sha256(spec: JobSpec) -> Optional[str]:
    """Content hash of the encoder weights (rank 0 only: a full read of ~2.4 GB for the real model)."""
    if spec.tiny:
        return None  # the seed and config above determine the weights
    digest = hashlib.sha256()
    with open(os.path.join(spec.encoder_dir, WEIGHTS_FILE), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def decoder_identity(decoder) -> str:
    """DALI on GPU, DALI on CPU and PIL give different pixels (alpha, resize kernels): each is its own job."""
    if decoder.name != "dali":
        return decoder.name
    return "dali-gpu" if decoder.use_gpu else "dali-cpu"


def job_meta(spec: JobSpec, items: Sequence[ImageItem], encoder: dict, decoder: str) -> dict:
    """Every setting that changes the codes; a resume with any of them different is refused."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(f"{item.key}\0{item.origin}\n".encode())
    return {"inputs_sha256": digest.hexdigest(), "num_inputs": len(items), "mode": spec.mode,
            "generation_target": spec.generation_target, "multi_image": spec.multi_image,
            "min_side": spec.min_side, "shard_size": spec.shard_size, "key_style": spec.key_style,
            "encoder": encoder, "decoder": decoder}


def claim_output(directory: str, meta: dict) -> None:
    """Write job.json, or check that an existing one describes the same job (resume).

    Runs on rank 0 before any rank writes, so temporary files left by a killed run can be removed.
    """
    shard_dir = os.path.join(directory, store.SHARD_DIR)
    if os.path.isdir(shard_dir):
        for name in os.listdir(shard_dir):
            if ".tmp." in name:
                os.remove(os.path.join(shard_dir, name))
    path = os.path.join(directory, store.JOB_FILE)
    if os.path.isfile(path):
        with open(path) as handle:
            previous = json.load(handle)
        changed = sorted(k for k in set(meta) | set(previous) if meta.get(k) != previous.get(k))
        if changed:
            detail = "; ".join(f"{k}: was {_short(previous.get(k))}, now {_short(meta.get(k))}" for k in changed)
            raise DataError(f"{directory} holds a different tokenization job (differs in {changed}: {detail}); "
                            "resume with the same settings or use a fresh output directory")
        return
    store.write_store_json(path, meta)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


# ---- encoding -----------------------------------------------------------------------------------------
def pick_device(spec: JobSpec, comm) -> torch.device:
    wants_cuda = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch sees no CUDA device")
    index = local_rank(comm) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def build_encoder(spec: JobSpec, device: torch.device) -> SigLIPVQ:
    dtype = torch.bfloat16 if device.type == "cuda" and not spec.tiny else torch.float32
    if spec.tiny:
        return build_seeded(VQConfig.tiny(spec.tiny_codes), spec.tiny_seed).to(device)
    if not spec.encoder_dir:
        raise ValueError("give --encoder IMAGE_TOKENIZER_DIR (HF image_tokenizer/ layout) or --tiny")
    return load_encoder(spec.encoder_dir, device=str(device), dtype=dtype)


def encode_arrays(model: SigLIPVQ, arrays: Sequence[np.ndarray], batch_size: int,
                  device: torch.device) -> List[np.ndarray]:
    """uint8 [h, w, 3] arrays -> code grids [h/16, w/16]; images of one size are batched together."""
    by_shape: Dict[Tuple[int, ...], List[int]] = {}
    for position, array in enumerate(arrays):
        by_shape.setdefault(array.shape, []).append(position)
    codes: List[Optional[np.ndarray]] = [None] * len(arrays)
    dtype = next(model.parameters()).dtype
    for positions in by_shape.values():
        for start in range(0, len(positions), batch_size):
            group = positions[start:start + batch_size]
            pixels = torch.stack([rules.normalize(arrays[p]) for p in group]).to(device=device, dtype=dtype)
            for position, grid in zip(group, model.encode(pixels).cpu().numpy()):
                codes[position] = grid
    return codes


class KillSwitch:
    """Counts encoded images and exits the process abruptly once the test-hook budget is spent."""

    def __init__(self):
        value = os.environ.get(EXIT_AFTER_ENV)
        self.remaining = int(value) if value else None

    def spend(self, count: int) -> None:
        if self.remaining is None:
            return
        self.remaining -= count
        if self.remaining <= 0:
            sys.stdout.flush()
            os._exit(KILLED_EXIT_CODE)


def tokenize_chunk(chunk: Sequence[ImageItem], spec: JobSpec, resolve, decoder, model, device,
                   kill: KillSwitch):
    """Probe, decode and encode one chunk; returns (entries, bad records) in manifest order."""
    outcomes: List[Union[Probed, BadImage, np.ndarray]] = [probe(item, resolve, spec.min_side) for item in chunk]
    good = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, Probed)]
    for start in range(0, len(good), spec.batch_size):
        batch = good[start:start + spec.batch_size]
        decoded = decoder.decode([outcomes[i] for i in batch])
        pixels = [(i, d) for i, d in zip(batch, decoded) if not isinstance(d, BadImage)]
        for i, d in zip(batch, decoded):
            if isinstance(d, BadImage):
                outcomes[i] = d
        grids = encode_arrays(model, [d for _, d in pixels], spec.batch_size, device)
        for (i, _), grid in zip(pixels, grids):
            outcomes[i] = grid
        kill.spend(len(pixels))
    entries = [(item.key, int(o.shape[0]), int(o.shape[1]), o) for item, o in zip(chunk, outcomes)
               if isinstance(o, np.ndarray)]
    bad = [o.record() for o in outcomes if isinstance(o, BadImage)]
    return entries, bad


def make_resolver(spec: JobSpec):
    rules.target_size(spec.mode, 512, 512, spec.generation_target, spec.multi_image)  # fail fast on bad options
    return lambda height, width: rules.target_size(spec.mode, height, width, spec.generation_target,
                                                   spec.multi_image)


# ---- driver -------------------------------------------------------------------------------------------
def run_job(spec: JobSpec, comm=None) -> dict:
    comm = comm or get_communicator()
    # Ranks on one node share its cores; oversubscribed torch threads slow everyone down.
    torch.set_num_threads(spec.threads or max(1, (os.cpu_count() or 1) // local_size()))
    items = read_items(spec)
    chunks = [items[i:i + spec.shard_size] for i in range(0, len(items), spec.shard_size)]
    resolve = make_resolver(spec)
    device = pick_device(spec, comm)
    model = build_encoder(spec, device)
    decoder = make_decoder(spec.decoder, spec.batch_size, device.type == "cuda",
                           device_id=device.index or 0)
    meta = job_meta(spec, items, describe_encoder(spec, model), decoder_identity(decoder))
    meta = _on_rank0_then_share(comm, lambda: _claim(spec, meta))

    mine = [i for i in range(len(chunks)) if i % comm.size == comm.rank]
    pending = [i for i in mine if not os.path.isfile(store.shard_path(spec.output, i))]
    counts = _process(pending, chunks, spec, resolve, decoder, model, device, comm)
    counts.update(rank=comm.rank, shards_skipped=len(mine) - len(pending), decoder=decoder.name)
    every_rank = comm.gather(counts, root=0)  # also the barrier: all shards are written after it
    summary = _on_rank0_then_share(comm, lambda: _finish(spec.output, len(chunks), meta))
    return {**summary, "this_rank": comm.rank, "ranks": every_rank if comm.rank == 0 else [counts]}


def _claim(spec: JobSpec, meta: dict) -> dict:
    meta = {**meta, "encoder": {**meta["encoder"], "weights_sha256": weights_sha256(spec)}}
    claim_output(spec.output, meta)
    return meta


def read_items(spec: JobSpec) -> List[ImageItem]:
    from megatron_uni.vq.manifest import read_inputs

    if spec.shard_size < 1 or spec.batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {spec.shard_size}, {spec.batch_size}")
    return read_inputs(spec.inputs, spec.key_style)


def _process(pending, chunks, spec, resolve, decoder, model, device, comm) -> dict:
    from tqdm import tqdm

    kill = KillSwitch()
    total = sum(len(chunks[i]) for i in pending)
    started, encoded, bad_count = time.time(), 0, 0
    with tqdm(total=total, unit="img", desc=f"rank {comm.rank}", position=comm.rank,
              disable=not spec.progress or comm.rank != 0, dynamic_ncols=True) as bar:
        for index in pending:
            entries, bad = tokenize_chunk(chunks[index], spec, resolve, decoder, model, device, kill)
            store.write_shard(store.shard_path(spec.output, index), entries, bad)
            encoded, bad_count = encoded + len(entries), bad_count + len(bad)
            bar.update(len(chunks[index]))
    elapsed = max(time.time() - started, 1e-9)
    return {"shards_written": len(pending), "images_encoded": encoded, "images_bad": bad_count,
            "images_per_s": encoded / elapsed}


def _finish(directory: str, num_shards: int, meta: dict) -> dict:
    missing = [store.shard_name(i) for i in range(num_shards) if not os.path.isfile(store.shard_path(directory, i))]
    if missing:
        raise RuntimeError(f"{directory}: shard(s) {missing[:5]} missing after all ranks finished")
    index = store.merge_index(directory, range(num_shards), meta)
    with open(os.path.join(directory, store.REPORT_FILE)) as handle:
        report = json.load(handle)
    return {"num_images": index["num_images"], "num_shards": num_shards, "num_bad": report["num_bad"],
            "bad_counts": report["counts"]}


def _on_rank0_then_share(comm, action):
    """Run ``action`` on rank 0 and give every rank its result, or raise its error on every rank."""
    outcome = None
    if comm.rank == 0:
        try:
            outcome = ("ok", action())
        except MegatronUniError as error:  # bad input: one line on every rank
            outcome = ("refused", str(error))
        except Exception as error:  # re-raised below on all ranks so none waits forever
            outcome = ("error", f"{type(error).__name__}: {error}")
    outcome = comm.bcast(outcome, root=0)
    if outcome[0] == "refused":
        raise DataError(outcome[1])
    if outcome[0] == "error":
        raise RuntimeError(outcome[1])
    return outcome[1]
