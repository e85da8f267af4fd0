"""Make megatron-core 0.16.1 run on CPU / gloo.

megatron-core assumes CUDA in about a dozen places. Every workaround lives in this module, is
applied only when CUDA is absent, and names the upstream line it works around (paths relative to
the ``megatron/core`` package of megatron-core 0.16.1). Each patch is a named function in
``PATCHES`` so a test can leave exactly one out and watch the scenario that needs it fail
(``tests/test_platform_cpu.py``).

The optimizer needs CUDA-typed tensors in a few asserts; rather than patching torch globally (it
doubles per-op overhead) :func:`cpu_optimizer_scope` maps them only around optimizer calls.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from typing import Callable, Dict, Iterable

import torch

SKIP_ENV = "MEGATRON_UNI_SKIP_CPU_PATCHES"  # comma-separated patch names to leave out (tests only)

_applied: Dict[str, bool] = {}


class _FakeStream:
    """Stands in for ``torch.cuda.Stream``/events: every wait or sync is a no-op on CPU."""

    def wait_stream(self, *args, **kwargs):
        return None

    def wait_event(self, *args, **kwargs):
        return None

    def synchronize(self, *args, **kwargs):
        return None

    def record_event(self, *args, **kwargs):
        # token_dispatcher.py:899 calls ``.synchronize()`` on the returned event.
        return self

    def query(self):
        return True


_FAKE_STREAM = _FakeStream()


def _patch_current_device() -> None:
    # utils.py:631 GlobalMemoryBuffer.get_tensor(device=torch.cuda.current_device()) and ~60 other
    # allocations ask CUDA for the current device; on CPU the answer is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")


def _patch_rng_tracker() -> None:
    # tensor_parallel/random.py:235 CudaRNGStatesTracker.add calls torch.cuda.get_rng_state(), and
    # random.py:41/72 _get/_set_cuda_rng_state drive recompute. Keep per-TP-rank CPU generator
    # states instead so dropout differs per TP rank and activation recompute replays it exactly.
    import megatron.core.tensor_parallel.random as mpu_random

    mpu_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mpu_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = torch.manual_seed


def _patch_streams() -> None:
    # transformer/moe/token_dispatcher.py:445 MoEAlltoAllTokenDispatcher creates torch.cuda.Stream()
    # for device-to-host copies of the split sizes; on CPU there is nothing to overlap.
    torch.cuda.Stream = lambda *args, **kwargs: _FAKE_STREAM
    torch.cuda.current_stream = lambda *args, **kwargs: _FAKE_STREAM
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()


def _patch_synchronize() -> None:
    # pipeline_parallel/p2p_communication.py:398 (batch_p2p_comm and batch_p2p_sync) and :242
    # (variable_seq_lengths) call torch.cuda.synchronize(); gloo ops are synchronous already.
    torch.cuda.synchronize = lambda *args, **kwargs: None


def _patch_te_general_gemm() -> None:
    # transformer/moe/moe_utils.py:1192 RouterGatingLinearFunction reads te_general_gemm, which is
    # only bound when TransformerEngine imports: NameError for every MoE model without TE.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _patch_alltoall_split_sizes() -> None:
    # transformer/moe/moe_utils.py:1093 maybe_move_tensor_to_cpu turns only CUDA tensors into numpy;
    # on CPU the split sizes stay tensors and mappings.py:444 all_to_all_single() rejects them.
    import megatron.core.transformer.moe.token_dispatcher as dispatcher

    upstream = dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _patch_sequence_parallel_norm() -> None:
    # transformer/torch_norm.py:32 WrappedTorchNorm asserts "sequence parallel not supported by torch
    # LayerNorm". A torch norm is fine under SP as long as its grads are all-reduced over TP, which
    # finalize_model_grads does for params tagged ``sequence_parallel``.
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def __new__(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                zero_centered_gamma=False, normalization="LayerNorm"):
        norms = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norms:
            raise ValueError(f"CPU norm supports {sorted(norms)}, not {config.normalization!r}")
        norm = norms[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm

    WrappedTorchNorm.__new__ = __new__


class _CudaDeviceProxy:
    """A stand-in for the ``torch`` module that creates tensors on the CPU when asked for cuda."""

    _factories = {"zeros", "ones", "empty", "tensor", "full", "arange"}

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name not in self._factories:
            return attr

        def factory(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return attr(*args, **kwargs)

        return factory


def _patch_schedules_device() -> None:
    # pipeline_parallel/schedules.py:596, :983 and :2138 allocate
    # torch.zeros([], dtype=torch.int, device="cuda") for the token count of every schedule.
    import megatron.core.pipeline_parallel.schedules as schedules

    schedules.torch = _CudaDeviceProxy()


def _die_with_parent() -> None:
    """Manager initializer: SIGKILL this process when the rank that forked it dies. A forked
    Manager inherits the rank's stdout and its gloo sockets; after a ``kill -9`` of the rank it kept
    both open, so the other ranks and srun saw the rank alive for another ~60 s (measured)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def _patch_checkpoint_writer_manager() -> None:
    # dist_checkpointing/strategies/filesystem_async.py:54 starts a *spawn* multiprocessing Manager for
    # the write-results queue: 5-6 s per process, and it re-imports ``__main__``, so any script
    # without a main guard runs itself again and prints a stray traceback. A fork Manager does not.
    import megatron.core.dist_checkpointing.strategies.filesystem_async as fs_async

    def _get_write_results_queue():
        if fs_async._results_queue is None:
            from multiprocessing.managers import SyncManager

            manager = SyncManager(ctx=multiprocessing.get_context("fork"))
            manager.start(_die_with_parent)
            fs_async._results_queue = manager.Queue()
        return fs_async._results_queue

    fs_async._get_write_results_queue = _get_write_results_queue


def _patch_checkpoint_without_output_fp8() -> None:
    # tensor_parallel/random.py:636 CheckpointWithoutOutput sets ``self.fp8 = fp8 is not None``,
    # True for fp8=False, then random.py:589 calls FP8GlobalStateManager (a NameError without TE)
    # whenever recompute_modules holds "layernorm" or "moe_act".
    from megatron.core.tensor_parallel.random import CheckpointWithoutOutput

    upstream_init = CheckpointWithoutOutput.__init__

    def __init__(self, fp8=False):
        upstream_init(self, fp8)
        self.fp8 = bool(fp8)

    CheckpointWithoutOutput.__init__ = __init__


def _enable_optimizer_scope() -> None:
    # Nothing global: enables the scoped mode of :func:`cpu_optimizer_scope` (see _CudaToCpuMode).
    return None


PATCHES: Dict[str, Callable[[], None]] = {
    "current_device": _patch_current_device,
    "rng_tracker": _patch_rng_tracker,
    "streams": _patch_streams,
    "synchronize": _patch_synchronize,
    "te_general_gemm": _patch_te_general_gemm,
    "alltoall_split_sizes": _patch_alltoall_split_sizes,
    "sequence_parallel_norm": _patch_sequence_parallel_norm,
    "schedules_device": _patch_schedules_device,
    "checkpoint_writer_manager": _patch_checkpoint_writer_manager,
    "checkpoint_without_output_fp8": _patch_checkpoint_without_output_fp8,
    "optimizer_scope": _enable_optimizer_scope,
}


def cuda_available() -> bool:
    return torch.cuda.is_available()


def apply_cpu_patches(skip: Iterable[str] = ()) -> Dict[str, bool]:
    """Apply every CPU patch (idempotent). A no-op when CUDA is available.

    ``skip`` (plus the names in ``$MEGATRON_UNI_SKIP_CPU_PATCHES``) leaves patches out; tests use
    it to prove each one is needed. Returns ``{name: applied}``.
    """
    if cuda_available():
        return {}
    skipped = set(skip) | {s for s in os.environ.get(SKIP_ENV, "").split(",") if s}
    unknown = skipped - set(PATCHES)
    if unknown:
        raise ValueError(f"unknown CPU patch(es) {sorted(unknown)}; known: {sorted(PATCHES)}")
    for name, patch in PATCHES.items():
        if name in skipped or _applied.get(name):
            continue
        patch()
        _applied[name] = True
    return {name: bool(_applied.get(name)) for name in PATCHES}


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """Maps ``device='cuda'``, ``.cuda()`` and ``.to('cuda')`` to the CPU and reports CPU tensors'
    ``.type()`` as their CUDA twin, for the optimizer's CUDA-only checks:

    - optimizer/optimizer.py:907 (and :473-485) ``torch.tensor([1.0], device='cuda')``
    - optimizer/clip_grads.py:167 ``assert param.grad.type() == 'torch.cuda.FloatTensor'``
    - optimizer/distrib_optimizer.py:431 and Float16OptimizerWithFloat16Params: wrapped params
      must be ``torch.cuda.*Tensor``
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if (isinstance(a, (str, torch.device)) and str(a).startswith("cuda")) else a
                         for a in args)
        return func(*args, **kwargs)


def cpu_optimizer_scope():
    """Context for megatron optimizer calls (build, step, state dicts). Null when CUDA exists."""
    if cuda_available() or not _applied.get("optimizer_scope"):
        return contextlib.nullcontext()
    return _CudaToCpuMode()
