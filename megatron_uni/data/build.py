"""JSONL task samples -> one stored dataset (``prefix.bin/.idx``), in parallel worker processes.

Output order equals input order (files in the given order, lines in file order) whatever the
number of workers, so a rebuild is byte-identical. Bad samples are skipped, counted per reason and
listed with file:line in ``prefix.errors.txt``.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_uni.data.formats import BuildContext, build_sample, sample_rng
from megatron_uni.data.schema import SampleError, Where
from megatron_uni.data.storage import SampleWriter, encode_positions
from megatron_uni.tokens import NUM_IMAGE_CODES, Vocabulary


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything a worker needs to rebuild the context on its own (picklable)."""

    tokenizer_dir: str
    image_codes: Optional[str] = None  # image_codes.json (demo fallback) or an ImageCodeStore directory
    text_size: Optional[int] = None
    num_image_codes: int = NUM_IMAGE_CODES
    cfg_dropout: float = 0.1
    seed: int = 1234


@dataclasses.dataclass
class BuildReport:
    written: int = 0
    tokens: int = 0
    bad: Dict[str, int] = dataclasses.field(default_factory=dict)  # field -> count
    errors: List[str] = dataclasses.field(default_factory=list)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


def open_image_lookup(spec: Optional[str]) -> Callable[[str], Tuple[int, int, Sequence[int]]]:
    """``None`` -> every lookup fails (text-only data); a ``.json`` file -> demo fallback codes;
    a directory -> the SigLIP-VQ image-code store written by tools/tokenize_images.py."""
    if spec is None:
        def no_images(key: str):
            raise KeyError(key)
        return no_images
    if spec.endswith(".json"):
        from megatron_uni.data.demo import JsonImageCodes
        return JsonImageCodes(spec).get
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"image codes {spec!r}: neither an image_codes.json nor a directory")
    from megatron_uni.data.image_codes import ImageCodeStore  # written by the VQ tool's owner
    return ImageCodeStore(spec).get


_WORKER: Dict[str, object] = {}


def _init_worker(settings: BuildSettings) -> None:
    _WORKER["vocab"] = Vocabulary.from_tokenizer_dir(settings.tokenizer_dir, text_size=settings.text_size,
                                                     num_image_codes=settings.num_image_codes)
    _WORKER["lookup"] = open_image_lookup(settings.image_codes)
    _WORKER["settings"] = settings


def _tokenize(item: Tuple[str, int, str]):
    """(file, line, text) -> packed int32 positions, or the error message of a bad sample."""
    path, line_no, text = item
    settings: BuildSettings = _WORKER["settings"]  # type: ignore[assignment]
    where = Where(path, line_no)
    ctx = BuildContext(vocab=_WORKER["vocab"], lookup_image=_WORKER["lookup"],  # type: ignore[arg-type]
                       rng=sample_rng(settings.seed, where), cfg_dropout=settings.cfg_dropout)
    try:
        return encode_positions(build_sample(text, where, ctx)), None
    except SampleError as err:
        return None, (err.field, str(err))


def read_lines(paths: Iterable[str]) -> Iterator[Tuple[str, int, str]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line_no, text in enumerate(f, start=1):
                if text.strip():
                    yield path, line_no, text


def build_dataset(paths: Sequence[str], prefix: str, settings: BuildSettings, workers: int = 1,
                  progress: Optional[Callable[[Iterator], Iterator]] = None) -> BuildReport:
    """Tokenize every line of ``paths`` into ``prefix``; returns counts (written, bad per field)."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input JSONL {path!r} not found")
    report = BuildReport()
    vocab = Vocabulary.from_tokenizer_dir(settings.tokenizer_dir, text_size=settings.text_size,
                                          num_image_codes=settings.num_image_codes)
    writer = SampleWriter(prefix)
    results = _run(read_lines(paths), settings, workers)
    for packed, error in (progress(results) if progress else results):
        if error is not None:
            field, message = error
            report.bad[field] = report.bad.get(field, 0) + 1
            report.errors.append(message)
            continue
        writer.add_packed(packed)
        report.written += 1
        report.tokens += int(packed.shape[0])
    writer.finalize()
    with open(prefix + ".errors.txt", "w") as f:
        f.writelines(e + "\n" for e in report.errors)
    with open(prefix + ".build.json", "w") as f:
        json.dump({"inputs": [os.path.basename(p) for p in paths], "written": report.written,
                   "tokens": report.tokens, "bad": report.bad, "settings": dataclasses.asdict(settings),
                   "vocabulary": vocab.layout().to_dict()},
                  f, indent=2)
    return report


def _run(items: Iterator, settings: BuildSettings, workers: int) -> Iterator:
    if workers <= 1:
        _init_worker(settings)
        yield from map(_tokenize, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (settings,)) as pool:
        yield from pool.imap(_tokenize, items, chunksize=64)
