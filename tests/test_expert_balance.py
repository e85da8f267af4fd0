"""Balanced experts and skipped steps, through the real training step (tiny model, 1 gloo rank).

- the zero-mean bias update keeps every router's mean bias at 0 (the plain sign rule drifts);
- a step with a NaN loss is skipped: parameters, Adam state, expert bias and LR schedule stay as
  they were, the skip is counted, and the next step trains;
- ``optimizer.max_consecutive_skips`` NaN steps in a row abort with TrainingAborted;
- ``checkpoint.keep_last`` prunes old iterations but never the one ``latest`` names.
"""

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_uni.checkpoint import prune_iterations
from megatron_uni.training.expert_balance import expert_load, zero_mean_bias_update

pytestmark = pytest.mark.timeout(600)


def test_zero_mean_update_keeps_the_mean_bias_at_zero_and_the_plain_rule_drifts():
    gen = torch.Generator().manual_seed(0)
    zero_mean = plain = torch.zeros(3, 16)
    for _ in range(20):
        counts = torch.randint(0, 100, (3, 16), generator=gen).float()
        counts[:, :3] = 500  # a few overloaded experts: sign(mean - count) is mostly +1
        zero_mean = zero_mean_bias_update(counts, zero_mean, 1e-3)
        plain = zero_mean_bias_update(counts, plain, 1e-3, zero_mean=False)
    assert zero_mean.mean(-1).abs().max() < 1e-7
    assert plain.mean(-1).abs().min() > 1e-3
    # the relative order the update pushes is the same as the plain rule's
    assert torch.equal((zero_mean[:, :3] < zero_mean[:, 3:].min(-1, keepdim=True).values), torch.ones(3, 3).bool())


def test_expert_load_report():
    load = expert_load(torch.tensor([[10.0, 10.0, 10.0, 10.0], [40.0, 0.0, 0.0, 0.0]]))
    assert load["max_over_mean"] == pytest.approx([1.0, 4.0])
    assert load["starved_fraction"] == [0.0, 0.75]


def test_keep_last_prunes_old_iterations_but_never_latest(tmp_path):
    for it in (1, 2, 3, 5):
        (tmp_path / f"iter_{it:07d}").mkdir()
        (tmp_path / f"iter_{it:07d}" / "metadata.json").write_text("{}")
    (tmp_path / "latest").write_text("iter_0000002\n")  # e.g. a newer save crashed before publishing
    deleted = prune_iterations(str(tmp_path), keep_last=1)
    assert sorted(os.path.basename(p) for p in deleted) == ["iter_0000001", "iter_0000003"]
    assert sorted(os.listdir(tmp_path)) == ["iter_0000002", "iter_0000005", "latest"]


# ----------------------------------------------------------------------------------------------
# through the training step
# ----------------------------------------------------------------------------------------------
def _microbatches(nan_iterations):
    from diffusion_helpers import random_batch, tiny_vocab
    from megatron_uni.config import DiffusionConfig
    from megatron_uni.diffusion.inputs import build_inputs

    vocab = tiny_vocab()

    def make(iteration, index, dp_rank, dp_size):
        gen = torch.Generator().manual_seed(1000 * iteration + index)
        inputs = build_inputs(random_batch(gen, 2, 64, 8, vocab), vocab, DiffusionConfig(t_min=0.3, t_max=0.8), gen,
                              block_size=8)
        if iteration in nan_iterations:
            inputs = dataclasses.replace(inputs, loss_weights=inputs.loss_weights * float("nan"))
        return inputs

    return make


def _snapshot(state):
    routers = state.balance.routers
    params = [p.detach().clone() for chunk in state.model for p in chunk.parameters()]
    members = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    adam = [s["exp_avg"].clone() for member in members for s in member.optimizer.state.values()]
    return {"bias": torch.stack([r.expert_bias.clone() for r in routers]), "params": params, "adam": adam,
            "lr": state.optimizer.param_groups[0]["lr"]}


def _worker(rank, out):
    # one process: platform.distributed meets through an in-memory store, no port
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from megatron_uni.config import load_config
    from megatron_uni.platform.distributed import destroy
    from megatron_uni.training import loop
    from megatron_uni.training.nonfinite import TrainingAborted

    overrides = ["data.seq_length=64", "data.block_size=8", "data.micro_batch_size=2", "data.global_batch_size=2",
                 "schedule.train_iters=20", "schedule.warmup_iters=0", "schedule.decay_style=linear",
                 "model.moe_router_bias_update_rate=1.0e-2", "optimizer.max_consecutive_skips=3"]
    results = {}
    try:
        state = loop.setup(load_config("recipes/model/tiny.yaml", overrides))
        make = _microbatches(nan_iterations={2, 5, 6, 7})
        snapshots, reports = [_snapshot(state)], []
        for _ in range(5):  # iterations 0..4; iteration 2 has a NaN loss
            reports.append(loop.train_step(state, make, 128))
            snapshots.append(_snapshot(state))
        results["reports"] = [r.as_record() for r in reports]
        results["snapshots"] = snapshots
        try:
            for _ in range(3):  # iterations 5, 6, 7: NaN three times in a row
                loop.train_step(state, make, 128)
        except TrainingAborted as err:
            results["aborted"] = str(err)
    finally:
        destroy()
    torch.save(results, out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("balance") / "results.pt")
    mp.start_processes(_worker, args=(out,), nprocs=1, start_method="spawn")
    return torch.load(out, weights_only=False)


def test_bias_mean_stays_zero_while_the_bias_moves(trained):
    final = trained["snapshots"][-1]["bias"]
    assert final.abs().max() > 1e-3                     # the update ran (rate 1e-2, 4 applied steps)
    assert final.mean(-1).abs().max() < 1e-7            # ... and kept every layer's mean at 0
    load = trained["reports"][0]["expert_load"]
    assert len(load["layers"]) == 3 and all(r >= 1.0 for r in load["max_over_mean"])


def test_nan_step_is_skipped_and_counted(trained):
    reports, snaps = trained["reports"], trained["snapshots"]
    assert [r["update_ok"] for r in reports] == [True, True, False, True, True]
    assert [r["skipped_steps"] for r in reports] == [0, 0, 1, 1, 1]
    before, after = snaps[2], snaps[3]                  # around iteration 2 (the NaN one)
    assert torch.equal(before["bias"], after["bias"]) and before["lr"] == after["lr"]
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert before["adam"] and all(torch.equal(a, b) for a, b in zip(before["adam"], after["adam"]))
    assert not all(torch.equal(a, b) for a, b in zip(after["params"], snaps[4]["params"]))  # trains again
    assert not torch.equal(after["bias"], snaps[4]["bias"])


def test_consecutive_nan_steps_abort(trained):
    assert "3 consecutive steps with a non-finite loss" in trained["aborted"]
    assert "\n" not in trained["aborted"]


def test_cli_reports_an_abort_in_one_line_with_exit_code_3(monkeypatch, capsys):
    from megatron_uni import cli
    from megatron_uni.training.nonfinite import TrainingAborted

    def abort(args):
        raise TrainingAborted("iteration 7: 3 consecutive steps with a non-finite loss or gradient")

    monkeypatch.setattr(cli, "cmd_info", abort)
    assert cli.main(["info", "recipes/model/tiny.yaml"]) == 3
    err = capsys.readouterr().err
    assert err == "megatron-uni: training aborted: iteration 7: 3 consecutive steps with a non-finite loss or gradient\n"
