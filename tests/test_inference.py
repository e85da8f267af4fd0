"""The block-diffusion sampler: schedule and threshold semantics on a fake model, the prefix KV
cache against full recomputation on the tiny reference model, image/CFG/editing prompts, errors."""

from __future__ import annotations

import pytest
import torch

from inference_helpers import FakeRunner, demo_vocabulary, one_thread, tiny_weights
from megatron_uni.inference import GenerationError, GenerationRequest, SamplerSettings, generate
from megatron_uni.inference.guidance import ClassifierFreeGuidance
from megatron_uni.inference.sampling import accept_positions, transfer_schedule


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return demo_vocabulary(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="module")
def runners():
    from megatron_uni.inference.reference_runner import CachedReferenceRunner, uncached_reference_runner

    weights, config = tiny_weights()
    return CachedReferenceRunner(weights, config), uncached_reference_runner(weights, config)


def prompt_ids(vocab, n, first=300):
    return [first + (7 * i) % 500 for i in range(n)]


# ---- schedule and threshold ------------------------------------------------------------------
def test_transfer_schedule_spreads_the_block_remainder_first():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert transfer_schedule(8, 3) == [3, 3, 2]


def test_accept_every_confident_position_when_enough_else_scheduled_most_confident():
    pending = torch.tensor([True, True, True, False, True])
    confidence = torch.tensor([0.99, 0.20, 0.97, 0.999, 0.50])
    assert accept_positions(confidence, pending, 1, 0.95).tolist() == [True, False, True, False, False]
    # 2 confident < 3 scheduled: the 3 most confident pending ones (the non-pending 0.999 never)
    assert accept_positions(confidence, pending, 3, 0.95).tolist() == [True, False, True, False, True]
    assert accept_positions(confidence, pending, 9, 0.95).tolist() == [True, True, True, False, True]


def test_fake_model_block_loop_prefill_commits_and_acceptance(vocab):
    # block 4, steps 4 (1 per step). Prompt of 6 -> block 0 prefilled, block 1 holds 2 prompt
    # tokens + 2 masks. Columns 9 and 11 are confident (above the threshold).
    confident = {9, 11}
    runner = FakeRunner(1280, lambda call, c: 0.99 if c in confident else 0.5 - 0.01 * (c % 4))
    request = GenerationRequest([prompt_ids(vocab, 6)], length=6, stop_at_eos=False)
    out = generate(runner, vocab, request, SamplerSettings(block_size=4, steps=4))
    assert out.tokens == [100 + c for c in range(6, 12)]
    kinds = [(k, s, n) for k, s, n in runner.calls]
    assert kinds[0] == ("commit", 0, 4)                      # prefill: the whole-prompt block only
    # block 1 (columns 4-7): 2 masked, 1 per step -> 2 forwards, then its commit
    assert kinds[1:4] == [("forward", 4, 4), ("forward", 4, 4), ("commit", 4, 4)]
    # block 2 (8-11): columns 9 and 11 together (2 confident >= 1 scheduled), then 8, then 10:
    # 3 forwards; the last block is never committed
    assert kinds[4:] == [("forward", 8, 4)] * 3
    assert out.refinement_forwards == 5 and out.model_forwards == 7
    assert runner.committed[1][0].tolist() == prompt_ids(vocab, 6)[4:] + [106, 107]  # final tokens


def test_threshold_accepts_a_whole_confident_block_in_one_forward(vocab):
    runner = FakeRunner(1280, lambda call, c: 0.97)
    request = GenerationRequest([prompt_ids(vocab, 8)], length=16, stop_at_eos=False)
    out = generate(runner, vocab, request, SamplerSettings(block_size=8, steps=8, threshold=0.95))
    assert out.refinement_forwards == 2 and out.tokens_per_forward == 8
    out = generate(runner, vocab, request, SamplerSettings(block_size=8, steps=8, threshold=0.98))
    assert out.refinement_forwards == 16  # nothing above 0.98: one scheduled position per step


def test_stop_after_the_block_that_generated_eos(vocab):
    eos_column = 13
    runner = FakeRunner(1280, lambda call, c: 0.5, token=lambda c: vocab.eos_id if c == eos_column else 100)
    request = GenerationRequest([prompt_ids(vocab, 8)], length=24)
    out = generate(runner, vocab, request, SamplerSettings(block_size=4, steps=4))
    assert out.finished and out.tokens == [100] * 5 + [vocab.eos_id]
    assert out.blocks == 2  # blocks 2 and 3; block 4.. never started
    assert [k for k, _, _ in runner.calls].count("commit") == 2  # prefill + block 2


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus(vocab):
    from megatron_uni.inference.sampling import choose_tokens

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]])).repeat(200, 1)
    settings = SamplerSettings(temperature=1.0, top_p=0.8)
    tokens, confidence = choose_tokens(logits, settings, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}  # 0.6 + 0.3 reaches 0.8: 2 and 3 never drawn
    assert torch.allclose(confidence[tokens == 0], torch.tensor(2 / 3))
    again, _ = choose_tokens(logits, settings, torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)


# ---- the cache -------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [4, 8, 32])
def test_cached_equals_uncached_greedy_text(vocab, runners, block_size):
    from megatron_uni.inference.prompts import text_request

    cached, uncached = runners
    request = text_request(vocab, "a blue square in the top left", length=40, system="be brief")
    request.stop_at_eos = False
    settings = SamplerSettings(block_size=block_size, steps=block_size)
    a, b = generate(cached, vocab, request, settings), generate(uncached, vocab, request, settings)
    assert a.tokens == b.tokens and len(a.tokens) == 40
    assert len(set(a.tokens)) > 1
    assert a.refinement_forwards == b.refinement_forwards


@pytest.mark.parametrize("block_size", [4, 8, 32])
def test_cached_equals_uncached_greedy_image_with_cfg(vocab, runners, block_size):
    from megatron_uni.inference.prompts import text_to_image_request

    cached, uncached = runners
    request = text_to_image_request(vocab, "a red circle below", 5, 7, cfg_scale=3.0, cfg_rescale=0.7, system=None)
    assert len(request.prompts) == 2
    settings = SamplerSettings(block_size=block_size, steps=max(1, block_size // 2))
    a, b = generate(cached, vocab, request, settings), generate(uncached, vocab, request, settings)
    assert a.tokens == b.tokens


# ---- modalities ------------------------------------------------------------------------------
def test_image_span_holds_only_codes_with_header_and_footer(vocab, runners):
    from megatron_uni.inference.prompts import text_to_image_request

    request = text_to_image_request(vocab, "a blue square", 3, 4, cfg_scale=2.0)
    out = generate(runners[0], vocab, request, SamplerSettings(block_size=8, steps=4))
    header = request.prompts[0][-4:]
    grid_h, grid_w, codes = vocab.parse_image_block(header + out.tokens)
    assert (grid_h, grid_w, len(codes)) == (3, 4, 12)
    assert all(vocab.is_image_token(t) for t in out.tokens[:-1]) and out.tokens[-1] == vocab.special("image_end")


def test_cfg_scale_one_is_the_conditional_branch(vocab, runners):
    from megatron_uni.inference.prompts import text_to_image_request

    settings = SamplerSettings(block_size=4, steps=2)
    plain = text_to_image_request(vocab, "a red circle", 3, 3, system=None)
    forced = text_to_image_request(vocab, "a red circle", 3, 3, cfg_scale=1.0, system=None, force_cfg=True)
    assert len(plain.prompts) == 1 and len(forced.prompts) == 2
    cached = runners[0]
    assert generate(cached, vocab, plain, settings).tokens == generate(cached, vocab, forced, settings).tokens


def test_cfg_scale_zero_is_the_unconditional_branch(vocab, runners):
    """The unconditional prompt left-padded by 8 (two blocks of 4) behaves as if alone."""
    from megatron_uni.inference.prompts import text_to_image_request

    text = [400 + i for i in range(9)]  # [human] + 9 + [assistant] = 11; <uncondition> prompt = 3
    request = text_to_image_request(vocab, text, 3, 3, cfg_scale=0.0, system=None)
    assert len(request.prompts[0]) - len(request.prompts[1]) == 8
    alone = GenerationRequest([request.prompts[1]], request.length, image_span=True, suffix=request.suffix,
                              pad_to_block=False, stop_at_eos=False)
    settings = SamplerSettings(block_size=4, steps=2)
    for runner in runners:
        assert generate(runner, vocab, request, settings).tokens == generate(runner, vocab, alone, settings).tokens


def test_guidance_formulas():
    cond, uncond, no_image = torch.randn(3, 2, 5).unbind(0)
    rows = torch.stack([cond, uncond])
    assert torch.allclose(ClassifierFreeGuidance(2.5)(rows), uncond + 2.5 * (cond - uncond))
    three = torch.stack([cond, uncond, no_image])
    expected = uncond + 4 * (cond - uncond) + 1.5 * (uncond - no_image)
    assert torch.allclose(ClassifierFreeGuidance(4.0, 1.5)(three), expected)
    rescaled = ClassifierFreeGuidance(3.0, rescale=1.0)(rows)
    assert torch.allclose(rescaled.std(-1), cond.std(-1), atol=1e-5)


def test_editing_branches_and_output_grid(vocab, runners):
    from megatron_uni.inference.prompts import editing_request

    source = (2, 3, [5, 6, 7, 8, 9, 10])
    block = vocab.image_block(*source)
    request = editing_request(vocab, source, "make it red", text_scale=4.0, image_scale=1.5)
    cond, no_text, no_image = request.prompts
    assert _contains(cond, block) and _contains(no_text, block) and not _contains(no_image, block)
    assert vocab.special("uncondition") in no_text and vocab.special("uncondition") not in cond
    assert len(editing_request(vocab, source, "make it red", text_scale=4.0).prompts) == 2
    assert len(editing_request(vocab, source, "make it red", text_scale=1.0).prompts) == 1
    out = generate(runners[0], vocab, request, SamplerSettings(block_size=8, steps=4))
    grid_h, grid_w, codes = vocab.parse_image_block(cond[-4:] + out.tokens)
    assert (grid_h, grid_w) == (2, 3)


def test_understanding_prompt_and_text_answer(vocab, runners):
    from megatron_uni.inference.prompts import understanding_request

    image = (2, 2, [1, 2, 3, 4])
    request = understanding_request(vocab, [image], "what is it?", length=12)
    assert _contains(request.prompts[0], vocab.image_block(*image))
    assert request.prompts[0][0] == vocab.special("role_system")
    assert request.prompts[0][-1] == vocab.special("role_assistant")
    request.stop_at_eos = False
    out = generate(runners[0], vocab, request, SamplerSettings(block_size=8, steps=8))
    assert len(out.tokens) == 12 and vocab.mask_id not in out.tokens
    assert all(t < vocab.size for t in out.tokens)


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


# ---- errors ----------------------------------------------------------------------------------
def test_prompt_longer_than_the_context_is_refused(vocab, runners):
    from megatron_uni.inference.prompts import text_request

    runner = FakeRunner(1280, lambda call, c: 0.5, max_length=64)
    with pytest.raises(GenerationError, match="exceeds the model's context of 64"):
        generate(runner, vocab, text_request(vocab, prompt_ids(vocab, 60), length=8, chat=False))


def test_image_size_not_a_whole_number_of_codes(vocab):
    from megatron_uni.inference.prompts import grid_from_pixels, text_to_image_request

    assert grid_from_pixels(1024, 512) == (32, 16)
    with pytest.raises(GenerationError, match="1000x1024 px is not a whole number of codes"):
        grid_from_pixels(1000, 1024)
    with pytest.raises(GenerationError, match="no size token"):
        text_to_image_request(vocab, "x", 4000, 4)


def test_unknown_special_token_in_the_prompt(vocab):
    from megatron_uni.inference.prompts import encode_text

    with pytest.raises(GenerationError, match=r"unknown special token\(s\) \['<\|nope\|>'\]"):
        encode_text(vocab, "draw <|nope|> now", allow_special=True)
    assert vocab.special("boi") in encode_text(vocab, "x <boi>", allow_special=True)
    assert vocab.special("boi") not in encode_text(vocab, "x <boi>")  # plain text by default


def test_text_only_model_cannot_generate_images(vocab):
    from megatron_uni.inference.prompts import text_to_image_request

    runner = FakeRunner(vocab.text_size, lambda call, c: 0.5)
    with pytest.raises(GenerationError, match="cannot generate images"):
        generate(runner, vocab, text_to_image_request(vocab, "x", 2, 2))


def test_cli_dispatches_generate_and_reports_a_missing_model(tmp_path, capsys):
    from megatron_uni import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["generate", "--help"])
    assert done.value.code == 0 and "decoder hand-off format" in capsys.readouterr().out
    assert cli.main(["generate", str(tmp_path), "text", "--prompt", "hi"]) == 2
    assert "neither an HF folder" in capsys.readouterr().err


def test_interleaved_text_then_the_image_the_model_announced_then_text(vocab):
    from megatron_uni.inference.interleaved import generate_interleaved

    prompt = prompt_ids(vocab, 8)
    header = [vocab.special("image_start"), vocab.size_token(2), vocab.size_token(2), vocab.special("boi")]

    def token(column):  # text 8-9, header 10-13, codes 14-17, <|/image|> 18, text 19, EOS 20
        if 10 <= column < 14:
            return header[column - 10]
        if 14 <= column < 18:
            return vocab.image_token(column)
        return vocab.eos_id if column == 20 else 500 + column

    runner = FakeRunner(1280, lambda call, c: 0.5, token=token)
    out = generate_interleaved(runner, vocab, prompt, text_length=12, settings=SamplerSettings(block_size=4, steps=4))
    assert out.images == [(2, 2, [14, 15, 16, 17])]
    assert out.tokens == [508, 509] + header + [vocab.image_token(c) for c in range(14, 18)] + \
        [vocab.special("image_end"), 519, vocab.eos_id]
    assert out.finished
