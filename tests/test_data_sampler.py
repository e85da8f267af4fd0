import itertools

import numpy as np
import pytest

from megatron_uni.data.blend import blend_order, load_blend
from megatron_uni.data.sampler import microbatch_rows
from reference_planner import reference_blended_documents


def test_microbatch_rows_are_disjoint_cover_each_iteration_and_ignore_the_layout():
    """Iteration i reads rows [i*G, (i+1)*G) whatever the data-parallel size: resume at another
    DP size replays the same rows."""
    global_batch = 8
    for dp_size, mbs in ((1, 2), (2, 2), (4, 1), (2, 4)):
        for iteration in (0, 3):
            steps = global_batch // (mbs * dp_size)
            rows = [r for k in range(steps) for rank in range(dp_size)
                    for r in microbatch_rows(iteration, k, rank, dp_size, mbs, global_batch)]
            assert sorted(rows) == list(range(iteration * global_batch, (iteration + 1) * global_batch))
    assert microbatch_rows(2, 1, 1, 2, 3, 12) == [33, 34, 35]


def test_microbatch_rows_refuse_impossible_layouts():
    with pytest.raises(ValueError, match="rank 2 outside world of 2"):
        microbatch_rows(0, 0, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        microbatch_rows(0, 0, 0, 2, 3, 8)
    with pytest.raises(ValueError, match="micro-batch 2 outside"):
        microbatch_rows(0, 2, 0, 2, 2, 8)


def test_blend_follows_weights_and_is_deterministic():
    sizes, weights = [10, 3, 5], [0.5, 0.3, 0.2]
    dataset, document = blend_order(sizes, weights, seed=3, count=1000)
    assert np.bincount(dataset, minlength=3).tolist() == [500, 300, 200]
    again = blend_order(sizes, weights, seed=3, count=1000)
    assert np.array_equal(again[0], dataset) and np.array_equal(again[1], document)
    assert not np.array_equal(blend_order(sizes, weights, seed=4, count=1000)[1], document)
    # each epoch over a dataset visits every document once
    assert sorted(document[dataset == 0][:10]) == list(range(10))
    # prefix-consistent: planning more documents extends the same order
    head = blend_order(sizes, weights, seed=3, count=137)
    assert np.array_equal(head[0], dataset[:137]) and np.array_equal(head[1], document[:137])


def test_blend_matches_the_python_blend_of_the_first_release():
    """Exact ratios (0.7/0.3, 1/1/2) tie in exact arithmetic and floating point breaks the ties:
    the vectorised planner must break them the same way."""
    rng = np.random.default_rng(1)
    cases = [([7, 3], [0.7, 0.3]), ([4, 4, 4], [1, 1, 2]), ([5, 9], [1, 1])]
    for _ in range(30):
        n = int(rng.integers(1, 5))
        cases.append((rng.integers(1, 20, n).tolist(), (rng.random(n) + 0.01).tolist()))
    for sizes, weights in cases:
        lengths = [np.arange(1, s + 1) for s in sizes]
        expected = list(itertools.islice(reference_blended_documents(lengths, weights, 3), 2000))
        dataset, document = blend_order(sizes, weights, 3, 2000)
        assert [(int(d), int(doc)) for d, doc in zip(dataset, document)] == [ref for ref, _ in expected]


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
