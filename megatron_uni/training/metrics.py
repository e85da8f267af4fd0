"""Per-step training metrics: console line, ``RUN_DIR/metrics.jsonl`` (and TensorBoard if installed).

One JSON object per logged step (keys documented in docs/training.md): the total loss, the
unweighted masked-token CE (comparable across weightings), text / image / special-token losses
(special: every target that is neither text nor image, e.g. the block-padding ``<|endoftext|>``),
grad norm, lr, throughput (``clean_tokens_per_s``: the L loss-bearing positions of each sequence;
``computed_tokens_per_s``: the 2L positions of the ``[noisy | clean]`` row the model computes),
model TFLOP/s per device and MFU from :func:`flops_per_sequence`, peak memory, skipped steps, and
the per-MoE-layer expert load from :mod:`megatron_uni.training.expert_balance`.

FLOP formula (one training sequence of L clean tokens, block size B, n = L / B blocks; the
``[noisy | clean]`` row of 2L positions; one document per row)::

    F = 3 * ( 2 * N_active_matmul * 2L  +  4 * num_layers * num_heads * head_dim * n(n + 1) * B^2 )

- ``N_active_matmul``: parameters a token multiplies with = the active parameters
  (model/params.py: top-k + shared experts, router, attention, dense FFN, output layer) minus the
  input embedding (a lookup); every computed position pays them (2 FLOPs per multiply-add);
- attention: QK^T and AV cost 2 * 2 * head_dim FLOPs per head per attended (query, key) pair;
  counted for attended block pairs only: noisy block i sees noisy block i and clean blocks < i,
  clean block i sees clean blocks <= i, so the row attends n(n+1) block pairs of B^2 pairs;
- factor 3: forward + backward (2x forward); activation recompute gets no credit. The formula
  counts the full layout even with ``diffusion.prefix_aware`` (the model FLOPs of the objective).

MFU = achieved model FLOP/s per device / the device's dense BF16 peak (:data:`PEAK_FLOPS`); on
CPU (or an unknown device) MFU is reported as null ("n/a").
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import time
from typing import Dict, Optional, Sequence

import torch

from megatron_uni import platform
from megatron_uni.config import ModelConfig
from megatron_uni.data.batch import IGNORE_INDEX, MODALITY_IMAGE, MODALITY_TEXT
from megatron_uni.diffusion.inputs import DiffusionInputs
from megatron_uni.model import flops

METRICS_FILE = "metrics.jsonl"

# dense BF16 tensor-core peak per device (vendor datasheets, no sparsity); matched by substring
# of torch.cuda.get_device_name(), first match wins
PEAK_FLOPS = (
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100", 989e12), ("H800", 989e12),
    ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12),
)

# per-micro-batch token statistics the loss function reports next to LossSums
TOKEN_FIELDS = ("masked_ce", "masked_count", "special_loss", "special_weight")


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------
def flops_per_sequence(model: ModelConfig, seq_length: int, block_size: int) -> float:
    """Training FLOPs of one ``[noisy | clean]`` row holding one document of ``seq_length`` clean
    tokens, by the one formula of ``model/flops.py``: linear layers on all 2L positions, attention
    on the L(L + B) pairs the mask rule allows, training = 3 x forward."""
    pairs = seq_length * (seq_length + block_size)
    forward = flops.linear_forward_flops(model, 2 * seq_length) + flops.attention_forward_flops(model, pairs)
    return float(flops.TRAIN_OVER_FORWARD * forward)


def peak_flops(device_name: Optional[str]) -> Optional[float]:
    if not device_name:
        return None
    for key, value in PEAK_FLOPS:
        if key in device_name:
            return value
    return None


def device_name() -> Optional[str]:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_memory_gib() -> Dict[str, object]:
    """Peak allocated device memory, or on CPU the process's peak resident set size."""
    if torch.cuda.is_available():
        return {"peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "peak_mem_kind": "cuda_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_mem_gib": rss_kib / 2 ** 20, "peak_mem_kind": "cpu_max_rss"}


# ----------------------------------------------------------------------------------------------
# token statistics of the loss
# ----------------------------------------------------------------------------------------------
def token_stats(per_token_ce: torch.Tensor, inputs: DiffusionInputs) -> torch.Tensor:
    """Stacked :data:`TOKEN_FIELDS` sums of one micro-batch."""
    masked = inputs.labels != IGNORE_INDEX
    ce = per_token_ce.detach().float()
    special = (inputs.modality != MODALITY_TEXT) & (inputs.modality != MODALITY_IMAGE)
    weights = inputs.loss_weights.float()
    return torch.stack([(ce * masked).sum(), masked.sum().float(), (ce * weights * special).sum(),
                        (weights * special).sum()])


def global_token_stats(reports: Sequence[Dict], contributes: bool) -> Dict[str, float]:
    """The step's masked-token CE and special-token loss over all micro-batches and ranks."""
    total = torch.zeros(len(TOKEN_FIELDS), device=platform.device())  # the process group's device
    if contributes:
        for report in reports:
            total += report["tokens"].to(total.device).float()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    sums = dict(zip(TOKEN_FIELDS, total.tolist()))
    nan = float("nan")
    return {"masked_ce": sums["masked_ce"] / sums["masked_count"] if sums["masked_count"] else nan,
            "special_loss": sums["special_loss"] / sums["special_weight"] if sums["special_weight"] else nan,
            "masked_tokens": sums["masked_count"]}


# ----------------------------------------------------------------------------------------------
# the writer
# ----------------------------------------------------------------------------------------------
def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _fmt(value) -> str:
    if value is None or value != value:  # None or NaN: no such targets / not measurable here
        return "  -   "
    return f"{value:.4f}"


class MetricsLogger:
    """Assembles a step's record, prints the console line, appends to JSONL / TensorBoard (rank 0)."""

    def __init__(self, run_dir: Optional[str], model: ModelConfig, seq_length: int, block_size: int,
                 global_batch_size: int, world_size: int, train_iters: int, start_iteration: int) -> None:
        self.run_dir = run_dir
        self.flops_per_step = flops_per_sequence(model, seq_length, block_size) * global_batch_size
        self.clean_tokens_per_step = seq_length * global_batch_size
        self.world_size = world_size
        self.peak = peak_flops(device_name())
        self.train_iters = train_iters
        self.start_iteration = start_iteration
        self.started = time.perf_counter()
        self.jsonl = None
        self.tensorboard = None
        if run_dir:
            os.makedirs(run_dir, exist_ok=True)
            self.jsonl = open(os.path.join(run_dir, METRICS_FILE), "a")
            self.tensorboard = _tensorboard(run_dir)

    def record(self, iteration: int, step: Dict, step_seconds: float) -> Dict:
        """The JSON record of one step from ``train_step``'s dict and its wall time."""
        achieved = self.flops_per_step / step_seconds / self.world_size
        record = {
            "iteration": iteration, "time": time.time(), "step_seconds": step_seconds,
            **{k: v for k, v in step.items() if k != "expert_load"},
            "clean_tokens_per_s": self.clean_tokens_per_step / step_seconds,
            "computed_tokens_per_s": 2 * self.clean_tokens_per_step / step_seconds,
            "model_tflops_per_device": achieved / 1e12,
            "mfu": achieved / self.peak if self.peak else None,
            **peak_memory_gib(),
        }
        load = step.get("expert_load")
        if load:
            for layer, ratio, starved in zip(load["layers"], load["max_over_mean"], load["starved_fraction"]):
                record[f"expert_load/layer{layer}/max_over_mean"] = ratio
                record[f"expert_load/layer{layer}/starved_fraction"] = starved
        return record

    def console_line(self, record: Dict) -> str:
        done = record["iteration"] - self.start_iteration
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.train_iters - record["iteration"])
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        ratios = [v for k, v in record.items() if k.endswith("/max_over_mean")]
        experts = f" | experts max/mean {max(ratios):.2f}" if ratios else ""
        return (f"iter {record['iteration']:6d}/{self.train_iters} | loss {record['loss']:.4f} | "
                f"ce {_fmt(record.get('masked_ce'))} | text {_fmt(record.get('text_loss'))} | "
                f"image {_fmt(record.get('image_loss'))} | special {_fmt(record.get('special_loss'))} | "
                f"lr {record['lr']:.3e} | grad_norm {record['grad_norm']:.3f} | {record['step_seconds']:.2f} s | "
                f"{record['clean_tokens_per_s']:.0f} clean tok/s ({record['computed_tokens_per_s']:.0f} computed) | "
                f"{record['model_tflops_per_device']:.3f} TFLOP/s/dev | MFU {mfu} | "
                f"mem {record['peak_mem_gib']:.2f} GiB | skipped {record['skipped_steps']}{experts} | "
                f"elapsed {_clock(elapsed)} ETA {_clock(eta)}")

    def write(self, record: Dict) -> None:
        if self.jsonl:
            self.jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "iteration":
                    self.tensorboard.add_scalar(key, value, record["iteration"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()


def validation_line(iteration: int, record: Dict) -> str:
    """The console line of an evaluation (``training/validation.py``'s ``valid/*`` fields)."""
    return (f"valid {iteration:6d} | ce {_fmt(record['valid/masked_ce'])} | text {_fmt(record['valid/text_ce'])} | "
            f"image {_fmt(record['valid/image_ce'])} | special {_fmt(record['valid/special_ce'])} | "
            f"{record['valid/masked_tokens']:.0f} masked tokens")


def _tensorboard(run_dir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: JSONL only
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


def run_dir_of(logging_run_dir: Optional[str], checkpoint_save: Optional[str]) -> Optional[str]:
    """``logging.run_dir``, else the parent of ``checkpoint.save``, else no file output."""
    if logging_run_dir:
        return logging_run_dir
    if checkpoint_save:
        return os.path.dirname(os.path.abspath(checkpoint_save.rstrip(os.sep)))
    return None

