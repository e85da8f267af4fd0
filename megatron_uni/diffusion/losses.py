"""Masked-diffusion losses as *sums* so that normalisation is global.

Megatron's ``GPTModel(..., labels=...)`` returns the vocab-parallel cross-entropy per token
``[b, S]`` (already reduced over TP); it exists only on the last pipeline stage. The loss of a
step is ``sum(weight * CE) / sum(normaliser)`` with both sums over every micro-batch and DP
rank: :func:`loss_sums` gives one micro-batch's sums, :func:`reduce_sums` adds micro-batches and
ranks (the one global reduction: the training loop and the tests call it), :func:`combine`
divides into a :class:`LossReport`. With megatron's schedule use ``calculate_per_token_loss=True``
and return ``(sums.loss, sums.normalizer, ...)`` from the loss function: megatron then divides
gradients by the global normaliser itself.

Also here: the CAP confidence term (entropy at masked positions the model already gets right,
vocab-parallel aware).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

import torch

from megatron_uni import platform
from megatron_uni.config import Weighting
from megatron_uni.data.batch import IGNORE_INDEX, MODALITY_IMAGE, MODALITY_TEXT
from megatron_uni.diffusion.inputs import DiffusionInputs


@dataclasses.dataclass
class LossSums:
    """Additive loss statistics of some tokens; every field a scalar tensor."""

    loss: torch.Tensor              # sum of weight * CE
    normalizer: torch.Tensor        # denominator share (DiffusionInputs.normalizer)
    text_loss: torch.Tensor         # sum of weight * CE over text targets
    text_weight: torch.Tensor       # sum of weight over text targets
    image_loss: torch.Tensor
    image_weight: torch.Tensor
    confidence: torch.Tensor        # sum of CAP entropies
    confidence_count: torch.Tensor  # positions contributing to it

    def stacked(self) -> torch.Tensor:
        """The fields as one float vector (for a single all-reduce); :meth:`from_stacked` inverts it."""
        return torch.stack([getattr(self, f.name).float() for f in dataclasses.fields(self)])

    @classmethod
    def from_stacked(cls, values: torch.Tensor) -> "LossSums":
        return cls(**{f.name: values[i] for i, f in enumerate(dataclasses.fields(cls))})

    def detached(self) -> "LossSums":
        return LossSums(**{f.name: getattr(self, f.name).detach() for f in dataclasses.fields(self)})


@dataclasses.dataclass
class LossReport:
    """The losses of some tokens, from summed :class:`LossSums` (scalar tensors or floats)."""

    loss: torch.Tensor              # diffusion_loss + confidence_beta * confidence_loss
    diffusion_loss: torch.Tensor    # sum(weight * CE) / sum(normaliser)
    text_loss: torch.Tensor         # weighted mean CE over text targets
    image_loss: torch.Tensor        # weighted mean CE over image-code targets
    confidence_loss: torch.Tensor   # mean CAP entropy


def loss_sums(per_token_ce: torch.Tensor, inputs: DiffusionInputs,
              confidence: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> LossSums:
    """Sums of one micro-batch from the per-token CE ``[b, S]`` and optional CAP
    ``(entropy, counted)`` from :func:`confidence_entropy`."""
    if per_token_ce.shape != inputs.loss_weights.shape:
        raise ValueError(f"per-token loss has shape {tuple(per_token_ce.shape)}, "
                         f"expected {tuple(inputs.loss_weights.shape)} (the DiffusionInputs rows)")
    weighted = per_token_ce.float() * inputs.loss_weights
    text = inputs.modality == MODALITY_TEXT
    image = inputs.modality == MODALITY_IMAGE
    zero = weighted.new_zeros(())
    if confidence is None:
        conf_sum, conf_count = zero, zero
    else:
        entropy, counted = confidence
        conf_sum, conf_count = entropy.float().sum(), counted.float().sum()
    return LossSums(
        loss=weighted.sum(), normalizer=inputs.normalizer.float().to(weighted.device),
        text_loss=(weighted * text).sum(), text_weight=(inputs.loss_weights * text).sum(),
        image_loss=(weighted * image).sum(), image_weight=(inputs.loss_weights * image).sum(),
        confidence=conf_sum, confidence_count=conf_count,
    )


def add_sums(a: LossSums, b: LossSums) -> LossSums:
    return LossSums.from_stacked(a.stacked() + b.stacked())


def reduce_sums(sums: Sequence[LossSums], group=None, contributes: bool = True) -> LossSums:
    """The global reduction: this rank's micro-batch sums added, then all-reduced over ``group``
    (the world when None; no-op without a process group). No grad.

    A rank whose sums duplicate another's (a TP peer of the last pipeline stage) passes
    ``contributes=False`` and adds zeros, so each replica is counted once.
    """
    device = platform.device()  # the process group's device: NCCL reduces CUDA tensors only
    total = torch.zeros(len(dataclasses.fields(LossSums)), device=device)
    if contributes:
        for item in sums:
            total += item.stacked().detach().to(device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(total, group=group)
    return LossSums.from_stacked(total)


def combine(sums: LossSums, confidence_beta: float = 0.0) -> LossReport:
    """Global loss and the reported split from summed statistics."""
    def ratio(num, den):
        return num / den.clamp_min(1e-12)

    loss = ratio(sums.loss, sums.normalizer)
    confidence = ratio(sums.confidence, sums.confidence_count)
    return LossReport(loss=loss + confidence_beta * confidence, diffusion_loss=loss,
                      text_loss=ratio(sums.text_loss, sums.text_weight),
                      image_loss=ratio(sums.image_loss, sums.image_weight), confidence_loss=confidence)


def _tp_sum(value: torch.Tensor, group) -> torch.Tensor:
    """All-reduce over the TP group in forward, identity in backward (the loss is replicated)."""
    if group is None or torch.distributed.get_world_size(group) == 1:
        return value
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(value, group=group)


def confidence_entropy(logits: torch.Tensor, labels: torch.Tensor, vocab_start: int = 0,
                       tp_group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """CAP term per token: ``(entropy, counted)`` ``[b, S]``, entropy kept only where the
    argmax equals the label (``counted``), else 0.

    ``logits`` ``[b, S, V_local]`` hold vocabulary rows ``vocab_start .. vocab_start+V_local`` of
    this TP rank; the softmax statistics are summed over ``tp_group``. The argmax test is
    "the label's logit equals the global maximum". Ignored labels give 0.
    """
    logits = logits.float()
    local_max = logits.max(-1).values.detach()
    global_max = local_max
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        global_max = local_max.clone()
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=tp_group)
    shifted = logits - global_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = _tp_sum(exp.sum(-1), tp_group)
    sum_exp_z = _tp_sum((exp * shifted).sum(-1), tp_group)
    entropy = sum_exp.log() - sum_exp_z / sum_exp  # H = log Z - E_p[z]
    local_label = labels - vocab_start
    owned = (local_label >= 0) & (local_label < logits.shape[-1]) & (labels != IGNORE_INDEX)
    label_logit = torch.where(owned, shifted.detach().gather(-1, local_label.clamp(0, logits.shape[-1] - 1)
                                                             .unsqueeze(-1)).squeeze(-1), torch.zeros_like(global_max))
    label_logit = label_logit.clone()
    if tp_group is not None and torch.distributed.get_world_size(tp_group) > 1:
        torch.distributed.all_reduce(label_logit, group=tp_group)
    correct = (labels != IGNORE_INDEX) & (label_logit >= 0)
    return torch.where(correct, entropy, torch.zeros_like(entropy)), correct


# megatron's schedules add the loss function's token count into an int32 tensor, so a
# non-integral normaliser is passed in fixed point: numerator and count both scaled by this
# factor; the sqrt_masked normaliser (a sum of square roots) is then off by < 0.5/64 per micro-batch.
NORMALIZER_FIXED_POINT: Dict[Weighting, int] = {"mean": 1, "elbo": 1, "sqrt_masked": 64}


def schedule_loss(sums: LossSums, weighting: Weighting):
    """``(loss_sum, num_tokens, report)`` for a megatron ``loss_func`` with ``calculate_per_token_loss=True``.

    megatron divides the summed ``loss_sum`` (gradients) by the summed ``num_tokens`` over
    micro-batches and DP: the global normalisation. ``report["diffusion"]`` holds the
    :class:`LossSums` (detached) for logging: :func:`reduce_sums` them, then :func:`combine`.
    """
    scale = NORMALIZER_FIXED_POINT[weighting]
    count = torch.round(sums.normalizer.detach() * scale).to(torch.int)
    return sums.loss * scale, count, {"diffusion": sums.detached()}


def ce_and_confidence(logits: torch.Tensor, labels: torch.Tensor):
    """Per-token vocab-parallel CE and the CAP ``(entropy, counted)`` from one logits tensor.

    For the CAP term the model is called *without* ``labels`` (megatron then returns this TP
    rank's vocabulary shard of the logits, ``[b, S, V/TP]``); CE uses megatron's
    ``vocab_parallel_cross_entropy``, the same function ``GPTModel`` uses with ``labels=``.
    """
    from megatron.core import parallel_state, tensor_parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    vocab_start = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
    confidence = confidence_entropy(logits, labels, vocab_start, tp_group)
    # megatron's CE subtracts the max from an fp32 input in place: give it its own copy
    ce_input = logits.clone() if logits.dtype == torch.float32 else logits
    ce = tensor_parallel.vocab_parallel_cross_entropy(ce_input, labels.clamp_min(0))
    return ce, confidence
