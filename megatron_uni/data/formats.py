"""Task formats: one JSONL schema, validator and builder per task.

Every line is a JSON object with ``"task"`` naming one of :data:`TASKS`. ``validate_*`` checks the
schema (raising :class:`SampleError` naming file, line, field) and returns the normalised sample;
``build_*`` turns it into a :class:`TokenizedSample` with the Ling chat template
``<role>SYSTEM</role> {system} <role>HUMAN</role>{images}{text}<role>ASSISTANT</role>{target}<|endoftext|>``.
Images are referenced by key; codes come from the injected ``lookup_image(key) -> (H, W, codes)``
so this module does not depend on the VQ tokenizer. See docs/data.md for the schemas.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from megatron_uni.data.schema import (Where, as_object, image_key, image_list, int_list, require_keys,
                                      text_field)
from megatron_uni.data.sequence import SequenceBuilder, TokenizedSample
from megatron_uni.tokens import Vocabulary

ImageLookup = Callable[[str], Tuple[int, int, Sequence[int]]]

# System prompts of the released model (sglang-omni preprocessor / interleaved).
SYSTEM_UNDERSTANDING = "You are a multimodal understanding assistant."
SYSTEM_T2I = "You are a text-to-image generation assistant."
SYSTEM_EDITING = "You are an image editing assistant."
SYSTEM_INTERLEAVED = "You are a interleaved generation assistant."

COORD_MAX = 1000  # grounding coordinates are normalised to [0, COORD_MAX]
MIN_INTERLEAVED_IMAGES, MAX_INTERLEAVED_IMAGES = 2, 6
MAX_PROMPT_IMAGES = 16


@dataclasses.dataclass
class BuildContext:
    """What a builder needs besides the sample; ``rng`` is seeded per sample by the caller."""

    vocab: Vocabulary
    lookup_image: ImageLookup
    rng: np.random.Generator
    cfg_dropout: float = 0.1  # probability that a text-to-image/editing prompt becomes <uncondition>

    def image(self, key: str, where: Where, field: str) -> Tuple[int, int, Sequence[int]]:
        try:
            grid_h, grid_w, codes = self.lookup_image(key)
        except KeyError:
            raise where.error(field, f"image key {key!r} not found in the image-code store") from None
        if len(codes) != grid_h * grid_w:
            raise where.error(field, f"image {key!r}: {len(codes)} codes for a {grid_h}x{grid_w} grid")
        values = np.asarray(codes, dtype=np.int64)
        outside = values[(values < 0) | (values >= self.vocab.num_image_codes)]
        if outside.size:
            raise where.error(field, f"image {key!r}: code {outside[0]} outside [0, {self.vocab.num_image_codes}) "
                                     f"({outside.size} such codes; tokenized with another codebook?)")
        return int(grid_h), int(grid_w), codes


# ---------------------------------------------------------------------------------------------
# template pieces
# ---------------------------------------------------------------------------------------------
def _open_prompt(seq: SequenceBuilder, system: Optional[str]) -> None:
    if system:
        seq.special("role_system").text(f" {system} ")
    seq.special("role_human")


def _images(seq: SequenceBuilder, ctx: BuildContext, keys: Sequence[str], where: Where, field: str,
            target: bool = False) -> None:
    for i, key in enumerate(keys):
        seq.image(*ctx.image(key, where, f"{field}[{i}]"), target=target)


def _prompt_or_uncondition(seq: SequenceBuilder, ctx: BuildContext, text: str) -> None:
    """Classifier-free guidance: with probability ``cfg_dropout`` the prompt is ``<uncondition>``."""
    if ctx.rng.random() < ctx.cfg_dropout:
        seq.special("uncondition")
    else:
        seq.text(text)


def _finish(seq: SequenceBuilder, where: Where) -> TokenizedSample:
    seq.special("eos", target=True)  # the model learns to end its answer
    sample = seq.build()
    if len(sample) == 0 or not sample.maskable.any():
        raise where.error("<sample>", "sample has no target tokens")
    return sample


# ---------------------------------------------------------------------------------------------
# understanding / captioning: images in the prompt, text target
# ---------------------------------------------------------------------------------------------
def validate_understanding(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["images", "response"], ["prompt", "system"])
    return {"images": image_list(s, where, "images", 1, MAX_PROMPT_IMAGES),
            "prompt": text_field(s, where, "prompt", allow_empty=True, default=""),
            "response": text_field(s, where, "response"),
            "system": text_field(s, where, "system", default=SYSTEM_UNDERSTANDING)}


def build_understanding(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    seq = SequenceBuilder(ctx.vocab)
    _open_prompt(seq, s["system"])
    _images(seq, ctx, s["images"], where, "images")
    if s["prompt"]:
        seq.text(s["prompt"])
    seq.special("role_assistant").text(s["response"], target=True)
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# text-to-image: text prompt, image target, CFG dropout
# ---------------------------------------------------------------------------------------------
def validate_text_to_image(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["prompt", "image"], ["system"])
    return {"prompt": text_field(s, where, "prompt"), "image": image_key(s["image"], where, "image"),
            "system": text_field(s, where, "system", default=SYSTEM_T2I)}


def build_text_to_image(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    seq = SequenceBuilder(ctx.vocab)
    _open_prompt(seq, s["system"])
    _prompt_or_uncondition(seq, ctx, s["prompt"])
    seq.special("role_assistant")
    seq.image(*ctx.image(s["image"], where, "image"), target=True)
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# editing: source image + instruction -> target image of the same grid
# ---------------------------------------------------------------------------------------------
def validate_editing(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["source", "instruction", "target"], ["system"])
    return {"source": image_key(s["source"], where, "source"),
            "instruction": text_field(s, where, "instruction"),
            "target": image_key(s["target"], where, "target"),
            "system": text_field(s, where, "system", default=SYSTEM_EDITING)}


def build_editing(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    source = ctx.image(s["source"], where, "source")
    target = ctx.image(s["target"], where, "target")
    if target[:2] != source[:2]:
        raise where.error("target", f"edited image grid {target[0]}x{target[1]} differs from the source "
                                    f"grid {source[0]}x{source[1]}")
    seq = SequenceBuilder(ctx.vocab)
    _open_prompt(seq, s["system"])
    seq.image(*source)
    _prompt_or_uncondition(seq, ctx, s["instruction"])
    seq.special("role_assistant")
    seq.image(*target, target=True)
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# interleaved: 2-6 images with text between; every segment is a target unless "target": false
# ---------------------------------------------------------------------------------------------
def validate_interleaved(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["segments"], ["prompt", "system"])
    segments = s["segments"]
    if not isinstance(segments, list) or not segments:
        raise where.error("segments", "expected a non-empty list of {'text': ...} / {'image': ...}")
    parsed = [_interleaved_segment(seg, where, f"segments[{i}]") for i, seg in enumerate(segments)]
    n_images = sum(1 for p in parsed if "image" in p)
    if not MIN_INTERLEAVED_IMAGES <= n_images <= MAX_INTERLEAVED_IMAGES:
        raise where.error("segments", f"expected {MIN_INTERLEAVED_IMAGES}..{MAX_INTERLEAVED_IMAGES} images, "
                                      f"got {n_images}")
    if not any(p["target"] for p in parsed):
        raise where.error("segments", "at least one segment must be a target")
    return {"segments": parsed, "prompt": text_field(s, where, "prompt", allow_empty=True, default=""),
            "system": text_field(s, where, "system", default=SYSTEM_INTERLEAVED)}


def _interleaved_segment(seg: Any, where: Where, field: str) -> Dict[str, Any]:
    if not isinstance(seg, dict) or len(set(seg) & {"text", "image"}) != 1:
        raise where.error(field, "expected an object with exactly one of 'text' or 'image'")
    unknown = sorted(set(seg) - {"text", "image", "target"})
    if unknown:
        raise where.error(f"{field}.{unknown[0]}", "unknown field; allowed: text, image, target")
    target = seg.get("target", True)
    if not isinstance(target, bool):
        raise where.error(f"{field}.target", f"expected true/false, got {target!r}")
    if "image" in seg:
        return {"image": image_key(seg["image"], where, f"{field}.image"), "target": target}
    text = seg["text"]
    if not isinstance(text, str) or not text.strip():
        raise where.error(f"{field}.text", f"expected a non-empty string, got {text!r}")
    return {"text": text, "target": target}


def build_interleaved(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    seq = SequenceBuilder(ctx.vocab)
    _open_prompt(seq, s["system"])
    if s["prompt"]:
        seq.text(s["prompt"])
    seq.special("role_assistant")
    for i, seg in enumerate(s["segments"]):
        if "image" in seg:
            seq.image(*ctx.image(seg["image"], where, f"segments[{i}].image"), target=seg["target"])
        else:
            seq.text(seg["text"], target=seg["target"])
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# grounding / OCR / counting: image + question, text answer with coordinates in [0, 1000]
# ---------------------------------------------------------------------------------------------
def validate_grounding(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["image", "prompt", "response"], ["boxes", "points", "count", "image_size", "system"])
    scale = _pixel_scale(s, where)
    boxes = _coords(s, where, "boxes", 4, scale)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if x0 > x1 or y0 > y1:
            raise where.error(f"boxes[{i}]", f"box [{x0}, {y0}, {x1}, {y1}] needs x0 <= x1 and y0 <= y1")
    count = s.get("count")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise where.error("count", f"expected a non-negative integer, got {count!r}")
    return {"image": image_key(s["image"], where, "image"), "prompt": text_field(s, where, "prompt"),
            "response": text_field(s, where, "response", allow_empty=bool(boxes) or count is not None),
            "boxes": boxes, "points": _coords(s, where, "points", 2, scale), "count": count,
            "system": text_field(s, where, "system", default=SYSTEM_UNDERSTANDING)}


def _pixel_scale(s: Mapping[str, Any], where: Where) -> Optional[Tuple[float, float]]:
    """With ``image_size: [w, h]`` coordinates are pixels, normalised here; without, already 0..1000."""
    if "image_size" not in s:
        return None
    w, h = int_list(s["image_size"], where, "image_size", 2, 1, 1 << 20)
    return float(w), float(h)


def _coords(s: Mapping[str, Any], where: Where, key: str, arity: int,
            scale: Optional[Tuple[float, float]]) -> List[List[int]]:
    value = s.get(key, [])
    if not isinstance(value, list):
        raise where.error(key, f"expected a list of {arity}-number lists, got {type(value).__name__}")
    high = max(scale) if scale else COORD_MAX
    out = []
    for i, item in enumerate(value):
        numbers = int_list(item, where, f"{key}[{i}]", arity, 0, high)
        if scale:
            sizes = [scale[j % 2] for j in range(arity)]  # x uses width, y uses height
            for j, (v, size) in enumerate(zip(numbers, sizes)):
                if v > size:
                    raise where.error(f"{key}[{i}][{j}]", f"{v} outside the image size {size:g}")
            numbers = [v / size * COORD_MAX for v, size in zip(numbers, sizes)]
        out.append([int(round(v)) for v in numbers])
    return out


def grounding_answer(s: Mapping[str, Any]) -> str:
    """Answer text: the response, then boxes ``<box>[x0, y0, x1, y1]</box>``, points, count."""
    parts = [s["response"]] if s["response"].strip() else []
    parts += [f"<box>[{', '.join(map(str, b))}]</box>" for b in s["boxes"]]
    parts += [f"<point>[{', '.join(map(str, p))}]</point>" for p in s["points"]]
    if s["count"] is not None:
        parts.append(f"Count: {s['count']}")
    return " ".join(parts)


def build_grounding(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    seq = SequenceBuilder(ctx.vocab)
    _open_prompt(seq, s["system"])
    seq.image(*ctx.image(s["image"], where, "image"))
    seq.text(s["prompt"])
    seq.special("role_assistant").text(grounding_answer(s), target=True)
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# multi-turn chat SFT: only assistant turns are maskable
# ---------------------------------------------------------------------------------------------
CHAT_ROLES = {"system": "role_system", "human": "role_human", "user": "role_human", "assistant": "role_assistant"}


def validate_chat(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["messages"], [])
    messages = s["messages"]
    if not isinstance(messages, list) or not messages:
        raise where.error("messages", "expected a non-empty list of {role, content}")
    parsed = [_chat_message(m, where, f"messages[{i}]") for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in parsed):
        raise where.error("messages", "needs at least one assistant turn")
    for i, m in enumerate(parsed):
        if m["role"] == "system" and i != 0:
            raise where.error(f"messages[{i}].role", "a system turn may only come first")
        if m["images"] and m["role"] == "assistant":
            raise where.error(f"messages[{i}].images", "images are only allowed in system/human turns")
    return {"messages": parsed}


def _chat_message(m: Any, where: Where, field: str) -> Dict[str, Any]:
    if not isinstance(m, dict):
        raise where.error(field, f"expected an object, got {type(m).__name__}")
    for key in ("role", "content"):
        if key not in m:
            raise where.error(f"{field}.{key}", "missing required field")
    unknown = sorted(set(m) - {"role", "content", "images"})
    if unknown:
        raise where.error(f"{field}.{unknown[0]}", "unknown field; allowed: role, content, images")
    if m["role"] not in CHAT_ROLES:
        raise where.error(f"{field}.role", f"unknown role {m['role']!r}; expected one of {sorted(CHAT_ROLES)}")
    if not isinstance(m["content"], str):
        raise where.error(f"{field}.content", f"expected a string, got {type(m['content']).__name__}")
    images = image_list(m, where, "images", 0, MAX_PROMPT_IMAGES) if "images" in m else []
    return {"role": "human" if m["role"] == "user" else m["role"], "content": m["content"], "images": images}


def build_chat(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    seq = SequenceBuilder(ctx.vocab)
    for i, m in enumerate(s["messages"]):
        is_assistant = m["role"] == "assistant"
        seq.special(CHAT_ROLES[m["role"]])
        _images(seq, ctx, m["images"], where, f"messages[{i}].images")
        content = f" {m['content']} " if m["role"] == "system" else m["content"]
        if content:
            seq.text(content, target=is_assistant)
    return _finish(seq, where)


# ---------------------------------------------------------------------------------------------
# plain text (pretraining): every token is maskable
# ---------------------------------------------------------------------------------------------
def validate_text(s: Mapping[str, Any], where: Where) -> Dict[str, Any]:
    require_keys(s, where, ["text"], [])
    return {"text": text_field(s, where, "text")}


def build_text(s: Mapping[str, Any], ctx: BuildContext, where: Where) -> TokenizedSample:
    return _finish(SequenceBuilder(ctx.vocab).text(s["text"], target=True), where)


# ---------------------------------------------------------------------------------------------
# registry and entry points
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskFormat:
    validate: Callable[[Mapping[str, Any], Where], Dict[str, Any]]
    build: Callable[[Mapping[str, Any], BuildContext, Where], TokenizedSample]


TASKS: Dict[str, TaskFormat] = {
    "understanding": TaskFormat(validate_understanding, build_understanding),
    "caption": TaskFormat(validate_understanding, build_understanding),
    "text_to_image": TaskFormat(validate_text_to_image, build_text_to_image),
    "editing": TaskFormat(validate_editing, build_editing),
    "interleaved": TaskFormat(validate_interleaved, build_interleaved),
    "grounding": TaskFormat(validate_grounding, build_grounding),
    "chat": TaskFormat(validate_chat, build_chat),
    "text": TaskFormat(validate_text, build_text),
}


def parse_line(line: str, where: Where) -> Tuple[str, Dict[str, Any]]:
    """JSON line -> (task name, validated sample)."""
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as err:
        raise where.error("<json>", f"invalid JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:  # the C parser recurses once per nesting level
        raise where.error("<json>", "JSON nested too deeply to parse") from None
    sample = as_object(raw, where)
    task = sample.get("task")
    if task not in TASKS:
        raise where.error("task", f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return task, TASKS[task].validate(sample, where)


def build_sample(line: str, where: Where, ctx: BuildContext) -> TokenizedSample:
    """Validate and tokenize one JSONL line."""
    task, sample = parse_line(line, where)
    return TASKS[task].build(sample, ctx, where)


def sample_rng(seed: int, where: Where) -> np.random.Generator:
    """Per-sample generator: CFG dropout depends on (seed, file name, line), not on worker order
    nor on the directory the file was read from."""
    return np.random.default_rng([seed, zlib.crc32(os.path.basename(where.file).encode()), where.line])
