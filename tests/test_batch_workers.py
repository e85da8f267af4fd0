"""Micro-batches built in worker processes (``data.num_workers``) are the ones built in-process."""

import pytest
import torch

from megatron_uni.config import ConfigError, load_config


def _source(demo, *overrides):
    from megatron_uni.training.batches import MicrobatchSource

    cfg = load_config("recipes/demo/tiny_cpu.yaml", [f"data.path={demo.dataset}",
                                                     f"data.tokenizer={demo.root / 'tokenizer'}",
                                                     "data.seq_length=128", "schedule.train_iters=3", *overrides])
    return MicrobatchSource(cfg)


def _fields(inputs):
    return (inputs.input_ids, inputs.position_ids, inputs.labels, inputs.loss_weights, inputs.modality,
            inputs.attention_mask, inputs.normalizer)


def test_two_workers_build_the_same_microbatches_as_none(demo):
    inline, workers = _source(demo), _source(demo, "data.num_workers=2", "data.prefetch=1")
    per_step = inline.microbatches_per_step
    assert per_step >= 2 and workers.cfg.data.num_workers == 2
    # iterations 1..2 as the loop asks for them, each micro-batch twice (as virtual-pipeline chunks do)
    for iteration in (1, 2):
        for index in list(range(per_step)) * 2:
            want, got = inline(iteration, index, 0, 1), workers(iteration, index, 0, 1)
            for a, b in zip(_fields(want), _fields(got)):
                assert a.shape == b.shape and torch.equal(a, b), (iteration, index)
    assert workers._prefetcher is not None and workers._prefetcher.newest == (2, per_step - 1, 0, 1)
    # a request behind the stream (a re-run iteration) and one past train_iters are still served exactly
    assert torch.equal(workers(1, 0, 0, 1).input_ids, inline(1, 0, 0, 1).input_ids)
    assert torch.equal(workers(5, 0, 0, 1).input_ids, inline(5, 0, 0, 1).input_ids)
    workers.close()


def test_worker_keys_are_validated(demo):
    with pytest.raises(ConfigError, match="data.num_workers=-1 must be >= 0 and data.prefetch=2"):
        _source(demo, "data.num_workers=-1")
