"""HF -> megatron (TP1, TP2xEP2, PP2 on spawned gloo ranks) -> HF, and logits parity with the
independent reference model."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from convert_helpers import batch, read_hf_folder, run_tool, tiny_config

LAYOUTS = {"tp1": (1, 1, 1, 1), "tp2_ep2": (2, 1, 2, 4), "pp2": (1, 2, 1, 2)}  # tp, pp, ep, world


def _rank_main(rank, world, init_method, layout, hf_dir, root, results):
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_uni.checkpoint import load_checkpoint
    from megatron_uni.config import ParallelConfig
    from megatron_uni.convert.importer import import_hf
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import destroy, init_distributed
    from megatron_uni.platform.launch import LaunchInfo

    tp, pp, ep, _ = LAYOUTS[layout]
    model_cfg = tiny_config().model
    parallel = ParallelConfig(tensor=tp, pipeline=pp, expert=ep)
    init_distributed(parallel, launch=LaunchInfo(rank=rank, world_size=world, local_rank=rank, launcher="single"),
                     init_method=init_method)
    groups = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
              "ep": ps.get_expert_model_parallel_world_size(), "world": torch.distributed.get_world_size()}
    with open(os.path.join(results, f"groups{rank}.json"), "w") as f:
        json.dump(groups, f)
    import_hf(hf_dir, model_cfg, parallel, root, seed=7, progress=False)
    if pp == 1:  # logits of a freshly built model loading what was just written
        model = build_model(model_cfg, parallel)
        load_checkpoint(root, [model], model_config=model_cfg)
        model.eval()
        for name, vocab in (("logits.pt", model_cfg.vocab), ("logits_text.pt", model_cfg.text_vocab)):
            ids, positions, mask = batch(vocab=vocab)
            with torch.no_grad():
                logits = gather_from_tensor_model_parallel_region(model(ids, positions, mask))
            if rank == 0:
                torch.save(logits, os.path.join(results, name))
    destroy()


def _spawn_import(layout, hf_dir, root, results):
    from megatron_uni.platform.distributed import file_rendezvous

    os.makedirs(results, exist_ok=True)
    world = LAYOUTS[layout][3]
    mp.start_processes(_rank_main, args=(world, file_rendezvous(results), layout, hf_dir, root, results), nprocs=world,
                       start_method="spawn", join=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny HF folder, imported at each layout and exported back (bf16, small shards)."""
    from megatron_uni.convert.tiny_hf import write_tiny_hf

    base = tmp_path_factory.mktemp("convert")
    hf_dir = str(base / "hf")
    weights = write_tiny_hf(hf_dir, tiny_config().model, text_only=True, seed=3)
    out = {"base": base, "hf_dir": hf_dir, "weights": weights}
    for layout in LAYOUTS:
        root, results, exported = (str(base / f"{layout}_{kind}") for kind in ("ckpt", "results", "hf"))
        _spawn_import(layout, hf_dir, root, results)
        done = run_tool("export_hf.py", [root, exported, "--no-progress", "--shard-size", "0.0004"])
        assert done.returncode == 0, done.stderr
        out[layout] = {"root": root, "results": results, "hf": exported}
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parallel_groups_match_layout(converted, layout):
    tp, pp, ep, world = LAYOUTS[layout]
    for rank in range(world):
        with open(os.path.join(converted[layout]["results"], f"groups{rank}.json")) as f:
            assert json.load(f) == {"tp": tp, "pp": pp, "ep": ep, "world": world}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hf_megatron_hf_is_byte_identical(converted, layout):
    text = tiny_config().model.text_vocab
    original, exported = converted["weights"], read_hf_folder(converted[layout]["hf"])
    assert set(exported) == set(original)
    for name, tensor in original.items():
        back = exported[name]
        if name in ("model.word_embeddings.weight", "lm_head.weight"):
            assert back.shape[0] == 1280
            back = back[:text]
        assert back.dtype == tensor.dtype, name
        assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.mark.parametrize("layout", ["tp2_ep2", "pp2"])
def test_export_of_other_layouts_equals_export_of_tp1(converted, layout):
    reference, other = read_hf_folder(converted["tp1"]["hf"]), read_hf_folder(converted[layout]["hf"])
    assert set(reference) == set(other)
    for name in reference:
        assert torch.equal(reference[name], other[name]), name
    for shard in sorted(os.listdir(converted["tp1"]["hf"])):
        if shard.endswith(".safetensors"):
            with open(os.path.join(converted["tp1"]["hf"], shard), "rb") as a, \
                    open(os.path.join(converted[layout]["hf"], shard), "rb") as b:
                assert a.read() == b.read(), shard


def test_image_rows_seeded_and_pad_rows_zero(converted):
    m = tiny_config().model
    exported = read_hf_folder(converted["tp1"]["hf"])
    image_end = m.text_vocab + m.num_image_codes
    for name in ("model.word_embeddings.weight", "lm_head.weight"):
        image = exported[name][m.text_vocab:image_end].float()
        assert 0.8 * m.init_method_std < image.std().item() < 1.2 * m.init_method_std, name
        assert torch.count_nonzero(exported[name][image_end:]) == 0, name
    assert not torch.equal(exported["model.word_embeddings.weight"][m.text_vocab:image_end],
                           exported["lm_head.weight"][m.text_vocab:image_end])


def test_export_folder_files(converted):
    folder = converted["tp1"]["hf"]
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    m = tiny_config().model
    assert config["architectures"] == ["LLaDA2MoeModelLM"] and config["model_type"] == "llada2_moe"
    assert config["image_token_offset"] == m.text_vocab and config["vocab_size"] == m.vocab
    assert (config["score_function"], config["router_dtype"]) == ("sigmoid", "fp32")
    assert config["moe_router_enable_expert_bias"] is True and config["norm_topk_prob"] is True
    assert config["tie_word_embeddings"] is False
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(os.path.isfile(os.path.join(folder, s)) for s in shards)
    exported = read_hf_folder(folder)
    bound = int(0.0004 * 2 ** 30)
    for shard in shards:
        sizes = [exported[n].numel() * exported[n].element_size() for n, s in index["weight_map"].items() if s == shard]
        assert sum(sizes) <= bound or len(sizes) == 1, shard
    bias = [n for n in exported if n.endswith("gate.expert_bias")]
    assert bias and all(exported[n].dtype == torch.float32 for n in bias)
    assert all(exported[n].dtype == torch.bfloat16 for n in exported if n not in bias)


@pytest.fixture(scope="module")
def uni_export(converted):
    """The TP1 checkpoint exported in fp32 with a tokenizer and a base Uni folder to carry over."""
    from megatron_uni.convert.exporter import CARRIED_DIRS
    from megatron_uni.data.demo import build_demo_tokenizer

    base_dir = converted["base"]
    tokenizer_dir, base, out = base_dir / "tok", base_dir / "base", base_dir / "uni_fp32"
    tokenizer_dir.mkdir()
    build_demo_tokenizer(["a blue square in the top left"] * 4).save(str(tokenizer_dir / "tokenizer.json"))
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    for sub in CARRIED_DIRS:
        (base / sub).mkdir(parents=True)
        (base / sub / "config.json").write_text(json.dumps({"folder": sub}))
    (base / "modeling_llada2uni_moe.py").write_text("# remote code\n")
    done = run_tool("export_hf.py", [converted["tp1"]["root"], str(out), "--dtype", "float32", "--tokenizer",
                                     str(tokenizer_dir), "--base", str(base), "--no-progress"])
    assert done.returncode == 0, done.stderr
    return {"out": out, "tokenizer": tokenizer_dir, "base": base}


@pytest.mark.parametrize("layout", ["tp1", "tp2_ep2"])
def test_logits_parity_reference_vs_megatron(converted, uni_export, layout):
    """The reference on the exported (fp32) HF folder, every id and column, image rows included."""
    from megatron_uni.convert.hf_io import read_json
    from megatron_uni.convert.hf_reference import LLaDA2Reference

    folder = str(uni_export["out"])
    reference = LLaDA2Reference(read_hf_folder(folder), read_json(os.path.join(folder, "config.json")))
    ids, positions, mask = batch()
    expected = reference(ids, positions, ~mask)
    megatron = torch.load(os.path.join(converted[layout]["results"], "logits.pt"))
    assert megatron.shape == expected.shape
    assert (megatron - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layout", ["tp1", "tp2_ep2"])
def test_logits_parity_on_original_hf_weights(converted, layout):
    """The reference on the HF input weights vs megatron on the imported checkpoint: text ids,
    text columns (the image rows do not exist in the text-only HF model)."""
    from megatron_uni.convert.hf_io import read_json
    from megatron_uni.convert.hf_reference import LLaDA2Reference

    text = tiny_config().model.text_vocab
    reference = LLaDA2Reference(converted["weights"], read_json(os.path.join(converted["hf_dir"], "config.json")))
    ids, positions, mask = batch(vocab=text)
    expected = reference(ids, positions, ~mask)
    megatron = torch.load(os.path.join(converted[layout]["results"], "logits_text.pt"))[..., :text]
    assert (megatron - expected).abs().max().item() <= 1e-5


def test_dry_run_export_lists_and_writes_nothing(converted, tmp_path):
    target = tmp_path / "never"
    done = run_tool("export_hf.py", [converted["tp1"]["root"], str(target), "--dry-run"])
    assert done.returncode == 0, done.stderr
    assert "would write" in done.stdout and "model-00001-of-00001.safetensors" in done.stdout
    assert "warning: no special token ids" in done.stdout  # imported without --tokenizer
    assert not target.exists()


def test_export_carries_tokenizer_and_base_folders(uni_export):
    from megatron_uni.convert.exporter import CARRIED_DIRS
    from megatron_uni.tokens import Vocabulary

    out, tokenizer_dir = uni_export["out"], uni_export["tokenizer"]
    for sub in CARRIED_DIRS:
        assert json.loads((out / sub / "config.json").read_text()) == {"folder": sub}
    assert (out / "modeling_llada2uni_moe.py").read_text() == "# remote code\n"
    assert (out / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()
    assert (out / "tokenizer_config.json").exists()
    vocabulary = Vocabulary.from_tokenizer_dir(str(tokenizer_dir), text_size=1024, num_image_codes=200)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["pad_token_id"] == vocabulary.eos_id == generation["eos_token_id"]
    assert generation["mask_token_id"] == vocabulary.mask_id
