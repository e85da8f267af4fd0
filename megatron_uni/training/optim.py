"""Optimizer and LR/WD schedule: megatron-core's, built from our config sections."""

from __future__ import annotations

from typing import Sequence

import torch
from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_uni.config import Config
from megatron_uni.platform.cpu import cpu_optimizer_scope


def build_optimizer(cfg: Config, model_chunks: Sequence[torch.nn.Module]):
    """megatron's optimizer (TE FusedAdam on GPU, torch AdamW fallback on CPU; never apex)."""
    o = cfg.optimizer
    bf16 = cfg.model.params_dtype == "bfloat16"
    mcore_cfg = McoreOptimizerConfig(
        optimizer=o.name, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad,
        bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    with cpu_optimizer_scope():
        return get_megatron_optimizer(mcore_cfg, list(model_chunks))


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    s, o = cfg.schedule, cfg.optimizer
    decay_steps = max(s.train_iters - s.warmup_iters, 1)
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters, lr_decay_steps=s.warmup_iters + decay_steps,
        lr_decay_style=s.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=s.train_iters, wd_incr_style="constant",
    )
