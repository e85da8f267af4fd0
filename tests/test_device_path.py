"""The training step's device path, checked on CPU through exactly the code a GPU runs.

Every device our training code uses comes from ``megatron_uni.platform.device()``: the worker
replaces it with a recording wrapper and checks that each micro-batch reached the model through
``DiffusionInputs.to(<that device>, non_blocking=True)`` and that the collectives our code issues
(loss sums, token stats, non-finite flag, stop flag) allocate their tensors through it.
"""

import inspect
import os
import sys

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.timeout(600)

OUR_COLLECTIVES = {"reduce_sums", "global_token_stats", "grads_finite", "any_rank"}


def _worker(rank, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_expert_balance import _microbatches

    import megatron_uni.platform as platform
    from megatron_uni.config import load_config
    from megatron_uni.diffusion.inputs import DiffusionInputs
    from megatron_uni.platform.distributed import destroy
    from megatron_uni.training import loop
    from megatron_uni.training.stop import StopFlag

    handed_out, callers, moves, reduced = [], [], [], []
    real_device, real_to, real_all_reduce = platform.device, DiffusionInputs.to, torch.distributed.all_reduce

    def recording_device():
        handed_out.append(real_device())
        callers.append(sys._getframe(1).f_code.co_name)
        return handed_out[-1]

    def recording_to(self, device, non_blocking=False):
        moved = real_to(self, device, non_blocking=non_blocking)
        moves.append({"from_platform": any(device is d for d in handed_out), "non_blocking": non_blocking,
                      "caller": sys._getframe(1).f_code.co_name})
        return moved

    def recording_all_reduce(tensor, *args, **kwargs):
        reduced.append((sys._getframe(1).f_code.co_name, tensor.device.type))
        return real_all_reduce(tensor, *args, **kwargs)

    platform.device = recording_device
    DiffusionInputs.to = recording_to
    torch.distributed.all_reduce = recording_all_reduce
    overrides = ["data.seq_length=64", "data.block_size=8", "data.micro_batch_size=2", "data.global_batch_size=4",
                 "schedule.train_iters=2", "schedule.warmup_iters=0"]
    try:
        state = loop.setup(load_config("recipes/model/tiny.yaml", overrides))
        metrics = loop.train_step(state, _microbatches(nan_iterations=set()), 128)
        stopped = StopFlag().any_rank()
    finally:
        destroy()
    torch.save({"callers": callers, "moves": moves, "reduced": reduced, "update_ok": metrics.update_ok,
                "stopped": stopped}, out)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("device") / "results.pt")
    mp.start_processes(_worker, args=(out,), nprocs=1, start_method="spawn")
    return torch.load(out, weights_only=False)


def test_every_microbatch_is_moved_once_to_the_platform_device(recorded):
    assert recorded["update_ok"] and not recorded["stopped"]
    # global batch 4 / micro-batch 2 = 2 micro-batches, each moved once, in the forward step
    assert recorded["moves"] == [{"from_platform": True, "non_blocking": True, "caller": "forward_step"}] * 2


def test_our_collectives_allocate_on_the_platform_device(recorded):
    reducers = {name for name, _ in recorded["reduced"]}
    assert OUR_COLLECTIVES <= reducers, reducers
    assert OUR_COLLECTIVES | {"forward_step"} <= set(recorded["callers"]), set(recorded["callers"])


def test_no_device_literal_outside_the_platform_layer():
    from megatron_uni.diffusion import losses
    from megatron_uni.training import expert_balance, loop, metrics, nonfinite, step, stop

    for module in (loop, step, metrics, expert_balance, nonfinite, stop, losses):
        source = inspect.getsource(module)
        for literal in ('"cuda"', "'cuda'", "torch.cuda.current_device", 'device="cpu"'):
            assert literal not in source, f"{module.__name__} uses {literal}; ask megatron_uni.platform.device()"
