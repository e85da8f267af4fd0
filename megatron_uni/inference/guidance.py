"""Classifier-free guidance over the rows of one forward (row 0 = conditional branch).

Two branches (text-to-image): ``uncond + s * (cond - uncond)``. Three branches (editing:
conditional, no text = ``<uncondition>`` with the source image, no image = the instruction
without the source image): ``no_text + s_text * (cond - no_text) + s_image * (no_text - no_image)``.
Optional rescale ``r`` (sglang-omni ``cfg_rescale``): multiply the guided logits by
``r * std(cond) / std(guided) + (1 - r)``, stds over each position's vocabulary row.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class ClassifierFreeGuidance:
    scale: float = 1.0           # text guidance (s, or s_text when editing)
    image_scale: float = 0.0     # editing only: weight of (no_text - no_image)
    rescale: float = 0.0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        cond, uncond = logits[0], logits[1]
        guided = uncond + self.scale * (cond - uncond)
        if logits.shape[0] == 3:
            guided = guided + self.image_scale * (uncond - logits[2])
        elif logits.shape[0] != 2:
            raise ValueError(f"classifier-free guidance needs 2 or 3 branches, got {logits.shape[0]} rows")
        if self.rescale:
            ratio = cond.std(-1, keepdim=True) / guided.std(-1, keepdim=True).clamp_min(1e-6)
            guided = guided * (self.rescale * ratio + (1.0 - self.rescale))
        return guided
