"""The diffusion loss under DP2, TP2 and PP2 (gloo, 2 processes) equals the single-process loss."""

import json
import os
from functools import partial, reduce

import torch
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_uni.attention.layout import AttentionLayout
from megatron_uni.checkpoint import load_checkpoint, save_checkpoint
from megatron_uni.config import DiffusionConfig, ParallelConfig, load_config
from megatron_uni.diffusion.inputs import DiffusionInputs, build_inputs
from megatron_uni.diffusion.losses import add_sums, combine, confidence_entropy, loss_sums, reduce_sums, schedule_loss
from megatron_uni.model.block_attention import block_attention_spec
from megatron_uni.model.builder import build_model
from megatron_uni.platform.distributed import destroy, file_rendezvous, init_distributed, init_model_parallel
from megatron_uni.platform.launch import LaunchInfo

from diffusion_helpers import random_batch, tiny_vocab

WORLD = 2
SAMPLES = 4


def _batch_inputs():
    """Four samples, sqrt_masked weighting (its normaliser is not a token count: the hard case)."""
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(0), SAMPLES, 64, 8, vocab)
    inputs = build_inputs(batch, vocab, DiffusionConfig(weighting="sqrt_masked"), torch.Generator().manual_seed(1),
                          block_size=8)
    return inputs, vocab


def _sample(inputs: DiffusionInputs, index: int) -> DiffusionInputs:
    """Sample ``index`` as its own micro-batch; the sqrt normaliser is the sum of its weights."""
    rows = slice(index, index + 1)
    layout = inputs.layout
    return DiffusionInputs(inputs.input_ids[rows], inputs.position_ids[rows], inputs.labels[rows],
                           inputs.loss_weights[rows], inputs.modality[rows],
                           AttentionLayout(layout.doc[rows], layout.block[rows], layout.clean[rows]),
                           inputs.loss_weights[rows].sum())


def _model(cfg, parallel: ParallelConfig, checkpoint=None):
    """The block-attention model under ``parallel``, with the shared weights when ``checkpoint``."""
    init_model_parallel(parallel)
    model = build_model(cfg, parallel, core_attention=block_attention_spec())
    if checkpoint:
        load_checkpoint(checkpoint, [model])
    return model


def _per_token_ce(model, x: DiffusionInputs) -> torch.Tensor:
    return model(x.input_ids, x.position_ids, x.attention_mask, labels=x.model_labels)


def _reference(model, inputs):
    """The full batch on one rank's full model: the loss and the CAP entropies to compare with."""
    with torch.no_grad():
        loss = combine(loss_sums(_per_token_ce(model, inputs), inputs)).loss.item()
        logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        cap = confidence_entropy(logits, inputs.labels)[0]
    return {"reference": loss}, cap


def _data_parallel(model, inputs, rank: int):
    """DP2: each rank two samples as two micro-batches of one, sums all-reduced over DP."""
    with torch.no_grad():
        local = None
        for index in (2 * rank, 2 * rank + 1):
            part = _sample(inputs, index)
            sums = loss_sums(_per_token_ce(model, part), part)
            local = sums if local is None else add_sums(local, sums)
    return {"dp2": combine(reduce_sums([local], parallel_state.get_data_parallel_group())).loss.item()}


def _tensor_parallel(model, inputs, cap_reference):
    """TP2 + sequence parallel: heads and vocabulary split; vocab-parallel CE; CAP over vocab shards."""
    with torch.no_grad():
        loss = combine(loss_sums(_per_token_ce(model, inputs), inputs)).loss.item()
        shard = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        start = parallel_state.get_tensor_model_parallel_rank() * shard.shape[-1]
        cap = confidence_entropy(shard, inputs.labels, start, parallel_state.get_tensor_model_parallel_group())[0]
    return {"tp2": loss, "tp2_cap_max_error": (cap - cap_reference).abs().max().item()}


def _pipeline_parallel(model, inputs):
    """PP2: megatron's pipeline schedule, loss only on the last stage, 4 micro-batches of one."""
    def loss_func(part, output):
        return schedule_loss(loss_sums(output, part), "sqrt_masked")

    def forward_step(data_iterator, chunk):
        part = next(data_iterator)
        return _per_token_ce(chunk, part), partial(loss_func, part)

    model.config.calculate_per_token_loss = True
    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([_sample(inputs, i) for i in range(SAMPLES)]),
        model=[model], num_microbatches=SAMPLES, seq_length=inputs.input_ids.shape[1], micro_batch_size=1,
        forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return {}
    total = reduce(add_sums, [s["diffusion"] for s in stats])
    return {"pp2": combine(total).loss.item(), "pp2_stage_count": len(stats)}


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    launch = LaunchInfo(rank=rank, world_size=WORLD, local_rank=rank, launcher="single")
    init_distributed(ParallelConfig(), launch=launch, init_method=init_method)  # DP2
    cfg = load_config("recipes/model/tiny.yaml").model
    inputs, vocab = _batch_inputs()
    # weights shared through a checkpoint written from the reference model
    checkpoint = os.path.join(out_dir, "ckpt")
    model = _model(cfg, ParallelConfig())
    save_checkpoint(checkpoint, 1, [model], cfg, vocab.layout(), ParallelConfig())
    load_checkpoint(checkpoint, [model])
    results, cap_reference = _reference(model, inputs)
    results.update(_data_parallel(model, inputs, rank))
    results.update(_tensor_parallel(_model(cfg, ParallelConfig(tensor=2, sequence_parallel=True), checkpoint),
                                    inputs, cap_reference))
    results.update(_pipeline_parallel(_model(cfg, ParallelConfig(pipeline=2), checkpoint), inputs))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    destroy()


def test_loss_under_dp2_tp2_pp2_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(file_rendezvous(str(tmp_path)), str(tmp_path)), nprocs=WORLD,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    reference = ranks[0]["reference"]
    assert ranks[1]["reference"] == reference
    for result in ranks:
        assert abs(result["dp2"] - reference) < 1e-5, result
        assert abs(result["tp2"] - reference) < 1e-4, result
        assert result["tp2_cap_max_error"] < 1e-4, result
    last = ranks[1]
    assert last["pp2_stage_count"] == 4 and "pp2" not in ranks[0]
    assert abs(last["pp2"] - reference) < 1e-5, last
