"""The Batch contract between ``data/`` (producer) and ``diffusion/`` (consumer).

A packed micro-batch, every tensor ``[b, L]``. Documents start and end on block boundaries
(padding to a multiple of the block size inside the document).
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

IGNORE_INDEX = -100

MODALITY_TEXT = 0
MODALITY_IMAGE = 1
MODALITY_SPECIAL = 2

BATCH_FIELDS = {
    "tokens": torch.int64,        # clean token ids
    "maskable": torch.bool,       # positions the noiser may mask (targets)
    "modality": torch.int8,       # MODALITY_* per position
    "doc_ids": torch.int32,       # document index inside the row; -1 on padding
    "position_ids": torch.int64,  # restart at 0 for each document
}


@dataclasses.dataclass
class Batch:
    tokens: torch.Tensor
    maskable: torch.Tensor
    modality: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor

    def __post_init__(self) -> None:
        shape = self.tokens.shape
        for name, dtype in BATCH_FIELDS.items():
            value = getattr(self, name)
            if value.dtype != dtype:
                raise TypeError(f"Batch.{name} must be {dtype}, got {value.dtype}")
            if value.shape != shape or value.dim() != 2:
                raise ValueError(f"Batch.{name} has shape {tuple(value.shape)}, expected [b, L] = {tuple(shape)}")

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def to(self, device) -> "Batch":
        return Batch(**{k: getattr(self, k).to(device) for k in BATCH_FIELDS})

    def as_dict(self) -> Dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in BATCH_FIELDS}
