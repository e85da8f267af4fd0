"""Benchmark block-diffusion attention: dense-mask SDPA vs FlexAttention vs causal FlashAttention.

Times forward+backward of one attention call over the BDLM layout ``[noisy | clean]`` of one
document of length L (sequence 2L), GQA heads, and reports peak memory on GPU. On CPU the
FlexAttention backward does not exist in torch, so CPU rows time FlexAttention forward only
and add our CPU fallback (SDPA over query chunks); no peak memory is reported on CPU.

``--train-memory`` measures what training keeps instead (CPU or GPU): each method runs forward +
backward once in a fresh process and reports the bytes autograd saves for backward, the peak
memory above the inputs (RSS on CPU, allocator peak on GPU) and the time; it compares dense-mask
SDPA, chunked SDPA under plain autograd (the CPU path before the recompute, kept here as the
baseline) and the CPU path as it is (``chunked_sdpa``: masks rebuilt in backward). It also times
building every chunk's mask of one layer both ways.

``--block-mask`` times building the FlexAttention ``BlockMask`` of the layout: from the block
structure (``masks.block_mask``, what training uses) and with ``create_block_mask`` over the
dense rule (the previous way, only up to ``--reference-max-length``), and checks both agree.

Examples:
    python tools/bench_attention.py                            # CPU, small L
    python tools/bench_attention.py --block-mask --lengths 4096 8192   # BlockMask build at 2L=8192, 16384
    python tools/bench_attention.py --train-memory --lengths 4096   # CPU training memory at 2L=8192
    python tools/bench_attention.py --lengths 2048 4096 8192   # GPU (H100 goal: Flex >= 4x faster,
                                                               # >= 10x less memory than dense at 8192)
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm import tqdm

from megatron_uni.attention.masks import allowed_from_codes, allowed_rows, block_mask, dense_mask, mask_codes
from megatron_uni.diffusion.layout import full_layout
from megatron_uni.model.block_attention import CPU_QUERY_CHUNK, chunked_sdpa


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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--block-mask", action="store_true",
                        help="time building the BlockMask from the block structure vs create_block_mask")
    parser.add_argument("--reference-max-length", type=int, default=4096,
                        help="--block-mask: largest L for which create_block_mask is also timed (default 4096)")
    parser.add_argument("--train-memory", action="store_true",
                        help="saved-for-backward bytes, peak memory and time of one fwd+bwd per method, each in a "
                             "fresh process; plus the per-layer cost of building the chunk masks")
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


# ----------------------------------------------------------------------------------------------
# --train-memory
# ----------------------------------------------------------------------------------------------
def autograd_chunked_sdpa(q, k, v, layout, scale, chunk=CPU_QUERY_CHUNK):
    """The CPU path before the recompute: plain autograd keeps every chunk's (float) mask."""
    outs = [F.scaled_dot_product_attention(q[:, :, a:a + chunk], k, v, attn_mask=allowed_rows(layout, a, a + chunk),
                                           scale=scale, enable_gqa=True) for a in range(0, q.shape[2], chunk)]
    return torch.cat(outs, 2)


TRAIN_METHODS = {
    "dense-mask SDPA": lambda q, k, v, layout, scale: F.scaled_dot_product_attention(
        q, k, v, attn_mask=~dense_mask(layout), scale=scale, enable_gqa=True),
    "chunked SDPA, plain autograd (before)": autograd_chunked_sdpa,
    "chunked_sdpa, masks recomputed (now)": chunked_sdpa,
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _train_once(method: str, length: int, args, device_name: str, results) -> None:
    """One fwd+bwd of ``method`` in this (fresh) process: saved MiB, peak MiB above the inputs, seconds."""
    if args.threads:  # a spawned process starts with torch's default
        torch.set_num_threads(args.threads)
    device = torch.device(device_name)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layout = full_layout(torch.zeros(1, length, dtype=torch.int32, device=device), args.block_size)
    gen = torch.Generator(device=device).manual_seed(0)
    shapes = [(1, h, 2 * length, args.head_dim) for h in (args.heads, args.kv_heads, args.kv_heads)]
    q, k, v = (torch.randn(s, device=device, dtype=dtype, generator=gen).requires_grad_() for s in shapes)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    base = torch.cuda.memory_allocated() if device.type == "cuda" else _rss_bytes()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = TRAIN_METHODS[method](q, k, v, layout, args.head_dim ** -0.5)
    out.float().sum().backward()
    _sync(device)
    seconds = time.perf_counter() - start
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))
    results[method] = (sum(saved.values()) - inputs, _peak_bytes(device) - base, seconds)


def _mask_build_ms(length: int, block_size: int, repeats: int) -> dict:
    """Milliseconds to build every chunk mask of one layer at 2L = 2*length, before and now."""
    layout = full_layout(torch.zeros(1, length, dtype=torch.int32), block_size)
    seq, out = 2 * length, {}
    for name, build in (("allowed_rows (before)", lambda: [allowed_rows(layout, a, a + CPU_QUERY_CHUNK)
                                                          for a in range(0, seq, CPU_QUERY_CHUNK)]),
                        ("mask_codes + allowed_from_codes (now)", lambda: [
                            allowed_from_codes(codes, a, a + CPU_QUERY_CHUNK)
                            for codes in [mask_codes(layout)] for a in range(0, seq, CPU_QUERY_CHUNK)])):
        build()
        start = time.perf_counter()
        for _ in range(repeats):
            build()
        out[name] = (time.perf_counter() - start) / repeats * 1e3
    return out


def train_memory(args, device) -> None:
    import multiprocessing

    lengths = args.lengths or [1024]
    print(f"device {device}, heads {args.heads}/{args.kv_heads}, dim {args.head_dim}, block {args.block_size}, "
          f"chunk {CPU_QUERY_CHUNK}, {torch.get_num_threads()} threads, one fwd+bwd per method in a fresh process, "
          f"torch {torch.__version__}")
    print(f"{'L':>6} {'2L':>6} {'method':<40} {'saved MiB':>10} {'peak MiB':>9} {'s fwd+bwd':>10}")
    context = multiprocessing.get_context("spawn")
    for length in lengths:
        for method in TRAIN_METHODS:
            with context.Manager() as manager:
                results = manager.dict()
                worker = context.Process(target=_train_once, args=(method, length, args, device.type, results))
                worker.start()
                worker.join()
                if method not in results:
                    print(f"{length:>6} {2 * length:>6} {method:<40} failed (exit code {worker.exitcode})")
                    continue
                saved, peak, seconds = results[method]
            print(f"{length:>6} {2 * length:>6} {method:<40} {saved / 2**20:10.0f} {peak / 2**20:9.0f} "
                  f"{seconds:10.2f}")
        for name, ms in _mask_build_ms(length, args.block_size, args.repeats).items():
            print(f"{length:>6} {2 * length:>6} build all chunk masks of a layer: {name}: {ms:.1f} ms")


# ----------------------------------------------------------------------------------------------
# --block-mask
# ----------------------------------------------------------------------------------------------
def _timed(fn, repeats: int):
    result = fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return result, (time.perf_counter() - start) / repeats


def block_mask_build(args, device) -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    from megatron_uni.attention.masks import FLEX_TILE, mask_mod

    lengths = args.lengths or [4096, 8192]
    print(f"device {device}, one document, block {args.block_size}, tile {FLEX_TILE}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'L':>6} {'2L':>6} {'method':<44} {'ms':>10}")
    for length in lengths:
        layout = full_layout(torch.zeros(1, length, dtype=torch.int32, device=device), args.block_size)
        seq = 2 * length
        ours, seconds = _timed(lambda: block_mask(layout), args.repeats)
        print(f"{length:>6} {seq:>6} {'block_mask (from the block structure)':<44} {seconds * 1e3:10.1f}")
        if length > args.reference_max_length:
            continue
        reference, seconds = _timed(lambda: create_block_mask(mask_mod(layout), 1, None, seq, seq, device=device,
                                                              BLOCK_SIZE=FLEX_TILE), 1)
        same = all(torch.equal(getattr(ours, f), getattr(reference, f))
                   for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"))
        print(f"{length:>6} {seq:>6} {'create_block_mask (dense rule), 1 repeat':<44} {seconds * 1e3:10.1f}"
              f"   tile lists equal: {same}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.block_mask:
        block_mask_build(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return
    if args.train_memory:
        train_memory(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return
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
