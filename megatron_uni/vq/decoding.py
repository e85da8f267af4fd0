"""Decode + resize images for the VQ encoder: NVIDIA DALI when installed, PIL otherwise.

Every image first goes through ``probe`` (header only, cheap): it must exist, be a recognised image,
be complete (JPEG ends with EOI, PNG with IEND) and be at least ``min_side`` px on each side. The bad
ones are returned as ``BadImage`` records with a reason and never reach the decoder, so one bad file
cannot fail a batch. The backends then decode, resize (aspect kept) to cover the target and centre-crop.
"""

from __future__ import annotations

import dataclasses
import io
import tarfile
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron_uni.vq import images as rules

REASONS = ("missing", "corrupt", "truncated", "too_small")


@dataclasses.dataclass(frozen=True)
class ImageItem:
    """One image to tokenize: a local file, or a member of a tar shard."""

    key: str
    path: str
    member: Optional[str] = None

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path


@dataclasses.dataclass(frozen=True)
class BadImage:
    key: str
    origin: str
    reason: str
    detail: str

    def record(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Probed:
    """An image that passed the probe, with the bytes and the (h, w) the encoder must see."""

    item: ImageItem
    data: bytes
    target: Tuple[int, int]
    cover: Tuple[int, int]


Resolver = Callable[[int, int], Tuple[int, int]]  # (height, width) -> encoder (h, w)


class _TarCache:
    """Keeps the last opened tar shard open: items of one tar arrive together."""

    def __init__(self):
        self._path: Optional[str] = None
        self._tar: Optional[tarfile.TarFile] = None

    def read(self, path: str, member: str) -> bytes:
        if path != self._path:
            if self._tar is not None:
                self._tar.close()
            self._tar, self._path = tarfile.open(path), path
        handle = self._tar.extractfile(member)
        if handle is None:
            raise FileNotFoundError(f"{member} is not a regular file in {path}")
        return handle.read()


_TARS = _TarCache()


def read_bytes(item: ImageItem) -> bytes:
    if item.member is None:
        with open(item.path, "rb") as handle:
            return handle.read()
    return _TARS.read(item.path, item.member)


def _looks_complete(data: bytes, image_format: Optional[str]) -> bool:
    tail = data.rstrip(b"\x00")
    if image_format == "JPEG":
        return tail.endswith(b"\xff\xd9")
    if image_format == "PNG":
        return b"IEND" in tail[-12:]
    return True


def probe(item: ImageItem, resolve: Resolver, min_side: int) -> Union[Probed, BadImage]:
    from PIL import Image, UnidentifiedImageError

    try:
        data = read_bytes(item)
    except (OSError, KeyError) as error:
        return BadImage(item.key, item.origin, "missing", f"{type(error).__name__}: {error}")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            image_format = image.format
    except UnidentifiedImageError:
        # PIL's message embeds a memory address; a fixed text keeps shards byte-identical across runs.
        return BadImage(item.key, item.origin, "corrupt", "not a recognised image format")
    except (OSError, ValueError, SyntaxError) as error:
        return BadImage(item.key, item.origin, "corrupt", f"{type(error).__name__}: {error}")
    if not _looks_complete(data, image_format):
        return BadImage(item.key, item.origin, "truncated", f"{image_format} stream has no end marker")
    if min(height, width) < min_side:
        return BadImage(item.key, item.origin, "too_small", f"{width}x{height} px < {min_side} px side")
    target = resolve(height, width)
    return Probed(item, data, target, rules.cover_size(height, width, *target))


class PILDecoder:
    """Pure-PIL fallback: decode, composite transparency on white, bicubic resize, centre crop."""

    name = "pil"

    def decode(self, batch: Sequence[Probed]) -> List[Union[np.ndarray, BadImage]]:
        return [self._one(probed) for probed in batch]

    @staticmethod
    def _one(probed: Probed) -> Union[np.ndarray, BadImage]:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(probed.data)) as image:
                image.load()
                rgb = _whiten(image)
        except Exception as error:  # any decoder failure is a property of the file, not of the run
            return BadImage(probed.item.key, probed.item.origin, "corrupt", f"{type(error).__name__}: {error}")
        return np.asarray(rules.resize_and_crop(rgb, *probed.target))


def _whiten(image):
    """RGBA/LA/P-with-alpha over a white canvas, as the reference tokenizer does; everything else to RGB."""
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")


class DALIDecoder:
    """NVIDIA DALI: ``mixed`` (nvJPEG) decode and GPU resize when a GPU exists, CPU operators otherwise.

    A decode error invalidates a DALI pipeline, so a failing batch is retried image by image on fresh
    pipelines and only the failing images are reported.
    """

    name = "dali"

    def __init__(self, batch_size: int, num_threads: int = 2, use_gpu: bool = False, device_id: int = 0):
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.use_gpu = use_gpu
        self.device_id = device_id
        self._pipe = None

    def _build(self):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.use_gpu

        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads,
                      device_id=self.device_id if gpu else None, prefetch_queue_depth=1)
        def resize_pipeline():
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            cover = fn.external_source(name="cover", dtype=types.FLOAT, ndim=1)
            crop = fn.external_source(name="crop", dtype=types.FLOAT, ndim=1)
            pixels = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
            pixels = fn.resize(pixels, size=cover, interp_type=types.INTERP_CUBIC, antialias=True)
            return fn.crop(pixels, crop=crop)

        pipe = resize_pipeline()
        pipe.build()
        return pipe

    def _run(self, batch: Sequence[Probed]) -> List[np.ndarray]:
        if self._pipe is None:
            self._pipe = self._build()
        self._pipe.feed_input("data", [np.frombuffer(p.data, dtype=np.uint8) for p in batch])
        self._pipe.feed_input("cover", [np.asarray(p.cover, dtype=np.float32) for p in batch])
        self._pipe.feed_input("crop", [np.asarray(p.target, dtype=np.float32) for p in batch])
        (output,) = self._pipe.run()
        if self.use_gpu:
            output = output.as_cpu()
        return [np.array(output[i]) for i in range(len(batch))]

    def decode(self, batch: Sequence[Probed]) -> List[Union[np.ndarray, BadImage]]:
        results: List[Union[np.ndarray, BadImage]] = []
        for start in range(0, len(batch), self.batch_size):
            chunk = batch[start:start + self.batch_size]
            try:
                results.extend(self._run(chunk))
            except RuntimeError:
                self._pipe = None
                results.extend(self._one_by_one(chunk))
        return results

    def _one_by_one(self, chunk: Sequence[Probed]) -> List[Union[np.ndarray, BadImage]]:
        results: List[Union[np.ndarray, BadImage]] = []
        for probed in chunk:
            try:
                results.extend(self._run([probed]))
            except RuntimeError as error:
                self._pipe = None
                first_line = str(error).strip().splitlines()[0] if str(error).strip() else "decode failed"
                results.append(BadImage(probed.item.key, probed.item.origin, "corrupt", f"DALI: {first_line}"))
        return results


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def make_decoder(backend: str, batch_size: int, use_gpu: bool, num_threads: int = 2, device_id: int = 0):
    """``backend``: 'auto' (DALI if importable, else PIL), 'dali' or 'pil'."""
    if backend == "auto":
        backend = "dali" if dali_available() else "pil"
    if backend == "dali":
        if not dali_available():
            raise ImportError("--decoder dali requested but nvidia.dali is not importable "
                              "(pip install nvidia-dali-cuda130)")
        return DALIDecoder(batch_size, num_threads, use_gpu, device_id)
    if backend == "pil":
        return PILDecoder()
    raise ValueError(f"unknown decoder backend {backend!r}; expected auto, dali or pil")
