"""The image-code store: shard encoding, atomic writes, index merge, reader."""

import json
import os

import numpy as np
import pytest

from megatron_uni.data import image_codes as store


def write_two_shards(directory):
    store.write_shard(store.shard_path(directory, 0), [("a.jpg", 2, 3, np.arange(6)), ("b.png", 1, 1, [16383])],
                      [{"key": "bad.jpg", "origin": "bad.jpg", "reason": "corrupt", "detail": "x"}])
    store.write_shard(store.shard_path(directory, 1), [("c.jpg", 2, 2, [5, 4, 3, 2])],
                      [{"key": "t.jpg", "origin": "t.jpg", "reason": "too_small", "detail": "y"},
                       {"key": "m.jpg", "origin": "m.jpg", "reason": "corrupt", "detail": "z"}])


def test_store_round_trip_and_report(tmp_path):
    directory = str(tmp_path)
    write_two_shards(directory)
    index = store.merge_index(directory, [1, 0], {"mode": "understanding"})
    assert index["num_images"] == 3 and index["shards"] == ["shard-000000.vqc", "shard-000001.vqc"]
    codes = store.ImageCodeStore(directory)
    assert len(codes) == 3 and "c.jpg" in codes and "bad.jpg" not in codes
    grid_h, grid_w, values = codes.get("a.jpg")
    assert (grid_h, grid_w) == (2, 3) and values.tolist() == [0, 1, 2, 3, 4, 5] and values.dtype == np.int64
    assert codes.get("b.png")[2].tolist() == [16383]
    assert codes.get("c.jpg")[2].tolist() == [5, 4, 3, 2]
    assert codes.meta == {"mode": "understanding"}

    with open(os.path.join(directory, store.REPORT_FILE)) as handle:
        summary = json.load(handle)
    assert summary["num_bad"] == 3 and summary["counts"] == {"corrupt": 2, "too_small": 1}
    with pytest.raises(KeyError, match="'zzz' is not in the image-code store"):
        codes.get("zzz")


def test_shard_bytes_depend_only_on_content_and_no_temp_file_remains(tmp_path):
    first = store.encode_shard([("k", 1, 2, np.array([7, 8]))], [])
    assert first == store.encode_shard([("k", 1, 2, [7, 8])], [])
    path = store.shard_path(str(tmp_path), 3)
    store.write_shard(path, [("k", 1, 2, [7, 8])], [])
    assert open(path, "rb").read() == first
    assert os.listdir(os.path.dirname(path)) == ["shard-000003.vqc"]


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="image 'k': 3 codes for a 2x2 grid"):
        store.encode_shard([("k", 2, 2, [1, 2, 3])], [])
    with pytest.raises(ValueError, match="codes outside"):
        store.encode_shard([("k", 1, 1, [70000])], [])
    directory = str(tmp_path)
    store.write_shard(store.shard_path(directory, 0), [("dup", 1, 1, [1])], [])
    store.write_shard(store.shard_path(directory, 1), [("dup", 1, 1, [2])], [])
    with pytest.raises(ValueError, match="'dup' appears in shard-000000.vqc and shard-000001.vqc"):
        store.merge_index(directory, [0, 1], {})
    broken = tmp_path / "shards" / "shard-000002.vqc"
    broken.write_bytes(b"garbage!")
    with pytest.raises(ValueError, match="shard-000002.vqc is not an image-code shard"):
        store.read_shard_header(str(broken))
    with pytest.raises(FileNotFoundError, match="has no index.json"):
        store.ImageCodeStore(str(tmp_path / "nowhere"))
