"""Loss terms beyond the masked-token CE, as the training step applies them.

- z-loss: the router is built with ``calculate_per_token_loss`` on, so its z-loss gradient is
  scaled by the router's token count (megatron then divides every gradient by the global count);
  built off, the z-loss would be ~tokens x too weak.
- CAP: with ``diffusion.confidence_beta`` the model is called without labels and the step's loss
  and gradient equal the library's ``combine(loss_sums(..., confidence), beta)``.
"""

import pytest
import torch

from megatron_uni.config import DiffusionConfig, load_config
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.losses import ce_and_confidence, combine, loss_sums
from megatron_uni.training.confidence import confidence_loss_func
from megatron_uni.training.step import make_forward_step

from diffusion_helpers import random_batch, tiny_vocab

pytestmark = pytest.mark.usefixtures("single_process")


def test_router_z_loss_gradient_is_scaled_by_its_token_count():
    from megatron.core.transformer.moe.moe_utils import z_loss_func
    from megatron_uni.model.builder import build_model

    cfg = load_config("recipes/model/tiny.yaml", ["model.moe_z_loss_coeff=1.0e-3"]).model
    model = build_model(cfg)
    model.train()
    routers = [layer.mlp.router for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    assert routers and all(r.calculate_per_token_loss for r in routers)
    tokens = 48
    logits = torch.randn(tokens, cfg.num_experts, generator=torch.Generator().manual_seed(0)).requires_grad_()
    (routers[0].apply_z_loss(logits) * 0).sum().backward()  # only the z-loss's own gradient flows
    reference = logits.detach().clone().requires_grad_()
    z_loss_func(reference, 1.0e-3).backward()
    # finalize_model_grads divides by the global token count: tokens x mean-z-loss gradient here
    torch.testing.assert_close(logits.grad, tokens * reference.grad)


def _inputs_and_logits(seed=0):
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(seed), 2, 64, 8, vocab)
    inputs = build_inputs(batch, vocab, DiffusionConfig(t_min=0.3, t_max=0.8), torch.Generator().manual_seed(seed + 1),
                          block_size=8)
    gen = torch.Generator().manual_seed(seed + 2)
    logits = torch.randn(*inputs.labels.shape, vocab.size, generator=gen)
    # make about half the masked positions predicted right, so CAP has positions to count
    right = (inputs.labels >= 0) & (torch.rand(inputs.labels.shape, generator=gen) < 0.5)
    logits[right, inputs.labels[right]] += 8.0
    return inputs, logits


@pytest.mark.parametrize("weighting", ["mean", "sqrt_masked"])
def test_confidence_loss_func_equals_the_library_loss(weighting):
    inputs, logits = _inputs_and_logits()
    ours = logits.clone().requires_grad_()
    loss_sum, count, report = confidence_loss_func(inputs, weighting, 0.5, ours)
    (loss_sum / count).backward()
    library = logits.clone().requires_grad_()
    ce, confidence = ce_and_confidence(library, inputs.labels)
    sums = loss_sums(ce, inputs, confidence)
    assert sums.confidence_count > 10
    want = combine(sums, confidence_beta=0.5).loss
    want.backward()
    tolerance = 1e-6 if weighting == "mean" else 2e-2 / 64  # sqrt_masked: fixed-point normaliser
    torch.testing.assert_close(loss_sum / count, want, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(ours.grad, library.grad, rtol=1e-2 if weighting != "mean" else 1e-5, atol=1e-7)
    assert torch.equal(report["diffusion"].stacked(), sums.stacked().detach())
    assert want > combine(sums).loss  # the CAP term is really in


def test_forward_step_drops_labels_only_with_confidence():
    inputs, logits = _inputs_and_logits(3)
    calls = []

    def model(*args, **kwargs):
        calls.append(kwargs)
        return logits

    for beta in (0.0, 0.5):
        output, loss_func = make_forward_step("mean", beta)(iter([inputs]), model)
        assert ("labels" in calls[-1]) == (beta == 0.0)
        if beta:
            torch.testing.assert_close(loss_func(output)[0], confidence_loss_func(inputs, "mean", beta, logits)[0])
