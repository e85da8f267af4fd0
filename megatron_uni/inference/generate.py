"""The block-diffusion generation loop (LLaDA2 semantics, prefix KV cache through the runner).

The canvas is ``prompt | span | suffix`` (e.g. ``<|/image|>`` after an image), split into blocks
of ``block_size`` columns from column 0. Blocks made only of prompt are committed once (the
prefill). Every later block starts with its span positions masked and is refined for at most
``steps`` forwards of that block alone; each forward accepts positions as
:func:`~megatron_uni.inference.sampling.accept_positions` says. A finished block is committed
once, and generation stops after the block in which EOS appeared (when asked to). CFG branches
are extra rows of the canvas: their prompts differ, their generated columns are shared.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, List, Optional, Sequence

import torch

from megatron_uni.inference.sampling import SamplerSettings, accept_positions, choose_tokens, transfer_schedule
from megatron_uni.rounding import round_up
from megatron_uni.tokens import Vocabulary

# rows of logits [rows, n, V] -> guided logits [n, V]; row 0 is the conditional branch
Guidance = Callable[[torch.Tensor], torch.Tensor]


def conditional_only(logits: torch.Tensor) -> torch.Tensor:
    return logits[0]


class GenerationError(ValueError):
    """A request the model cannot serve (too long for its context, no image rows, ...)."""


@dataclasses.dataclass
class GenerationRequest:
    prompts: List[List[int]]        # one prompt per branch; [0] is the conditional one
    length: int                     # positions to generate after the prompt
    image_span: bool = False        # the generated positions may only hold image codes
    suffix: Sequence[int] = ()      # fixed tokens after the generated positions
    pad_to_block: bool = True       # extend the canvas with masks to a whole block (LLaDA2 text)
    stop_at_eos: bool = True
    guidance: Guidance = conditional_only


@dataclasses.dataclass
class Generation:
    tokens: List[int]     # generated positions + suffix, cut after the first EOS (kept)
    finished: bool        # EOS generated (text), or the whole span filled (image)
    refinement_forwards: int
    model_forwards: int   # refinement + commits (prefill included)
    blocks: int
    seconds: float

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.refinement_forwards)


@dataclasses.dataclass
class Canvas:
    tokens: torch.Tensor     # int64 [rows, total]
    positions: torch.Tensor  # int64 [rows, total]
    valid: torch.Tensor      # bool  [rows, total] (False on a branch's left pad)
    pending: torch.Tensor    # bool  [total]: still masked
    image: torch.Tensor      # bool  [total]: restricted to image codes
    prompt_length: int
    span_end: int            # prompt_length + request.length


def build_canvas(request: GenerationRequest, vocabulary: Vocabulary, block_size: int) -> Canvas:
    if not request.prompts or not request.prompts[0]:
        raise GenerationError("the prompt is empty: generation needs at least one prompt token")
    if request.length < 1:
        raise GenerationError(f"nothing to generate: length {request.length}")
    prompt_length = max(len(p) for p in request.prompts)
    span_end = prompt_length + request.length
    total = span_end + len(request.suffix)
    if request.pad_to_block:
        total = round_up(total, block_size)
    rows = len(request.prompts)
    tokens = torch.full((rows, total), vocabulary.mask_id, dtype=torch.long)
    valid = torch.ones((rows, total), dtype=torch.bool)
    positions = torch.arange(total).repeat(rows, 1)
    for row, prompt in enumerate(request.prompts):
        pad = prompt_length - len(prompt)  # left pad: hidden keys, positions restart after it
        tokens[row, :pad] = vocabulary.pad_id
        tokens[row, pad:prompt_length] = torch.tensor(prompt, dtype=torch.long)
        valid[row, :pad] = False
        positions[row] = (torch.arange(total) - pad).clamp(min=0)
    tokens[:, span_end:span_end + len(request.suffix)] = torch.tensor(list(request.suffix), dtype=torch.long)
    pending = torch.zeros(total, dtype=torch.bool)
    pending[prompt_length:span_end] = True
    pending[span_end + len(request.suffix):] = True  # block padding is generated too (LLaDA2)
    image = torch.zeros(total, dtype=torch.bool)
    if request.image_span:
        image[prompt_length:span_end] = True
    return Canvas(tokens, positions, valid, pending, image, prompt_length, span_end)


def disallowed_ids(vocabulary: Vocabulary, columns: int, image: bool) -> torch.Tensor:
    """Bool [columns]: ids never generated (mask, vocabulary padding rows; text ids for images)."""
    ids = torch.arange(columns)
    banned = (ids >= vocabulary.size) | (ids == vocabulary.mask_id)
    if image:
        if columns < vocabulary.image_offset + vocabulary.num_image_codes:
            raise GenerationError(f"the model has {columns} output rows, fewer than the "
                                  f"{vocabulary.size} of text + image codes: it cannot generate images")
        banned |= ids < vocabulary.image_offset
    return banned


def _restrict(logits: torch.Tensor, image: torch.Tensor, banned_text: torch.Tensor,
              banned_image: Optional[torch.Tensor]) -> torch.Tensor:
    banned = banned_text[None].expand_as(logits).clone()
    if banned_image is not None and image.any():
        banned[image] = banned_image
    return logits.masked_fill(banned, float("-inf"))


def _check_context(canvas: Canvas, runner) -> None:
    total = canvas.tokens.shape[1]
    if total > runner.max_length:
        raise GenerationError(f"prompt ({canvas.prompt_length} tokens) + generation ({total - canvas.prompt_length} "
                              f"positions, block padding included) = {total} exceeds the model's context of "
                              f"{runner.max_length} positions")


@dataclasses.dataclass
class _Step:
    """What every refinement step of one generation shares."""

    runner: object
    cache: object
    request: GenerationRequest
    settings: SamplerSettings
    schedule: List[int]
    banned_text: torch.Tensor
    banned_image: Optional[torch.Tensor]
    generator: torch.Generator


def _refine_block(step: _Step, canvas: Canvas, columns: slice) -> int:
    """Refine the block at ``columns`` until nothing is masked or the steps run out; returns
    the forwards made."""
    for index, scheduled in enumerate(step.schedule):
        pending = canvas.pending[columns]
        if not pending.any():
            return index
        logits = step.runner.forward(step.cache, canvas.tokens[:, columns], canvas.positions[:, columns])
        logits = _restrict(step.request.guidance(logits).float(), canvas.image[columns], step.banned_text,
                           step.banned_image)
        tokens, confidence = choose_tokens(logits, step.settings, step.generator)
        accepted = accept_positions(confidence, pending, scheduled, step.settings.threshold)
        canvas.tokens[:, columns][:, accepted] = tokens[accepted]  # every CFG row gets the same tokens
        canvas.pending[columns] &= ~accepted
    return len(step.schedule)


def generate(runner, vocabulary: Vocabulary, request: GenerationRequest,
             settings: SamplerSettings = SamplerSettings()) -> Generation:
    started, forwards_before = time.perf_counter(), runner.forwards
    size = settings.block_size
    canvas = build_canvas(request, vocabulary, size)
    _check_context(canvas, runner)
    total = canvas.tokens.shape[1]
    step = _Step(runner, runner.new_cache(canvas.tokens.shape[0], size), request, settings,
                 # more steps than positions would schedule empty steps
                 transfer_schedule(size, min(settings.steps, size)),
                 disallowed_ids(vocabulary, runner.vocab_size, image=False),
                 disallowed_ids(vocabulary, runner.vocab_size, image=True) if request.image_span else None,
                 torch.Generator().manual_seed(settings.seed))
    first_block = canvas.prompt_length // size
    if first_block:  # prefill: the blocks made only of prompt
        end = first_block * size
        runner.commit(step.cache, canvas.tokens[:, :end], canvas.positions[:, :end], canvas.valid[:, :end])
    refinements, blocks, finished = 0, 0, not request.stop_at_eos
    for start in range(first_block * size, total, size):
        columns = slice(start, min(start + size, total))
        refinements += _refine_block(step, canvas, columns)
        blocks += 1
        if request.stop_at_eos and _has_eos(canvas, vocabulary, columns.stop):
            finished = True
            break
        if columns.stop < total:  # the finished block's keys/values, computed once
            runner.commit(step.cache, canvas.tokens[:, columns], canvas.positions[:, columns])
    return Generation(_output(canvas, vocabulary, request), finished, refinements, runner.forwards - forwards_before,
                      blocks, time.perf_counter() - started)


def _has_eos(canvas: Canvas, vocabulary: Vocabulary, stop: int) -> bool:
    generated = canvas.tokens[0, canvas.prompt_length:min(stop, canvas.span_end)]
    return bool((generated == vocabulary.eos_id).any())


def _output(canvas: Canvas, vocabulary: Vocabulary, request: GenerationRequest) -> List[int]:
    span = canvas.tokens[0, canvas.prompt_length:canvas.span_end].tolist()
    if request.stop_at_eos and vocabulary.eos_id in span:
        return span[:span.index(vocabulary.eos_id) + 1]
    return span + list(request.suffix)
