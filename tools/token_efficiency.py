"""Training FLOPs per loss-bearing token: dFactory as it runs vs packed full 2L vs ours.

Draws a synthetic sample mix, lays every sample out the way each trainer does, and counts,
with our layout code (``build_inputs`` -> full/compacted ``AttentionLayout`` -> ``block_mask``),
the model positions, the attention pairs the kernel computes and the loss-bearing tokens:

* **dFactory as it runs**: one sample per row padded to ``--seq-length``, the full
  ``[noisy | clean]`` 2L row, complementary masking as a second 2L row, dense-mask SDPA
  (every one of the (2L)^2 pairs computed);
* **packed full 2L** (ours before prefix-aware): samples packed greedily into rows of
  ``--seq-length``, the full 2L layout, complementary rows, FlexAttention (the non-empty
  128x128 tiles of the ``BlockMask`` computed);
* **ours**: packed, prefix-aware compaction (rows padded to 128), complementary pairs in the
  shared-clean ``[noisy_a | noisy_b | clean]`` layout (one clean copy per pair), FlexAttention.

FLOPs: ``model/flops.py``'s formula -- linear layers 2 x (active matmul weights, LM head
included: megatron computes logits for the clean copy too) per position; attention 4 x heads x
head_dim x layers per computed pair (QK^T and AV); training 3 x forward. Model sizes from
``--model-recipe`` (default the 16B recipe).

Mixes (assumptions, not statistics of real data):
* ``sft``: length ~ lognormal (median 600 tokens, sigma ``--sigma``), prompt share ~ U[0.2, 0.8],
  clipped to [1 block, seq-length];
* ``understanding``: an image prefix of 729..2500 codes + 16..128 question tokens (clean),
  8..256 answer tokens (uniform), as ``diffusion/savings.py``.
A loss-bearing token is a masked position; with complementary masking every maskable token of a
sample (the answer, padded to the block size) is loss-bearing once per pair.

Example:
    python tools/token_efficiency.py --samples 400 --seq-length 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from typing import Dict, List, Tuple

import torch

from megatron_uni.attention.masks import FLEX_TILE, block_mask
from megatron_uni.config import DiffusionConfig, ModelConfig, load_config
from megatron_uni.data.batch import MODALITY_IMAGE, MODALITY_TEXT, Batch
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.savings import SHAPES
from megatron_uni.model import flops
from megatron_uni.tokens import Vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("dFactory as it runs", "packed full 2L", "ours (packed, prefix-aware, shared-clean)")


@dataclasses.dataclass(frozen=True)
class Sample:
    clean: int      # image codes + prompt tokens (never masked)
    image: int      # of which image codes
    target: int     # answer tokens (maskable), before block padding


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=400, help="samples drawn per mix (default 400)")
    parser.add_argument("--seq-length", type=int, default=4096,
                        help="dFactory's padded row length and our packed row length L (default 4096)")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--t-min", type=float, default=0.3)
    parser.add_argument("--t-max", type=float, default=0.8)
    parser.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of SFT lengths (default 0.8)")
    parser.add_argument("--mixes", nargs="+", default=["sft", "understanding"], choices=["sft", "understanding"])
    parser.add_argument("--model-recipe", default=os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml"),
                        help="recipe whose model section sizes the FLOPs (default the 16B recipe)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# samples
# ----------------------------------------------------------------------------------------------
def _uniform_int(gen: torch.Generator, bounds: Tuple[int, int]) -> int:
    low, high = bounds
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def draw_samples(mix: str, count: int, args, gen: torch.Generator) -> List[Sample]:
    samples = []
    for _ in range(count):
        if mix == "sft":
            length = math.exp(math.log(600) + args.sigma * float(torch.randn(1, generator=gen)))
            length = int(min(max(length, args.block_size), args.seq_length))
            prompt = int(length * (0.2 + 0.6 * float(torch.rand(1, generator=gen))))
            samples.append(Sample(clean=prompt, image=0, target=max(1, length - prompt)))
        else:
            shape = SHAPES["understanding"]
            image, prompt = _uniform_int(gen, shape.prompt_image), _uniform_int(gen, shape.prompt_text)
            samples.append(Sample(clean=image + prompt, image=image, target=_uniform_int(gen, shape.target)))
    return samples


def padded_length(sample: Sample, block: int, limit: int) -> int:
    """Document length in the row: clean + target rounded up to the block, at most ``limit``."""
    return min(-(-(sample.clean + sample.target) // block) * block, limit)


def pack(samples: List[Sample], block: int, limit: int) -> List[List[Sample]]:
    """Greedy in-order packing into rows of ``limit`` positions (documents block-aligned)."""
    rows, row, used = [], [], 0
    for sample in samples:
        length = padded_length(sample, block, limit)
        if row and used + length > limit:
            rows.append(row)
            row, used = [], 0
        row.append(sample)
        used += length
    return rows + ([row] if row else [])


def row_batch(row: List[Sample], block: int, limit: int, vocab: Vocabulary) -> Batch:
    """One packed row ``[1, limit]``: clean prefix, maskable target + block padding, row padding (doc -1)."""
    doc_ids = torch.full((1, limit), -1, dtype=torch.int32)
    maskable = torch.zeros(1, limit, dtype=torch.bool)
    modality = torch.full((1, limit), MODALITY_TEXT, dtype=torch.int8)
    positions = torch.zeros(1, limit, dtype=torch.int64)
    start = 0
    for doc, sample in enumerate(row):
        stop = start + padded_length(sample, block, limit)
        doc_ids[0, start:stop] = doc
        maskable[0, min(start + sample.clean, stop - 1):stop] = True  # at least one maskable token
        modality[0, start:start + sample.image] = MODALITY_IMAGE
        positions[0, start:stop] = torch.arange(stop - start)
        start = stop
    tokens = torch.full((1, limit), vocab.pad_id, dtype=torch.int64)
    return Batch(tokens=tokens, maskable=maskable, modality=modality, doc_ids=doc_ids, position_ids=positions)


# ----------------------------------------------------------------------------------------------
# counting
# ----------------------------------------------------------------------------------------------
def count_rows(rows: List[List[Sample]], args, vocab: Vocabulary, ours: bool, dense: bool,
               gen: torch.Generator) -> Dict[str, float]:
    cfg = DiffusionConfig(t_min=args.t_min, t_max=args.t_max, complementary=True, prefix_aware=ours, shared_clean=ours)
    totals = {"positions": 0, "pairs": 0, "loss_tokens": 0}
    for row in rows:
        inputs = build_inputs(row_batch(row, args.block_size, args.seq_length, vocab), vocab, cfg, gen,
                              block_size=args.block_size)
        length = inputs.input_ids.shape[1]
        totals["positions"] += inputs.num_tokens
        totals["loss_tokens"] += int((inputs.loss_weights > 0).sum())
        if dense:
            totals["pairs"] += inputs.input_ids.shape[0] * length * length
        else:
            mask = block_mask(inputs.layout)
            tiles = int(mask.kv_num_blocks.sum() + mask.full_kv_num_blocks.sum())
            totals["pairs"] += tiles * FLEX_TILE * FLEX_TILE
    return totals


def training_flops(totals: Dict[str, float], m: ModelConfig) -> Tuple[float, float]:
    """(linear, attention) training FLOPs by model/flops.py's formula: 3x forward. The pairs are
    the kernel's (all of the dense mask, or the BlockMask's non-empty tiles), not the rule's."""
    linear = flops.TRAIN_OVER_FORWARD * flops.linear_forward_flops(m, totals["positions"])
    attention = flops.TRAIN_OVER_FORWARD * flops.attention_forward_flops(m, totals["pairs"])
    return linear, attention


def measure_mix(mix: str, args, model: ModelConfig, vocab: Vocabulary) -> Dict[str, Dict[str, float]]:
    samples = draw_samples(mix, args.samples, args, torch.Generator().manual_seed(args.seed))
    layouts = {
        SYSTEMS[0]: ([[s] for s in samples], False, True),
        SYSTEMS[1]: (pack(samples, args.block_size, args.seq_length), False, False),
        SYSTEMS[2]: (pack(samples, args.block_size, args.seq_length), True, False),
    }
    results = {}
    for system, (rows, ours, dense) in layouts.items():
        # the same noise draws for every system: one generator seed per system
        totals = count_rows(rows, args, vocab, ours, dense, torch.Generator().manual_seed(args.seed + 1))
        linear, attention = training_flops(totals, model)
        totals.update(rows=len(rows), linear=linear, attention=attention)
        results[system] = totals
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    model = load_config(args.model_recipe).model
    vocab = Vocabulary.synthetic(text_size=model.text_vocab, num_image_codes=model.num_image_codes)
    print(f"model {os.path.basename(args.model_recipe)}: {flops.linear_weights_per_position(model) / 1e9:.2f}B active "
          f"linear params per position; L = {args.seq_length}, block {args.block_size}, t in "
          f"[{args.t_min}, {args.t_max}], complementary masking, {args.samples} samples per mix")
    header = (f"{'mix':<14} {'system':<30} {'rows':>5} {'positions':>10} {'loss tok':>8} {'pos/loss':>9} "
              f"{'pairs/loss':>11} {'lin GFLOP/loss':>15} {'GFLOP/loss':>11} {'vs packed 2L':>13} {'vs dFactory':>12}")
    print(header)
    for mix in args.mixes:
        results = measure_mix(mix, args, model, vocab)
        per_token = {s: (r["linear"] + r["attention"]) / r["loss_tokens"] for s, r in results.items()}
        for system, r in results.items():
            loss = r["loss_tokens"]
            print(f"{mix:<14} {system:<30} {r['rows']:>5} {r['positions']:>10,} {loss:>8,} "
                  f"{r['positions'] / loss:>9.2f} {r['pairs'] / loss:>11,.0f} {r['linear'] / loss / 1e9:>15.1f} "
                  f"{per_token[system] / 1e9:>11.1f} {per_token[SYSTEMS[1]] / per_token[system]:>12.2f}x "
                  f"{per_token[SYSTEMS[0]] / per_token[system]:>11.2f}x")

if __name__ == "__main__":
    main()
