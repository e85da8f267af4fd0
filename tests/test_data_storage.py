"""Demo data -> build_dataset -> IndexedDataset -> packed, resumable Batch stream (end to end)."""

import hashlib
import os
import pathlib

import numpy as np
import pytest

from megatron_uni.data.blend import BlendEntry
from megatron_uni.data.build import BuildSettings, build_dataset
from megatron_uni.data.demo import DEMO_IMAGE_CODES, DEMO_TEXT_VOCAB, make_demo_data
from megatron_uni.data.loader import PackedBatchLoader
from megatron_uni.data.packing import PackingSettings
from megatron_uni.data.sampler import microbatch_rows
from megatron_uni.data.sequence import TokenizedSample
from megatron_uni.data.storage import (LOSS_BIT, MASKABLE_BIT, SampleDataset, SampleWriter, decode_positions,
                                       encode_positions)
from megatron_uni.tokens import Vocabulary


def test_packed_int_encoding_round_trip():
    rng = np.random.default_rng(0)
    sample = TokenizedSample(tokens=rng.integers(0, 173568, 50), maskable=rng.random(50) < 0.5,
                             modality=rng.integers(0, 3, 50).astype(np.int8))
    packed = encode_positions(sample)
    back = decode_positions(packed)
    for name in ("tokens", "maskable", "modality"):
        assert np.array_equal(getattr(back, name), getattr(sample, name)), name
    # the on-disk loss bit stays in the format, equal to the maskable bit
    assert np.array_equal((packed & LOSS_BIT) != 0, (packed & MASKABLE_BIT) != 0)


def test_indexed_dataset_round_trip(tmp_path):
    samples = [TokenizedSample(np.arange(n) + 170000, np.arange(n) % 3 == 0, np.full(n, 1, np.int8))
               for n in (3, 10, 1)]
    writer = SampleWriter(str(tmp_path / "x"))
    for s in samples:
        writer.add(s)
    writer.finalize()
    data = SampleDataset(str(tmp_path / "x"))
    assert data.lengths.tolist() == [3, 10, 1]
    assert data.get(1, offset=4, length=3).tokens.tolist() == [170004, 170005, 170006]
    assert data.get(1).maskable.tolist() == samples[1].maskable.tolist()


def test_demo_tokenizer_text_vocab_is_1024(demo):
    vocab = demo.vocab
    assert vocab.text_size == DEMO_TEXT_VOCAB and vocab.size == 1280


def test_build_counts_bad_samples_and_keeps_good(demo):
    root, report, vocab = demo.root, demo.report, demo.vocab
    assert report.bad == {"image": 1, "text": 1}
    lines = open(f"{demo.dataset}.errors.txt").read().splitlines()
    assert len(lines) == 2 and lines[0].endswith("field 'image': image key 'nope' not found in the image-code store")
    data = SampleDataset(str(demo.dataset))
    assert len(data) == report.written == sum(1 for _ in open(root / "samples.jsonl")) - 2
    first = data.get(0)
    assert first.tokens.max() < vocab.size and first.maskable.any()


def test_demo_generation_is_deterministic(demo, tmp_path):
    root = demo.root
    make_demo_data(str(tmp_path), **demo.make_args)
    for name in ("image_codes.json", os.path.join("tokenizer", "tokenizer.json"),
                 os.path.join("images", "scene_00003.png")):
        assert hashlib.md5((tmp_path / name).read_bytes()).digest() == hashlib.md5((root / name).read_bytes()).digest()


def test_parallel_build_is_byte_identical(demo, tmp_path):
    root = demo.root
    settings = BuildSettings(str(root / "tokenizer"), str(root / "image_codes.json"),
                             num_image_codes=DEMO_IMAGE_CODES)
    build_dataset([str(root / "samples.jsonl")], str(tmp_path / "par"), settings, workers=2)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"par{ext}").read_bytes() == pathlib.Path(f"{demo.dataset}{ext}").read_bytes()


def loader(dataset, vocab, split=False, **packing):
    return PackedBatchLoader.open([BlendEntry(str(dataset), 1.0)], vocab,
                                  PackingSettings(**{"seq_length": 256, "block_size": 32, "split_samples": split,
                                                     **packing}), seed=5)


def test_loader_batches_follow_contract(demo):
    vocab = demo.vocab
    stream = loader(demo.dataset, vocab)
    batch = stream.rows([0, 1])
    assert batch.tokens.shape == (2, 256)
    for row in range(2):
        doc_ids = batch.doc_ids[row].numpy()
        used = doc_ids >= 0
        # every document occupies whole 32-token blocks
        for d in np.unique(doc_ids[used]):
            where = np.flatnonzero(doc_ids == d)
            assert where[0] % 32 == 0 and len(where) % 32 == 0
            assert batch.position_ids[row, where].tolist() == list(range(len(where)))
        assert not batch.maskable[row][~torch_bool(used)].any()
    assert 0.0 < stream.stats.efficiency <= 1.0
    assert stream.plan.path.startswith(str(demo.dataset.parent / "row_plans"))


def torch_bool(mask):
    import torch
    return torch.from_numpy(mask)


def test_loader_resume_and_dp_sharding(demo):
    vocab = demo.vocab
    straight = loader(demo.dataset, vocab, split=True)
    expected = [straight.rows(microbatch_rows(3, k, 0, 1, 2, 4)).tokens for k in range(2)]
    # a new process (here: a new loader reading the cached plan) resumes at iteration 3
    resumed = loader(demo.dataset, vocab, split=True)
    assert all((resumed.rows(microbatch_rows(3, k, 0, 1, 2, 4)).tokens == e).all() for k, e in enumerate(expected))
    # two DP ranks with one micro-batch each read what one rank reads in two
    ranks = [resumed.rows(microbatch_rows(3, 0, r, 2, 2, 4)).tokens for r in range(2)]
    assert (np.concatenate([t.numpy() for t in ranks]) == np.concatenate([e.numpy() for e in expected])).all()
    # reading past the planned rows extends the plan; earlier rows keep their content
    far = straight.plan.rows + 5
    straight.rows([far])
    assert straight.plan.rows > far and (straight.rows([14, 15]).tokens == expected[1]).all()


@pytest.mark.timeout(300)
def test_loader_stops_when_overlong_drop_leaves_nothing(demo):
    """Every demo document is longer than 32 tokens: with overlong=drop the blend would read
    forever; the loader must say which dataset and why, at once."""
    vocab = demo.vocab
    assert SampleDataset(str(demo.dataset)).lengths.min() > 32
    with pytest.raises(ValueError, match=r"dataset '.*demo': none of its \d+ documents can be packed"):
        loader(demo.dataset, vocab, seq_length=32, overlong="drop")
    assert loader(demo.dataset, vocab, seq_length=32, overlong="truncate").stats.truncated > 0


def test_open_training_data_from_recipe_sections(demo):
    from megatron_uni.config import load_config
    from megatron_uni.data.loader import open_training_data
    root = demo.root
    tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "model", "tiny.yaml")
    cfg = load_config(tiny, [f"data.path={demo.dataset}", f"data.tokenizer={root / 'tokenizer'}",
                             "data.seq_length=128", "data.block_size=16", "model.text_vocab=1024",
                             "model.num_image_codes=256", "data.lookahead=3", "data.split_samples=true",
                             "data.overlong=truncate", f"data.cache_dir={root / 'plans'}"])
    opened = open_training_data(cfg.data, cfg.model, rows=10)
    batch = opened.rows(list(range(cfg.data.micro_batch_size)))
    assert batch.tokens.shape == (cfg.data.micro_batch_size, 128)
    assert int(batch.tokens.max()) < 1280
    assert opened.packing == PackingSettings(128, 16, split_samples=True, overlong="truncate", lookahead=3)
    assert opened.plan.path.startswith(str(root / "plans")) and opened.plan.rows >= 10
    assert "lookahead 3 split_samples True overlong truncate" in opened.packing_summary()
    cfg.data.tokenizer = None
    with pytest.raises(ValueError, match="data.tokenizer must be set"):
        open_training_data(cfg.data, cfg.model)


def test_demo_manifest_lists_every_image_key(demo):
    import json
    root = demo.root
    manifest = [json.loads(line) for line in open(root / "images.jsonl")]
    codes = json.load(open(root / "image_codes.json"))
    assert [m["key"] for m in manifest] == list(codes)
    assert all((root / m["image"]).is_file() for m in manifest)


def test_loader_refuses_dataset_built_with_other_vocabulary(demo):
    root, vocab = demo.root, demo.vocab
    other = Vocabulary.from_tokenizer_dir(str(root / "tokenizer"), text_size=1100, num_image_codes=DEMO_IMAGE_CODES)
    with pytest.raises(ValueError, match="was built with text_size=1024, this run uses 1100"):
        loader(demo.dataset, other)
    built = __import__("json").load(open(f"{demo.dataset}.build.json"))
    assert built["vocabulary"]["special_ids"] == dict(vocab.special_ids)


def test_build_reads_image_code_store_like_fallback(demo, tmp_path):
    """The VQ tool's ImageCodeStore (directory) and the demo's image_codes.json give the same dataset."""
    import json
    from megatron_uni.data.image_codes import merge_index, shard_path, write_shard
    root = demo.root
    table = json.load(open(root / "image_codes.json"))
    store = tmp_path / "store"
    entries = [(k, v["grid_h"], v["grid_w"], np.asarray(v["codes"])) for k, v in table.items()]
    write_shard(shard_path(str(store), 0), entries[:5], [])
    write_shard(shard_path(str(store), 1), entries[5:], [])
    merge_index(str(store), [0, 1], {})
    settings = BuildSettings(str(root / "tokenizer"), str(store), num_image_codes=DEMO_IMAGE_CODES)
    build_dataset([str(root / "samples.jsonl")], str(tmp_path / "from_store"), settings)
    assert (tmp_path / "from_store.bin").read_bytes() == pathlib.Path(f"{demo.dataset}.bin").read_bytes()
