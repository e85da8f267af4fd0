"""Our megatron model (torch_dist checkpoint, one CPU process) as a sampler runner, with and
without the prefix KV cache: the same greedy tokens as the reference model on the HF folder it
was imported from; the generate CLI and its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from inference_helpers import PARITY_OVERRIDES, REPO, demo_vocabulary, one_thread, tiny_model_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def _tool(script, args):
    # a one-process job binds no port (platform.distributed uses an in-memory store)
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", script), *args], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny HF folder (text + image rows, with its tokenizer) and its megatron import."""
    from megatron_uni.convert.tiny_hf import write_tiny_hf

    base = tmp_path_factory.mktemp("megatron_generate")
    hf_dir, ckpt = base / "hf", str(base / "ckpt")
    write_tiny_hf(str(hf_dir), tiny_model_config(PARITY_OVERRIDES), text_only=False, seed=5)
    vocab = demo_vocabulary(str(hf_dir))
    _tool("convert_hf_to_megatron.py", [str(hf_dir), ckpt, "--recipe", os.path.join(REPO, "recipes/model/tiny.yaml"),
                                        "--override", *PARITY_OVERRIDES, "--tokenizer", str(hf_dir), "--no-progress"])
    return {"base": base, "hf": str(hf_dir), "ckpt": ckpt, "vocab": vocab}


def _reference_tokens(exported, request, settings):
    from megatron_uni.inference import generate
    from megatron_uni.inference.loading import hf_runner

    return generate(hf_runner(exported["hf"]), exported["vocab"], request, settings).tokens


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_megatron_text_generation_equals_reference(exported):
    from megatron_uni.inference import SamplerSettings
    from megatron_uni.inference.prompts import text_request

    out = str(exported["base"] / "text.jsonl")
    _tool("generate.py", [exported["ckpt"], "--tokenizer", exported["hf"], "--block-size", "8", "--steps", "8",
                          "--output", out, "text", "--prompt", "a blue square in the", "--length", "20"])
    record, = _records(out)
    request = text_request(exported["vocab"], "a blue square in the", 20)
    expected = _reference_tokens(exported, request, SamplerSettings(block_size=8, steps=8))
    assert record["tokens"] == expected and record["task"] == "text"
    assert record["stats"]["generated"] == len(expected)


@pytest.mark.parametrize("cache", ["cached", "uncached"])
def test_megatron_image_generation_with_cfg_equals_reference_and_exports_grid(exported, cache):
    from megatron_uni.inference import SamplerSettings
    from megatron_uni.inference.prompts import text_to_image_request

    out, images = str(exported["base"] / f"image_{cache}.jsonl"), str(exported["base"] / f"grids_{cache}.jsonl")
    _tool("generate.py", [exported["ckpt"], "--tokenizer", exported["hf"], "--block-size", "4", "--steps", "2",
                          "--output", out, "--images", images] + (["--no-cache"] if cache == "uncached" else []) +
          ["image", "--prompt", "a red circle", "--grid", "3x4", "--cfg-scale", "2.0"])
    record, = _records(out)
    assert record["stats"]["model_forwards"] > record["stats"]["refinement_forwards"] or cache == "uncached"
    request = text_to_image_request(exported["vocab"], "a red circle", 3, 4, cfg_scale=2.0)
    expected = _reference_tokens(exported, request, SamplerSettings(block_size=4, steps=2))
    assert record["tokens"][4:] == expected
    grid, = _records(images)
    assert (grid["h"], grid["w"]) == (3, 4)
    assert grid["token_ids"] == [exported["vocab"].image_code(t) for t in expected[:-1]]
