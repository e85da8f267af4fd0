"""Throughput benchmark of the real training step, with its baselines, written as a JSON card.

    python tools/bench_throughput.py RECIPE [section.key=value ...] [--warmup N] [--steps M]
        [--baseline] [--megatron-gpt] [--out CARD.json]

Runs ``training/loop.py``'s ``setup`` and ``train_step`` (forward, backward, optimizer) for N
warm-up steps, then times M steps and reports per GPU:

* tokens/s (per median step time: robust on a shared machine), three ways, each named: ``sample_tokens`` (the non-padding tokens of the packed
  L-token samples, each sample once), ``loss_tokens`` (the masked, loss-bearing positions) and
  ``positions`` (every position the model computes: 2L, 3L or the compacted length, with padding);
* model TFLOP/s and MFU by ``megatron_uni.model.flops`` (active weights on computed positions,
  attended pairs only, 3 x forward, no recompute credit); MFU against the device's dense BF16
  peak (:data:`PEAK_BF16_TFLOPS`); n/a on CPU or an unknown device;
* peak memory (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS);
* the fraction of routed tokens per expert in each MoE layer: natural routing (the recipe's
  router and expert bias, nothing forced).

Data: synthetic by default -- documents of lognormal length (median ``--median-doc``, a quarter
of L by default), a quarter of each document a clean prompt, greedily packed into L-token rows
-- or the recipe's ``data.path`` with ``--data recipe``.

Baselines, same run, documents from the same generator:

* ``--baseline``: the plain-PyTorch reference model (``convert/hf_reference.py``) run the way
  dFactory runs it: one conversation per row padded to L, full ``[noisy | clean]`` 2L rows
  (complementary copies as two rows), a dense additive 2L x 2L mask with SDPA, the per-expert
  loop, AdamW on the BF16/FP32 weights; timed per optimizer step over as many rows as our step.
* ``--megatron-gpt``: forward + backward of megatron-core's plain GPT model of the same size
  (local spec, causal mask, its own router) vs ours (same spec as training, block-diffusion
  layout) on the same ``[b, S]`` shapes; single process only.

The card (``docs/benchmarks/`` by default) holds recipe, overrides, layout, device, git commit and
the numbers; ``tools/collect_bench_cards.py`` turns cards into one markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from megatron_uni import platform
from megatron_uni.config import Config, ConfigError, data_parallel_size, load_config
from megatron_uni.data.batch import IGNORE_INDEX, MODALITY_TEXT, Batch
from megatron_uni.diffusion.inputs import DiffusionInputs, build_inputs
from megatron_uni.model import flops
from megatron_uni.tokens import Vocabulary
from megatron_uni.training.metrics import peak_memory_gib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD_DIR = os.path.join(REPO, "docs", "benchmarks")

# Dense BF16 tensor-core peak per GPU, TFLOP/s (vendor datasheets, SXM parts, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0, "A100": 312.0,
                    "A800": 312.0, "B200": 2250.0, "L40S": 362.0}


# ------------------------------------------------------------------------------------------------
# device
# ------------------------------------------------------------------------------------------------
def device_info() -> Dict:
    if not torch.cuda.is_available():
        return {"type": "cpu", "name": f"CPU, {os.cpu_count()} cores", "peak_bf16_tflops": None}
    name = torch.cuda.get_device_name()
    peak = next((tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name.upper()), None)
    return {"type": "cuda", "name": name, "peak_bf16_tflops": peak}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> Dict:
    """The training loop's measurement (``metrics.peak_memory_gib``) under the card's key names."""
    memory = peak_memory_gib()
    return {"peak_memory_gib": memory["peak_mem_gib"], "memory_kind": memory["peak_mem_kind"]}


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks on the process group's device (``platform.device``), returned on the CPU."""
    if not torch.distributed.is_initialized():
        return tensor
    moved = tensor.to(platform.device())
    torch.distributed.all_reduce(moved)
    return moved.cpu()


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------------
# synthetic documents
# ------------------------------------------------------------------------------------------------
def document_lengths(gen: torch.Generator, count: int, seq_length: int, block: int, median: int) -> List[int]:
    """Lognormal lengths (sigma 0.8) rounded up to whole blocks, within [2 blocks, L]."""
    normal = torch.randn(count, generator=gen)
    raw = (median * torch.exp(0.8 * normal)).tolist()
    return [min(seq_length, max(2 * block, -(-int(x) // block) * block)) for x in raw]


def _fill_row(batch: Dict[str, torch.Tensor], row: int, start: int, length: int, doc: int, block: int) -> None:
    stop = start + length
    batch["doc_ids"][row, start:stop] = doc
    batch["position_ids"][row, start:stop] = torch.arange(length)
    prompt = max(block, (length // 4) // block * block)   # a clean prompt, then the maskable response
    batch["maskable"][row, start + min(prompt, length - block):stop] = True


def make_batch(gen: torch.Generator, lengths_per_row: List[List[int]], seq_length: int, block: int,
               vocab: Vocabulary) -> Batch:
    rows = len(lengths_per_row)
    fields = {"doc_ids": torch.full((rows, seq_length), -1, dtype=torch.int32),
              "position_ids": torch.zeros(rows, seq_length, dtype=torch.int64),
              "maskable": torch.zeros(rows, seq_length, dtype=torch.bool)}
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for doc, length in enumerate(lengths):
            _fill_row(fields, row, start, length, doc, block)
            start += length
    tokens = torch.randint(0, vocab.text_size - 100, (rows, seq_length), generator=gen)
    modality = torch.full((rows, seq_length), MODALITY_TEXT, dtype=torch.int8)
    return Batch(tokens=tokens, modality=modality, **fields)


def pack(lengths: List[int], seq_length: int) -> List[List[int]]:
    """Greedy packing in order: a document that does not fit starts the next row."""
    rows: List[List[int]] = [[]]
    for length in lengths:
        if sum(rows[-1]) + length > seq_length:
            rows.append([])
        rows[-1].append(length)
    return rows


class SyntheticDocuments:
    """Synthetic documents for our run (packed) and the baseline (one per row): same generator."""

    def __init__(self, cfg: Config, median: int, seed: int):
        self.cfg, self.median, self.seed = cfg, median, seed
        self.vocab = Vocabulary.synthetic(cfg.model.text_vocab, cfg.model.num_image_codes)

    def packed_rows(self, index: int, rows: int) -> List[List[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        d = self.cfg.data
        packed: List[List[int]] = []
        while len(packed) < rows:
            packed += pack(document_lengths(gen, 4 * rows, d.seq_length, d.block_size, self.median), d.seq_length)[:-1]
        return packed[:rows]

    def batch(self, index: int, lengths_per_row: List[List[int]]) -> Batch:
        gen = torch.Generator().manual_seed(self.seed * 7_919 + index)
        return make_batch(gen, lengths_per_row, self.cfg.data.seq_length, self.cfg.data.block_size, self.vocab)


# ------------------------------------------------------------------------------------------------
# our training step
# ------------------------------------------------------------------------------------------------
def inputs_to(inputs: DiffusionInputs, device) -> DiffusionInputs:
    moved = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs) if f.name != "_descriptor"}
    moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in moved.items()}
    return DiffusionInputs(**moved)


def sample_tokens(batch: Batch) -> int:
    return int((batch.doc_ids >= 0).sum())


def loss_tokens(inputs: DiffusionInputs) -> int:
    return int((inputs.labels != IGNORE_INDEX).sum())


class RecordingSource:
    """The loop's micro-batch function over synthetic documents (or the recipe's data), moving
    each micro-batch to the model's device and recording what the FLOP and token counts need."""

    def __init__(self, cfg: Config, documents: Optional[SyntheticDocuments], recipe_source=None):
        self.cfg, self.documents, self.recipe_source = cfg, documents, recipe_source
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        self.recorded: List[tuple] = []   # (layout on CPU, loss tokens, sample tokens)
        self.recording = False

    def __call__(self, iteration: int, index: int, dp_rank: int, dp_size: int) -> DiffusionInputs:
        if self.recipe_source is not None:
            inputs, samples = self.recipe_source(iteration, index, dp_rank, dp_size), None
        else:
            mbs = self.cfg.data.micro_batch_size
            key = (iteration * 4096 + index) * dp_size + dp_rank
            batch = self.documents.batch(key, self.documents.packed_rows(key, mbs))
            generator = torch.Generator().manual_seed(key)
            inputs = build_inputs(batch, self.documents.vocab, self.cfg.diffusion, generator,
                                  block_size=self.cfg.data.block_size)
            samples = sample_tokens(batch)
        if self.recording:
            self.recorded.append((inputs.layout, loss_tokens(inputs), samples))
        return inputs if self.device is None else inputs_to(inputs, self.device)


class RoutingCounter:
    """Tokens routed to each expert, per MoE layer, from the routers' ``routing_map`` outputs."""

    def __init__(self, model_chunks, num_layers: int, num_experts: int):
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts = num_layers, max(num_experts, 1)
        self.counts: Dict[int, torch.Tensor] = {}   # layer index -> [experts], on the router's device (no sync)
        self.enabled = False
        for chunk in model_chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if self.enabled:
            routed = output[1].sum(0).double()
            layer = module.layer_number - 1
            self.counts[layer] = self.counts[layer] + routed if layer in self.counts else routed

    def summary(self) -> List[Dict]:
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        for layer, routed in self.counts.items():
            counts[layer] = routed.cpu()
        counts = all_reduce_sum(counts)   # ranks route disjoint tokens (DP, SP) or layers (PP)
        layers = []
        for layer, row in enumerate(counts):
            total = float(row.sum())
            if total == 0:
                continue
            fraction = row / total
            mean = 1.0 / len(row)
            layers.append({"layer": layer + 1, "routed_token_copies": int(total),
                           "max_over_mean": float(fraction.max()) / mean, "min_over_mean": float(fraction.min()) / mean,
                           "fraction": [round(float(x), 6) for x in fraction]})
        return layers


def _per_gpu_sum(values: List[float], cfg: Config) -> List[float]:
    """Per-GPU mean of quantities each rank counted for its whole model replica."""
    replica_ranks = cfg.parallel.tensor * cfg.parallel.pipeline * cfg.parallel.context
    tensor = all_reduce_sum(torch.tensor([v / replica_ranks for v in values], dtype=torch.float64))
    return (tensor / (cfg.parallel.world_size or 1)).tolist()


def measure_ours(cfg: Config, documents: Optional[SyntheticDocuments], warmup: int, steps: int) -> Dict:
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource

    recipe_source = MicrobatchSource(cfg) if documents is None else None
    vocab = recipe_source.vocab if recipe_source else documents.vocab
    state = loop.setup(cfg, vocabulary=vocab.layout())
    source = RecordingSource(cfg, documents, recipe_source)
    seq_length = (3 if cfg.diffusion.shared_clean else 2) * cfg.data.seq_length
    routing = RoutingCounter(state.model, cfg.model.num_layers, cfg.model.num_experts)
    for _ in range(warmup):
        loop.train_step(state, source, seq_length)
    sync()
    reset_peak_memory()
    source.recording = routing.enabled = True
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        metrics = loop.train_step(state, source, seq_length)
        sync()
        times.append(time.perf_counter() - start)
    memory = peak_memory()
    chunks = len(state.model)   # every model chunk reads each micro-batch once
    step_flops = sum((flops.model_flops(cfg.model, layout) for layout, _, _ in source.recorded[::chunks]),
                     flops.ModelFlops(0, 0, 0, 0))
    samples = [s for _, _, s in source.recorded[::chunks]]
    # throughput per median step: robust to a machine shared with other jobs
    seconds = statistics.median(times) * steps
    per_gpu = _per_gpu_sum([step_flops.train, sum(n for _, n, _ in source.recorded[::chunks]),
                            sum(s or 0 for s in samples), step_flops.positions], cfg)
    result = {
        "step_seconds": {"mean": sum(times) / steps, "median": statistics.median(times), "all": times},
        "model_tflops_per_gpu": per_gpu[0] / seconds / 1e12,
        "tokens_per_s_per_gpu": {"loss_tokens": per_gpu[1] / seconds,
                                 "sample_tokens": per_gpu[2] / seconds if None not in samples else None,
                                 "positions": per_gpu[3] / seconds},
        "model_flops_per_step_per_gpu": per_gpu[0] / steps,
        "attention_share_of_flops": step_flops.attention_forward / max(step_flops.forward, 1),
        "last_loss": metrics.losses.loss,
        **memory,
        "routing": {"natural": True, "note": "the recipe's router and expert bias; no forced balance",
                    "layers": routing.summary()},
    }
    del state
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def add_mfu(result: Dict, device: Dict, cfg: Config) -> None:
    peak = device["peak_bf16_tflops"]
    if device["type"] != "cuda" or peak is None or cfg.model.params_dtype != "bfloat16":
        result["mfu"] = None
        result["mfu_note"] = "n/a: " + ("CPU" if device["type"] != "cuda" else
                                        "unknown device peak" if peak is None else "not a BF16 run")
    else:
        result["mfu"] = result["model_tflops_per_gpu"] / peak


# ------------------------------------------------------------------------------------------------
# baseline: the reference model as dFactory runs it
# ------------------------------------------------------------------------------------------------
def dfactory_reference(cfg: Config, device, dtype):
    from megatron_uni.convert.hf_config import uni_config
    from megatron_uni.convert.hf_reference import LLaDA2Reference
    from megatron_uni.convert.tiny_hf import tiny_hf_weights

    class DenseMaskReference(LLaDA2Reference):
        """HF eager-style attention replaced by SDPA with a dense additive [b, 1, 2L, 2L] mask."""

        def attend(self, q, k, v, prefix, bias):
            b, _, s, _ = q.shape
            repeat = self.heads // self.kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return F.linear(out.transpose(1, 2).reshape(b, s, -1), self.w[f"{prefix}.dense.weight"])

    weights = tiny_hf_weights(cfg.model, text_only=False, seed=cfg.data.seed)
    for name, tensor in weights.items():
        keep = tensor.dtype == torch.float32 and name.endswith("expert_bias")
        weights[name] = tensor.to(device=device, dtype=torch.float32 if keep else dtype).requires_grad_(not keep)
    config = uni_config(cfg.model, pad_token_id=None)
    params = [t for t in weights.values() if t.requires_grad]
    return DenseMaskReference(weights, config, dtype), params


def measure_baseline(cfg: Config, documents: SyntheticDocuments, warmup: int, steps: int) -> Dict:
    from megatron_uni.attention.bias import additive_bias

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if cfg.model.params_dtype == "bfloat16" else torch.float32
    model, params = dfactory_reference(cfg, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    diffusion = dataclasses.replace(cfg.diffusion, shared_clean=False, prefix_aware=False)
    mbs, d = cfg.data.micro_batch_size, cfg.data
    rows_per_step = d.global_batch_size // max(data_parallel_size(cfg.parallel), 1)

    def step(index: int):
        # the documents of our step's packed rows, one conversation per row
        conversations = [[n] for row in documents.packed_rows(index, rows_per_step) for n in row]
        loss_count = samples = 0
        for first in range(0, len(conversations), mbs):
            batch = documents.batch(index * 4096 + first, conversations[first:first + mbs])
            inputs = build_inputs(batch, documents.vocab, diffusion, torch.Generator().manual_seed(first),
                                  block_size=d.block_size)
            bias = additive_bias(inputs.layout.to(device), dtype)
            logits = model(inputs.input_ids.to(device), inputs.position_ids.to(device), bias)
            labels = inputs.labels.to(device)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / max(int((labels != IGNORE_INDEX).sum()), 1)
            loss.backward()
            loss_count += loss_tokens(inputs)
            samples += sample_tokens(batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_count, samples, len(conversations)

    for index in range(warmup):
        step(index)
    sync()
    reset_peak_memory()
    times, losses, samples, rows = [], 0, 0, 0
    for index in range(warmup, warmup + steps):
        start = time.perf_counter()
        n_loss, n_samples, n_rows = step(index)
        sync()
        times.append(time.perf_counter() - start)
        losses, samples, rows = losses + n_loss, samples + n_samples, rows + n_rows
    seconds = statistics.median(times) * steps
    result = {"what": "convert/hf_reference.py as dFactory runs it: one conversation per row padded to L, "
                      "[noisy | clean] 2L rows, dense additive mask + SDPA, per-expert loop, AdamW",
              "step_seconds": {"mean": seconds / steps, "median": statistics.median(times)},
              "rows_per_step": rows / steps,
              "tokens_per_s_per_gpu": {"loss_tokens": losses / seconds, "sample_tokens": samples / seconds},
              **peak_memory()}
    return result   # the reference model and its optimizer are freed with this frame


# ------------------------------------------------------------------------------------------------
# CPU figure: our layers vs megatron-core's plain GPT of the same size
# ------------------------------------------------------------------------------------------------
def measure_megatron_gpt(cfg: Config, documents: SyntheticDocuments, repeats: int) -> Dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_uni.model.builder import build_model
    from megatron_uni.model.spec import core_attention_spec
    from megatron_uni.model.transformer_config import build_transformer_config
    from megatron_uni.platform.distributed import init_single_process

    init_single_process(cfg.parallel, seed=cfg.data.seed)
    ours = build_model(cfg.model, cfg.parallel, core_attention=core_attention_spec(cfg.model))
    config = build_transformer_config(cfg.model, cfg.parallel)
    plain = GPTModel(config=config, vocab_size=cfg.model.vocab,
                     transformer_layer_spec=get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                                                       normalization="RMSNorm"),
                     max_sequence_length=cfg.model.max_position_embeddings, position_embedding_type="rope",
                     rotary_percent=cfg.model.rotary_percent, rotary_base=cfg.model.rotary_base,
                     share_embeddings_and_output_weights=False)
    mbs = cfg.data.micro_batch_size
    batch = documents.batch(0, documents.packed_rows(0, mbs))
    inputs = build_inputs(batch, documents.vocab, cfg.diffusion, torch.Generator().manual_seed(0),
                          block_size=cfg.data.block_size)
    b, s = inputs.input_ids.shape
    causal_positions = torch.arange(s).expand(b, s)
    # built here: megatron's default causal mask is allocated on "cuda" (fused_softmax.py)
    causal_mask = torch.ones(1, 1, s, s, dtype=torch.bool).triu(1)

    def ours_step():
        ours(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels).sum().backward()

    def plain_step():
        plain(inputs.input_ids, causal_positions, causal_mask, labels=inputs.model_labels).sum().backward()

    timings = {"ours": [], "plain": []}
    for repeat in range(repeats + 1):          # the first round warms up
        for name, fn in (("ours", ours_step), ("plain", plain_step)):
            start = time.perf_counter()
            fn()
            if repeat:
                timings[name].append(time.perf_counter() - start)
    ours_s, plain_s = statistics.median(timings["ours"]), statistics.median(timings["plain"])
    return {"what": "forward+backward of one micro-batch [b, S] = " + f"[{b}, {s}]: our spec (block-diffusion "
                    "layout, Ling router) vs megatron-core GPTModel, local spec, causal mask, its own router",
            "ours_seconds": ours_s, "megatron_gpt_seconds": plain_s, "ratio": ours_s / plain_s,
            "goal": "ratio <= 1.5", "repeats": repeats}


# ------------------------------------------------------------------------------------------------
# the card
# ------------------------------------------------------------------------------------------------
def layout_of(cfg: Config) -> Dict:
    p, d, diff = cfg.parallel, cfg.data, cfg.diffusion
    rows = "shared_clean 3L" if diff.shared_clean else "pairs 2 x 2L" if diff.complementary else "2L"
    return {"tensor": p.tensor, "pipeline": p.pipeline, "virtual_pipeline": p.virtual_pipeline,
            "context": p.context, "expert": p.expert, "expert_tensor": p.expert_tensor,
            "sequence_parallel": p.sequence_parallel, "world_size": p.world_size,
            "data_parallel": data_parallel_size(p), "micro_batch": d.micro_batch_size,
            "global_batch": d.global_batch_size, "seq_length": d.seq_length, "block_size": d.block_size,
            "rows": rows, "prefix_aware": diff.prefix_aware, "params_dtype": cfg.model.params_dtype,
            "attention_backend": cfg.model.attention_backend, "recompute": cfg.model.recompute_granularity}


def card_name(recipe: str, cfg: Config, device: Dict) -> str:
    p = cfg.parallel
    stem = os.path.splitext(os.path.basename(recipe))[0]
    where = "cpu" if device["type"] == "cpu" else device["name"].split()[-1].lower()
    return (f"{stem}-{where}-w{p.world_size}-tp{p.tensor}-pp{p.pipeline}-ep{p.expert}"
            f"-mbs{cfg.data.micro_batch_size}.json")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench_throughput.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="training recipe, e.g. recipes/bench/proxy_1gpu.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (e.g. parallel.expert=8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    parser.add_argument("--data", choices=("synthetic", "recipe"), default="synthetic",
                        help="synthetic documents (default) or the recipe's data.path")
    parser.add_argument("--median-doc", type=int, default=None, help="median synthetic document length (default L/4)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the reference model as dFactory runs it (rank 0 of a 1-process run)")
    parser.add_argument("--megatron-gpt", action="store_true",
                        help="also time megatron-core's plain GPT of the same size (single process)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of --megatron-gpt (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="card path (default docs/benchmarks/<recipe>-<device>-<layout>.json)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as err:
        print(f"bench_throughput: config error: {err}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    median = args.median_doc or max(cfg.data.block_size, cfg.data.seq_length // 4)
    documents = SyntheticDocuments(cfg, median, cfg.data.seed) if args.data == "synthetic" else None
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.cuda.is_available() and os.environ.get("TORCHDYNAMO_DISABLE") == "1":
        print("bench_throughput: warning: TORCHDYNAMO_DISABLE=1 -- FlexAttention runs eagerly (dense mask "
              "memory, slow); unset it for a GPU measurement", file=sys.stderr)
    device = device_info()
    from megatron_uni.platform.distributed import destroy, is_rank0

    ours = measure_ours(cfg, documents, args.warmup, args.steps)
    add_mfu(ours, device, cfg)
    single = (cfg.parallel.world_size or 1) == 1
    card = {"recipe": os.path.relpath(os.path.abspath(args.recipe), REPO), "overrides": args.overrides,
            "layout": layout_of(cfg), "device": {**device, "count": cfg.parallel.world_size},
            "commit": git_commit(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "data": args.data if documents is None else f"synthetic, lognormal lengths, median {median}",
            "warmup_steps": args.warmup, "timed_steps": args.steps, "ours": ours}
    rank0 = is_rank0()
    destroy()
    if args.baseline and documents is not None and single:
        card["baseline_dfactory"] = measure_baseline(cfg, documents, args.warmup, args.steps)
        ratio = ours["tokens_per_s_per_gpu"]["loss_tokens"] / card["baseline_dfactory"]["tokens_per_s_per_gpu"]["loss_tokens"]
        card["speedup_loss_tokens_vs_dfactory"] = ratio
        gc.collect()
    if args.megatron_gpt and documents is not None and single:
        card["megatron_gpt"] = measure_megatron_gpt(cfg, documents, args.repeats)
        destroy()
    if rank0:
        out = args.out or os.path.join(CARD_DIR, card_name(args.recipe, cfg, device))
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(card, f, indent=1)
            f.write("\n")
        print(json.dumps({k: v for k, v in card.items() if k != "ours"}, indent=1)[:4000])
        print(f"ours: {ours['tokens_per_s_per_gpu']} tokens/s/GPU, {ours['model_tflops_per_gpu']:.4f} TFLOP/s/GPU, "
              f"MFU {ours['mfu']}, peak {ours['peak_memory_gib']:.2f} GiB; card: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
