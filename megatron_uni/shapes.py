"""Shape-difference reports: the one wording of "tensor X has shape A, expected B" and its kin.

Used wherever a set of named tensors is checked against what a model expects (HF import,
checkpoint export, the image tokenizer's weights), so every such error reads the same: shapes
as lists, the tensor named first, and where it was found when that is known.
"""

from __future__ import annotations

from typing import Callable, List, Mapping, Sequence

Shape = Sequence[int]


def shape_text(shape: Shape) -> str:
    return str([int(size) for size in shape])


def missing(name: str, expected: Shape) -> str:
    return f"missing tensor {name} (expected shape {shape_text(expected)})"


def unexpected(name: str, got: Shape, where: str = "") -> str:
    return f"unexpected tensor {name} {shape_text(got)}{where}"


def wrong_shape(name: str, got: Shape, expected: Shape, where: str = "") -> str:
    return f"tensor {name}{where} has shape {shape_text(got)}, expected {shape_text(expected)}"


def shape_problems(expected: Mapping[str, Shape], found: Mapping[str, Shape],
                   where: Callable[[str], str] = lambda name: "") -> List[str]:
    """Missing, unexpected and wrongly shaped tensors, one line each; ``where(name)`` says where a
    found tensor lies (`` in shard.safetensors``)."""
    problems = [missing(n, s) for n, s in expected.items() if n not in found]
    problems += [unexpected(n, s, where(n)) for n, s in found.items() if n not in expected]
    problems += [wrong_shape(n, found[n], s, where(n)) for n, s in expected.items()
                 if n in found and tuple(found[n]) != tuple(s)]
    return problems


def summary(problems: List[str], shown: int = 10) -> str:
    """The first ``shown`` problems joined, with a count of the rest."""
    more = f" (+{len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more

