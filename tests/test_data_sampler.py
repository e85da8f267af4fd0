import itertools

import numpy as np
import pytest

from megatron_uni.data.blend import blended_documents, load_blend
from megatron_uni.data.sampler import ResumableSampler


def take(sampler, steps):
    return [sampler.next_rows() for _ in range(steps)]


def test_resume_reproduces_exact_remaining_order():
    straight = ResumableSampler(micro_batch_size=3, seed=7, dp_rank=1, dp_world=2)
    first = take(straight, 4)
    state = straight.state_dict()
    rest = take(straight, 5)
    resumed = ResumableSampler(micro_batch_size=3, seed=7, dp_rank=1, dp_world=2)
    resumed.load_state_dict(state)
    assert take(resumed, 5) == rest
    assert state == {"consumed_samples": 24, "seed": 7} and first[0] == [3, 4, 5]


def test_resume_refuses_other_seed():
    sampler = ResumableSampler(micro_batch_size=2, seed=1)
    with pytest.raises(ValueError, match="saved with seed 2"):
        sampler.load_state_dict({"consumed_samples": 4, "seed": 2})


def test_dp_shards_disjoint_and_covering():
    world, mbs, steps = 4, 2, 5
    shards = [sum(take(ResumableSampler(mbs, 0, rank, world), steps), []) for rank in range(world)]
    flat = sum(shards, [])
    assert len(flat) == len(set(flat)) == world * mbs * steps
    assert sorted(flat) == list(range(world * mbs * steps))


def test_blend_follows_weights_and_is_deterministic():
    lengths = [np.arange(1, 11), np.arange(1, 4), np.arange(1, 6)]
    stream = list(itertools.islice(blended_documents(lengths, [0.5, 0.3, 0.2], seed=3), 1000))
    counts = np.bincount([ref[0] for ref, _ in stream], minlength=3)
    assert counts.tolist() == [500, 300, 200]
    assert stream == list(itertools.islice(blended_documents(lengths, [0.5, 0.3, 0.2], seed=3), 1000))
    other = list(itertools.islice(blended_documents(lengths, [0.5, 0.3, 0.2], seed=4), 1000))
    assert other != stream
    # each epoch over a dataset visits every document once
    first_epoch = [doc for (d, doc), _ in stream if d == 0][:10]
    assert sorted(first_epoch) == list(range(10))
    assert all(length == lengths[d][doc] for (d, doc), length in stream)


def test_blend_file_stages(tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text("stages:\n  pretrain: [{path: a/x, weight: 2}, {path: b, weight: 1}]\n"
                    "  sft: [{path: c, weight: 1}]\n")
    entries = load_blend(str(path), "pretrain")
    assert [e.weight for e in entries] == [2.0, 1.0]
    assert entries[0].path == str(tmp_path / "a" / "x")
    with pytest.raises(ValueError, match=r"choose a stage among \['pretrain', 'sft'\]"):
        load_blend(str(path), "decay")
    path.write_text("datasets: [{path: a, weight: 0}]\n")
    with pytest.raises(ValueError, match=r"datasets\[0\].weight: expected a positive number"):
        load_blend(str(path))
