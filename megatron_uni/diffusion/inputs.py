"""The diffusion step: a ``Batch`` becomes model inputs of the BDLM layout.

``build_inputs`` noises the batch, lays out ``[noisy | clean]`` (2L) -- or, with
``complementary`` and ``shared_clean``, ``[noisy_a | noisy_b | clean]`` (3L, one row per
complementary pair) -- optionally prefix-aware compacted, and returns
:class:`DiffusionInputs`: ``input_ids``, ``position_ids``, ``labels`` (clean ids on masked
noisy positions, ``IGNORE_INDEX`` elsewhere; no shift), per-token ``loss_weights``, the
per-micro-batch ``normalizer`` of the loss, ``modality`` for the text/image split, and the
:class:`AttentionLayout` from which masks are built.

Settings: the recipe's ``diffusion:`` section (``config.DiffusionConfig``). Loss weighting
(``weighting``, one of ``config.Weighting``), with N_d the masked and M_d the maskable tokens of document d:

* ``mean``        -- weight 1, normaliser sum N_d (dFactory: mean over masked tokens);
* ``elbo``        -- weight 1/t, normaliser sum M_d (the ELBO; E[sum 1/t] over masks = M_d);
* ``sqrt_masked`` -- weight 1/sqrt(N_d), normaliser sum sqrt(N_d) (SFT reweighting of
  variable-length samples: a weighted mean in which each document counts sqrt(N_d)).

The loss is sum(weight * CE) / normaliser with both terms summed over micro-batches and DP
ranks before dividing (``losses.py``), i.e. a global normalisation, not a mean of means.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_uni.attention.layout import FILLER_DOC, AttentionLayout
from megatron_uni.attention.masks import FLEX_TILE, dense_mask
from megatron_uni.config import DiffusionConfig
from megatron_uni.data.batch import IGNORE_INDEX, MODALITY_SPECIAL, Batch
from megatron_uni.diffusion.layout import (check_block_aligned, compact_rows, full_layout, kept_positions,
                                           share_clean, shared_clean_layout)
from megatron_uni.diffusion.noising import RowKeys, noise_batch
from megatron_uni.tokens import Vocabulary


@dataclasses.dataclass
class DiffusionInputs:
    input_ids: torch.Tensor     # [b, S] int64
    position_ids: torch.Tensor  # [b, S] int64
    labels: torch.Tensor        # [b, S] int64, IGNORE_INDEX where no loss
    loss_weights: torch.Tensor  # [b, S] float, 0 where no loss
    modality: torch.Tensor      # [b, S] int8
    layout: AttentionLayout
    normalizer: torch.Tensor    # scalar float: this micro-batch's share of the loss denominator
    _descriptor: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def attention_mask(self) -> torch.Tensor:
        """Layout descriptor ``[b, 4, S]`` for the block attention (see ``megatron_uni.attention.layout``).

        Built once and returned again on later calls: the attention caches its BlockMask per
        descriptor tensor, so one tensor per micro-batch means one mask build per micro-batch.
        """
        if self._descriptor is None:
            self._descriptor = self.layout.descriptor()
        return self._descriptor

    def dense_attention_mask(self) -> torch.Tensor:
        """Bool ``[b, 1, S, S]`` (True = masked out) for megatron's stock attention modules."""
        return dense_mask(self.layout)

    @property
    def model_labels(self) -> torch.Tensor:
        """Labels with ignored positions set to 0: megatron's CE needs in-range ids; weights are 0 there."""
        return self.labels.clamp_min(0)

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device, non_blocking: bool = False) -> "DiffusionInputs":
        """A copy on ``device`` (the training step's one host-to-device move, ``training/step.py``).

        Towards a CUDA device, CPU tensors are pinned first so that ``non_blocking`` copies overlap
        with compute (tensors a loader already pinned are not copied again).
        """
        def move(tensor: torch.Tensor) -> torch.Tensor:
            if torch.device(device).type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
                tensor = tensor.pin_memory()
            return tensor.to(device, non_blocking=non_blocking)

        layout = AttentionLayout(*(move(getattr(self.layout, name)) for name in ("doc", "block", "clean", "copy")))
        return DiffusionInputs(
            input_ids=move(self.input_ids), position_ids=move(self.position_ids), labels=move(self.labels),
            loss_weights=move(self.loss_weights), modality=move(self.modality), layout=layout,
            normalizer=move(self.normalizer),
            _descriptor=None if self._descriptor is None else move(self._descriptor))


def per_document_sum(values: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """``[b, L]`` sum of ``values`` over each position's document, broadcast back to positions."""
    slot = (doc_ids.long() + 1)  # doc -1 (padding) -> slot 0
    sums = torch.zeros(values.shape[0], int(slot.max().item()) + 1, dtype=values.dtype, device=values.device)
    sums.scatter_add_(1, slot, values)
    return sums.gather(1, slot)


def token_weights(weighting: str, masked: torch.Tensor, maskable: torch.Tensor, ratio: torch.Tensor,
                  doc_ids: torch.Tensor):
    """Per-token loss weights ``[b, L]`` and the scalar normaliser (see the module docstring)."""
    masked_f = masked.float()
    if weighting == "mean":
        return masked_f, masked_f.sum()
    if weighting == "elbo":
        return masked_f / ratio, maskable.float().sum()
    num_masked = per_document_sum(masked_f, doc_ids)
    weights = torch.where(masked, num_masked.clamp_min(1.0).rsqrt(), torch.zeros_like(masked_f))
    # sum over tokens of 1/sqrt(N_d) over the N_d masked tokens of d = sum_d sqrt(N_d)
    return weights, weights.sum()


def build_inputs(batch: Batch, vocab: Vocabulary, cfg: DiffusionConfig,
                 generator: Optional[torch.Generator] = None, *, block_size: int,
                 pad_multiple: int = FLEX_TILE, keys: Optional[RowKeys] = None) -> DiffusionInputs:
    """The BDLM inputs of ``batch`` (documents aligned to ``block_size``, ``data.block_size``).

    With ``cfg.prefix_aware`` the compacted rows are padded to a multiple of ``pad_multiple``
    (FlexAttention tiles are 128). With ``cfg.shared_clean`` the b samples give b rows of 3L
    (otherwise complementary masking gives 2b rows of 2L); weights and normaliser are computed
    on the pairs first, so both forms carry the same per-token weights. Training passes ``keys``
    (the rows' global positions) so the noise does not depend on the layout; see ``noising``.
    """
    if block_size < 1 or pad_multiple < 1:
        raise ValueError(f"build_inputs: block_size ({block_size}) and pad_multiple ({pad_multiple}) must be >= 1")
    check_block_aligned(batch.doc_ids, block_size)
    noised = noise_batch(batch, vocab, cfg, block_size, generator, keys)
    clean = noised.batch
    weights, normalizer = token_weights(cfg.weighting, noised.masked, clean.maskable, noised.ratio, clean.doc_ids)
    labels = torch.where(noised.masked, clean.tokens, torch.full_like(clean.tokens, IGNORE_INDEX))
    layout = full_layout(clean.doc_ids, block_size)
    rows = {
        "input_ids": (torch.cat([noised.noisy_tokens, clean.tokens], 1), vocab.pad_id),
        "position_ids": (torch.cat([clean.position_ids, clean.position_ids], 1), 0),
        "labels": (torch.cat([labels, torch.full_like(labels, IGNORE_INDEX)], 1), IGNORE_INDEX),
        "loss_weights": (torch.cat([weights, torch.zeros_like(weights)], 1), 0.0),
        "modality": (torch.cat([clean.modality, clean.modality], 1), MODALITY_SPECIAL),
        "doc": (layout.doc, FILLER_DOC),
        "block": (layout.block, -1),
        "clean": (layout.clean, False),
        "copy": (torch.zeros_like(layout.doc), 0),
    }
    if cfg.shared_clean:
        rows = {name: (share_clean(tensor), fill) for name, (tensor, fill) in rows.items()}
        shared = shared_clean_layout(clean.doc_ids[0::2], block_size)
        rows.update(doc=(shared.doc, FILLER_DOC), block=(shared.block, -1), clean=(shared.clean, False),
                    copy=(shared.copy, 0))
        layout = shared
    if cfg.prefix_aware:
        keep = kept_positions(layout, rows["labels"][0] != IGNORE_INDEX)
        compacted, _ = compact_rows(keep, *rows.values(), multiple=pad_multiple)
        values = dict(zip(rows, compacted))
    else:
        values = {name: tensor for name, (tensor, _) in rows.items()}
    return DiffusionInputs(
        input_ids=values["input_ids"], position_ids=values["position_ids"], labels=values["labels"],
        loss_weights=values["loss_weights"], modality=values["modality"],
        layout=AttentionLayout(doc=values["doc"], block=values["block"], clean=values["clean"], copy=values["copy"]),
        normalizer=normalizer,
    )
