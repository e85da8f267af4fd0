"""Bad inputs to tools/build_dataset.py: each bad sample is a named, counted skip; a build never
leaves a torn or emptied dataset behind (issue 11, sections 1 and 2)."""

import json
import os
import runpy

import numpy as np
import pytest

from megatron_uni.data.build import BuildSettings, build_dataset
from megatron_uni.data.demo import build_demo_tokenizer
from megatron_uni.data.image_codes import merge_index, shard_path, write_shard
from megatron_uni.data.storage import SEAL_SUFFIX, SampleDataset, SampleWriter, check_seal
from megatron_uni.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODES = 16
GOOD_TEXT = '{"task": "text", "text": "a red circle"}\n'


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(["a red circle", "hello there"] * 3, text_vocab=512).save(str(path / "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="module")
def image_codes(tmp_path_factory):
    path = tmp_path_factory.mktemp("codes") / "image_codes.json"
    path.write_text(json.dumps({"ok": {"grid_h": 1, "grid_w": 2, "codes": [1, 2]},
                                "big": {"grid_h": 1, "grid_w": 2, "codes": [1, CODES + 4]}}))
    return str(path)


def settings(tokenizer, image_codes=None, **kw):
    return BuildSettings(tokenizer, image_codes, num_image_codes=CODES, **kw)


def test_each_bad_sample_is_a_named_skip(tokenizer, image_codes, tmp_path):
    jsonl = tmp_path / "in.jsonl"
    lines = [b"\xef\xbb\xbf" + GOOD_TEXT.encode(),                              # 1: BOM opening the file: valid
             b'{"task": "text", "text": "caf\xe9"}\n',                         # 2: latin-1 byte
             ("[" * 100000 + "]" * 100000 + "\n").encode(),                    # 3: RecursionError in json
             b'{"task": "text_to_image", "prompt": "p", "image": "big"}\n',    # 4: code 20 >= 16
             json.dumps({"task": "text", "text": "hello there " * 100}).encode() + b"\n",  # 5: too long
             b'{"task": "text_to_image", "prompt": "p", "image": "ok"}\n']     # 6: good
    jsonl.write_bytes(b"".join(lines))
    report = build_dataset([str(jsonl)], str(tmp_path / "ds"), settings(tokenizer, image_codes, max_length=100))
    assert report.written == 2
    assert report.bad == {"<encoding>": 1, "<json>": 1, "image": 1, "<sample>": 1}
    named = (tmp_path / "ds.errors.txt").read_text().splitlines()
    assert [line.split(": field ")[0] for line in named] == [f"{jsonl}:{n}" for n in (2, 3, 4, 5)]
    assert "not UTF-8: byte 0xe9" in named[0] and "nested too deeply" in named[1]
    assert f"code {CODES + 4} outside [0, {CODES})" in named[2] and "longer than the limit 100" in named[3]


def test_store_of_another_codebook_refused_before_any_sample(tokenizer, tmp_path):
    store = str(tmp_path / "store")
    write_shard(shard_path(store, 0), [("ok", 1, 2, np.array([1, 2]))], [])
    merge_index(store, [0], {"encoder": {"config": {"vq_config": {"num_embeddings": 256}}}})
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(GOOD_TEXT)
    with pytest.raises(DataError, match=r"256-entry codebook.*--num-image-codes is 16"):
        build_dataset([str(jsonl)], str(tmp_path / "ds"), settings(tokenizer, store))
    assert not os.path.exists(tmp_path / "ds.bin")


def _good_dataset(tokenizer, tmp_path, text="a red circle"):
    jsonl = tmp_path / "good.jsonl"
    jsonl.write_text(json.dumps({"task": "text", "text": text}) + "\n")
    build_dataset([str(jsonl)], str(tmp_path / "ds"), settings(tokenizer))
    return str(tmp_path / "ds")


def test_empty_input_keeps_the_good_dataset(tokenizer, tmp_path, capsys):
    prefix = _good_dataset(tokenizer, tmp_path)
    before = {s: open(prefix + s, "rb").read() for s in (".bin", ".idx", SEAL_SUFFIX)}
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"task": "text"}\n')
    main = runpy.run_path(os.path.join(REPO, "tools", "build_dataset.py"), run_name="build_dataset")["main"]
    rc = main(["--input", str(empty), "--output", prefix, "--tokenizer", tokenizer, "--num-image-codes", str(CODES)])
    err = capsys.readouterr().err.strip()  # the progress bar, then one line
    assert rc == 2 and "Traceback" not in err and err.splitlines()[-1].startswith("build_dataset: error: ")
    assert "no usable sample" in err and "field 'text'" in err
    assert {s: open(prefix + s, "rb").read() for s in before} == before
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_kill_between_bin_and_idx_renames_is_refused(tokenizer, tmp_path, monkeypatch):
    prefix = _good_dataset(tokenizer, tmp_path)
    renames = []

    def killed_after_first_rename(src, dst):
        if renames and src.endswith(".idx"):
            raise KeyboardInterrupt("killed")  # stands for SIGKILL between the two renames
        renames.append(dst)
        real_replace(src, dst)

    real_replace = os.replace
    writer = SampleWriter(prefix)
    writer.add_packed(np.arange(7, dtype=np.int32))
    monkeypatch.setattr(os, "replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        writer.finalize()
    monkeypatch.undo()
    with pytest.raises(DataError, match="killed while publishing"):
        SampleDataset(prefix)
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n]  # the killed build's temporary .idx
    prefix = _good_dataset(tokenizer, tmp_path)  # a rebuild removes it and publishes a sealed pair
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    assert len(SampleDataset(prefix)) == 1


def test_seal_catches_files_of_two_builds(tokenizer, tmp_path):
    prefix = _good_dataset(tokenizer, tmp_path)
    (tmp_path / "other").mkdir()
    other = _good_dataset(tokenizer, tmp_path / "other", text="hello there hello there")
    os.replace(other + ".bin", prefix + ".bin")
    with pytest.raises(DataError, match=r"ds\.bin holds \d+ bytes, its seal"):
        SampleDataset(prefix)


def test_verify_content_catches_same_size_bin(tokenizer, tmp_path):
    prefix = _good_dataset(tokenizer, tmp_path)
    data = bytearray(open(prefix + ".bin", "rb").read())
    data[0] ^= 1
    open(prefix + ".bin", "wb").write(bytes(data))
    check_seal(prefix)  # sizes agree: opening stays cheap
    with pytest.raises(DataError, match="checksum differs"):
        check_seal(prefix, verify_content=True)
