"""Inputs of the tokenization job: a JSONL manifest of local image paths, or WebDataset-style tar shards.

JSONL: one object per line with ``"image": "path"`` or ``"images": ["path", ...]`` (other fields, such as
text, are ignored here); relative paths are relative to the manifest's directory. The store key of an
image is its path exactly as written in the manifest, or the line's ``"key"`` when it names one image.

Tar: every member whose extension is an image format is one image, keyed ``<tar name>/<member name>``.

Directory: every image file directly inside it, in name order, keyed by its file name.

With ``key_style="stem"`` a JSONL path or directory file is keyed by its file name without extension
(``images/scene_00001.png`` -> ``scene_00001``), the convention of the demo data set.

Items keep manifest order and a key seen twice is tokenized once.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Iterable, List

from megatron_uni.vq.decoding import ImageItem

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


KEY_STYLES = ("path", "stem")


def _key_of(written: str, key_style: str) -> str:
    return os.path.splitext(os.path.basename(written))[0] if key_style == "stem" else written


def read_jsonl(path: str, key_style: str = "path") -> List[ImageItem]:
    base = os.path.dirname(os.path.abspath(path))
    items: List[ImageItem] = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                items.extend(_items_of_line(line, path, line_number, base, key_style))
    return items


def _items_of_line(line: str, path: str, line_number: int, base: str, key_style: str) -> List[ImageItem]:
    where = f"{path}:{line_number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "image" in record:
        paths = [record["image"]]
        field = "image"
    elif "images" in record:
        paths, field = record["images"], "images"
        if not isinstance(paths, list):
            raise ValueError(f"{where}: field 'images' must be a list of paths")
    else:
        raise ValueError(f"{where}: missing field 'image' (or 'images')")
    if not all(isinstance(p, str) and p for p in paths):
        raise ValueError(f"{where}: field {field!r} must hold non-empty path strings")
    key = record.get("key")
    if key is not None and (len(paths) != 1 or not isinstance(key, str)):
        raise ValueError(f"{where}: field 'key' must be a string and names exactly one image")
    return [ImageItem(key=key if key is not None else _key_of(p, key_style), path=os.path.join(base, p))
            for p in paths]


def read_tar(path: str) -> List[ImageItem]:
    prefix = os.path.basename(path)
    prefix = prefix[:-len(".tar")] if prefix.endswith(".tar") else prefix
    try:
        with tarfile.open(path) as archive:
            names = [m.name for m in archive.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as error:
        raise ValueError(f"cannot read tar shard {path}: {error}") from None
    return [ImageItem(key=f"{prefix}/{name}", path=path, member=name)
            for name in names if name.lower().endswith(IMAGE_EXTENSIONS)]


def read_directory(path: str, key_style: str = "path") -> List[ImageItem]:
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                   and os.path.isfile(os.path.join(path, n)))
    return [ImageItem(key=_key_of(n, key_style), path=os.path.join(path, n)) for n in names]


def read_inputs(paths: Iterable[str], key_style: str = "path") -> List[ImageItem]:
    """All images of the given manifests / tar shards / directories, in order, first occurrence of a key kept."""
    if key_style not in KEY_STYLES:
        raise ValueError(f"unknown key style {key_style!r}; expected one of {KEY_STYLES}")
    items: List[ImageItem] = []
    for path in paths:
        if os.path.isdir(path):
            items.extend(read_directory(path, key_style))
        elif not os.path.isfile(path):
            raise FileNotFoundError(f"input {path} does not exist")
        else:
            items.extend(read_tar(path) if path.endswith(".tar") else read_jsonl(path, key_style))
    seen, unique = set(), []
    for item in items:
        if item.key not in seen:
            seen.add(item.key)
            unique.append(item)
    return unique
