"""The cached row plan: built once, memory-mapped, rebuilt (never read) when stale or torn."""

import itertools
import os
import threading

import numpy as np
import pytest

from megatron_uni.data import row_plan
from megatron_uni.data.packing import PackingSettings
from megatron_uni.data.row_plan import PlanInputs, open_row_plan
from reference_planner import ReferenceStats, reference_blended_documents, reference_plan_rows

LENGTHS = [np.random.default_rng(0).integers(1, 90, 300), np.random.default_rng(1).integers(1, 40, 50)]


def inputs(**change):
    base = dict(lengths=LENGTHS, weights=[0.7, 0.3], seed=3, names=["a", "b"],
                packing=PackingSettings(seq_length=64, block_size=8, lookahead=4))
    return PlanInputs(**{**base, **change})


def rows_of(plan):
    return [[(s.ref, s.start, s.end) for s in plan.row(i)] for i in range(plan.rows)]


def count_builds(monkeypatch):
    builds = []
    real = row_plan.build_plan
    monkeypatch.setattr(row_plan, "build_plan", lambda *a: builds.append(1) or real(*a))
    return builds


@pytest.mark.parametrize("chunk", [1 << 22, 37])
def test_plan_equals_the_python_planner_of_the_first_release(tmp_path, monkeypatch, chunk):
    """Blend + packing through the cache give exactly the rows (and statistics) of the generator
    pipeline, whatever the number of documents blended and packed at a time."""
    monkeypatch.setattr(row_plan, "CHUNK_DOCUMENTS", chunk)
    lengths = [LENGTHS[0], np.concatenate([LENGTHS[1], [70, 0, 200]])]      # overlong and empty ones
    for packing in (PackingSettings(64, 8, lookahead=4), PackingSettings(64, 8, split_samples=True),
                    PackingSettings(64, 8, overlong="truncate"), PackingSettings(64, 8)):
        plan = open_row_plan(inputs(packing=packing, lengths=lengths), str(tmp_path), rows=60)
        stream = reference_blended_documents(lengths, [0.7, 0.3], 3)
        stats = ReferenceStats()
        expected = list(itertools.islice(reference_plan_rows(stream, packing, stats), plan.rows))
        assert rows_of(plan) == [[(s.ref, s.start, s.end) for s in row] for row in expected]
        assert plan.rows == 60 and plan.stats.rows == 60
        assert (plan.stats.real_tokens, plan.stats.split) == (stats.real_tokens, stats.split)
        assert plan.stats.dropped + plan.stats.truncated > 0


def test_cache_hit_and_miss_on_every_key_change(tmp_path, monkeypatch):
    builds = count_builds(monkeypatch)
    first = open_row_plan(inputs(), str(tmp_path), rows=20)
    again = open_row_plan(inputs(), str(tmp_path), rows=20)
    assert len(builds) == 1 and again.path == first.path and rows_of(again) == rows_of(first)
    changed = [inputs(seed=4), inputs(weights=[0.6, 0.4]), inputs(packing=PackingSettings(64, 8, lookahead=5)),
               inputs(packing=PackingSettings(64, 8, lookahead=4, overlong="truncate")),
               inputs(lengths=[LENGTHS[0], np.concatenate([LENGTHS[1][:-1], [7]])])]
    paths = {open_row_plan(c, str(tmp_path), rows=20).path for c in changed}
    assert len(builds) == 1 + len(changed) and len(paths | {first.path}) == len(changed) + 1
    assert inputs(names=["x", "y"]).key() == inputs().key()      # names only label errors


def test_more_rows_extend_the_plan_without_changing_earlier_rows(tmp_path, monkeypatch):
    builds = count_builds(monkeypatch)
    short = rows_of(open_row_plan(inputs(), str(tmp_path), rows=10))
    longer = open_row_plan(inputs(), str(tmp_path), rows=200)
    assert len(builds) == 2 and longer.rows >= 200 and rows_of(longer)[:len(short)] == short
    open_row_plan(inputs(), str(tmp_path), rows=15)            # a longer plan serves a shorter need
    assert len(builds) == 2


@pytest.mark.parametrize("damage", ["truncate", "header", "tail", "garbage"])
def test_torn_or_corrupt_cache_is_rebuilt_never_read(tmp_path, monkeypatch, damage):
    good = open_row_plan(inputs(), str(tmp_path), rows=50)
    expected, path = rows_of(good), good.path
    del good
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[:len(data) - 100]
    elif damage == "header":
        data[60] ^= 0x55
    elif damage == "tail":
        data[-3] ^= 0x55
    else:
        data = bytearray(b"\0" * len(data))
    with open(path, "wb") as f:
        f.write(data)
    builds = count_builds(monkeypatch)
    plan = open_row_plan(inputs(), str(tmp_path), rows=50)
    assert len(builds) == 1 and rows_of(plan) == expected
    assert row_plan.read_plan(path, inputs().key(), 50) is not None


def test_concurrent_openers_build_once(tmp_path, monkeypatch):
    builds = count_builds(monkeypatch)
    plans = []
    threads = [threading.Thread(target=lambda: plans.append(open_row_plan(inputs(), str(tmp_path), rows=30)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len({tuple(map(tuple, rows_of(p)[0])) for p in plans}) == 1
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


@pytest.mark.timeout(60)
def test_overlong_drop_of_every_document_names_the_dataset(tmp_path):
    lengths = [LENGTHS[0], np.full(20, 65)]
    with pytest.raises(ValueError, match=r"dataset 'b': none of its 20 documents can be packed.*seq_length 64"):
        open_row_plan(inputs(lengths=lengths), str(tmp_path), rows=10)
    plan = open_row_plan(inputs(lengths=lengths, packing=PackingSettings(64, 8, overlong="truncate")),
                         str(tmp_path), rows=10)
    assert plan.stats.truncated > 0


def _rank_opens(rank, world, port, cache, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        builds = []
        real = row_plan.build_plan
        row_plan.build_plan = lambda *a: builds.append(1) or real(*a)
        plan = open_row_plan(inputs(), cache, rows=40)
        built = len(builds)
        try:
            open_row_plan(inputs(lengths=[LENGTHS[0], np.full(5, 99)]), cache, rows=5)
            failed = ""
        except ValueError as err:
            failed = str(err)
        results[rank] = (built, rows_of(plan)[:5], failed)
    finally:
        dist.destroy_process_group()


def test_ranks_wait_for_rank_zero_and_share_its_plan(tmp_path):
    """With a process group, rank 0 builds while rank 1 waits; a build error reaches every rank
    instead of leaving the others at the barrier."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_opens, args=(2, port, str(tmp_path), results), nprocs=2, join=True)
        results = dict(results)
    assert [results[r][0] for r in (0, 1)] == [1, 0]
    assert results[0][1] == results[1][1]
    assert all("dataset 'b': none of its 5 documents" in results[r][2] for r in (0, 1))
