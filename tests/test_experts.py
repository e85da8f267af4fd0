"""Grouped-GEMM experts (model/experts.py) equal megatron-core's SequentialMLP: outputs, every
gradient, checkpoint keys; single process and EP2 on two gloo ranks."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from megatron_uni.model import experts
from megatron_uni.model.experts import grouped_linear

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "model", "tiny.yaml")
BACKENDS = ["loop", "grouped_mm"]  # torch._grouped_mm runs on CPU too (slowly): both paths are tested here


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_linear_equals_per_expert_linear(monkeypatch, backend):
    monkeypatch.setattr(experts, "GEMM_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    sizes = [5, 0, 11, 1]  # an expert without tokens still gets a (zero) weight gradient
    x = torch.randn(sum(sizes), 8, generator=gen, requires_grad=True)
    weights = [torch.randn(12, 8, generator=gen, requires_grad=True) for _ in sizes]
    offsets = torch.cumsum(torch.tensor(sizes), 0).to(torch.int32)
    grad_out = torch.randn(sum(sizes), 12, generator=gen)

    got = grouped_linear(x, offsets, weights)
    got_grads = torch.autograd.grad(got, [x, *weights], grad_out)
    want = torch.cat([F.linear(part, w) for part, w in zip(x.split(sizes), weights)])
    want_grads = torch.autograd.grad(want, [x, *weights], grad_out)

    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)
    assert torch.count_nonzero(got_grads[2]) == 0 and torch.count_nonzero(got_grads[1]) > 0


def _tiny_config(impl: str):
    from megatron_uni.config import load_config

    return load_config(TINY, [f"model.expert_impl={impl}"]).model


def _batch(seed=0, b=2, s=24, vocab=1280):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=gen)
    positions = torch.arange(s)[None].expand(b, s)
    block = torch.arange(s) // 8
    masked_out = ~(block[None, :] <= block[:, None])[None, None].expand(b, 1, s, s)
    return ids, positions, masked_out


def _loss_and_grads(model, seed=0):
    model.zero_grad(set_to_none=True)
    ids, positions, mask = _batch(seed)
    loss = model(ids, positions, mask, labels=ids).float().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _sequential_and_grouped():
    from megatron_uni.model.builder import build_model

    sequential = build_model(_tiny_config("sequential"))
    grouped = build_model(_tiny_config("grouped"))
    grouped.load_state_dict(sequential.state_dict())  # same keys, or this raises
    return sequential, grouped


def _compare(sequential, grouped, seeds=(0, 1)) -> dict:
    """Max abs difference of loss and of every gradient; also which names each model had."""
    worst = {"loss": 0.0, "grad": 0.0, "grads": 0, "missing": []}
    for seed in seeds:
        loss_s, grads_s = _loss_and_grads(sequential, seed)
        loss_g, grads_g = _loss_and_grads(grouped, seed)
        worst["loss"] = max(worst["loss"], (loss_s - loss_g).abs().item())
        worst["missing"] += sorted(set(grads_s) ^ set(grads_g))
        for name in grads_s.keys() & grads_g.keys():
            worst["grad"] = max(worst["grad"], (grads_s[name] - grads_g[name]).abs().max().item())
        worst["grads"] = len(grads_s)
    return worst


@pytest.fixture(scope="module")
def single_process():
    from megatron_uni.platform.distributed import init_single_process

    init_single_process()


def test_spec_selects_grouped_experts(single_process):
    sequential, grouped = _sequential_and_grouped()
    kinds = {type(m).__name__ for m in grouped.modules()}
    assert "GroupedExperts" in kinds and "GroupedExperts" not in {type(m).__name__ for m in sequential.modules()}
    assert list(sequential.state_dict()) == list(grouped.state_dict())
    assert list(sequential.sharded_state_dict()) == list(grouped.sharded_state_dict())


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_loss_and_every_gradient_equal(single_process, monkeypatch, backend):
    monkeypatch.setattr(experts, "GEMM_BACKEND", backend)
    sequential, grouped = _sequential_and_grouped()
    worst = _compare(sequential, grouped)
    expert_grads = [n for n, p in grouped.named_parameters() if "local_experts" in n]
    assert expert_grads and worst["grads"] == len(list(grouped.parameters()))
    assert worst["missing"] == []
    assert worst["loss"] <= 1e-6 and worst["grad"] <= 1e-6, worst


def test_checkpoint_saved_by_one_loads_into_the_other(single_process, tmp_path):
    from megatron_uni.checkpoint import load_checkpoint, save_checkpoint
    from megatron_uni.config import ParallelConfig

    sequential, grouped = _sequential_and_grouped()
    torch.nn.init.normal_(grouped.decoder.layers[1].mlp.experts.local_experts[3].linear_fc2.weight)
    save_checkpoint(str(tmp_path / "g"), 1, [grouped], _tiny_config("grouped"), None, ParallelConfig())
    load_checkpoint(str(tmp_path / "g"), [sequential])
    for (name, a), b in zip(grouped.state_dict().items(), sequential.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    with torch.no_grad():
        ids, positions, mask = _batch(3)
        torch.testing.assert_close(grouped(ids, positions, mask), sequential(ids, positions, mask))


def test_config_rejects_unknown_impl_and_double_choice():
    from megatron_uni.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.expert_impl"):
        load_config(TINY, ["model.expert_impl=fast"])
    with pytest.raises(ConfigError, match="moe_grouped_gemm"):
        load_config(TINY, ["model.expert_impl=grouped", "model.moe_grouped_gemm=true"])


def test_16b_recipe_picks_grouped_experts():
    from megatron_uni.config import load_config

    recipe = os.path.join(os.path.dirname(TINY), "llada2_uni_16b.yaml")
    assert load_config(recipe).model.expert_impl == "grouped"


# ----------------------------------------------------------------------------------------------
# EP2: two gloo ranks, alltoall dispatcher; every local gradient compared on each rank
# ----------------------------------------------------------------------------------------------
def _ep2_rank(rank, world, init_method, out_dir):
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch.set_num_threads(1)
    from megatron_uni.config import ParallelConfig
    from megatron_uni.platform.distributed import destroy, init_distributed
    from megatron_uni.platform.launch import LaunchInfo

    launch = LaunchInfo(rank=rank, world_size=world, local_rank=rank, launcher="single")
    init_distributed(ParallelConfig(expert=2), launch=launch, init_method=init_method)
    try:
        from megatron.core import parallel_state as ps

        sequential, grouped = _sequential_and_grouped()
        worst = _compare(sequential, grouped, seeds=(rank, rank + 10))
        worst["ep"] = ps.get_expert_model_parallel_world_size()
        worst["local_experts"] = len(grouped.decoder.layers[1].mlp.experts.local_experts)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(worst, f)
    finally:
        destroy()


def test_ep2_loss_and_every_gradient_equal(tmp_path):
    from megatron_uni.platform.distributed import file_rendezvous

    mp.start_processes(_ep2_rank, args=(2, file_rendezvous(str(tmp_path)), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        with open(tmp_path / f"rank{rank}.json") as f:
            worst = json.load(f)
        assert (worst["ep"], worst["local_experts"]) == (2, 4), worst
        assert worst["missing"] == [] and worst["grads"] > 0, worst
        assert worst["loss"] <= 1e-6 and worst["grad"] <= 1e-6, worst
