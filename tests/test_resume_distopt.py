"""The distributed optimizer resumes exactly (2 gloo ranks, tiny model, demo data, the real loop).

- DP2 -> DP2: a run stopped at step 2 and resumed ends with the same parameters, Adam moments
  and step counter, bit for bit, as an uninterrupted 4-step run;
- DP2 -> DP1: the DP2 checkpoint of step 2 loads on one rank with the same parameters, moments and
  step, bit for bit, and DP1 continuing it to step 4 ends where the uninterrupted DP2 run does, up
  to float summation order (rows and their noise do not depend on the DP layout);
- the resumed DP2 run builds its micro-batches in 2 worker processes (``data.num_workers=2``) and
  still matches bit for bit.
- every parameter has its own ``step`` tensor after a resume (megatron shares one, which torch
  Adam then increments once per parameter);
- a TP/PP/EP change refuses at load time with one line naming both layouts.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_uni.platform.distributed import file_rendezvous

pytestmark = pytest.mark.timeout(900)

RECIPE = "recipes/demo/tiny_cpu.yaml"
MOMENTS = ("param", "exp_avg", "exp_avg_sq")


def _overrides(demo, save, iters, *extra):
    return [f"data.path={demo.dataset}", f"data.tokenizer={demo.root / 'tokenizer'}", f"checkpoint.save={save}",
            f"schedule.train_iters={iters}", "schedule.warmup_iters=1", "checkpoint.save_interval=0",
            "data.seq_length=64", "parallel.distributed_optimizer=true", *extra]


def _optimizer_shards(state) -> dict:
    """This rank's slice of every parameter's main value and Adam state, keyed by parameter name."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    names = {p: n for chunk in state.model for n, p in chunk.module.named_parameters()}
    shards = {}
    for member in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        assert isinstance(member, DistributedOptimizer)
        for model_param in member.model_param_gbuf_map:
            span = member._get_model_param_range_map(model_param)["param"]
            tensors = member._get_main_param_and_optimizer_states(model_param)
            shards[names[model_param]] = {"start": span.start, "numel": model_param.numel(),
                                          **{k: tensors[k].detach().clone() for k in MOMENTS},
                                          "step": float(tensors["step"]), "step_id": id(tensors["step"])}
    return shards


def _worker(rank, world, init_method, out_dir, phases):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from megatron_uni.checkpoint import CheckpointError
    from megatron_uni.config import load_config
    from megatron_uni.platform.distributed import destroy, init_process_group
    from megatron_uni.platform.launch import detect_launch

    init_process_group(detect_launch(), init_method)  # the ranks meet through a file, not a port
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource

    try:
        for name, overrides in phases:
            cfg = load_config(RECIPE, overrides)
            source = MicrobatchSource(cfg)
            try:
                state = loop.setup(cfg, vocabulary=source.vocab.layout())
            except CheckpointError as err:
                torch.save(str(err), os.path.join(out_dir, f"{name}.rank{rank}.err"))
                continue
            loop.run(state, source, source.model_seq_length, log_fn=lambda line: None)
            torch.save(_optimizer_shards(state), os.path.join(out_dir, f"{name}.rank{rank}.pt"))
    finally:
        destroy()


def _spawn(out_dir, world, phases):
    mp.start_processes(_worker, args=(world, file_rendezvous(str(out_dir)), str(out_dir), phases), nprocs=world,
                       start_method="spawn")


def _full_state(out_dir, name, world) -> dict:
    """Every parameter's full flat main value / moments (ranks' slices put together) and steps."""
    full = {}
    for rank in range(world):
        for param, shard in torch.load(os.path.join(out_dir, f"{name}.rank{rank}.pt")).items():
            entry = full.setdefault(param, {**{k: torch.full((shard["numel"],), float("nan")) for k in MOMENTS},
                                            "steps": [], "step_ids": set()})
            for key in MOMENTS:
                entry[key][shard["start"]:shard["start"] + shard[key].numel()] = shard[key]
            entry["steps"].append(shard["step"])
            entry["step_ids"].add((rank, shard["step_id"]))
    return full


def test_distributed_optimizer_resumes_exactly(demo, tmp_path):
    straight, resumed, dp1 = (str(tmp_path / n) for n in ("straight", "resumed", "dp1"))
    _spawn(tmp_path, 2, [
        ("straight", _overrides(demo, straight, 4)),
        ("first", _overrides(demo, resumed, 4, "schedule.exit_interval=2")),
        ("second", _overrides(demo, resumed, 4, "data.num_workers=2")),
        # the same checkpoint under another expert-parallel layout: refused before anything loads
        ("ep2", _overrides(demo, str(tmp_path / "ep2"), 4, "parallel.expert=2",
                           f"checkpoint.load={resumed}/iter_0000002")),
    ])
    _spawn(tmp_path, 1, [
        ("dp1_loaded", _overrides(demo, dp1, 2, f"checkpoint.load={resumed}/iter_0000002")),  # load, save
        ("dp1", _overrides(demo, dp1, 4)),  # resumes from its own DP1 save of step 2
    ])

    want, first = _full_state(tmp_path, "straight", 2), _full_state(tmp_path, "first", 2)
    cases = (("second", _full_state(tmp_path, "second", 2), want, 4.0),
             ("dp1_loaded", _full_state(tmp_path, "dp1_loaded", 1), first, 2.0))
    for name, got, expected, step in cases:
        assert got.keys() == expected.keys()
        for param in expected:
            for key in MOMENTS:
                assert torch.equal(got[param][key], expected[param][key]), (name, param, key)
            assert got[param]["steps"] == [step] * len(got[param]["steps"]), (name, param, got[param]["steps"])
    # the resumed run continued from step 2's state, which differs from step 4's
    assert any(not torch.equal(first[p]["exp_avg"], want[p]["exp_avg"]) for p in want)
    # after two more steps on DP1 every parameter counts 4: one step tensor per parameter (megatron's
    # load shares one, which torch Adam would advance once per parameter)
    dp1_state = _full_state(tmp_path, "dp1", 1)
    assert all(entry["steps"] == [4.0] for entry in dp1_state.values())
    assert len({ids for entry in dp1_state.values() for ids in entry["step_ids"]}) == len(dp1_state)
    assert any(not torch.equal(dp1_state[p]["param"], first[p]["param"]) for p in first)
    # ... and they are the uninterrupted DP2 run's, up to the order of the gradient sums
    for param in want:
        torch.testing.assert_close(dp1_state[param]["param"], want[param]["param"], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, p=param: f"{p}: DP1 continuing DP2 diverged: {m}")

    errors = [torch.load(tmp_path / f"ep2.rank{r}.err") for r in range(2)]
    assert errors[0] == errors[1] and "\n" not in errors[0], errors
    assert "expert=1" in errors[0] and "expert=2" in errors[0] and "iter_0000002" in errors[0], errors[0]


def test_layout_rule_allows_data_parallel_changes_only():
    from megatron_uni.config import ParallelConfig
    from megatron_uni.training.optimizer_state import ResumeLayoutError, check_resume_layout

    saved = {"tensor": 1, "pipeline": 2, "virtual_pipeline": None, "context": 1, "expert": 1, "expert_tensor": 1,
             "distributed_optimizer": True, "world_size": 4}
    check_resume_layout(saved, ParallelConfig(pipeline=2, distributed_optimizer=True, world_size=8), "ckpt")
    # the plain optimizer's state is keyed like the model's: any layout
    check_resume_layout({**saved, "distributed_optimizer": False}, ParallelConfig(tensor=2), "ckpt")
    for changed in (ParallelConfig(tensor=2, pipeline=2, distributed_optimizer=True),
                    ParallelConfig(pipeline=1, distributed_optimizer=True),
                    ParallelConfig(pipeline=2, distributed_optimizer=False)):
        with pytest.raises(ResumeLayoutError, match=r"^ckpt: optimizer state saved under parallel layout \[tensor=1 "
                                                    r"pipeline=2 .*\] cannot be resumed under \["):
            check_resume_layout(saved, changed, "ckpt")
