"""Samples during training: every ``eval.sample_interval`` steps, generate from fixed prompts.

Rank 0 runs the block-diffusion sampler (greedy, :mod:`megatron_uni.inference`) on the model being
trained and writes ``RUN_DIR/samples/iter_NNNNNNN.jsonl`` beside ``metrics.jsonl``, one line per
prompt (format in docs/training.md):

- text: ``{"iteration", "id", "task": "text", "prompt", "tokens", "text", "stats"}``, the sampler
  record of ``megatron-uni generate --output``;
- image: the decoder hand-off record of ``tools/export_image_tokens.py`` (``id, index, prompt, h,
  w, token_ids`` = 0-based codes, ``metadata``) plus ``iteration``, ``task: "image"`` and
  ``tokens`` (the whole ``<|image|> <H> <W> <boi> ... <|/image|>`` block).

The training chunk is wrapped by DDP and built with the plain block-diffusion attention, so the
uncached runner drives it (prefix recomputed every step: cheap for a few short prompts). The
model is whole on rank 0 only without TP / PP / EP / CP; other layouts, and prompts the sampler
refuses, skip with one logged note (training goes on).
Sampling never changes the run: the forwards run under ``no_grad`` (routers count tokens for the
expert-bias update only with gradients on), every RNG state is restored afterwards and each
module's train/eval mode put back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

from megatron_uni.config import Config, ParallelConfig
from megatron_uni.inference.command import render_text
from megatron_uni.inference.generate import GenerationError, generate
from megatron_uni.inference.megatron_runner import megatron_runner
from megatron_uni.inference.prompts import text_request, text_to_image_request
from megatron_uni.inference.sampling import SamplerSettings
from megatron_uni.platform.distributed import is_rank0
from megatron_uni.tokens import Vocabulary
from megatron_uni.training.metrics import run_dir_of

SAMPLES_DIR = "samples"
_NOTED: set = set()  # skip reasons already logged by this process


def samples_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, SAMPLES_DIR, f"iter_{iteration:07d}.jsonl")


def unsupported_layout(parallel: ParallelConfig) -> Optional[str]:
    """Why rank 0 does not hold the whole model alone, or None when it does."""
    split = {"parallel.tensor": parallel.tensor, "parallel.pipeline": parallel.pipeline,
             "parallel.expert": parallel.expert, "parallel.context": parallel.context}
    named = [f"{key}={value}" for key, value in split.items() if value > 1]
    if parallel.virtual_pipeline:
        named.append(f"parallel.virtual_pipeline={parallel.virtual_pipeline}")
    return (f"the model is split over ranks ({', '.join(named)}); eval.sample_interval needs it whole on rank 0"
            if named else None)


@functools.lru_cache(maxsize=4)
def _vocabulary(tokenizer: str, text_vocab: int, num_image_codes: int) -> Vocabulary:
    return Vocabulary.from_tokenizer_dir(tokenizer, text_size=text_vocab, num_image_codes=num_image_codes)


@contextlib.contextmanager
def sampling_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients, and on exit every module's mode and every RNG state as before
    (the training trajectory must not depend on whether samples were drawn)."""
    modes = [(module, module.training) for module in model.modules()]
    tracker_states = get_cuda_rng_tracker().get_states()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        model.eval()
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training
            get_cuda_rng_tracker().set_states(tracker_states)


def _text_record(runner, vocabulary: Vocabulary, cfg: Config, prompt: str, settings: SamplerSettings) -> Dict:
    out = generate(runner, vocabulary, text_request(vocabulary, prompt, cfg.eval.sample_length, chat=False),
                   settings)
    text = render_text(vocabulary, [t for t in out.tokens if t != vocabulary.eos_id])
    return {"task": "text", "prompt": prompt, "tokens": out.tokens, "text": text, "stats": _stats(out)}


def _image_record(runner, vocabulary: Vocabulary, cfg: Config, prompt: str, settings: SamplerSettings) -> Dict:
    grid_h, grid_w = cfg.eval.sample_image_grid
    request = text_to_image_request(vocabulary, prompt, grid_h, grid_w, cfg_scale=1.0)
    out = generate(runner, vocabulary, request, settings)
    tokens = request.prompts[0][-4:] + out.tokens  # <|image|> <H> <W> <boi> codes <|/image|>
    _, _, codes = vocabulary.parse_image_block(tokens)
    # the decoder hand-off record (tools/export_image_tokens.py), plus what the text lines carry
    return {"task": "image", "index": 0, "prompt": prompt, "h": grid_h, "w": grid_w, "token_ids": list(codes),
            "tokens": tokens, "metadata": {"stats": _stats(out)}}


def _stats(out) -> Dict[str, Any]:
    return {"generated": len(out.tokens), "refinement_forwards": out.refinement_forwards,
            "finished": out.finished, "seconds": round(out.seconds, 3)}


def sample_records(model: torch.nn.Module, cfg: Config, vocabulary: Vocabulary, iteration: int) -> List[Dict]:
    """One record per fixed prompt (text first, then images), generated greedily by ``model``."""
    settings = SamplerSettings(block_size=cfg.data.block_size, steps=cfg.eval.sample_steps)
    runner = megatron_runner(model, cfg.model, cached=False)
    records = []
    with sampling_mode(model):
        for index, prompt in enumerate(cfg.eval.sample_prompts):
            records.append({"iteration": iteration, "id": f"text-{index}",
                            **_text_record(runner, vocabulary, cfg, prompt, settings)})
        for index, prompt in enumerate(cfg.eval.sample_image_prompts):
            records.append({"iteration": iteration, "id": f"image-{index}",
                            **_image_record(runner, vocabulary, cfg, prompt, settings)})
    return records


def _note_once(reason: str, log_fn: Callable[[str], None]) -> None:
    if reason not in _NOTED:
        _NOTED.add(reason)
        log_fn(f"samples skipped: {reason}")


def write_samples(state, log_fn: Callable[[str], None] = print) -> Optional[str]:
    """After a step of ``training.loop.run``: when ``state.iteration`` is a multiple of
    ``eval.sample_interval``, rank 0 writes the samples file; returns its path (None otherwise).
    Other ranks return at once (they do not take part: the model is whole on rank 0)."""
    cfg = state.cfg
    interval = cfg.eval.sample_interval
    if not interval or state.iteration % interval or not is_rank0():
        return None
    run_dir = run_dir_of(cfg.logging.run_dir, cfg.checkpoint.save)
    reason = unsupported_layout(cfg.parallel) or (None if run_dir else "no run directory (set logging.run_dir)")
    if reason is None and not cfg.data.tokenizer:
        reason = "no tokenizer (set data.tokenizer)"
    if reason:
        _note_once(reason, log_fn)
        return None
    vocabulary = _vocabulary(cfg.data.tokenizer, cfg.model.text_vocab, cfg.model.num_image_codes)
    try:
        records = sample_records(state.model[0], cfg, vocabulary, state.iteration)
    except GenerationError as err:  # e.g. a grid without size tokens: the run goes on without samples
        _note_once(f"eval.sample_*: {err}", log_fn)
        return None
    path = samples_path(run_dir, state.iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    log_fn(f"samples: {len(records)} written to {path}")
    return path
