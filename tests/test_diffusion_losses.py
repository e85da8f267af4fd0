"""Loss sums, global normalisation, text/image split, CAP term, mask-embedding noise."""

import torch
import torch.nn.functional as F

from megatron_uni.config import DiffusionConfig
from megatron_uni.data.batch import IGNORE_INDEX
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.losses import LossSums, add_sums, combine, confidence_entropy, loss_sums, reduce_sums
from megatron_uni.model.embedding_noise import mask_embedding_noise_hook
from diffusion_helpers import random_batch, tiny_vocab


def _inputs(seed, weighting="mean"):
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(seed), 2, 64, 8, vocab)
    cfg = DiffusionConfig(t_min=0.3, t_max=0.8, weighting=weighting)
    return build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(seed), block_size=8)


def test_mean_loss_and_modality_split():
    inputs = _inputs(0)
    ce = torch.rand(inputs.loss_weights.shape, generator=torch.Generator().manual_seed(1))
    out = combine(loss_sums(ce, inputs))
    supervised = inputs.labels != IGNORE_INDEX
    torch.testing.assert_close(out.loss, ce[supervised].mean())
    text = supervised & (inputs.modality == 0)
    image = supervised & (inputs.modality == 1)
    assert text.any() and image.any()
    torch.testing.assert_close(out.text_loss, ce[text].mean())
    torch.testing.assert_close(out.image_loss, ce[image].mean())


def test_global_normalisation_is_not_a_mean_of_means():
    a, b = _inputs(2), _inputs(3)
    gen = torch.Generator().manual_seed(4)
    ce_a, ce_b = torch.rand(a.loss_weights.shape, generator=gen), torch.rand(b.loss_weights.shape, generator=gen)
    total = combine(add_sums(loss_sums(ce_a, a), loss_sums(ce_b, b))).loss
    all_ce = torch.cat([ce_a[a.labels != IGNORE_INDEX], ce_b[b.labels != IGNORE_INDEX]])
    torch.testing.assert_close(total, all_ce.mean())
    mean_of_means = (ce_a[a.labels != IGNORE_INDEX].mean() + ce_b[b.labels != IGNORE_INDEX].mean()) / 2
    assert (total - mean_of_means).abs() > 1e-4
    # no process group: reduce_sums of one micro-batch is the identity
    torch.testing.assert_close(reduce_sums([loss_sums(ce_a, a)]).stacked(), loss_sums(ce_a, a).stacked())


def test_sqrt_weighted_loss_value():
    inputs = _inputs(5, "sqrt_masked")
    ce = torch.rand(inputs.loss_weights.shape, generator=torch.Generator().manual_seed(6))
    sums = loss_sums(ce, inputs)
    torch.testing.assert_close(sums.loss, (ce * inputs.loss_weights).sum())
    torch.testing.assert_close(combine(sums).loss, sums.loss / inputs.normalizer)


def test_confidence_entropy_only_where_argmax_is_the_label():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 5, 11, generator=gen)
    labels = logits.argmax(-1)
    labels[0, 1] = (labels[0, 1] + 1) % 11     # wrong prediction: excluded
    labels[1, 2] = IGNORE_INDEX                 # ignored: excluded
    entropy, counted = confidence_entropy(logits, labels)
    expected = -(F.softmax(logits, -1) * F.log_softmax(logits, -1)).sum(-1)
    want = torch.ones(2, 5, dtype=torch.bool)
    want[0, 1] = want[1, 2] = False
    assert torch.equal(counted, want)
    torch.testing.assert_close(entropy[want], expected[want])
    assert (entropy[~want] == 0).all()
    # the same logits as the shard holding vocabulary rows 100..110: labels are global ids, so an
    # ignored vocab_start would count no label (the multi-shard case runs in test_diffusion_parallel)
    global_labels = torch.where(labels == IGNORE_INDEX, labels, labels + 100)
    sharded, sharded_counted = confidence_entropy(logits, global_labels, vocab_start=100, tp_group=None)
    assert torch.equal(sharded_counted, want)
    torch.testing.assert_close(sharded, entropy)


def test_confidence_term_enters_the_loss():
    sums = LossSums(*[torch.tensor(v) for v in (6.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 2.0)])
    out = combine(sums, confidence_beta=2.0)
    assert out.loss.item() == 2.0 + 2.0 * 2.0


def test_mask_embedding_noise_hook_adds_noise_to_mask_tokens_only_while_active():
    vocab = tiny_vocab()
    embedding = torch.nn.Embedding(vocab.size, 4)

    class Wrapper(torch.nn.Module):  # megatron's embedding returns [s, b, h]
        def forward(self, input_ids, position_ids=None):
            return embedding(input_ids).transpose(0, 1)

    module = Wrapper()
    step = [0]
    module.register_forward_hook(mask_embedding_noise_hook(vocab.mask_id, 0.5, 2, lambda: step[0]), with_kwargs=True)
    ids = torch.tensor([[1, vocab.mask_id, 3, vocab.mask_id]])
    clean = embedding(ids).transpose(0, 1)
    noisy = module(ids)
    diff = (noisy - clean).abs().sum(-1)[:, 0]
    assert (diff[[0, 2]] == 0).all() and (diff[[1, 3]] > 0).all()
    step[0] = 2
    torch.testing.assert_close(module(input_ids=ids), clean)


def test_schedule_loss_counts_are_integers_and_the_ratio_is_kept():
    from megatron_uni.diffusion.losses import schedule_loss

    for weighting, tolerance in (("mean", 0.0), ("elbo", 0.0), ("sqrt_masked", 1e-3)):
        inputs = _inputs(8, weighting)
        ce = torch.rand(inputs.loss_weights.shape, generator=torch.Generator().manual_seed(9))
        sums = loss_sums(ce, inputs)
        loss, count, report = schedule_loss(sums, weighting)
        assert count.dtype == torch.int32
        ratio = (loss / count).item()
        assert abs(ratio - combine(sums).loss.item()) <= tolerance * ratio + 1e-7
        torch.testing.assert_close(report["diffusion"].stacked(), sums.stacked())


def test_reduce_sums_adds_micro_batches_and_a_copy_holder_adds_nothing():
    a, b = _inputs(2), _inputs(3)
    ce_a, ce_b = torch.rand(a.labels.shape), torch.rand(b.labels.shape)
    sums = [loss_sums(ce_a, a), loss_sums(ce_b, b)]
    torch.testing.assert_close(reduce_sums(sums).stacked(), add_sums(*sums).stacked())
    assert not reduce_sums(sums, contributes=False).stacked().any()
    report = combine(reduce_sums(sums))
    assert report.loss.item() == report.diffusion_loss.item() > 0   # no CAP term without confidence_beta


def test_every_weighting_has_a_fixed_point_factor():
    import typing

    from megatron_uni.config import Weighting
    from megatron_uni.diffusion.losses import NORMALIZER_FIXED_POINT

    assert set(NORMALIZER_FIXED_POINT) == set(typing.get_args(Weighting))
