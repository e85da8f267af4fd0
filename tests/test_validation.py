"""Validation on held-out data (training/validation.py), on the demo dataset, 1 gloo rank.

- an evaluation gives finite per-modality masked-token CEs over a fixed set of masked tokens;
- two evaluations with the same weights give identical numbers (fixed noise);
- an evaluation leaves the weights, Adam state, expert bias, expert counts and RNG untouched: the
  next training step is bitwise the same as without it;
- ``loop.run`` logs the ``valid/*`` fields with the training metrics every ``eval.interval`` steps.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from megatron_uni.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(600)


def _snapshot(state):
    members = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    return {"params": [p.detach().clone() for chunk in state.model for p in chunk.parameters()],
            "adam": [s["exp_avg"].clone() for m in members for s in m.optimizer.state.values()],
            "bias": [r.expert_bias.clone() for r in state.balance.routers],
            "counts": [r.local_tokens_per_expert.clone() for r in state.balance.routers],
            "rng": torch.get_rng_state(), "training": [c.training for c in state.model]}


def _worker(rank, dataset, tokenizer, run_dir, out):
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from megatron_uni.platform.distributed import destroy
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource
    from megatron_uni.training.validation import Validation

    overrides = [f"data.path={dataset}", f"data.tokenizer={tokenizer}", f"eval.path={dataset}", "eval.interval=2",
                 "eval.iters=2", "data.seq_length=128", "schedule.train_iters=3", "schedule.warmup_iters=1",
                 "diffusion.weighting=elbo", "checkpoint.save=", f"logging.run_dir={run_dir}"]
    results = {}
    try:
        cfg = load_config("recipes/demo/tiny_cpu.yaml", overrides)
        source = MicrobatchSource(cfg)
        state = loop.setup(cfg, vocabulary=source.vocab.layout())
        validate = Validation(cfg, source.model_seq_length)
        loop.train_step(state, source, source.model_seq_length)  # Adam state exists from here
        before = _snapshot(state)
        results["first"], results["second"] = validate(state), validate(state)
        results["same_state"] = _same(before, _snapshot(state))
        with_eval = loop.train_step(state, source, source.model_seq_length).losses.loss
        results["next_loss"] = with_eval
        state.iteration = 0
        loop.run(state, source, source.model_seq_length, log_fn=lambda line: None, validate=validate)
    finally:
        destroy()
    torch.save(results, out)


def _same(a, b):
    return {key: (a[key] == b[key]) if key == "training" else
            (torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else
             len(a[key]) == len(b[key]) and all(torch.equal(x, y) for x, y in zip(a[key], b[key])))
            for key in a}


def _reference_worker(rank, dataset, tokenizer, out):
    """The same two training steps without any evaluation in between."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    from megatron_uni.platform.distributed import destroy
    from megatron_uni.training import loop
    from megatron_uni.training.batches import MicrobatchSource

    cfg = load_config("recipes/demo/tiny_cpu.yaml", [f"data.path={dataset}", f"data.tokenizer={tokenizer}",
                                                     "data.seq_length=128", "schedule.train_iters=3",
                                                     "schedule.warmup_iters=1", "diffusion.weighting=elbo",
                                                     "checkpoint.save="])
    try:
        source = MicrobatchSource(cfg)
        state = loop.setup(cfg, vocabulary=source.vocab.layout())
        loop.train_step(state, source, source.model_seq_length)
        torch.save({"next_loss": loop.train_step(state, source, source.model_seq_length).losses.loss}, out)
    finally:
        destroy()


@pytest.fixture(scope="module")
def evaluated(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    args = (str(demo.dataset), str(demo.root / "tokenizer"))
    mp.start_processes(_worker, args=(*args, str(root / "run"), str(root / "results.pt")), nprocs=1,
                       start_method="spawn")
    mp.start_processes(_reference_worker, args=(*args, str(root / "reference.pt")), nprocs=1, start_method="spawn")
    results = torch.load(root / "results.pt", weights_only=False)
    results["reference_loss"] = torch.load(root / "reference.pt", weights_only=False)["next_loss"]
    with open(root / "run" / "metrics.jsonl") as f:
        results["records"] = [json.loads(line) for line in f]
    return results


def test_evaluation_gives_per_modality_masked_ce(evaluated):
    first = evaluated["first"]
    assert set(first) == {"valid/masked_ce", "valid/text_ce", "valid/image_ce", "valid/special_ce",
                          "valid/masked_tokens"}
    assert first["valid/masked_tokens"] > 100
    for key in ("valid/masked_ce", "valid/text_ce", "valid/image_ce"):
        assert 0.5 < first[key] < 20, (key, first[key])  # a CE near log(vocab), not 0, NaN or a weighted sum


def test_evaluation_is_deterministic_and_changes_no_training_state(evaluated):
    assert evaluated["first"] == evaluated["second"]
    assert all(evaluated["same_state"].values()), evaluated["same_state"]
    assert evaluated["next_loss"] == evaluated["reference_loss"]


def test_run_logs_valid_fields_every_eval_interval(evaluated):
    records = evaluated["records"]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    assert ["valid/masked_ce" in r for r in records] == [False, True, False]
    assert records[1]["valid/text_ce"] > 0 and "loss" in records[1]


def test_eval_interval_needs_a_path():
    with pytest.raises(ConfigError, match="eval.interval=5 needs eval.path"):
        load_config("recipes/model/tiny.yaml", ["eval.interval=5"])
