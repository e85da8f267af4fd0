"""Sampler output -> image-token grids in the form the LLaDA2.0-Uni decoder consumes.

Input (what the sampler writes), JSON Lines, one generation per line:

    {"id": "cat-0", "prompt": "a cat", "tokens": [...model token ids...], ...any other fields}
        ``tokens`` holds the generated sequence; every well-formed image block in it
        (``<|image|> <H> <W> <boi>`` + H*W image-code tokens + ``<|/image|>``) is exported.
    {"id": "cat-1", "prompt": "a cat", "grid": [H, W], "image_tokens": [...H*W token ids...]}
        the image-code tokens alone (row-major) with their grid.

Output, JSON Lines, one image per line, with the decoder's argument names
(``decoder/decode.py::decode_vq_tokens(token_ids, h, w, model_path, ...)``):

    {"id": "cat-0", "index": 0, "prompt": "a cat", "h": H, "w": W,
     "token_ids": [...H*W 0-based VQ codes, row-major...], "metadata": {...other input fields}}
"""

from __future__ import annotations

import json
from typing import Any, Dict, Iterator, List, Tuple

from megatron_uni.convert.hf_io import ConversionError

RESERVED_FIELDS = ("id", "prompt", "tokens", "grid", "image_tokens")


def _image_spans(ids: List[int], vocabulary, where: str) -> Iterator[Tuple[int, int, List[int]]]:
    """(H, W, 0-based codes) of every image block in ``ids``."""
    start_id, i = vocabulary.special("image_start"), 0
    while i < len(ids):
        if ids[i] != start_id:
            i += 1
            continue
        try:
            grid_h, grid_w = vocabulary.size_of_token(ids[i + 1]), vocabulary.size_of_token(ids[i + 2])
            end = i + 4 + grid_h * grid_w + 1
            yield vocabulary.parse_image_block(ids[i:end])
        except (ValueError, IndexError) as err:
            raise ConversionError(f"{where}: malformed image block at token {i}: {err}") from None
        i = end


def _codes_from_grid(record: Dict[str, Any], vocabulary, where: str) -> Tuple[int, int, List[int]]:
    grid = record["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ConversionError(f"{where}: field 'grid' must be [H, W] positive integers, got {grid!r}")
    tokens = record["image_tokens"]
    if len(tokens) != grid[0] * grid[1]:
        raise ConversionError(f"{where}: grid {grid[0]}x{grid[1]} needs {grid[0] * grid[1]} image_tokens, "
                              f"got {len(tokens)}")
    try:
        return grid[0], grid[1], [vocabulary.image_code(int(t)) for t in tokens]
    except ValueError as err:
        raise ConversionError(f"{where}: field 'image_tokens': {err}") from None


def images_of_record(record: Dict[str, Any], vocabulary, where: str) -> List[Dict[str, Any]]:
    """Decoder records for one sampler record."""
    if "image_tokens" in record or "grid" in record:
        if not ("image_tokens" in record and "grid" in record):
            raise ConversionError(f"{where}: 'image_tokens' and 'grid' must come together")
        grids = [_codes_from_grid(record, vocabulary, where)]
    elif "tokens" in record:
        grids = list(_image_spans([int(t) for t in record["tokens"]], vocabulary, where))
    else:
        raise ConversionError(f"{where}: needs 'tokens' (generated sequence) or 'grid' + 'image_tokens'")
    if not grids:
        raise ConversionError(f"{where}: no image block <|image|> <H> <W> <boi> ... <|/image|> in 'tokens'")
    metadata = {k: v for k, v in record.items() if k not in RESERVED_FIELDS}
    return [{"id": record.get("id"), "index": k, "prompt": record.get("prompt"), "h": h, "w": w,
             "token_ids": codes, "metadata": metadata} for k, (h, w, codes) in enumerate(grids)]


def export_image_tokens(input_path: str, output_path: str, vocabulary, progress: bool = True) -> int:
    """Convert a sampler JSONL file; returns the number of images written."""
    from tqdm import tqdm

    count = 0
    with open(input_path) as source, open(output_path, "w") as sink:
        for line_no, line in enumerate(tqdm(source, desc="images", unit="line", disable=not progress), 1):
            if not line.strip():
                continue
            where = f"{input_path}:{line_no}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConversionError(f"{where}: invalid JSON: {err}") from None
            for image in images_of_record(record, vocabulary, where):
                sink.write(json.dumps(image) + "\n")
                count += 1
    return count
