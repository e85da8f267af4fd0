"""The training loop: megatron-core schedules, DDP, optimizer, checkpoints, per-step log.

Resumes from ``checkpoint.save`` when it already holds a ``latest`` (a requeued job continues),
else from ``checkpoint.load``. Saves every ``checkpoint.save_interval`` iterations and at the end,
and on SIGTERM/SIGUSR1 (Slurm's pre-emption warning) or every ``schedule.exit_interval``
iterations saves at the end of the current step and exits cleanly (a signal during set-up: see
``training/stop.py``). On resume the LR schedule is the checkpoint's (megatron's
``OptimizerParamScheduler`` semantics), so keep ``schedule.*`` unchanged across restarts.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_uni import checkpoint
from megatron_uni.config import Config, data_parallel_size, validate_world_size
from megatron_uni.diffusion.inputs import DiffusionInputs
from megatron_uni.diffusion.losses import LossReport, LossSums, combine, reduce_sums
from megatron_uni.model.builder import build_model_chunks
from megatron_uni.model.embedding_noise import mask_embedding_noise_hook
from megatron_uni.model.spec import core_attention_spec
from megatron_uni.platform.cpu import cpu_optimizer_scope
from megatron_uni.platform.distributed import init_distributed, is_rank0
from megatron_uni.tokens import VocabularyLayout
from megatron_uni.training.expert_balance import ExpertBalance
from megatron_uni.training.metrics import MetricsLogger, global_token_stats, run_dir_of, validation_line
from megatron_uni.training.nonfinite import SkipCounter
from megatron_uni.training.optim import build_optimizer, build_scheduler
from megatron_uni.training import samples
from megatron_uni.training.optimizer_state import allocate_adam_state, check_resume_layout, restore_adam_step
from megatron_uni.training.step import make_forward_step
from megatron_uni.training.stop import StoppedBeforeTraining, install_stop_handlers, reset_stop_flag

log = logging.getLogger("megatron_uni.train")

# (iteration, microbatch index, dp_rank, dp_size) -> DiffusionInputs of one micro-batch
MicrobatchFn = Callable[[int, int, int, int], DiffusionInputs]


@dataclasses.dataclass
class TrainState:
    cfg: Config
    model: List[torch.nn.Module]
    optimizer: object
    scheduler: object
    vocabulary: Optional[VocabularyLayout] = None   # recorded in every checkpoint; its mask id feeds the noise hook
    iteration: int = 0
    balance: Optional[ExpertBalance] = None
    skips: Optional[SkipCounter] = None


@dataclasses.dataclass
class StepMetrics:
    """One optimizer step: the global losses (floats; NaN for a split without targets) and the update."""

    losses: LossReport
    grad_norm: float                      # NaN when the update was skipped
    update_ok: bool
    lr: float
    tokens: Dict[str, float] = dataclasses.field(default_factory=dict)  # metrics.global_token_stats
    expert_load: Optional[Dict[str, Any]] = None                        # ExpertBalance.after_step
    skipped_steps: int = 0

    def as_record(self) -> Dict[str, Any]:
        """The flat dict ``metrics.MetricsLogger.record`` writes (one JSON object per step)."""
        losses = {f.name: float(getattr(self.losses, f.name)) for f in dataclasses.fields(self.losses)}
        return {**losses, **self.tokens, "grad_norm": self.grad_norm, "update_ok": self.update_ok, "lr": self.lr,
                "expert_load": self.expert_load, "skipped_steps": self.skipped_steps}


def wrap_ddp(cfg: Config, chunks: Sequence[torch.nn.Module]) -> List[torch.nn.Module]:
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    for chunk in chunks:
        # Before DDP is built: DDP reads calculate_per_token_loss at construction and would
        # otherwise also scale every gradient by 1/DP (finalize_model_grads already divides by
        # the token count summed over DP).
        chunk.config.calculate_per_token_loss = True
        # the prefix-aware layout compacts each micro-batch to its own length
        chunk.config.variable_seq_lengths = cfg.diffusion.prefix_aware and cfg.parallel.pipeline > 1
    chunks[0].config.finalize_model_grads_func = finalize_model_grads
    return [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def setup(cfg: Config, vocabulary: Optional[VocabularyLayout] = None) -> TrainState:
    """Distributed init, model (block-diffusion attention), DDP, optimizer, scheduler, resume."""
    launch = init_distributed(cfg.parallel, seed=cfg.data.seed)
    validate_world_size(cfg, launch.world_size)
    cfg.parallel.world_size = launch.world_size
    chunks = build_model_chunks(cfg.model, cfg.parallel, core_attention_spec(cfg.model))
    first_chunk = chunks[0]
    chunks = wrap_ddp(cfg, chunks)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    state = TrainState(cfg=cfg, model=chunks, optimizer=optimizer, scheduler=scheduler, vocabulary=vocabulary,
                       balance=ExpertBalance(chunks, cfg.model.moe_router_bias_update_rate,
                                             cfg.model.moe_router_bias_zero_mean),
                       skips=SkipCounter(cfg.optimizer.max_consecutive_skips))
    # our bias update (after the optimizer step, skipped with it) replaces megatron's in finalize
    first_chunk.config.finalize_model_grads_func = state.balance.finalize_model_grads
    if cfg.diffusion.mask_noise_steps and vocabulary is not None and first_chunk.pre_process:
        sp_rank = parallel_state.get_tensor_model_parallel_rank() if cfg.parallel.sequence_parallel else 0
        diffusion = cfg.diffusion
        hook = mask_embedding_noise_hook(vocabulary.mask_id, diffusion.mask_noise_std, diffusion.mask_noise_steps,
                                         current_step=lambda: state.iteration, sequence_parallel_rank=sp_rank)
        first_chunk.embedding.register_forward_hook(hook, with_kwargs=True)
    # A run's own checkpoints win over checkpoint.load: a requeued job must continue, not restart
    # from the base it was initialised with.
    if cfg.checkpoint.save and checkpoint.latest_iteration_dir(cfg.checkpoint.save):
        load(state, cfg.checkpoint.save)
    elif cfg.checkpoint.load:
        load(state, cfg.checkpoint.load, finetune=cfg.checkpoint.finetune)
    return state


def _optimizer_sharded(state: TrainState, is_loading: bool = False) -> Dict:
    """The optimizer's sharded state. ``is_loading`` allocates Adam's (lazily created) moments
    first: without it a fresh optimizer offers no tensors to load into and resumes from zero
    moments without any error."""
    model_sd = checkpoint.model_sharded_state_dict(state.model)
    if is_loading:
        allocate_adam_state(state.optimizer)
    with cpu_optimizer_scope():
        return {"optimizer": state.optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})}


def save(state: TrainState) -> str:
    cfg = state.cfg
    return checkpoint.save_checkpoint(
        cfg.checkpoint.save, state.iteration, state.model, cfg.model, state.vocabulary, cfg.parallel,
        extra_sharded=_optimizer_sharded(state), scheduler=state.scheduler.state_dict(), config=cfg.to_dict(),
        keep_last=cfg.checkpoint.keep_last,
    )


def load(state: TrainState, path: str, finetune: bool = False) -> None:
    if finetune:
        checkpoint.load_checkpoint(path, state.model, state.cfg.model)
        return
    saved = checkpoint.read_metadata(path)
    has_optimizer = "optimizer" in saved.extra_keys
    if has_optimizer:
        check_resume_layout(saved.parallel, state.cfg.parallel, saved.iteration_dir)
    extra = _optimizer_sharded(state, is_loading=True) if has_optimizer else None
    metadata, loaded = checkpoint.load_checkpoint(path, state.model, state.cfg.model, extra_sharded=extra)
    if extra:
        with torch.no_grad(), cpu_optimizer_scope():
            state.optimizer.load_state_dict(loaded["optimizer"])
            restore_adam_step(state.optimizer)
    if metadata.scheduler:
        state.scheduler.load_state_dict(metadata.scheduler)
    state.iteration = metadata.iteration
    if is_rank0():
        log.info("resumed from %s at iteration %d", metadata.iteration_dir, state.iteration)


def num_microbatches(cfg: Config) -> int:
    return cfg.data.global_batch_size // (cfg.data.micro_batch_size * data_parallel_size(cfg.parallel))


def _microbatch_iterators(state: TrainState, make_microbatch: MicrobatchFn) -> List[Iterator]:
    """One iterator per model chunk, each yielding the same micro-batches of this step."""
    cfg = state.cfg
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    count = num_microbatches(cfg)

    def iterator():
        for index in range(count):
            yield make_microbatch(state.iteration, index, dp_rank, dp_size)

    return [iterator() for _ in state.model]


def _reports_contribute() -> bool:
    return parallel_state.is_pipeline_last_stage(ignore_virtual=True) and \
        parallel_state.get_tensor_model_parallel_rank() == 0


def global_loss_sums(reports: Sequence[Dict[str, LossSums]]) -> LossSums:
    """This step's loss sums over all micro-batches and DP ranks, on every rank, from the reports
    of megatron's forward-backward schedule.

    Only the last pipeline stage has reports, and TP ranks hold copies: rank (tp 0, last stage)
    of each DP replica contributes its sums and one all-reduce over the world adds them up.
    """
    return reduce_sums([report["diffusion"] for report in reports], contributes=_reports_contribute())


def step_losses(reports: Sequence[Dict[str, LossSums]], confidence_beta: float = 0.0) -> LossReport:
    """The step's global losses as floats; a split without targets in this step is NaN, not 0."""
    sums = global_loss_sums(reports)
    report = combine(sums, confidence_beta)
    losses = {f.name: float(getattr(report, f.name)) for f in dataclasses.fields(report)}
    for split in ("text", "image"):
        if float(getattr(sums, f"{split}_weight")) == 0.0:
            losses[f"{split}_loss"] = float("nan")
    return LossReport(**losses)


def train_step(state: TrainState, make_microbatch: MicrobatchFn, seq_length: int) -> StepMetrics:
    cfg = state.cfg
    for chunk in state.model:
        chunk.zero_grad_buffer()
    state.optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    iterators = _microbatch_iterators(state, make_microbatch)
    reports = forward_backward(
        forward_step_func=make_forward_step(cfg.diffusion.weighting, cfg.diffusion.confidence_beta),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=state.model,
        num_microbatches=num_microbatches(cfg),
        seq_length=seq_length,
        micro_batch_size=cfg.data.micro_batch_size * cfg.diffusion.rows_per_sample,  # p2p shapes under PP
        forward_only=False,
    )
    losses = step_losses(reports, cfg.diffusion.confidence_beta)
    skip = state.skips is not None and state.skips.should_skip(losses.loss, state.model)
    update_ok, grad_norm = False, float("nan")
    if not skip:
        with cpu_optimizer_scope():
            update_ok, grad_norm, _ = state.optimizer.step()
    if update_ok:  # megatron-LM: the LR schedule advances with applied updates only
        state.scheduler.step(increment=1)
    expert_load = state.balance.after_step(bool(update_ok)) if state.balance else None
    state.iteration += 1
    if state.skips is not None:
        state.skips.update(not update_ok, state.iteration)
    return StepMetrics(losses=losses, grad_norm=float("nan") if grad_norm is None else float(grad_norm),
                       update_ok=bool(update_ok), lr=state.optimizer.param_groups[0]["lr"],
                       tokens=global_token_stats(reports, _reports_contribute()), expert_load=expert_load,
                       skipped_steps=state.skips.total if state.skips else 0)


def run(state: TrainState, make_microbatch: MicrobatchFn, seq_length: int,
        log_fn: Callable[[str], None] = print,
        validate: Optional[Callable[[TrainState], Dict[str, float]]] = None) -> TrainState:
    """Train to ``schedule.train_iters``; ``validate`` (``training/validation.Validation``) runs
    every ``eval.interval`` iterations and its ``valid/*`` metrics join that step's record."""
    cfg = state.cfg
    stop = install_stop_handlers()  # the CLI installed them before set-up; a no-op then
    if stop.any_rank():  # raised during set-up: nothing trained, nothing to save
        reset_stop_flag()
        raise StoppedBeforeTraining(f"stop signal received during set-up, before iteration {state.iteration + 1}: "
                                    f"exiting without training or saving; run again to continue")
    logger = MetricsLogger(run_dir_of(cfg.logging.run_dir, cfg.checkpoint.save) if is_rank0() else None,
                           cfg.model, cfg.data.seq_length, cfg.data.block_size, cfg.data.global_batch_size,
                           cfg.parallel.world_size or 1, cfg.schedule.train_iters, state.iteration)
    while state.iteration < cfg.schedule.train_iters:
        start = time.perf_counter()
        metrics = train_step(state, make_microbatch, seq_length)
        record = logger.record(state.iteration, metrics.as_record(), time.perf_counter() - start)
        evaluated = validate is not None and cfg.eval.interval and state.iteration % cfg.eval.interval == 0
        if evaluated:
            record.update(validate(state))
        if is_rank0() and (evaluated or state.iteration % cfg.logging.log_interval == 0):
            logger.write(record)
            log_fn(logger.console_line(record))
            if evaluated:
                log_fn(validation_line(state.iteration, record))
        samples.write_samples(state, log_fn)  # every eval.sample_interval steps, rank 0 (training/samples.py)
        interval = cfg.checkpoint.save_interval
        due = cfg.checkpoint.save and interval and state.iteration % interval == 0
        exit_now = cfg.schedule.exit_interval and state.iteration % cfg.schedule.exit_interval == 0
        if stop.any_rank() or exit_now:
            reset_stop_flag()
            if cfg.checkpoint.save:
                path = save(state)
                if is_rank0():
                    reason = "exit interval reached" if exit_now else "signal received"
                    log_fn(f"{reason}: saved {path}, exiting")
            logger.close()
            return state
        if due:
            save(state)
    if cfg.checkpoint.save:
        path = checkpoint.latest_iteration_dir(cfg.checkpoint.save) or ""
        if not path.endswith(checkpoint.iteration_dir_name(state.iteration)):
            path = save(state)
        if is_rank0():
            log_fn(f"final checkpoint: {path}")
    logger.close()
    return state
