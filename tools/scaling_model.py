"""Scaling on paper: per-GPU compute, EP all-to-all volume, PP bubble and memory of the 16B model.

For each training stage (its BDLM layout, sequence length and recommended parallel layout) and
each world size, prints one row of arithmetic from the model's recipe dimensions. Nothing here
is measured on a GPU; the only validated figure is the all-to-all byte count (see
``tests/test_scaling_model.py``, which counts it in a 2-rank EP2 gloo run of the tiny model).

Assumptions (also in docs/scaling.md):
* one document per row (upper bound on attention; packing shortens attention spans);
* FlexAttention cost at 128x128 tile granularity (a partially allowed tile costs a full tile);
* no prefix-aware compaction (an upper bound: compaction only removes positions);
* uniform routing: a fraction (EP-1)/EP of dispatched tokens leaves the GPU;
* training FLOPs = 3x forward, +1 forward with full recompute;
* step time at an assumed MFU (default 35%, the issue's goal), never measured.

Examples:
    python tools/scaling_model.py                       # all stages, 8..256 GPUs, H100 and H200
    python tools/scaling_model.py --stage sft8k --mfu 0.3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Dict, List, Optional

from megatron_uni.config import ModelConfig, load_config
from megatron_uni.model import flops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_RECIPE = os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml")
FLEX_TILE = 128
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float    # dense BF16 peak (SXM)
    memory_gib: float
    nvlink_gbs: float     # per GPU, one direction (GB/s)
    network_gbs: float    # per GPU across nodes (400 Gb/s InfiniBand = 50 GB/s)
    per_node: int = 8


GPUS = {
    "H100": Gpu("H100", 989.0, 80 * 1e9 / GIB, 450.0, 50.0),
    "H200": Gpu("H200", 989.0, 141 * 1e9 / GIB, 450.0, 50.0),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage recipe's sequence layout and recommended parallel layout."""

    name: str
    seq_length: int        # L: clean tokens of a packed sample
    # "full" = [noisy | clean] (2L); complementary pair as "pairs" = two [noisy | clean] rows (4L)
    # or "shared_clean" = one [noisy_a | noisy_b | clean] row (3L)
    layout: str
    global_batch: int      # samples per step (a complementary pair counts once)
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int = 1
    expert: int = 8
    micro_batch: int = 1   # samples per micro-batch (a complementary pair counts once)
    recompute: str = "selective"   # none | selective (moe_act, layernorm, core_attn) | full
    why: str = ""


STAGES: Dict[str, Stage] = {s.name: s for s in (
    Stage("align", 4096, "full", 512, why="2L = 8192 positions fit one GPU: no TP/PP, EP8 inside the node"),
    Stage("pretrain", 8192, "full", 512, why="2L = 16384 positions; EP8 in the node, no PP bubble, "
                                             "activations fit H200 (H100: see memory)"),
    Stage("sft8k", 8192, "shared_clean", 256, tensor=2,
          why="complementary pair as one 3L = 24576 row (25% fewer positions than two 2L rows); TP2+SP "
              "halves activations and logits so it fits H100 without recompute or a PP bubble"),
    Stage("sft16k", 16384, "shared_clean", 128, tensor=2, recompute="full",
          why="3L = 49152 positions: TP2+SP splits the 48 GiB of logits, full recompute keeps only layer "
              "inputs; PP1 avoids the bubble of 64 micro-batches at most per rank"),
)}


# other layouts, for comparison (the stage recipes as first written: PP2 for pretraining and 16k
# SFT, complementary pairs as two rows)
ALTERNATIVES: Dict[str, Stage] = {s.name: s for s in (
    Stage("pretrain-pp2", 8192, "full", 512, pipeline=2,
          why="PP2 (VPP1): half the layers per GPU, needs 16 GPUs, pays a bubble"),
    Stage("sft8k-pairs", 8192, "pairs", 256, recompute="selective",
          why="complementary pairs as two 2L rows, TP1 PP1"),
    Stage("sft16k-pp2", 16384, "shared_clean", 128, tensor=2, pipeline=2, recompute="full",
          why="TP2+SP, PP2 (VPP1), full recompute"),
)}


# ------------------------------------------------------------------------------------------------
# model dimensions
# ------------------------------------------------------------------------------------------------
def load_model(recipe: str = MODEL_RECIPE) -> ModelConfig:
    return load_config(recipe).model


attention_params = flops.attention_weights
matmul_params_per_position = flops.linear_weights_per_position   # active weights, output layer included


def expert_params(m: ModelConfig) -> int:
    """One routed expert (SwiGLU: fc1 is 2 x ffn wide)."""
    return flops.swiglu_weights(m.hidden_size, m.moe_ffn_hidden_size)


def shared_expert_params(m: ModelConfig) -> int:
    return flops.swiglu_weights(m.hidden_size, m.moe_shared_expert_intermediate_size or 0)


moe_layers = flops.num_moe_layers


def params_split(m: ModelConfig) -> Dict[str, int]:
    """Total parameters: routed experts (split by EP) and the rest (split by TP), norms ignored."""
    experts = moe_layers(m) * m.num_experts * expert_params(m)
    dense_layers = m.first_k_dense * (attention_params(m) + 3 * m.hidden_size * m.ffn_hidden_size)
    moe_rest = moe_layers(m) * (attention_params(m) + m.hidden_size * m.num_experts + shared_expert_params(m))
    embeddings = 2 * m.hidden_size * m.vocab  # input embedding + untied output layer
    return {"experts": experts, "dense": dense_layers + moe_rest, "embeddings": embeddings}


# ------------------------------------------------------------------------------------------------
# per-sample quantities of a BDLM layout
# ------------------------------------------------------------------------------------------------
def positions_per_sample(stage: Stage) -> int:
    return {"full": 2, "shared_clean": 3, "pairs": 4}[stage.layout] * stage.seq_length


def attended_tiles(seq_length: int, layout: str, tile: int = FLEX_TILE) -> int:
    """FlexAttention tiles computed for one document of length L (block size <= tile).

    With m = L / tile query tiles per copy: a noisy tile j needs its own noisy tile and clean
    tiles 0..j (tile j holds earlier blocks), a clean tile j needs clean tiles 0..j.
    """
    m = -(-seq_length // tile)
    noisy = m + m * (m + 1) // 2
    clean = m * (m + 1) // 2
    return {"full": noisy + clean, "shared_clean": 2 * noisy + clean, "pairs": 2 * (noisy + clean)}[layout]


def attention_flops_per_sample(m: ModelConfig, stage: Stage) -> float:
    """Forward attention over every position of the computed FlexAttention tiles (hardware work;
    ``flops.attended_pairs`` is the exact, smaller model count)."""
    return float(flops.attention_forward_flops(m, attended_tiles(stage.seq_length, stage.layout) * FLEX_TILE ** 2))


def train_flops_per_sample(m: ModelConfig, stage: Stage) -> float:
    """Hardware FLOPs: model FLOPs (``megatron_uni.model.flops``) with tiles for pairs, plus one
    more forward under full recompute."""
    forward = flops.linear_forward_flops(m, positions_per_sample(stage)) + attention_flops_per_sample(m, stage)
    return float(forward * (flops.TRAIN_OVER_FORWARD + (1 if stage.recompute == "full" else 0)))


# ------------------------------------------------------------------------------------------------
# communication and memory
# ------------------------------------------------------------------------------------------------
def all_to_all_bytes(tokens: int, hidden: int, topk: int, num_moe_layers: int, act_bytes: int,
                     prob_bytes: int, backward: bool = True) -> int:
    """Bytes a rank hands to ``all_to_all_single`` for ``tokens`` of one micro-batch, EP-group mean.

    megatron-core's alltoall dispatcher, per MoE layer: dispatch the token copies (tokens x
    top-k rows of ``hidden``) and their routing probabilities, then combine the expert outputs;
    backward sends the gradients of all three back. A rank's combine sends what its experts
    received, so one rank's count varies with routing; the sum over the EP group is exact.
    Self-sends included: the fraction (EP-1)/EP of it leaves the GPU under uniform routing.
    """
    rows = tokens * topk
    forward = 2 * rows * hidden * act_bytes + rows * prob_bytes
    return num_moe_layers * forward * (2 if backward else 1)


def micro_batches_per_rank(stage: Stage, world: int) -> float:
    dp = world // (stage.tensor * stage.pipeline)
    return stage.global_batch / (dp * stage.micro_batch)


def pipeline_bubble(stage: Stage, world: int) -> float:
    """Idle fraction of the ideal step time, (p-1) / (v m) (1F1B / interleaved)."""
    if stage.pipeline == 1:
        return 0.0
    return (stage.pipeline - 1) / (stage.virtual_pipeline * micro_batches_per_rank(stage, world))


def activation_bytes_per_position_layer(m: ModelConfig, recompute: str) -> float:
    """BF16 activations a layer keeps for backward, per position (before TP/SP division).

    Attention: residual, norm output, q/k/v, attention output; MoE: norm output, router logits
    (fp32), the top-k dispatched copies, fc1 output (2 x ffn), activation output and fc2
    output per copy, the shared expert's fc1/act. Selective recompute drops the norm outputs,
    the expert activation outputs and (core_attn) nothing extra with flash/flex kernels.
    """
    h, k, f = m.hidden_size, m.moe_router_topk, m.moe_ffn_hidden_size
    s = m.moe_shared_expert_intermediate_size or 0
    qkv = (m.num_attention_heads + 2 * m.num_query_groups) * m.kv_channels
    attention = h + h + qkv + m.num_attention_heads * m.kv_channels
    moe = h + 2 * m.num_experts + k * (h + 2 * f + f + h) + (2 * s + s)
    dropped = 2 * h + k * f + s if recompute == "selective" else 0
    return 2.0 * (attention + moe - dropped)


def memory_gib(m: ModelConfig, stage: Stage, world: int) -> Dict[str, float]:
    tp, pp, ep = stage.tensor, stage.pipeline, stage.expert
    dp, expert_dp = world // (tp * pp), world // (ep * pp)
    split = params_split(m)
    # stage 0 holds the embedding; the last stage the output layer: count one of them
    dense = (split["dense"] / pp + split["embeddings"] / 2) / tp
    experts = split["experts"] / (pp * ep)
    weights = 2 * (dense + experts)              # bf16
    grads = 4 * (dense + experts)                # fp32 grad buffers (grad_reduce_in_fp32)
    optimizer = 12 * (dense / dp + experts / expert_dp)  # fp32 main + Adam moments, distributed
    positions = stage.micro_batch * positions_per_sample(stage)
    layers = m.num_layers / pp
    # 1F1B: stage 0 holds p micro-batches of its layers; interleaving (v > 1) adds (p-1)/(p v) of that
    in_flight = pp if stage.virtual_pipeline == 1 else pp * (1 + (pp - 1) / (pp * stage.virtual_pipeline))
    if stage.recompute == "full":
        # layer inputs of every layer in flight, plus one layer's full activations during its recompute
        kept = (positions * layers * 2 * m.hidden_size * in_flight
                + positions * activation_bytes_per_position_layer(m, "none"))
    else:
        kept = positions * layers * activation_bytes_per_position_layer(m, stage.recompute) * in_flight
    logits = positions * m.vocab * (2 + 4)       # bf16 logits + fp32 softmax kept by the CE
    activations = (kept + logits) / tp           # sequence parallel splits positions over TP
    parts = {"weights": weights, "grads": grads, "optimizer": optimizer, "activations": activations}
    out = {name: value / GIB for name, value in parts.items()}
    out["total"] = sum(out.values())
    return out


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------
def row(m: ModelConfig, stage: Stage, world: int, mfu: float) -> Optional[dict]:
    if world % (stage.tensor * stage.pipeline) or world % (stage.expert * stage.pipeline):
        return None
    if micro_batches_per_rank(stage, world) < 1:
        return None
    dp = world // (stage.tensor * stage.pipeline)
    flops = train_flops_per_sample(m, stage) * stage.global_batch / world
    compute_s = flops / (mfu * GPUS["H100"].bf16_tflops * 1e12)
    tokens = stage.micro_batch * positions_per_sample(stage) // stage.tensor  # per GPU: SP splits over TP
    layers = moe_layers(m) / stage.pipeline
    a2a = all_to_all_bytes(tokens, m.hidden_size, m.moe_router_topk, 1, 2, 4) * layers \
        * micro_batches_per_rank(stage, world)  # bf16 tokens, fp32 probabilities
    off_gpu = a2a * (stage.expert - 1) / stage.expert
    gpu = GPUS["H100"]
    # expert TP 1: an EP group is EP consecutive ranks, inside one node while EP <= 8
    link = gpu.nvlink_gbs if stage.expert <= gpu.per_node else gpu.network_gbs
    mem = memory_gib(m, stage, world)
    return {"stage": stage.name, "world": world, "dp": dp,
            "tflop_per_gpu": flops / 1e12, "step_s": compute_s * (1 + pipeline_bubble(stage, world)),
            "a2a_gb": off_gpu / 1e9, "a2a_s": off_gpu / (link * 1e9),
            "bubble": pipeline_bubble(stage, world), "memory_gib": mem["total"],
            "fits": "/".join(name for name, g in GPUS.items() if mem["total"] < 0.9 * g.memory_gib) or "none"}


def table(stages: List[Stage], worlds: List[int], mfu: float, m: Optional[ModelConfig] = None) -> List[dict]:
    m = m or load_model()
    return [r for stage in stages for world in worlds if (r := row(m, stage, world, mfu)) is not None]


def format_table(rows: List[dict]) -> str:
    head = ("| stage | GPUs | DP | TFLOP/GPU/step | step s @MFU | EP a2a GB/GPU/step | a2a s | PP bubble "
            "| memory GiB/GPU | fits (90%) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['world']} | {r['dp']} | {r['tflop_per_gpu']:.0f} | {r['step_s']:.1f} | "
                     f"{r['a2a_gb']:.1f} | {r['a2a_s']:.2f} | {r['bubble']:.1%} | {r['memory_gib']:.0f} | "
                     f"{r['fits']} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted({**STAGES, **ALTERNATIVES}), nargs="*", help="stages (default: all)")
    parser.add_argument("--gpus", type=int, nargs="*", default=[8, 16, 32, 64, 128, 256], help="world sizes")
    parser.add_argument("--mfu", type=float, default=0.35, help="assumed model FLOP utilisation for step time")
    parser.add_argument("--layouts", action="store_true", help="print each stage's layout and why, then exit")
    parser.add_argument("--alternatives", action="store_true",
                        help="the comparison layouts (PP2, two-row complementary pairs) instead of the recommended")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    catalogue = ALTERNATIVES if args.alternatives else STAGES
    everything = {**STAGES, **ALTERNATIVES}
    stages = [everything[name] for name in args.stage] if args.stage else list(catalogue.values())
    if args.layouts:
        for s in stages:
            print(f"{s.name}: L={s.seq_length} {s.layout} TP{s.tensor} PP{s.pipeline}x{s.virtual_pipeline} "
                  f"EP{s.expert} recompute={s.recompute} -- {s.why}")
        return
    print(format_table(table(stages, args.gpus, args.mfu)))


if __name__ == "__main__":
    main()
