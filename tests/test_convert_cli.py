"""tools/convert_hf_to_megatron.py as a user runs it: the documented TP x EP layout resolves, a
real 2-rank TP2 import under torchrun round-trips, the target is refused in one line before
anything is built, and the import builds its model without random initialisation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from convert_helpers import REPO, TINY_OVERRIDES, read_hf_folder, run_tool, tiny_config

TINY = ["--recipe", os.path.join("recipes", "model", "tiny.yaml"), "--no-progress", "--override", *TINY_OVERRIDES]


def _tool():
    spec = importlib.util.spec_from_file_location("convert_hf_to_megatron",
                                                  os.path.join(REPO, "tools", "convert_hf_to_megatron.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_uni.convert.tiny_hf import write_tiny_hf

    folder = str(tmp_path_factory.mktemp("cli") / "hf")
    write_tiny_hf(folder, tiny_config().model, text_only=True, seed=5, shards=2)
    return folder


def _published(root):
    """A root whose ``latest`` names a complete iteration 0 (only the files the check looks at)."""
    os.makedirs(os.path.join(root, "iter_0000000"))
    with open(os.path.join(root, "iter_0000000", "metadata.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("iter_0000000\n")


def _one_line_refusal(done, *fragments):
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("convert_hf_to_megatron: error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]


def test_documented_tp2_ep4_command_resolves_for_the_16b_recipe():
    from megatron_uni.config import ConfigError

    tool = _tool()
    args = tool.parse_args(["HF", "OUT", "--recipe", os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml"),
                            "--tp", "2", "--ep", "4"])
    cfg = tool.resolve_config(args)
    p = cfg.parallel
    assert (p.tensor, p.expert, p.expert_tensor, p.sequence_parallel) == (2, 4, 1, True)
    tool.check_layout(cfg, 8)  # torchrun --nproc-per-node 8, as docs/conversion.md launches it
    assert tool.resolve_config(tool.parse_args(["HF", "OUT", "--recipe", args.recipe])).parallel.sequence_parallel \
        is False  # TP1 stays as the recipe says
    forced_off = tool.parse_args(["HF", "OUT", "--recipe", args.recipe, "--tp", "2", "--ep", "4",
                                  "--override", "parallel.sequence_parallel=false"])
    with pytest.raises(ConfigError, match="sequence_parallel must be true"):
        tool.resolve_config(forced_off)  # an explicit override wins over the default


def test_tp2_import_under_torchrun_round_trips(hf_dir, tmp_path):
    root, exported = str(tmp_path / "ckpt"), str(tmp_path / "hf_back")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           os.path.join(REPO, "tools", "convert_hf_to_megatron.py"), hf_dir, root, "--tp", "2", *TINY],
                          capture_output=True, text=True, env=env, timeout=400, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(root, "iter_0000000", "metadata.json")) as f:
        parallel = json.load(f)["parallel"]
    assert (parallel["tensor"], parallel["expert_tensor"], parallel["sequence_parallel"]) == (2, 2, True)
    done = run_tool("export_hf.py", [root, exported, "--no-progress"])
    assert done.returncode == 0, done.stderr[-2000:]
    original, back = read_hf_folder(hf_dir), read_hf_folder(exported)
    assert set(back) == set(original)
    text = tiny_config().model.text_vocab
    for name, tensor in original.items():
        again = back[name][:text] if name in ("model.word_embeddings.weight", "lm_head.weight") else back[name]
        assert torch.equal(again.view(torch.uint8), tensor.view(torch.uint8)), name


def test_published_target_is_refused_before_the_hf_folder_is_read(tmp_path):
    root = str(tmp_path / "ckpt")
    _published(root)
    done = run_tool("convert_hf_to_megatron.py", [str(tmp_path / "no_such_hf"), root, *TINY])
    _one_line_refusal(done, "iter_0000000 already holds a published checkpoint")


def test_target_under_a_file_is_one_line_not_a_traceback(hf_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    done = run_tool("convert_hf_to_megatron.py", [hf_dir, str(blocker / "ckpt"), *TINY])
    _one_line_refusal(done, str(blocker), "is not a folder")


def test_unpublished_iteration_is_no_obstacle(tmp_path):
    from megatron_uni.convert.importer import check_target

    root = str(tmp_path / "ckpt")
    _published(root)
    check_target(root, 1)  # iteration 1 is newer than 'latest': the save may (re)do it
    os.remove(os.path.join(root, "latest"))
    check_target(root, 0)  # a complete iter_0 that 'latest' never named was killed before publishing


def test_import_builds_without_random_initialisation(hf_dir, tmp_path, monkeypatch, single_process):
    from megatron_uni.config import ParallelConfig
    from megatron_uni.convert.importer import import_hf
    from megatron_uni.model import builder

    draws, built = [], []
    normal = torch.nn.init.normal_
    monkeypatch.setattr(torch.nn.init, "normal_", lambda tensor, *a, **k: draws.append(tensor.shape) or
                        normal(tensor, *a, **k))
    build = builder.build_model_chunks
    monkeypatch.setattr(builder, "build_model_chunks", lambda *a, **k: built.extend(build(*a, **k)) or built)
    model_cfg = tiny_config().model
    builder.build_model(model_cfg)
    assert draws, "control: a default build draws its weights through torch.nn.init.normal_"
    draws.clear()
    import_hf(hf_dir, model_cfg, ParallelConfig(), str(tmp_path / "ckpt"), progress=False)
    assert draws == []
    assert built and all(chunk.config.perform_initialization is False for chunk in built)
