"""tools/scaling_model.py against what can be counted on CPU.

- the all-to-all bytes of one EP2 training micro-batch (2 gloo ranks, tiny model, every
  ``all_to_all_single`` call counted) equal the model's prediction, for the full layout and for
  the shared-clean layout (which sends 25% less);
- the attention tile count equals the tiles our own layout code leaves unmasked;
- the parameter arithmetic gives the published 16.32B total / 1.50B active.
"""

import json
import os
import runpy

import pytest
import torch
import torch.multiprocessing as mp

from megatron_uni.attention.masks import dense_mask
from megatron_uni.config import DiffusionConfig, ParallelConfig, load_config
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.layout import full_layout, shared_clean_layout
from diffusion_helpers import random_batch, tiny_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALING = runpy.run_path(os.path.join(REPO, "tools", "scaling_model.py"), run_name="scaling_model")
SAMPLES, LENGTH, BLOCK = 2, 32, 8


def _inputs(rank: int, shared: bool):
    vocab = tiny_vocab()
    batch = random_batch(torch.Generator().manual_seed(rank), SAMPLES, LENGTH, BLOCK, vocab)
    cfg = DiffusionConfig(complementary=True, shared_clean=shared)
    return build_inputs(batch, vocab, cfg, torch.Generator().manual_seed(10 + rank), block_size=BLOCK)


def _count_all_to_all():
    """Wrap ``torch.distributed.all_to_all_single`` (megatron calls it through the module) with a byte counter."""
    counted = {"bytes": 0, "calls": 0}
    original = torch.distributed.all_to_all_single

    def counting(output, input, *args, **kwargs):
        counted["bytes"] += input.numel() * input.element_size()
        counted["calls"] += 1
        return original(output, input, *args, **kwargs)

    torch.distributed.all_to_all_single = counting
    return counted


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    from megatron_uni.diffusion.losses import combine, loss_sums
    from megatron_uni.model.block_attention import block_attention_spec
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import destroy, init_distributed
    from megatron_uni.platform.launch import LaunchInfo

    torch.set_num_threads(1)
    parallel = ParallelConfig(expert=2)
    init_distributed(parallel, launch=LaunchInfo(rank=rank, world_size=2, local_rank=rank, launcher="single"),
                     init_method=init_method)
    model = build_model(load_config("recipes/model/tiny.yaml").model, parallel, core_attention=block_attention_spec())
    counted = _count_all_to_all()
    results = {}
    for shared in (False, True):
        inputs = _inputs(rank, shared)
        before = dict(counted)
        ce = model(inputs.input_ids, inputs.position_ids, inputs.attention_mask, labels=inputs.model_labels)
        combine(loss_sums(ce, inputs)).loss.backward()
        results["shared" if shared else "pairs"] = {"tokens": inputs.num_tokens,
                                                    "bytes": counted["bytes"] - before["bytes"],
                                                    "calls": counted["calls"] - before["calls"]}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    destroy()


def test_all_to_all_bytes_of_an_ep2_step_equal_the_prediction(tmp_path):
    from megatron_uni.platform.distributed import file_rendezvous

    mp.start_processes(_worker, args=(file_rendezvous(str(tmp_path)), str(tmp_path)), nprocs=2, start_method="spawn")
    m = load_config("recipes/model/tiny.yaml").model
    moe_layers = m.num_layers - m.first_k_dense
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for name in ("pairs", "shared"):
        # a rank's combine sends back what its experts received: exact for the EP group's sum
        counted = sum(result[name]["bytes"] for result in ranks)
        predicted = sum(SCALING["all_to_all_bytes"](result[name]["tokens"], m.hidden_size, m.moe_router_topk,
                                                    moe_layers, act_bytes=4, prob_bytes=4) for result in ranks)
        assert counted == predicted, (name, ranks, predicted)
        # tokens, probabilities, combine; forward and backward
        assert all(result[name]["calls"] == moe_layers * 6 for result in ranks)
    # the shared-clean row sends a quarter less: 3L per sample instead of 4L
    pairs, shared = (sum(result[name]["bytes"] for result in ranks) for name in ("pairs", "shared"))
    assert shared * 4 == pairs * 3


@pytest.mark.parametrize("layout_name", ["full", "shared_clean"])
def test_attended_tiles_equal_the_layout_code(layout_name):
    tile, length = 16, 128  # small tiles keep the dense mask small; block 8 <= tile as in the model
    build = shared_clean_layout if layout_name == "shared_clean" else full_layout
    layout = build(torch.zeros(1, length, dtype=torch.int32), 8)
    allowed = ~dense_mask(layout)[0, 0]
    s = allowed.shape[0] // tile
    tiles = allowed.view(s, tile, s, tile).any(dim=3).any(dim=1)
    assert int(tiles.sum()) == SCALING["attended_tiles"](length, layout_name, tile=tile)


def test_parameter_arithmetic_gives_the_published_counts():
    m = SCALING["load_model"]()
    total = sum(SCALING["params_split"](m).values())
    active = SCALING["matmul_params_per_position"](m) + m.hidden_size * m.vocab  # + input embedding
    assert round(total / 1e9, 2) == 16.32 and round(active / 1e9, 2) == 1.50
    stage = SCALING["STAGES"]["sft8k"]
    assert SCALING["positions_per_sample"](stage) == 3 * 8192  # shared clean: 3L per complementary pair
