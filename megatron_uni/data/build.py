"""JSONL task samples -> one stored dataset (``prefix.bin/.idx``), in parallel worker processes.

Output order equals input order (files in the given order, lines in file order) whatever the
number of workers, so a rebuild is byte-identical. Bad samples (bad JSON, bytes that are not UTF-8,
schema violations, unknown images, image codes outside the codebook, samples over ``max_length``)
are skipped, counted per field and listed with file:line in ``prefix.errors.txt``. A build that
keeps no sample raises :class:`DataError` and leaves an existing dataset under ``prefix`` untouched.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from megatron_uni.data.formats import BuildContext, build_sample, sample_rng
from megatron_uni.data.schema import SampleError, Where
from megatron_uni.data.storage import SampleWriter, encode_positions
from megatron_uni.errors import DataError
from megatron_uni.fileio import write_json
from megatron_uni.tokens import NUM_IMAGE_CODES, Vocabulary

UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """Everything a worker needs to rebuild the context on its own (picklable)."""

    tokenizer_dir: str
    image_codes: Optional[str] = None  # image_codes.json (demo fallback) or an ImageCodeStore directory
    text_size: Optional[int] = None
    num_image_codes: int = NUM_IMAGE_CODES
    cfg_dropout: float = 0.1
    seed: int = 1234
    max_length: Optional[int] = None  # longer samples are skipped by name (None: no limit)


@dataclasses.dataclass
class BuildReport:
    written: int = 0
    tokens: int = 0
    bad: Dict[str, int] = dataclasses.field(default_factory=dict)  # field -> count
    errors: List[str] = dataclasses.field(default_factory=list)

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


def open_image_lookup(spec: Optional[str], num_image_codes: Optional[int] = None
                      ) -> Callable[[str], Tuple[int, int, Sequence[int]]]:
    """``None`` -> every lookup fails (text-only data); a ``.json`` file -> demo fallback codes;
    a directory -> the SigLIP-VQ image-code store written by tools/tokenize_images.py, whose codebook
    must have ``num_image_codes`` entries (checked before any sample is read)."""
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
    store = ImageCodeStore(spec)
    codebook = store_codebook_size(store.meta)
    if num_image_codes is not None and codebook is not None and codebook != num_image_codes:
        raise DataError(f"image codes {spec!r} were made with a {codebook}-entry codebook "
                        f"(index.json meta.encoder.config.vq_config.num_embeddings), but --num-image-codes is "
                        f"{num_image_codes}; build with --num-image-codes {codebook} or retokenize the images")
    return store.get


def store_codebook_size(meta: dict) -> Optional[int]:
    """Codebook size recorded by the tokenization job; None for a store without job metadata."""
    try:
        return int(meta["encoder"]["config"]["vq_config"]["num_embeddings"])
    except (KeyError, TypeError):
        return None


_WORKER: Dict[str, object] = {}


def _init_worker(settings: BuildSettings) -> None:
    _WORKER["vocab"] = Vocabulary.from_tokenizer_dir(settings.tokenizer_dir, text_size=settings.text_size,
                                                     num_image_codes=settings.num_image_codes)
    _WORKER["lookup"] = open_image_lookup(settings.image_codes)  # codebook checked once by the parent
    _WORKER["settings"] = settings


def _tokenize(item: Tuple[str, int, bytes]):
    """(file, line, raw bytes) -> packed int32 positions, or (field, message) of a bad sample."""
    path, line_no, raw = item
    settings: BuildSettings = _WORKER["settings"]  # type: ignore[assignment]
    where = Where(path, line_no)
    ctx = BuildContext(vocab=_WORKER["vocab"], lookup_image=_WORKER["lookup"],  # type: ignore[arg-type]
                       rng=sample_rng(settings.seed, where), cfg_dropout=settings.cfg_dropout)
    try:
        packed = encode_positions(build_sample(decode_line(raw, where), where, ctx))
        if settings.max_length is not None and packed.shape[0] > settings.max_length:
            raise where.error("<sample>", f"{packed.shape[0]} tokens, longer than the limit {settings.max_length}")
        return packed, None
    except SampleError as err:
        return None, (err.field, str(err))


def decode_line(raw: bytes, where: Where) -> str:
    """UTF-8 text of one line; a UTF-8 byte-order mark opening a file is not part of the sample."""
    if where.line == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise where.error("<encoding>", f"not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1}") from None


def read_lines(paths: Iterable[str]) -> Iterator[Tuple[str, int, bytes]]:
    """Non-blank lines as bytes: decoding happens per sample, so a bad byte costs one sample."""
    for path in paths:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                if raw.strip() and raw.strip() != UTF8_BOM:
                    yield path, line_no, raw


def build_dataset(paths: Sequence[str], prefix: str, settings: BuildSettings, workers: int = 1,
                  progress: Optional[Callable[[Iterator], Iterator]] = None) -> BuildReport:
    """Tokenize every line of ``paths`` into ``prefix``; returns counts (written, bad per field)."""
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input JSONL {path!r} not found")
    report = BuildReport()
    vocab = Vocabulary.from_tokenizer_dir(settings.tokenizer_dir, text_size=settings.text_size,
                                          num_image_codes=settings.num_image_codes)
    open_image_lookup(settings.image_codes, settings.num_image_codes)  # refuse a wrong codebook up front
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
    if not report.written:
        writer.discard()
        first = f"; first: {report.errors[0]}" if report.errors else ""
        raise DataError(f"no usable sample in {list(paths)} ({report.bad_total} bad{first}); "
                        f"{prefix}.bin/.idx left as they were")
    writer.finalize()
    with open(prefix + ".errors.txt", "w") as f:
        f.writelines(e + "\n" for e in report.errors)
    write_json(prefix + ".build.json", {"inputs": [os.path.basename(p) for p in paths], "written": report.written,
                                        "tokens": report.tokens, "bad": report.bad,
                                        "settings": dataclasses.asdict(settings), "vocabulary": vocab.layout().to_dict()},
               sort_keys=False)
    return report


def _run(items: Iterator, settings: BuildSettings, workers: int) -> Iterator:
    if workers <= 1:
        _init_worker(settings)
        yield from map(_tokenize, items)
        return
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (settings,)) as pool:
        yield from pool.imap(_tokenize, items, chunksize=64)
