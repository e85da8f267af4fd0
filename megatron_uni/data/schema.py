"""Field checks for JSONL samples; every failure names the file, the line and the field."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional

from megatron_uni.errors import MegatronUniError


class SampleError(MegatronUniError, ValueError):
    """A sample violates its task schema. ``str()`` is ``file:line: field 'x': why``."""

    def __init__(self, where: "Where", field: str, reason: str) -> None:
        self.file, self.line, self.field, self.reason = where.file, where.line, field, reason
        super().__init__(f"{where.file}:{where.line}: field '{field}': {reason}")


@dataclasses.dataclass(frozen=True)
class Where:
    """Location of a sample: JSONL file and 1-based line number."""

    file: str
    line: int

    def error(self, field: str, reason: str) -> SampleError:
        return SampleError(self, field, reason)


def require_keys(sample: Mapping[str, Any], where: Where, required: List[str], optional: List[str]) -> None:
    """Every required key present, no key outside required + optional + ``task``."""
    for key in required:
        if key not in sample:
            raise where.error(key, "missing required field")
    unknown = sorted(set(sample) - set(required) - set(optional) - {"task"})
    if unknown:
        raise where.error(unknown[0], f"unknown field; allowed: {sorted(set(required) | set(optional))}")


def text_field(sample: Mapping[str, Any], where: Where, key: str, allow_empty: bool = False,
               default: Optional[str] = None) -> str:
    if key not in sample:
        if default is None:
            raise where.error(key, "missing required field")
        return default
    value = sample[key]
    if not isinstance(value, str):
        raise where.error(key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise where.error(key, "must not be empty")
    return value


def image_key(value: Any, where: Where, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(field, f"expected an image key (non-empty string), got {value!r}")
    return value


def image_list(sample: Mapping[str, Any], where: Where, key: str, low: int, high: int) -> List[str]:
    value = sample.get(key)
    if not isinstance(value, list):
        raise where.error(key, f"expected a list of image keys, got {type(value).__name__}")
    if not low <= len(value) <= high:
        raise where.error(key, f"expected {low}..{high} images, got {len(value)}")
    return [image_key(v, where, f"{key}[{i}]") for i, v in enumerate(value)]


def int_list(value: Any, where: Where, field: str, length: int, low: float, high: float) -> List[float]:
    """A list of ``length`` numbers in [low, high]."""
    if not isinstance(value, list) or len(value) != length:
        raise where.error(field, f"expected a list of {length} numbers, got {value!r}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise where.error(f"{field}[{i}]", f"expected a number, got {v!r}")
        if not low <= v <= high:
            raise where.error(f"{field}[{i}]", f"{v} outside [{low}, {high}]")
    return list(value)


def as_object(raw: Any, where: Where) -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise where.error("<sample>", f"a sample must be a JSON object, got {type(raw).__name__}")
    return raw
