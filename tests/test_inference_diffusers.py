"""Our sampler against diffusers' ``LLaDA2Pipeline`` + ``BlockRefinementScheduler`` (diffusers >=
0.42) driving the same reference model: identical greedy tokens. Skipped where diffusers is not
installed (it is not a dependency of this project; see docs/inference.md for how it was run)."""

from __future__ import annotations

import types

import pytest
import torch

from inference_helpers import one_thread, tiny_weights

pytest.importorskip("diffusers.pipelines.llada2.pipeline_llada2")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


class PipelineModel(torch.nn.Module):
    """What the pipeline calls: ``model(ids, attention_mask=[b, S] 0/1, position_ids).logits``;
    the block-causal mask is built here, as LLaDA2's remote modeling code does."""

    def __init__(self, logits_fn, block_size: int) -> None:
        super().__init__()
        self.logits_fn, self.block_size = logits_fn, block_size

    @property
    def device(self) -> torch.device:  # read by DiffusionPipeline.device
        return torch.device("cpu")

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        from megatron_uni.inference.runner import block_causal_allowed

        index = torch.arange(input_ids.shape[1])
        allowed = block_causal_allowed(index, index, self.block_size, attention_mask.bool())
        return types.SimpleNamespace(logits=self.logits_fn(input_ids, position_ids, allowed))


@pytest.mark.parametrize("block_size,sharpness", [(4, 1.0), (8, 30.0), (32, 30.0)])
def test_same_greedy_tokens_as_diffusers_llada2_pipeline(block_size, sharpness):
    from diffusers import BlockRefinementScheduler
    from diffusers.pipelines.llada2.pipeline_llada2 import LLaDA2Pipeline

    from megatron_uni.convert.hf_reference import LLaDA2Reference
    from megatron_uni.inference import GenerationRequest, SamplerSettings, UncachedRunner, generate
    from megatron_uni.tokens import Vocabulary

    weights, config = tiny_weights(seed=2)
    reference = LLaDA2Reference(weights, config)
    logits_fn = lambda ids, pos, allowed: sharpness * reference(ids, pos, allowed)  # noqa: E731
    vocab = Vocabulary.synthetic(config["image_token_offset"], config["vocab_size"] - config["image_token_offset"])
    prompt = [(37 * i) % 900 for i in range(2 * block_size + 3)]
    gen_length = 4 * block_size - 3  # prompt + generation = whole blocks: no hidden tail (see docs)
    steps = block_size  # one scheduled position per step: any faster progress is the threshold

    ours = generate(UncachedRunner(logits_fn, config["vocab_size"], 4096), vocab,
                    GenerationRequest([prompt], gen_length), SamplerSettings(block_size, steps, threshold=0.95))
    pipe = LLaDA2Pipeline(model=PipelineModel(logits_fn, block_size), scheduler=BlockRefinementScheduler())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(input_ids=torch.tensor([prompt]), gen_length=gen_length, block_length=block_size,
                  num_inference_steps=steps, temperature=0.0, sampling_method="greedy", threshold=0.95,
                  editing_threshold=None, eos_early_stop=True, eos_token_id=vocab.eos_id,
                  mask_token_id=vocab.mask_id, output_type="seq").sequences[0].tolist()
    if vocab.eos_id in theirs:
        theirs = theirs[:theirs.index(vocab.eos_id) + 1]
    assert vocab.mask_id not in theirs  # our sampler never emits the mask id; the comparison needs it unused
    assert ours.tokens == theirs
    # sharpened logits: positions above the threshold are accepted together (the threshold path)
    assert (ours.refinement_forwards < len(ours.tokens)) == (sharpness > 1)
