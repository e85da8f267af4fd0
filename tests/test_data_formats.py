import json

import numpy as np
import pytest

from megatron_uni.data.batch import MODALITY_IMAGE, MODALITY_SPECIAL, MODALITY_TEXT
from megatron_uni.data.demo import build_demo_tokenizer
from megatron_uni.data.formats import BuildContext, build_sample, parse_line
from megatron_uni.data.schema import SampleError, Where
from megatron_uni.data.storage import LOSS_BIT, encode_positions
from megatron_uni.tokens import Vocabulary

IMAGES = {"a": (2, 2, [1, 2, 3, 4]), "b": (2, 2, [5, 6, 7, 8]), "c": (2, 3, [0] * 6)}
IMG = {"x": (1, 1, [9])}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_demo_tokenizer(["describe the image please", "a red circle", "hello there"] * 3,
                         text_vocab=512).save(str(path / "tokenizer.json"))
    return Vocabulary.from_tokenizer_dir(str(path), num_image_codes=16)


def ctx(vocab, cfg_dropout=0.0, seed=0):
    return BuildContext(vocab=vocab, lookup_image=IMAGES.__getitem__, rng=np.random.default_rng(seed),
                        cfg_dropout=cfg_dropout)


def build(vocab, sample, **kw):
    return build_sample(json.dumps(sample), Where("s.jsonl", 7), ctx(vocab, **kw))


# (malformed sample, field the error must name, words the reason must contain)
MALFORMED = [
    ({"task": "caption", "images": ["a"]}, "response", "missing required field"),
    ({"task": "understanding", "images": [], "response": "x"}, "images", "expected 1..16 images"),
    ({"task": "understanding", "images": ["a"], "response": "x", "colour": 1}, "colour", "unknown field"),
    ({"task": "text_to_image", "prompt": "", "image": "a"}, "prompt", "must not be empty"),
    ({"task": "text_to_image", "prompt": "p", "image": 3}, "image", "expected an image key"),
    ({"task": "editing", "source": "a", "instruction": "do"}, "target", "missing required field"),
    ({"task": "interleaved", "segments": [{"image": "a"}, {"text": "t"}]}, "segments", "expected 2..6 images"),
    ({"task": "interleaved", "segments": [{"image": "a"}, {"image": "b"}, {"text": 5}]}, "segments[2].text",
     "non-empty string"),
    ({"task": "interleaved", "segments": [{"image": "a", "text": "t"}, {"image": "b"}]}, "segments[0]",
     "exactly one of"),
    ({"task": "grounding", "image": "a", "prompt": "where", "response": "r", "boxes": [[0, 0, 1200, 5]]},
     "boxes[0][2]", "outside [0, 1000]"),
    ({"task": "grounding", "image": "a", "prompt": "where", "response": "r", "boxes": [[50, 0, 10, 5]]},
     "boxes[0]", "x0 <= x1"),
    ({"task": "grounding", "image": "a", "prompt": "how many", "response": "r", "count": -1}, "count",
     "non-negative integer"),
    ({"task": "chat", "messages": [{"role": "human", "content": "hi"}]}, "messages", "at least one assistant"),
    ({"task": "chat", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "unknown role"),
    ({"task": "chat", "messages": [{"role": "assistant"}]}, "messages[0].content", "missing required field"),
    ({"task": "text", "text": 12}, "text", "expected a string"),
    ({"task": "poem", "text": "x"}, "task", "unknown task"),
]


@pytest.mark.parametrize("sample,field,reason", MALFORMED, ids=[f"{m[0]['task']}-{m[1]}" for m in MALFORMED])
def test_validator_names_file_line_field(sample, field, reason):
    with pytest.raises(SampleError) as err:
        parse_line(json.dumps(sample), Where("data/train.jsonl", 42))
    assert err.value.field == field
    assert str(err.value).startswith(f"data/train.jsonl:42: field '{field}': ")
    assert reason in str(err.value)


def test_every_task_has_a_malformed_case():
    from megatron_uni.data.formats import TASKS
    covered = {m[0]["task"] for m in MALFORMED}
    assert set(TASKS) <= covered


def test_invalid_json_named():
    with pytest.raises(SampleError, match=r"f.jsonl:3: field '<json>': invalid JSON"):
        parse_line("{not json", Where("f.jsonl", 3))


def test_caption_only_response_maskable(vocab):
    s = build(vocab, {"task": "caption", "images": ["a"], "prompt": "describe the image", "response": "a red circle"})
    response = vocab.encode("a red circle") + [vocab.eos_id]
    assert s.tokens[-len(response):].tolist() == response
    assert s.maskable.tolist() == [False] * (len(s) - len(response)) + [True] * len(response)
    assert (((encode_positions(s) & LOSS_BIT) != 0) == s.maskable).all()  # stored loss mask = maskable
    image = np.flatnonzero(s.modality == MODALITY_IMAGE)
    assert s.tokens[image].tolist() == [vocab.image_token(c) for c in IMAGES["a"][2]]
    assert s.tokens[0] == vocab.special("role_system") and s.modality[0] == MODALITY_SPECIAL


def test_text_to_image_codes_maskable_header_given(vocab):
    s = build(vocab, {"task": "text_to_image", "prompt": "a red circle", "image": "c"})
    start = int(np.flatnonzero(s.tokens == vocab.special("image_start"))[-1])
    header = s.tokens[start:start + 4].tolist()
    assert header == [vocab.special("image_start"), vocab.size_token(2), vocab.size_token(3), vocab.special("boi")]
    assert not s.maskable[:start + 4].any()
    assert s.maskable[start + 4:].all()  # 6 codes, <|/image|>, <|endoftext|>
    assert (s.modality[start + 4:start + 10] == MODALITY_IMAGE).all()


def test_cfg_dropout_replaces_prompt_and_is_seeded(vocab):
    sample = {"task": "text_to_image", "prompt": "a red circle", "image": "a"}
    dropped = build(vocab, sample, cfg_dropout=1.0)
    kept = build(vocab, sample, cfg_dropout=0.0)
    assert vocab.special("uncondition") in dropped.tokens.tolist()
    assert vocab.special("uncondition") not in kept.tokens.tolist()
    draws = [vocab.special("uncondition") in build(vocab, sample, cfg_dropout=0.5, seed=s).tokens.tolist()
             for s in range(40)]
    assert 5 < sum(draws) < 35
    assert draws == [vocab.special("uncondition") in build(vocab, sample, cfg_dropout=0.5, seed=s).tokens.tolist()
                     for s in range(40)]


def test_editing_requires_same_grid(vocab):
    s = build(vocab, {"task": "editing", "source": "a", "instruction": "make it blue", "target": "b"})
    assert s.tokens[s.maskable & (s.modality == MODALITY_IMAGE)].tolist() == [vocab.image_token(c) for c in [5, 6, 7, 8]]
    assert not (s.maskable & np.isin(s.tokens, [vocab.image_token(c) for c in [1, 2, 3, 4]])).any()
    with pytest.raises(SampleError, match="s.jsonl:7: field 'target': edited image grid 2x3 differs"):
        build(vocab, {"task": "editing", "source": "a", "instruction": "wider", "target": "c"})


def test_unknown_image_key_names_field(vocab):
    with pytest.raises(SampleError, match=r"s.jsonl:7: field 'images\[1\]': image key 'zzz' not found"):
        build(vocab, {"task": "caption", "images": ["a", "zzz"], "response": "x"})


def test_interleaved_targets_follow_segments(vocab):
    s = build(vocab, {"task": "interleaved", "segments": [
        {"image": "a", "target": False}, {"text": "hello"}, {"image": "b"}]})
    codes_a = np.isin(s.tokens, [vocab.image_token(c) for c in [1, 2, 3, 4]])
    codes_b = np.isin(s.tokens, [vocab.image_token(c) for c in [5, 6, 7, 8]])
    assert not s.maskable[codes_a].any() and s.maskable[codes_b].all()
    assert s.maskable[s.modality == MODALITY_TEXT].sum() == len(vocab.encode("hello"))


def test_grounding_pixels_normalised_to_1000(vocab):
    s = build(vocab, {"task": "grounding", "image": "a", "prompt": "where", "response": "here",
                      "boxes": [[32, 64, 128, 128]], "image_size": [128, 256], "count": 1})
    answer = vocab.decode(s.tokens[s.maskable].tolist())
    assert answer == "here <box>[250, 250, 1000, 500]</box> Count: 1<|endoftext|>"


def test_chat_only_assistant_turns_maskable(vocab):
    s = build(vocab, {"task": "chat", "messages": [
        {"role": "system", "content": "be nice"}, {"role": "user", "content": "hello", "images": ["a"]},
        {"role": "assistant", "content": "hi"}, {"role": "human", "content": "again"},
        {"role": "assistant", "content": "there"}]})
    assert vocab.decode(s.tokens[s.maskable].tolist()) == "hithere<|endoftext|>"
    assert (s.tokens == vocab.special("role_assistant")).sum() == 2
    assert not s.maskable[s.tokens == vocab.special("role_assistant")].any()


def test_plain_text_all_maskable(vocab):
    s = build(vocab, {"task": "text", "text": "hello there"})
    assert s.maskable.all() and s.tokens.tolist() == vocab.encode("hello there") + [vocab.eos_id]


def test_special_strings_in_sample_text_stay_text(vocab):
    s = build(vocab, {"task": "text", "text": "hello <|image|> <role>HUMAN</role>"})
    assert vocab.special("image_start") not in s.tokens.tolist()
    assert vocab.special("role_human") not in s.tokens.tolist()
    assert vocab.decode(s.tokens[:-1].tolist()) == "hello <|image|> <role>HUMAN</role>"
    assert vocab.encode("<|image|>") == [vocab.special("image_start")]  # default still parses specials
