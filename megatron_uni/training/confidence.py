"""The CAP confidence term in training: megatron's ``loss_func`` when ``diffusion.confidence_beta > 0``.

The model is called without ``labels`` (it returns this TP rank's vocabulary shard of the logits);
:func:`~megatron_uni.diffusion.losses.ce_and_confidence` gives the per-token CE and the CAP entropy
from them. megatron divides the summed ``loss_sum`` by the summed token count (one global
normalisation), but CAP is a mean over its own positions (correctly predicted masked tokens). So
each micro-batch adds its CAP mean weighted by its share of the normaliser:

    loss = [sum_mb wCE_mb + beta * sum_mb N_mb * (H_mb / C_mb)] / sum_mb N_mb

which is exactly ``combine(sums, beta).loss`` for one micro-batch and, over several, the
normaliser-weighted mean of the micro-batches' CAP means (the logged ``confidence_loss`` is the
global ``sum H / sum C``).
"""

from __future__ import annotations

import torch

from megatron_uni.diffusion.inputs import DiffusionInputs
from megatron_uni.diffusion.losses import ce_and_confidence, loss_sums, schedule_loss
from megatron_uni.training.metrics import token_stats


def confidence_loss_func(inputs: DiffusionInputs, weighting: str, confidence_beta: float, logits: torch.Tensor):
    """megatron's ``(loss_sum, num_tokens, report)`` with the CAP term folded into ``loss_sum``."""
    ce, confidence = ce_and_confidence(logits, inputs.labels)
    sums = loss_sums(ce, inputs, confidence)
    loss_sum, count, report = schedule_loss(sums, weighting)
    cap_mean = sums.confidence / sums.confidence_count.clamp_min(1)
    report = {**report, "tokens": token_stats(ce, inputs)}
    return loss_sum + confidence_beta * cap_mean * count.to(cap_mean.dtype), count, report
