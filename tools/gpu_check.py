"""One-GPU check of the training path: 20 steps of the tiny model, step 1 compared with the CPU.

    python tools/gpu_check.py                    # on a GPU machine (< 8 minutes on one GPU)
    python tools/gpu_check.py --device cpu       # smoke test of the script itself on CPU

On the GPU leave TORCHDYNAMO_DISABLE unset: the compiled FlexAttention is part of what is checked.

What it does, printing one table at the end:

1. builds the tiny model (recipes/model/tiny.yaml) on the device (on GPU the block attention is
   compiled FlexAttention), saves its initial weights, and trains one step on the demo data;
2. re-runs that step 1 on the CPU from the same weights (a child process without CUDA) and
   compares the loss and every parameter gradient;
3. if transformer_engine imports, repeats step 1 with TE layers (``model.transformer_impl=
   transformer_engine``) from the same weights and compares them too;
4. trains 19 more steps on the device and reports the mean step time, clean tokens/s, model
   TFLOP/s and MFU (docs/training.md) and peak memory.

Inputs are moved to the device here (pinned, non-blocking); the process group uses gloo for CPU
tensors and NCCL for device tensors, so the loop's CPU-side collectives work under it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

RECIPE = "recipes/model/tiny.yaml"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="training steps on the device (default 20)")
    parser.add_argument("--seq-length", type=int, default=512, help="clean tokens per sequence (default 512)")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--data", default=None, help="dataset prefix built by tools/build_dataset.py; default: "
                                                     "generate the demo data in a temporary directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory of --data")
    # internal: the CPU reference child
    parser.add_argument("--reference", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="local", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _demo_data(root: str):
    from megatron_uni.data.build import BuildSettings, build_dataset
    from megatron_uni.data.demo import make_demo_data

    make_demo_data(root, num_scenes=12, num_paragraphs=16, seed=0)
    settings = BuildSettings(tokenizer_dir=os.path.join(root, "tokenizer"),
                             image_codes=os.path.join(root, "image_codes.json"), num_image_codes=256)
    build_dataset([os.path.join(root, "samples.jsonl")], os.path.join(root, "dataset", "demo"), settings)
    return os.path.join(root, "dataset", "demo"), os.path.join(root, "tokenizer")


def _overrides(args, impl: str):
    return [f"data.path={args.data}", f"data.tokenizer={args.tokenizer}", f"data.seq_length={args.seq_length}",
            "data.micro_batch_size=2", f"data.global_batch_size={args.global_batch}", "data.block_size=32",
            f"schedule.train_iters={args.steps}", "schedule.warmup_iters=1", f"model.transformer_impl={impl}"]


def _init_process_group(device: str) -> None:
    # one process: an in-memory store, no port to collide on
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    backend = "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=0, world_size=1, store=torch.distributed.HashStore())


def _on_device(source, device: str):
    """The loop's micro-batch function with every tensor moved to ``device`` (pinned, non-blocking)."""
    def move(value):
        if torch.is_tensor(value):
            return value.pin_memory().to(device, non_blocking=True) if device == "cuda" else value
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, **{f.name: move(getattr(value, f.name))
                                                 for f in dataclasses.fields(value) if f.init})
        return value

    return lambda *key: move(source(*key))


def _gradients(state) -> dict:
    grads = {}
    for chunk in state.model:
        for name, param in chunk.module.named_parameters():
            grad = getattr(param, "main_grad", None)
            grads[name] = (grad if grad is not None else param.grad).detach().float().cpu().clone()
    return grads


def one_step(args, impl: str, weights: str, save_initial: bool):
    """Set up (on ``args.device``), optionally save the initial weights, train step 1."""
    from megatron_uni import checkpoint
    from megatron_uni.config import load_config
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource

    cfg = load_config(RECIPE, _overrides(args, impl))
    if not save_initial:
        cfg.checkpoint.load, cfg.checkpoint.finetune = weights, True
    source = MicrobatchSource(cfg)
    state = loop.setup(cfg, vocabulary=source.vocab.layout())
    if save_initial:
        checkpoint.save_checkpoint(weights, 0, state.model, cfg.model, source.vocab.layout(), cfg.parallel)
    make = _on_device(source, args.device)
    metrics = loop.train_step(state, make, source.model_seq_length).as_record()
    return state, make, source, metrics


def _compare(name: str, reference: dict, metrics: dict, grads: dict) -> dict:
    worst = max(((g - reference["grads"][k]).abs().max().item() / max(reference["grads"][k].abs().max().item(), 1e-12))
                for k, g in grads.items())
    return {"check": name, "loss": metrics["loss"], "cpu loss": reference["loss"],
            "|loss diff|": abs(metrics["loss"] - reference["loss"]), "worst rel grad diff": worst}


def reference_child(args) -> int:
    """CPU step 1 from the saved weights; writes loss and gradients to ``args.reference``.pt."""
    _init_process_group("cpu")
    state, _, _, metrics = one_step(args, "local", args.reference, save_initial=False)
    torch.save({"loss": metrics["loss"], "grads": _gradients(state)}, args.reference + ".pt")
    return 0


def _run_reference(args, weights: str) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TORCHDYNAMO_DISABLE": "1"}
    command = [sys.executable, os.path.abspath(__file__), "--device", "cpu", "--reference", weights,
               "--data", args.data, "--tokenizer", args.tokenizer, "--seq-length", str(args.seq_length),
               "--global-batch", str(args.global_batch), "--steps", str(args.steps)]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return torch.load(weights + ".pt", weights_only=False)


def _te_row(args, weights: str, reference: dict):
    from megatron_uni.platform.distributed import destroy
    from megatron_uni.platform.te import transformer_engine_available

    if not transformer_engine_available():
        return {"check": "step 1, TE layers", "loss": None, "note": "transformer_engine does not import: skipped"}
    destroy()
    _init_process_group(args.device)
    state, _, _, metrics = one_step(args, "transformer_engine", weights, save_initial=False)
    return _compare("step 1, TE layers vs CPU", reference, metrics, _gradients(state))


def _train_rows(args, state, make, source) -> dict:
    from megatron_uni.training import loop
    from megatron_uni.training.metrics import MetricsLogger

    cfg = state.cfg
    logger = MetricsLogger(None, cfg.model, cfg.data.seq_length, cfg.data.block_size, cfg.data.global_batch_size,
                           1, cfg.schedule.train_iters, state.iteration)
    records = []
    while state.iteration < cfg.schedule.train_iters:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = loop.train_step(state, make, source.model_seq_length).as_record()
        if args.device == "cuda":
            torch.cuda.synchronize()
        records.append(logger.record(state.iteration, metrics, time.perf_counter() - start))
    timed = records[1:] or records  # the first of these steps may still compile
    seconds = sum(r["step_seconds"] for r in timed) / len(timed)
    last = records[-1]
    return {"check": f"steps 2-{cfg.schedule.train_iters} on {args.device}", "loss": last["loss"],
            "step s": seconds, "clean tok/s": last["clean_tokens_per_s"] * last["step_seconds"] / seconds,
            "TFLOP/s": last["model_tflops_per_device"] * last["step_seconds"] / seconds,
            "MFU": None if last["mfu"] is None else last["mfu"] * last["step_seconds"] / seconds,
            "peak GiB": last["peak_mem_gib"], "finite": all(r["loss"] == r["loss"] for r in records)}


def print_table(rows) -> None:
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    def cell(value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)
    table = [[cell(row.get(k, "")) for k in keys] for row in rows]
    widths = [max(len(k), *(len(r[i]) for r in table)) for i, k in enumerate(keys)]
    print("| " + " | ".join(k.ljust(w) for k, w in zip(keys, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (use --device cpu for the smoke test)", file=sys.stderr)
        return 2
    if args.reference:
        return reference_child(args)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.data is None:
            args.data, args.tokenizer = _demo_data(os.path.join(tmp, "demo"))
        weights = os.path.join(tmp, "initial")
        _init_process_group(args.device)
        state, make, source, metrics = one_step(args, "local", weights, save_initial=True)
        device_grads = _gradients(state)
        reference = _run_reference(args, weights)
        rows = [_compare(f"step 1, {args.device} vs CPU", reference, metrics, device_grads)]
        rows.append(_train_rows(args, state, make, source))
        rows.append(_te_row(args, weights, reference))
    rows.append({"check": "total wall time", "step s": time.perf_counter() - started})
    print(json.dumps({"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}))
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
