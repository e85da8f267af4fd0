import json

import pytest

from megatron_uni.data.demo import build_demo_tokenizer
from megatron_uni.tokens import SPECIAL_TOKEN_STRINGS, Vocabulary, VocabularyError, VocabularyLayout

TEXTS = ["a red circle on a gray background", "two blue squares", "hello world, the shapes are small"] * 4


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(TEXTS, text_vocab=512).save(str(path / "tokenizer.json"))
    return path


def test_image_block_round_trip_synthetic():
    vocab = Vocabulary.synthetic(text_size=1024, num_image_codes=256)
    codes = [0, 255, 17, 3, 128, 9]
    block = vocab.image_block(2, 3, codes)
    assert block[0] == vocab.special("image_start") and block[3] == vocab.special("boi")
    assert block[-1] == vocab.special("image_end")
    assert block[4:-1] == [1024 + c for c in codes]
    assert vocab.parse_image_block(block) == (2, 3, codes)


def test_image_block_rejects_wrong_code_count():
    vocab = Vocabulary.synthetic(text_size=1024, num_image_codes=256)
    with pytest.raises(ValueError, match="2x2 needs 4 codes, got 3"):
        vocab.image_block(2, 2, [1, 2, 3])


def test_from_tokenizer_dir_resolves_specials_by_string(tokenizer_dir):
    vocab = Vocabulary.from_tokenizer_dir(str(tokenizer_dir), num_image_codes=256)
    assert vocab.text_size == 512 and vocab.image_offset == 512 and vocab.size == 768
    for name, string in SPECIAL_TOKEN_STRINGS.items():
        assert vocab.tokenizer.id_to_token(vocab.special(name)) == string
    assert vocab.tokenizer.id_to_token(vocab.size_token(32)) == "<|reserved_token_32|>"
    assert vocab.padded_size(tensor_parallel=2) == 768 and vocab.padded_size(tensor_parallel=4) == 1024


def test_text_and_image_round_trip_through_tokenizer(tokenizer_dir):
    vocab = Vocabulary.from_tokenizer_dir(str(tokenizer_dir), num_image_codes=256)
    ids = vocab.encode("a red circle") + vocab.image_block(2, 2, [5, 6, 7, 8]) + vocab.encode(" two squares")
    assert vocab.decode(ids) == "a red circle[image 2x2] two squares"
    assert vocab.encode("<|mask|>") == [vocab.mask_id]


def test_missing_specials_listed_in_one_error(tmp_path):
    build_demo_tokenizer(TEXTS, text_vocab=512).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens.json").write_text(json.dumps({"mask": "<MASK>", "boi": "<not-there>"}))
    with pytest.raises(VocabularyError) as err:
        Vocabulary.from_tokenizer_dir(str(tmp_path))
    assert "mask='<MASK>'" in str(err.value) and "boi='<not-there>'" in str(err.value)
    assert "tokenizer.json" in str(err.value)


def test_special_string_override_from_directory(tmp_path):
    build_demo_tokenizer(TEXTS, text_vocab=512).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "special_tokens.json").write_text(json.dumps({"mask": "<|reserved_token_70|>"}))
    vocab = Vocabulary.from_tokenizer_dir(str(tmp_path))
    assert vocab.tokenizer.id_to_token(vocab.mask_id) == "<|reserved_token_70|>"
    with pytest.raises(VocabularyError, match="unknown special token names"):
        Vocabulary.from_tokenizer_dir(str(tmp_path), special_strings={"masque": "<|mask|>"})


def test_text_size_must_hold_tokenizer(tokenizer_dir):
    with pytest.raises(VocabularyError, match="does not fit the text vocabulary of size 100"):
        Vocabulary.from_tokenizer_dir(str(tokenizer_dir), text_size=100)
    padded = Vocabulary.from_tokenizer_dir(str(tokenizer_dir), text_size=640, num_image_codes=256)
    assert padded.image_token(0) == 640


def test_missing_tokenizer_file_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Vocabulary.from_tokenizer_dir(str(tmp_path))


def test_layout_is_what_travels_and_reads_back():
    vocab = Vocabulary.synthetic(text_size=1000, num_image_codes=200)
    layout = vocab.layout()
    assert (layout.image_offset, layout.size, layout.padded_size) == (1000, 1200, 1280)
    assert layout.mask_id == vocab.mask_id and layout.special_ids == dict(vocab.special_ids)
    assert VocabularyLayout.from_dict(json.loads(json.dumps(layout.to_dict()))) == layout
    # a description written before padded_size existed gets the padding rule's value
    old = {k: v for k, v in layout.to_dict().items() if k != "padded_size"}
    assert VocabularyLayout.from_dict(old) == layout
    assert VocabularyLayout.of_sizes(157184, 16384).padded_size == 173568


def test_round_up():
    from megatron_uni.rounding import ceil_div, round_up

    assert [round_up(n, 32) for n in (0, 1, 32, 33)] == [0, 32, 32, 64]
    assert [ceil_div(n, 4) for n in (0, 1, 4, 5)] == [0, 1, 1, 2]
