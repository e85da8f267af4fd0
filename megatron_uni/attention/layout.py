"""The attention layout: what every position of a model row *is*.

A BDLM row is built by ``diffusion/layout.py`` (the ``[noisy | clean]`` copies of a packed
sample, possibly compacted); this module defines only what the model needs to read it.
Every position carries four integers, and the attention mask (``masks.py``) is a function of
these alone, so the full, the compacted and the shared-clean rows use one mask definition:

* ``doc``   -- document index inside the packed row (-1 = padding of the packed row,
  :data:`FILLER_DOC` = filler appended to equalise compacted rows in a micro-batch);
* ``block`` -- block index of the position *in the original packed row* (position // block size);
* ``clean`` -- 1 for the clean copy, 0 for a noisy copy;
* ``copy``  -- which noisy copy a noisy position belongs to: 0 in the ``[noisy | clean]`` row;
  0 / 1 for ``noisy_a`` / ``noisy_b`` of the shared-clean complementary row
  ``[noisy_a | noisy_b | clean]``, whose two noisy copies never attend each other
  (0 on clean positions, where it is not read).

The layout travels through megatron-core as one int32 tensor ``[b, 4, S]`` (the
"descriptor"), passed where megatron passes ``attention_mask``: megatron hands that argument
untouched to the core attention and, under full activation recompute, saves it with
``ctx.save_for_backward`` -- which only accepts tensors, hence a tensor and not an object.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

# doc id of filler positions that equalise row lengths after compaction (never attended by others)
FILLER_DOC = -2
DESCRIPTOR_ROWS = 4  # doc, block, clean, copy


@dataclasses.dataclass
class AttentionLayout:
    """Per-position attributes of a model row, each ``[b, S]``; see the module docstring."""

    doc: torch.Tensor      # int32
    block: torch.Tensor    # int32
    clean: torch.Tensor    # bool
    copy: Optional[torch.Tensor] = None  # int32; None = all 0 (a single noisy copy)

    def __post_init__(self) -> None:
        if self.copy is None:
            self.copy = torch.zeros_like(self.doc, dtype=torch.int32)
        for name in ("doc", "block", "clean", "copy"):
            value = getattr(self, name)
            if value.dim() != 2 or value.shape != self.doc.shape:
                raise ValueError(f"AttentionLayout.{name} has shape {tuple(value.shape)}, "
                                 f"expected [b, S] = {tuple(self.doc.shape)}")

    @property
    def batch_size(self) -> int:
        return self.doc.shape[0]

    @property
    def seq_length(self) -> int:
        return self.doc.shape[1]

    def descriptor(self) -> torch.Tensor:
        """``[b, 4, S]`` int32 tensor to pass as ``attention_mask`` to the block attention."""
        rows = [self.doc.int(), self.block.int(), self.clean.int(), self.copy.int()]
        return torch.stack(rows, dim=1).contiguous()

    @classmethod
    def from_descriptor(cls, descriptor: torch.Tensor) -> "AttentionLayout":
        if not is_descriptor(descriptor):
            raise ValueError(f"attention layout descriptor must be an int32 [b, {DESCRIPTOR_ROWS}, S] tensor, "
                             f"got {descriptor.dtype} {tuple(descriptor.shape)}")
        return cls(doc=descriptor[:, 0], block=descriptor[:, 1], clean=descriptor[:, 2].bool(), copy=descriptor[:, 3])

    def to(self, device, non_blocking: bool = False) -> "AttentionLayout":
        return AttentionLayout(*(getattr(self, name).to(device, non_blocking=non_blocking)
                                 for name in ("doc", "block", "clean", "copy")))


def is_descriptor(tensor) -> bool:
    return (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int32 and tensor.dim() == 3
            and tensor.shape[1] == DESCRIPTOR_ROWS)
