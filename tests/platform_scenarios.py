"""One real megatron-core scenario per CPU platform patch (``megatron_uni.platform.cpu.PATCHES``).

``python tests/platform_scenarios.py --json OUT`` imports megatron-core once, then forks:

- one child per patch that runs that patch's scenario with only that patch left out (through
  ``$MEGATRON_UNI_SKIP_CPU_PATCHES``, which subprocesses inherit too);
- one child with every patch that runs all the scenarios in turn.

Each outcome records whether the scenario passed, and if not the exception type, its message and
the innermost megatron-core frame (the upstream line the patch works around). Multi-rank
scenarios fork their ranks (gloo, meeting through a FileStore); fork is safe because CUDA is absent and torch
runs on one thread. ``tests/test_platform_cpu.py`` reads the JSON and asserts on it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import runpy
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from megatron_uni.config import ModelConfig, ParallelConfig, load_config
from megatron_uni.platform import cpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK_TIMEOUT_S = 60
MCORE_MARK = os.sep + os.path.join("megatron", "core") + os.sep


# ----------------------------------------------------------------------------------------------
# outcomes
# ----------------------------------------------------------------------------------------------
def _upstream_frame(tb) -> Optional[str]:
    """``path:line func`` of the innermost megatron-core frame (path relative to megatron/core)."""
    frames = [f for f in traceback.extract_tb(tb) if MCORE_MARK in f.filename]
    if not frames:
        return None
    last = frames[-1]
    return f"{last.filename.split(MCORE_MARK, 1)[1]}:{last.lineno} {last.name}"


def _outcome(fn: Callable[[], None]) -> Dict:
    start = time.time()
    try:
        fn()
    except RankFailure as failure:  # a rank's own outcome, with its upstream frame
        return {**failure.outcome, "seconds": round(time.time() - start, 2)}
    except BaseException as err:  # report everything, including assertion errors from megatron
        lines = str(err).strip().splitlines()
        return {"ok": False, "error": type(err).__name__, "message": lines[0] if lines else "",
                "where": _upstream_frame(err.__traceback__), "seconds": round(time.time() - start, 2)}
    return {"ok": True, "seconds": round(time.time() - start, 2)}


def _fork(fn: Callable[[], Dict], result_path: str) -> int:
    """Fork a child in its own process group that writes ``fn()``'s JSON result to ``result_path``."""
    pid = os.fork()
    if pid:
        return pid
    os.setpgid(0, 0)  # so the parent can end it with whatever it started (ranks, writer managers)
    try:
        payload = fn()
    except BaseException as err:
        payload = {"ok": False, "error": type(err).__name__, "message": str(err), "where": None}
    with open(result_path, "w") as out:
        json.dump(payload, out)
    os._exit(0)


def _in_children(fns: List[Callable[[], Dict]], timeout: float) -> List[Dict]:
    """Run each of ``fns`` in a forked child at once; after the first failure or the deadline, end
    the others. Waits on the processes, not on pipes a grandchild could keep open."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, f"{i}.json") for i in range(len(fns))]
        pids = [_fork(fn, path) for fn, path in zip(fns, paths)]
        results: Dict[int, Dict] = {}
        deadline = time.time() + timeout
        while len(results) < len(pids) and time.time() < deadline:
            if any(not r.get("ok", True) for r in results.values()):
                break
            for i, pid in enumerate(pids):
                done, status = os.waitpid(pid, os.WNOHANG) if i not in results else (0, 0)
                if done:
                    results[i] = _read_result(paths[i], status)
            time.sleep(0.02)
        for i, pid in enumerate(pids):
            _end_group(pid)
            if i not in results:  # still running: a peer failed first, or the deadline passed
                os.waitpid(pid, 0)
                results[i] = {"ok": False, "error": "Timeout" if time.time() >= deadline else "Aborted",
                              "message": f"no result within {timeout:.0f} s", "where": None}
        return [results[i] for i in range(len(pids))]


def _read_result(path: str, status: int) -> Dict:
    if not os.path.isfile(path):
        return {"ok": False, "error": "ChildDied", "where": None,
                "message": f"child exited without a result ({_describe_status(status)})"}
    with open(path) as f:
        return json.load(f)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def _end_group(pid: int) -> None:
    """Kill what is left of the process group of our child ``pid`` (it may have exited already)."""
    try:
        os.killpg(pid, 9)
    except (ProcessLookupError, PermissionError):
        pass


def _in_child(fn: Callable[[], Dict], timeout: float) -> Dict:
    return _in_children([fn], timeout)[0]


# ----------------------------------------------------------------------------------------------
# distributed set-up inside a scenario
# ----------------------------------------------------------------------------------------------
def _tiny(**overrides) -> ModelConfig:
    model = load_config(os.path.join(REPO, "recipes", "model", "tiny.yaml")).model
    return dataclasses.replace(model, **overrides)


def _dense(**overrides) -> ModelConfig:
    return _tiny(first_k_dense=4, **overrides)


def _single(fn: Callable[[], None], parallel: Optional[ParallelConfig] = None) -> None:
    """World size 1: process group, megatron's parallel groups and RNG tracker, then ``fn``."""
    from megatron_uni.platform.distributed import destroy, init_single_process

    init_single_process(parallel)
    try:
        fn()
    finally:
        destroy()


def _ranks(world: int, parallel: ParallelConfig, fn: Callable[[int], None]) -> None:
    """Run ``fn(rank)`` on ``world`` forked gloo ranks; raise the first rank's failure."""
    from megatron_uni.platform.distributed import destroy, file_rendezvous, init_distributed
    from megatron_uni.platform.launch import LaunchInfo

    def rank_main(rank: int, init_method: str) -> Callable[[], Dict]:
        def run() -> Dict:
            launch = LaunchInfo(rank=rank, world_size=world, local_rank=rank, launcher="single")

            def body():
                init_distributed(parallel, launch=launch, init_method=init_method)
                fn(rank)
                destroy()
            return _outcome(body)
        return run

    with tempfile.TemporaryDirectory() as rendezvous_dir:
        init_method = file_rendezvous(rendezvous_dir)
        results = _in_children([rank_main(rank, init_method) for rank in range(world)], RANK_TIMEOUT_S)
    failures = sorted((r for r in results if not r["ok"]), key=lambda r: r["error"] == "Aborted")
    if failures:  # the rank that failed first, not a peer ended because of it
        raise RankFailure(failures[0])


class RankFailure(Exception):
    """A rank's failure, carried to the scenario's outcome unchanged."""

    def __init__(self, outcome: Dict) -> None:
        super().__init__(outcome["message"])
        self.outcome = outcome


def _inputs(vocab: int, batch: int = 2, seq: int = 16):
    """Token ids, positions, an all-visible bidirectional mask (True = masked) and labels."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=generator)
    positions = torch.arange(seq).expand(batch, seq)
    mask = torch.zeros(batch, 1, seq, seq, dtype=torch.bool)
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    return tokens, positions, mask, labels


def _forward_backward(model, model_cfg: ModelConfig) -> torch.Tensor:
    tokens, positions, mask, labels = _inputs(model_cfg.vocab)
    per_token = model(tokens, positions, mask, labels=labels)
    per_token.float().mean().backward()
    return per_token


def _schedule_step(model_cfg: ModelConfig, parallel: ParallelConfig, num_microbatches: int) -> List[Dict]:
    """One forward+backward through megatron's schedule for this layout (PP or not)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_uni.model.builder import build_model

    model = build_model(model_cfg, parallel)
    tokens, positions, mask, labels = _inputs(model_cfg.vocab)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        output = chunk(tokens, positions, mask, labels=labels if chunk.post_process else None)

        def loss_func(per_token):
            loss = per_token.float().mean()
            return loss, {"loss": loss.detach()}
        return output, loss_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(range(num_microbatches)), model=[model],
        num_microbatches=num_microbatches, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
        forward_only=False)


# ----------------------------------------------------------------------------------------------
# scenarios, one per patch
# ----------------------------------------------------------------------------------------------
def scenario_current_device() -> None:
    """Dense forward: attention asks GlobalMemoryBuffer for ``torch.cuda.current_device()``."""
    from megatron_uni.model.builder import build_model

    def run():
        model_cfg = _dense()
        tokens, positions, mask, _ = _inputs(model_cfg.vocab)
        logits = build_model(model_cfg)(tokens, positions, mask)
        assert logits.shape == (2, 16, model_cfg.vocab) and torch.isfinite(logits).all()
    _single(run)


def scenario_rng_tracker() -> None:
    """``model_parallel_cuda_manual_seed`` and the tracker's fork replaying the same stream."""
    from megatron.core import tensor_parallel

    def run():
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        tracker = tensor_parallel.get_cuda_rng_tracker()
        with tracker.fork():
            first = torch.rand(4)
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        with tracker.fork():
            again = torch.rand(4)
        assert torch.equal(first, again), "the RNG tracker did not replay its stream"
    # init_single_process seeds through model_parallel_cuda_manual_seed already; do it again here
    _single(run)


def scenario_streams() -> None:
    """Build and forward an MoE model with the alltoall token dispatcher (device-to-host stream)."""
    from megatron_uni.model.builder import build_model

    def run():
        model_cfg = _tiny(moe_token_dispatcher_type="alltoall")
        per_token = _forward_backward(build_model(model_cfg), model_cfg)
        assert torch.isfinite(per_token).all()
    _single(run)


def scenario_synchronize() -> None:
    """PP2 1F1B over two gloo ranks: batched p2p then ``torch.cuda.synchronize()``."""
    parallel = ParallelConfig(pipeline=2)
    model_cfg = _dense()

    def run(rank: int):
        losses = _schedule_step(model_cfg, parallel, num_microbatches=2)
        if rank == 1:  # the last stage holds the losses
            assert len(losses) == 2 and all(torch.isfinite(r["loss"]) for r in losses)
    _ranks(2, parallel, run)


def scenario_te_general_gemm() -> None:
    """MoE router forward without TransformerEngine (``RouterGatingLinearFunction``)."""
    from megatron_uni.model.builder import build_model

    def run():
        model_cfg = _tiny(moe_token_dispatcher_type="allgather")
        model = build_model(model_cfg)
        router = model.decoder.layers[1].mlp.router
        probs, routing_map = router(torch.randn(16, 2, model_cfg.hidden_size))
        assert routing_map.sum(dim=-1).eq(model_cfg.moe_router_topk).all()
    _single(run)


def scenario_alltoall_split_sizes() -> None:
    """EP2 alltoall dispatch over two gloo ranks: split sizes must reach all_to_all as lists."""
    parallel = ParallelConfig(expert=2)
    from megatron_uni.model.builder import build_model

    def run(rank: int):
        model_cfg = _tiny(moe_token_dispatcher_type="alltoall")
        per_token = _forward_backward(build_model(model_cfg, parallel), model_cfg)
        assert torch.isfinite(per_token).all()
    _ranks(2, parallel, run)


def scenario_sequence_parallel_norm() -> None:
    """Build the local spec's norm under TP2 + sequence parallelism (no Apex: WrappedTorchNorm)."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_uni.model.spec import decoder_block_spec
    from megatron_uni.model.transformer_config import build_transformer_config

    def run():
        model_cfg = _tiny()
        config = build_transformer_config(model_cfg, ParallelConfig(tensor=2, sequence_parallel=True))
        block = decoder_block_spec(config, use_te=False)
        norm = build_module(block.layer_norm, config=config, hidden_size=model_cfg.hidden_size,
                            eps=model_cfg.norm_epsilon)
        assert isinstance(norm, torch.nn.RMSNorm), type(norm)
        assert all(getattr(p, "sequence_parallel", False) for p in norm.parameters()), \
            "SP norm params are not tagged for the TP all-reduce of their grads"
    _single(run)


def scenario_schedules_device() -> None:
    """``forward_backward_no_pipelining`` counts tokens in a tensor made on ``device="cuda"``."""
    def run():
        losses = _schedule_step(_dense(), ParallelConfig(), num_microbatches=1)
        assert len(losses) == 1 and torch.isfinite(losses[0]["loss"])
    _single(run)


UNGUARDED_SAVE_SCRIPT = '''\
# A training script without an ``if __name__ == "__main__":`` guard, saving a dist checkpoint.
import sys
import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_uni.platform.distributed import destroy, init_single_process

print("SCRIPT-RUN", flush=True)
init_single_process()
weight = torch.arange(8, dtype=torch.float32)
dist_checkpointing.save({"weight": ShardedTensor.from_rank_offsets("weight", weight, replica_id=0)}, sys.argv[1])
print("SCRIPT-SAVED", flush=True)
destroy()
'''


@contextlib.contextmanager
def _output_to(path: str):
    """Send fds 1 and 2 (ours and any child process's) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def scenario_checkpoint_writer_manager() -> None:
    """An unguarded ``__main__`` script that saves a checkpoint must run once, with no traceback.

    The script runs as ``__main__`` through ``runpy.run_path`` (what ``python script.py`` does) in
    this already-warm process; a spawned child re-executes it from its path, as it would.
    """
    with tempfile.TemporaryDirectory() as tmp:
        script, log, ckpt = (os.path.join(tmp, n) for n in ("unguarded_save.py", "output.log", "ckpt"))
        with open(script, "w") as f:
            f.write(UNGUARDED_SAVE_SCRIPT)
        os.makedirs(ckpt)
        argv, sys.argv = sys.argv, [script, ckpt]
        error = None
        try:
            with _output_to(log):
                runpy.run_path(script, run_name="__main__")
        except Exception as err:  # the parent's own failure; the child's traceback is in the log
            error = err
        finally:
            sys.argv = argv
        with open(log) as f:
            out = f.read()
        runs = out.count("SCRIPT-RUN")
        if runs != 1 or "Traceback" in out or error is not None:
            raise RuntimeError(f"unguarded __main__ ran {runs} times ({type(error).__name__ if error else 'no error'} "
                               f"in the script); stray traceback: {_last_error(out)}")
        assert "SCRIPT-SAVED" in out and os.path.isfile(os.path.join(ckpt, "metadata.json")), out[-500:]


def _last_error(output: str) -> str:
    """The last ``SomeError: text`` of a traceback in ``output``, joined with its next lines."""
    lines = [line.replace("[rank0]: ", "").strip() for line in output.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.split(":")[0].endswith(("Error", "Exception"))]
    bootstrapping = [i for i in starts if "bootstrapping" in " ".join(lines[i:i + 4])]
    i = (bootstrapping or starts or [len(lines) - 1])[0]
    return " ".join(line for line in lines[i:i + 4] if line)


def scenario_checkpoint_without_output_fp8() -> None:
    """Selective recompute of the layernorms (``CheckpointWithoutOutput``) forward + backward."""
    from megatron_uni.model.builder import build_model

    def run():
        model_cfg = _tiny(recompute_granularity="selective", recompute_modules=["layernorm"])
        model = build_model(model_cfg)
        _forward_backward(model, model_cfg)
        grad = model.decoder.layers[0].self_attention.linear_qkv.weight.grad
        assert grad is not None and grad.abs().sum() > 0
    _single(run)


def scenario_optimizer_scope() -> None:
    """Build megatron's optimizer over a DDP-wrapped model and take one step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_uni.model.builder import build_model

    def run():
        model_cfg = _dense()
        module = build_model(model_cfg)
        model = DistributedDataParallel(config=module.config, ddp_config=DistributedDataParallelConfig(),
                                        module=module)
        with cpu.cpu_optimizer_scope():
            optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0), [model])
        before = module.output_layer.weight.detach().clone()
        _forward_backward(model, model_cfg)
        model.finish_grad_sync()
        with cpu.cpu_optimizer_scope():
            update_ok, grad_norm, _ = optimizer.step()
        assert update_ok and grad_norm > 0
        assert not torch.equal(before, module.output_layer.weight), "the step did not move the weights"
    _single(run)


SCENARIOS: Dict[str, Callable[[], None]] = {
    "current_device": scenario_current_device,
    "rng_tracker": scenario_rng_tracker,
    "streams": scenario_streams,
    "synchronize": scenario_synchronize,
    "te_general_gemm": scenario_te_general_gemm,
    "alltoall_split_sizes": scenario_alltoall_split_sizes,
    "sequence_parallel_norm": scenario_sequence_parallel_norm,
    "schedules_device": scenario_schedules_device,
    "checkpoint_writer_manager": scenario_checkpoint_writer_manager,
    "checkpoint_without_output_fp8": scenario_checkpoint_without_output_fp8,
    "optimizer_scope": scenario_optimizer_scope,
}

MULTI_RANK = {"synchronize", "alltoall_split_sizes"}  # scenarios that fork gloo ranks


# ----------------------------------------------------------------------------------------------
# runner
# ----------------------------------------------------------------------------------------------
def _with_patches(skip: List[str], names: List[str]) -> Callable[[], Dict]:
    """A child body: apply every patch but ``skip`` (via the env, so subprocesses skip it too)."""
    def body() -> Dict:
        os.environ[cpu.SKIP_ENV] = ",".join(skip)
        cpu.apply_cpu_patches()
        results = {}
        # Ranks forked from a process that has already run a gloo group segfault (signal 11) in
        # init: the multi-rank scenarios go first, while this process has not touched gloo.
        for name in sorted(names, key=lambda n: n not in MULTI_RANK):
            results[name] = _outcome(SCENARIOS[name])
        return results
    return body


def run_all(names: List[str], timeout: float) -> Dict:
    report: Dict = {"skipped_one": {}, "all_patches": {}}
    for name in names:
        start = time.time()
        result = _in_child(_with_patches([name], [name]), timeout)
        report["skipped_one"][name] = result.get(name, result)
        report["skipped_one"][name]["wall"] = round(time.time() - start, 2)
    start = time.time()
    result = _in_child(_with_patches([], names), timeout * len(names))
    report["all_patches"] = {n: result.get(n, result) for n in names}
    report["all_patches_wall"] = round(time.time() - start, 2)
    return report


def preload() -> None:
    """Import what the scenarios use once, in the parent, so forked children start warm."""
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.distributed  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
    import megatron.core.transformer.spec_utils  # noqa: F401

    import megatron_uni.model.builder  # noqa: F401
    import megatron_uni.platform.distributed  # noqa: F401


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the outcomes here (default: print them)")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per scenario child")
    args = parser.parse_args(argv)
    if cpu.cuda_available():
        parser.error("CUDA is available: the CPU patches are not applied there, nothing to check")
    torch.set_num_threads(1)  # fork-safe (no OpenMP pool) and fair to two ranks on two cores
    preload()
    report = run_all(args.only or list(SCENARIOS), args.timeout)
    text = json.dumps(report, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
