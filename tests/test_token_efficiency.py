"""tools/token_efficiency.py counts with our layout code: the same loss tokens for every system,
fewer positions and attention pairs for each step of packing and compaction."""

import importlib.util
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("token_efficiency", os.path.join(REPO, "tools", "token_efficiency.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mix", ["sft", "understanding"])
def test_systems_ordered_and_loss_tokens_equal(tool, mix):
    args = tool.parse_args(["--samples", "12", "--seq-length", "3072", "--model-recipe",
                            os.path.join(REPO, "recipes", "model", "tiny.yaml")])
    from megatron_uni.config import load_config
    from megatron_uni.tokens import Vocabulary

    model = load_config(args.model_recipe).model
    vocab = Vocabulary.synthetic(text_size=model.text_vocab, num_image_codes=model.num_image_codes)
    dfactory, packed, ours = (tool.measure_mix(mix, args, model, vocab)[s] for s in tool.SYSTEMS)
    assert dfactory["loss_tokens"] == packed["loss_tokens"] == ours["loss_tokens"] > 0
    assert dfactory["rows"] == 12 and packed["rows"] == ours["rows"] < 12
    assert dfactory["positions"] == 12 * 2 * 2 * 3072  # complementary pair of 2L rows per sample
    assert ours["positions"] < packed["positions"] < dfactory["positions"]
    assert ours["pairs"] <= packed["pairs"] < dfactory["pairs"]
