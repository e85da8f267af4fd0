"""The diffusion loss under DP2, TP2 and PP2 (gloo, 2 processes) equals the single-process loss."""

import json
import os

import torch
import torch.multiprocessing as mp

from megatron_uni.platform.distributed import free_port

WORLD = 2


def _worker(rank: int, port: int, out_dir: str) -> None:
    from functools import partial, reduce

    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_uni.checkpoint import load_checkpoint, save_checkpoint
    from megatron_uni.config import DiffusionConfig, ParallelConfig, load_config
    from megatron_uni.diffusion.inputs import build_inputs
    from megatron_uni.diffusion.losses import (add_sums, combine, confidence_entropy, loss_sums, reduce_sums,
                                               schedule_loss)
    from megatron_uni.model.block_attention import block_attention_spec
    from megatron_uni.model.builder import build_model
    from megatron_uni.model.position_rope import use_position_ids_for_rope
    from megatron_uni.platform.distributed import init_distributed, init_model_parallel
    from megatron_uni.platform.launch import LaunchInfo
    from tests.diffusion_helpers import random_batch, tiny_vocab

    torch.set_num_threads(1)
    launch = LaunchInfo(rank=rank, world_size=WORLD, local_rank=rank, launcher="single", master_port=port)
    init_distributed(ParallelConfig(), launch=launch)  # DP2
    cfg = load_config("recipes/model/tiny.yaml").model
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(0), 4, 64, 8, vocab)
    inputs = build_inputs(batch, vocab, DiffusionConfig(weighting="sqrt_masked"), torch.Generator().manual_seed(1),
                          block_size=8)

    def model_for(parallel):
        init_model_parallel(parallel)
        model = build_model(cfg, parallel, core_attention=block_attention_spec())
        use_position_ids_for_rope(model)
        return model

    def rows(sl, x):
        return x[sl]

    def sub_inputs(sl):
        from megatron_uni.diffusion.inputs import DiffusionInputs
        from megatron_uni.diffusion.layout import AttentionLayout
        lay = inputs.layout
        # the normaliser of sqrt weighting is the sum of weights: recompute it per slice
        return DiffusionInputs(inputs.input_ids[sl], inputs.position_ids[sl], inputs.labels[sl],
                               inputs.loss_weights[sl], inputs.modality[sl],
                               AttentionLayout(lay.doc[sl], lay.block[sl], lay.clean[sl]),
                               inputs.loss_weights[sl].sum())

    def per_token_ce(model, x):
        return model(x.input_ids, x.position_ids, x.attention_mask, labels=x.model_labels)

    results = {}
    # reference: the full batch on one rank's full model (TP1), weights shared through a checkpoint
    model = model_for(ParallelConfig())
    save_checkpoint(os.path.join(out_dir, "ckpt"), 1, [model], cfg, vocab.layout(), ParallelConfig())
    load_checkpoint(os.path.join(out_dir, "ckpt"), [model])
    with torch.no_grad():
        reference = combine(loss_sums(per_token_ce(model, inputs), inputs)).loss.item()
        logits = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        cap_reference = confidence_entropy(logits, inputs.labels)[0]
    results["reference"] = reference

    # DP2: each rank two samples as two micro-batches of one, sums all-reduced over DP
    with torch.no_grad():
        local = None
        for i in (2 * rank, 2 * rank + 1):
            part = sub_inputs(slice(i, i + 1))
            sums = loss_sums(per_token_ce(model, part), part)
            local = sums if local is None else add_sums(local, sums)
        results["dp2"] = combine(reduce_sums([local], parallel_state.get_data_parallel_group())).loss.item()

    # TP2 + sequence parallel: heads and vocabulary split; vocab-parallel CE; CAP over vocab shards
    model = model_for(ParallelConfig(tensor=2, sequence_parallel=True))
    load_checkpoint(os.path.join(out_dir, "ckpt"), [model])
    with torch.no_grad():
        results["tp2"] = combine(loss_sums(per_token_ce(model, inputs), inputs)).loss.item()
        shard = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask)
        start = parallel_state.get_tensor_model_parallel_rank() * shard.shape[-1]
        cap = confidence_entropy(shard, inputs.labels, start, parallel_state.get_tensor_model_parallel_group())[0]
        results["tp2_cap_max_error"] = (cap - cap_reference).abs().max().item()

    # PP2: megatron's pipeline schedule, loss only on the last stage, 4 micro-batches of one
    model = model_for(ParallelConfig(pipeline=2))
    load_checkpoint(os.path.join(out_dir, "ckpt"), [model])

    def loss_func(part, output):
        return schedule_loss(loss_sums(output, part), "sqrt_masked")

    def forward_step(data_iterator, chunk):
        part = next(data_iterator)
        return per_token_ce(chunk, part), partial(loss_func, part)

    micro = iter([sub_inputs(slice(i, i + 1)) for i in range(4)])
    model.config.calculate_per_token_loss = True
    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=micro, model=[model], num_microbatches=4,
        seq_length=inputs.input_ids.shape[1], micro_batch_size=1, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        total = reduce(add_sums, [s["diffusion"] for s in stats])
        results["pp2"] = combine(total).loss.item()
        results["pp2_stage_count"] = len(stats)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    torch.distributed.destroy_process_group()


def test_loss_under_dp2_tp2_pp2_equals_single_process(tmp_path):
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn")
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
