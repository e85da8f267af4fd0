"""Benchmark block-diffusion attention: dense-mask SDPA vs FlexAttention vs causal FlashAttention.

Times forward+backward of one attention call over the BDLM layout ``[noisy | clean]`` of one
document of length L (sequence 2L), GQA heads, and reports peak memory on GPU. On CPU the
FlexAttention backward does not exist in torch, so CPU rows time FlexAttention forward only
and add our CPU fallback (SDPA over query chunks); no peak memory is reported on CPU.

Examples:
    python tools/bench_attention.py                            # CPU, small L
    python tools/bench_attention.py --lengths 2048 4096 8192   # GPU (H100 goal: Flex >= 4x faster,
                                                               # >= 10x less memory than dense at 8192)
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_uni.attention.masks import block_mask, dense_mask
from megatron_uni.diffusion.layout import full_layout
from megatron_uni.model.block_attention import chunked_sdpa


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="document lengths L (sequence is 2L); default 2048 4096 8192 on GPU, 256 512 on CPU")
    parser.add_argument("--heads", type=int, default=16, help="query heads (default 16)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default 4)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after one warm-up")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="default bfloat16 on GPU, float32 on CPU")
    return parser.parse_args(argv)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, inputs, device, repeats: int, backward: bool):
    """Mean seconds per call and peak GPU memory (bytes, None on CPU) of ``fn(*inputs)`` (+ backward)."""
    def once():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        if backward:
            out.float().sum().backward()
    once()  # warm-up (compilation, autotuning)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(repeats):
        once()
    _sync(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return seconds, peak


def methods(layout, device, scale):
    """name -> (function of q, k, v, has backward)."""
    gqa = dict(enable_gqa=True)
    table = {}

    def dense(q, k, v):
        # the mask is built inside: its [1,1,2L,2L] materialisation is part of the dense method's cost
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~dense_mask(layout), scale=scale, **gqa)
    table["dense-mask SDPA"] = (dense, True)

    from torch.nn.attention.flex_attention import flex_attention
    mask = block_mask(layout)  # built once per layout and cached in training
    if device.type == "cuda":
        compiled = torch.compile(flex_attention, dynamic=False)
        table["FlexAttention (compiled)"] = (lambda q, k, v: compiled(q, k, v, block_mask=mask, scale=scale,
                                                                      **gqa), True)
        table["causal FlashAttention"] = (lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, **gqa), True)
    else:
        table["FlexAttention (eager, fwd only)"] = (lambda q, k, v: flex_attention(q, k, v, block_mask=mask,
                                                                                   scale=scale, **gqa), False)
        table["chunked SDPA (CPU fallback)"] = (lambda q, k, v: chunked_sdpa(q, k, v, layout, scale), True)
    return table


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    lengths = args.lengths or ([2048, 4096, 8192] if device.type == "cuda" else [256, 512])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device {name}, dtype {dtype}, heads {args.heads}/{args.kv_heads}, dim {args.head_dim}, "
          f"block {args.block_size}, torch {torch.__version__}")
    print(f"{'L':>6} {'2L':>6} {'method':<32} {'ms fwd(+bwd)':>13} {'peak MiB':>9}")
    scale = args.head_dim ** -0.5
    for length in tqdm(lengths, desc="lengths", disable=len(lengths) < 2):
        layout = full_layout(torch.zeros(1, length, dtype=torch.int32, device=device), args.block_size)
        seq = 2 * length
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(1, args.heads, seq, args.head_dim, device=device, dtype=dtype, generator=gen)
        k = torch.randn(1, args.kv_heads, seq, args.head_dim, device=device, dtype=dtype, generator=gen)
        v = torch.randn(1, args.kv_heads, seq, args.head_dim, device=device, dtype=dtype, generator=gen)
        for method, (fn, backward) in methods(layout, device, scale).items():
            inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            try:
                seconds, peak = measure(fn, inputs, device, args.repeats, backward)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as error:  # e.g. dense OOM at large L
                tqdm.write(f"{length:>6} {seq:>6} {method:<32} failed: {str(error).splitlines()[0][:60]}")
                continue
            memory = f"{peak / 2**20:9.0f}" if peak is not None else f"{'n/a':>9}"
            tqdm.write(f"{length:>6} {seq:>6} {method:<32} {seconds * 1e3:13.1f} {memory}")


if __name__ == "__main__":
    main()
