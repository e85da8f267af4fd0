"""A small real demo dataset: procedurally drawn shapes with captions, plus a little text.

``make_demo_data(out_dir)`` writes, in seconds:

    images/<key>.png         128x128 drawings (one or two coloured shapes)
    samples.jsonl            task-format samples (caption, text_to_image, editing, grounding,
                             interleaved, chat, text) referencing images by key
    tokenizer/tokenizer.json byte-level BPE trained on the demo text; TEXT vocabulary of exactly
                             1024 ids (specials and size tokens included, topped up with
                             further <|reserved_token_N|>) = the tiny recipe's text_vocab
    images.jsonl             image manifest (path + key) for tools/tokenize_images.py
    image_codes.json         fallback image codes (see :func:`fallback_codes`) until the
                             SigLIP-VQ tool has written real ones
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from megatron_uni.fileio import write_json
from megatron_uni.tokens import SIZE_TOKEN_FORMAT, SPECIAL_TOKEN_STRINGS, TOKENIZER_FILE

DEMO_TEXT_VOCAB = 1024
DEMO_IMAGE_CODES = 256
DEMO_MAX_SIZE_TOKEN = 64
IMAGE_PX = 128
PATCH_PX = 16

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
          "purple": (150, 60, 190), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
PLACES = {"top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
          "bottom right": (0.7, 0.7), "center": (0.5, 0.5)}
BACKGROUNDS = ("gray", "white", "black")
BACKGROUND_RGB = {"gray": (128, 128, 128), "white": (250, 250, 250), "black": (10, 10, 10)}


# ---------------------------------------------------------------------------------------------
# drawing
# ---------------------------------------------------------------------------------------------
def shape_box(place: str, size: str) -> Tuple[int, int, int, int]:
    cx, cy = PLACES[place]
    half = (0.18 if size == "large" else 0.1) * IMAGE_PX
    return (int(cx * IMAGE_PX - half), int(cy * IMAGE_PX - half), int(cx * IMAGE_PX + half), int(cy * IMAGE_PX + half))


def draw(shapes: Sequence[Dict[str, str]], background: str):
    """PIL image of ``shapes`` (dicts with color, shape, place, size) on ``background``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (IMAGE_PX, IMAGE_PX), BACKGROUND_RGB[background])
    pen = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = shape_box(s["place"], s["size"])
        fill = COLORS[s["color"]]
        if s["shape"] == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif s["shape"] == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        elif s["shape"] == "triangle":
            pen.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            pen.polygon([((x0 + x1) // 2, y0), (x1, (y0 + y1) // 2), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2)],
                        fill=fill)
    return image


def describe(shapes: Sequence[Dict[str, str]], background: str) -> str:
    parts = [f"a {s['size']} {s['color']} {s['shape']} in the {s['place']}" for s in shapes]
    return f"{' and '.join(parts).capitalize()}, on a {background} background."


def random_scene(rng: np.random.Generator, count: int) -> Tuple[List[Dict[str, str]], str]:
    places = rng.choice(list(PLACES), size=count, replace=False)
    shapes = [{"color": str(rng.choice(list(COLORS))), "shape": str(rng.choice(SHAPES)), "place": str(p),
               "size": str(rng.choice(["small", "large"]))} for p in places]
    return shapes, str(rng.choice(BACKGROUNDS))


# ---------------------------------------------------------------------------------------------
# fallback image codes: 3-3-2 bit RGB colour of each 16x16 patch (256 codes, deterministic)
# ---------------------------------------------------------------------------------------------
def fallback_codes(image) -> Tuple[int, int, List[int]]:
    """(grid_h, grid_w, codes) with one code per 16-px patch: its mean colour quantised to 3-3-2 bits.

    A stand-in for SigLIP-VQ codes (same block layout, vocabulary of 256) so the demo trains on
    something learnable before the VQ tool has run."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    grid_h, grid_w = pixels.shape[0] // PATCH_PX, pixels.shape[1] // PATCH_PX
    patches = pixels[:grid_h * PATCH_PX, :grid_w * PATCH_PX].reshape(grid_h, PATCH_PX, grid_w, PATCH_PX, 3)
    mean = patches.mean(axis=(1, 3))
    r, g, b = (mean[..., 0] // 32).astype(int), (mean[..., 1] // 32).astype(int), (mean[..., 2] // 64).astype(int)
    return grid_h, grid_w, ((r << 5) | (g << 2) | b).reshape(-1).tolist()


class JsonImageCodes:
    """``image_codes.json`` (key -> {grid_h, grid_w, codes}) with the ``get(key)`` lookup signature."""

    def __init__(self, path: str) -> None:
        with open(path) as f:
            self._table = json.load(f)
        self.path = path

    def get(self, key: str) -> Tuple[int, int, List[int]]:
        entry = self._table[key]  # KeyError is reported by the builder with file/line/field
        return entry["grid_h"], entry["grid_w"], entry["codes"]


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def demo_special_tokens() -> List[str]:
    return list(SPECIAL_TOKEN_STRINGS.values()) + [SIZE_TOKEN_FORMAT.format(n) for n in range(DEMO_MAX_SIZE_TOKEN + 1)]


def build_demo_tokenizer(texts: Sequence[str], text_vocab: int = DEMO_TEXT_VOCAB):
    """Byte-level BPE trained on ``texts``; specials first; topped up to exactly ``text_vocab`` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = demo_special_tokens()
    trainer = trainers.BpeTrainer(vocab_size=text_vocab, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    extra, n = [], DEMO_MAX_SIZE_TOKEN + 1
    while tokenizer.get_vocab_size(with_added_tokens=True) + len(extra) < text_vocab:
        extra.append(SIZE_TOKEN_FORMAT.format(n))
        n += 1
    tokenizer.add_special_tokens(extra)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != text_vocab:
        raise RuntimeError(f"demo tokenizer has {size} ids, expected exactly {text_vocab}")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# samples
# ---------------------------------------------------------------------------------------------
def demo_paragraphs(rng: np.random.Generator, count: int) -> List[str]:
    """Plain text about the shapes world, so the text side has something to learn."""
    out = []
    for _ in range(count):
        shape, color = str(rng.choice(SHAPES)), str(rng.choice(list(COLORS)))
        n = int(rng.integers(2, 9))
        out.append(f"There are {n} {color} {shape}s on the table. If one {shape} is taken away, "
                   f"{n - 1} {shape}s remain. A {shape} can be small or large, and it can be drawn "
                   f"in the {str(rng.choice(list(PLACES)))} of a picture.")
    return out


def _grounding(key: str, shapes: List[Dict[str, str]]) -> Dict:
    target = shapes[0]
    return {"task": "grounding", "image": key, "prompt": f"Where is the {target['color']} {target['shape']}?",
            "response": f"The {target['color']} {target['shape']} is here:",
            "boxes": [list(shape_box(target["place"], target["size"]))], "image_size": [IMAGE_PX, IMAGE_PX]}


def _samples_for_scene(i: int, key: str, caption: str, shapes, rng) -> Iterator[Dict]:
    yield {"task": "caption", "images": [key], "prompt": "Describe the image.", "response": caption}
    yield {"task": "text_to_image", "prompt": caption, "image": key}
    yield _grounding(key, shapes)
    if i % 4 == 0:
        yield {"task": "chat", "messages": [
            {"role": "human", "content": "How many shapes are in the picture?", "images": [key]},
            {"role": "assistant", "content": f"There {'is one shape' if len(shapes) == 1 else 'are two shapes'}."},
            {"role": "human", "content": "What colour is the first one?"},
            {"role": "assistant", "content": f"It is {shapes[0]['color']}."}]}


def make_demo_data(out_dir: str, num_scenes: int = 48, num_paragraphs: int = 64, seed: int = 0,
                   progress=None) -> Dict[str, int]:
    """Write the demo dataset into ``out_dir``; returns counts per task. Deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    samples: List[Dict] = []
    codes: Dict[str, Dict] = {}
    texts: List[str] = []
    scenes = range(num_scenes) if progress is None else progress(range(num_scenes))
    for i in scenes:
        shapes, background = random_scene(rng, count=1 + i % 2)
        key = f"scene_{i:05d}"
        image = draw(shapes, background)
        image.save(os.path.join(out_dir, "images", f"{key}.png"))
        codes[key] = dict(zip(("grid_h", "grid_w", "codes"), fallback_codes(image)))
        caption = describe(shapes, background)
        texts.append(caption)
        samples.extend(_samples_for_scene(i, key, caption, shapes, rng))
        if i % 2 == 0:  # editing: recolour the first shape
            new_color = str(rng.choice([c for c in COLORS if c != shapes[0]["color"]]))
            edited = [dict(shapes[0], color=new_color)] + shapes[1:]
            edit_key = f"{key}_edit"
            edit_image = draw(edited, background)
            edit_image.save(os.path.join(out_dir, "images", f"{edit_key}.png"))
            codes[edit_key] = dict(zip(("grid_h", "grid_w", "codes"), fallback_codes(edit_image)))
            samples.append({"task": "editing", "source": key, "target": edit_key,
                            "instruction": f"Make the {shapes[0]['shape']} {new_color}."})
        if i % 6 == 5:
            samples.append(_interleaved(i))
    for paragraph in demo_paragraphs(rng, num_paragraphs):
        texts.append(paragraph)
        samples.append({"task": "text", "text": paragraph})
    order = rng.permutation(len(samples))
    with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
        for j in order:
            f.write(json.dumps(samples[j]) + "\n")
    write_json(os.path.join(out_dir, "image_codes.json"), codes, indent=None, sort_keys=False)
    with open(os.path.join(out_dir, "images.jsonl"), "w") as f:  # manifest for tools/tokenize_images.py
        f.writelines(json.dumps({"image": f"images/{key}.png", "key": key}) + "\n" for key in codes)
    tokenizer_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tokenizer_dir, exist_ok=True)
    texts += [json.dumps(s) for s in samples]  # prompts, instructions, chat turns
    build_demo_tokenizer(texts).save(os.path.join(tokenizer_dir, TOKENIZER_FILE))
    counts: Dict[str, int] = {}
    for s in samples:
        counts[s["task"]] = counts.get(s["task"], 0) + 1
    return counts


def _interleaved(i: int) -> Dict:
    """A story over the last two scenes: text, image, text, image."""
    first, second = f"scene_{i - 1:05d}", f"scene_{i:05d}"
    return {"task": "interleaved", "prompt": "Draw two pictures and say what changes.",
            "segments": [{"text": "First picture:"}, {"image": first}, {"text": "Then the picture changes:"},
                         {"image": second}]}
