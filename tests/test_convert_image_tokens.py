"""Sampler output -> decoder input (0-based VQ codes, H, W, prompt metadata)."""

from __future__ import annotations

import json

import pytest

from convert_helpers import run_tool
from megatron_uni.convert.hf_io import ConversionError
from megatron_uni.convert.image_tokens import export_image_tokens, images_of_record
from megatron_uni.tokens import Vocabulary

VOCAB = Vocabulary.synthetic(text_size=1024, num_image_codes=256)


def test_image_blocks_in_a_generated_sequence_become_decoder_records():
    first = VOCAB.image_block(2, 3, [0, 5, 255, 7, 1, 2])
    second = VOCAB.image_block(1, 2, [9, 8])
    record = {"id": "s1", "prompt": "two cats", "tokens": [3, 4] + first + [5] + second, "seed": 11}
    images = images_of_record(record, VOCAB, "x:1")
    assert [(i["h"], i["w"], i["token_ids"], i["index"]) for i in images] == [
        (2, 3, [0, 5, 255, 7, 1, 2], 0), (1, 2, [9, 8], 1)]
    assert images[0]["prompt"] == "two cats" and images[0]["metadata"] == {"seed": 11}


def test_grid_plus_image_tokens_form():
    tokens = [VOCAB.image_token(c) for c in (4, 3, 2, 1)]
    [image] = images_of_record({"prompt": "p", "grid": [2, 2], "image_tokens": tokens}, VOCAB, "x:1")
    assert (image["h"], image["w"], image["token_ids"]) == (2, 2, [4, 3, 2, 1])


@pytest.mark.parametrize("record, message", [
    ({"tokens": [1, 2, 3]}, r"x:1: no image block"),
    ({"tokens": VOCAB.image_block(2, 2, [1, 2, 3, 4])[:-2]}, r"x:1: malformed image block at token 0"),
    ({"grid": [2, 2], "image_tokens": [VOCAB.image_token(0)] * 3}, r"grid 2x2 needs 4 image_tokens, got 3"),
    ({"grid": [1, 1], "image_tokens": [5]}, r"field 'image_tokens': token id 5 is not an image code token"),
    ({"prompt": "only"}, r"needs 'tokens' \(generated sequence\) or 'grid' \+ 'image_tokens'"),
])
def test_bad_sampler_records_are_refused(record, message):
    with pytest.raises(ConversionError, match=message):
        images_of_record(record, VOCAB, "x:1")


def test_cli_with_a_tokenizer_directory(tmp_path):
    from megatron_uni.data.demo import build_demo_tokenizer

    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    build_demo_tokenizer(["a red circle on a gray background"] * 4).save(str(tokenizer_dir / "tokenizer.json"))
    vocabulary = Vocabulary.from_tokenizer_dir(str(tokenizer_dir), num_image_codes=256)
    samples = tmp_path / "samples.jsonl"
    sequence = vocabulary.encode("a red circle") + vocabulary.image_block(2, 2, [10, 11, 12, 13])
    samples.write_text(json.dumps({"id": "a", "prompt": "a red circle", "tokens": sequence}) + "\n\n")
    out = tmp_path / "images.jsonl"
    done = run_tool("export_image_tokens.py", [str(samples), str(out), "--tokenizer", str(tokenizer_dir),
                                               "--text-vocab", "1024", "--num-image-codes", "256", "--no-progress"])
    assert done.returncode == 0, done.stderr
    [line] = out.read_text().splitlines()
    assert json.loads(line)["token_ids"] == [10, 11, 12, 13]
    assert export_image_tokens(str(samples), str(tmp_path / "again.jsonl"), vocabulary, progress=False) == 1
