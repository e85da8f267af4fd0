"""Samples during training (``eval.sample_interval``, training/samples.py) on the demo data.

- the samples file appears at exactly the multiples of the interval, beside metrics.jsonl, and
  holds the prompts, a text continuation and a well-formed image grid in the decoder format;
- drawing samples leaves the run unchanged: same losses as a run without samples;
- ``sampling_mode`` restores every RNG state and each module's train/eval mode;
- a layout that splits the model skips with a note.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.timeout(600)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = (4, 4)


def _train(demo, save, *extra):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    args = ["train", "recipes/demo/tiny_cpu.yaml", f"data.path={demo.dataset}",
            f"data.tokenizer={demo.root / 'tokenizer'}", f"checkpoint.save={save}", "schedule.train_iters=4",
            "schedule.warmup_iters=1", "checkpoint.save_interval=0", "data.seq_length=128", *extra]
    proc = subprocess.run([sys.executable, "-m", "megatron_uni.cli", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout


def _trajectory(run_dir):
    """Full-precision loss and grad norm per step from metrics.jsonl (the console rounds)."""
    return {r["iteration"]: (r["loss"], r["grad_norm"]) for r in _read(run_dir / "metrics.jsonl")}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_samples_written_every_interval_without_changing_the_run(demo, tmp_path):
    _train(demo, str(tmp_path / "plain" / "ckpt"))
    out = _train(demo, str(tmp_path / "sampled" / "ckpt"), "eval.sample_interval=2",
                 f"eval.sample_image_grid=[{GRID[0]}, {GRID[1]}]")
    run_dir = tmp_path / "sampled"
    plain, sampled = _trajectory(tmp_path / "plain"), _trajectory(run_dir)
    assert sorted(plain) == [1, 2, 3, 4] and sampled == plain, (sampled, plain)
    assert sorted(os.listdir(run_dir / "samples")) == ["iter_0000002.jsonl", "iter_0000004.jsonl"]
    assert "samples: 2 written to" in out
    assert not (tmp_path / "plain" / "samples").exists()

    vocab = demo.vocab
    from megatron_uni.config import EvalConfig

    defaults = EvalConfig()
    text, image = _read(run_dir / "samples" / "iter_0000004.jsonl")
    assert text["iteration"] == 4 and text["task"] == "text" and text["prompt"] == defaults.sample_prompts[0]
    assert 1 <= len(text["tokens"]) <= defaults.sample_length and isinstance(text["text"], str)
    assert all(0 <= t < vocab.size and t != vocab.mask_id for t in text["tokens"])

    assert image["iteration"] == 4 and image["task"] == "image"
    assert image["prompt"] == defaults.sample_image_prompts[0]
    tokens = image["tokens"]
    header = [vocab.special("image_start"), vocab.size_token(GRID[0]), vocab.size_token(GRID[1]),
              vocab.special("boi")]
    assert tokens[:4] == header and tokens[-1] == vocab.special("image_end")
    codes = tokens[4:-1]
    assert len(codes) == GRID[0] * GRID[1]
    assert all(vocab.image_offset <= t < vocab.image_offset + vocab.num_image_codes for t in codes)
    # the decoder hand-off fields, readable by convert/image_tokens as well
    assert (image["h"], image["w"], image["index"]) == (*GRID, 0)
    assert image["token_ids"] == [t - vocab.image_offset for t in codes]
    from megatron_uni.convert.image_tokens import images_of_record

    assert images_of_record(image, vocab, "sample")[0]["token_ids"] == image["token_ids"]


def test_sampling_mode_restores_rng_and_module_modes(single_process):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from megatron_uni.training.samples import sampling_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a module deliberately in eval mode stays so
    tracker = {name: state.clone() for name, state in get_cuda_rng_tracker().get_states().items()}
    torch.manual_seed(0)
    before_rng = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before_rng)
    with sampling_mode(model):
        assert not model.training and not model[1].training and not torch.is_grad_enabled()
        torch.rand(100)
        with get_cuda_rng_tracker().fork():
            torch.rand(100)
    assert torch.equal(torch.rand(3), expected)
    assert model.training and model[1].training and not model[0].training
    after = get_cuda_rng_tracker().get_states()
    assert after.keys() == tracker.keys() and all(torch.equal(after[k], tracker[k]) for k in tracker)


def test_split_layouts_skip_with_a_reason():
    from megatron_uni.config import ParallelConfig
    from megatron_uni.training.samples import unsupported_layout

    assert unsupported_layout(ParallelConfig()) is None
    assert unsupported_layout(ParallelConfig(tensor=1, expert=1)) is None
    assert "parallel.tensor=2" in unsupported_layout(ParallelConfig(tensor=2))
    reason = unsupported_layout(ParallelConfig(pipeline=2, virtual_pipeline=2))
    assert "parallel.pipeline=2" in reason and "parallel.virtual_pipeline=2" in reason


@pytest.mark.parametrize("override, message", [
    ("eval.sample_interval=-1", "eval.sample_interval=-1 must be >= 0"),
    ("eval.sample_image_grid=[4]", "eval.sample_image_grid=[4] must be [H, W]"),
    ("eval.sample_prompts=hello", "eval.sample_prompts: expected a list"),
])
def test_bad_eval_keys_name_the_key(override, message):
    from megatron_uni.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("recipes/model/tiny.yaml", [override])


def test_write_samples_skips_with_one_note(demo, tmp_path, monkeypatch):
    """Off-interval steps write nothing; a split layout and a prompt the sampler refuses are
    logged once each and leave the run going (no file, no exception)."""
    import types

    from megatron_uni.config import load_config
    from megatron_uni.inference.generate import GenerationError
    from megatron_uni.training import samples

    def state(iteration, *overrides):
        cfg = load_config("recipes/model/tiny.yaml", ["eval.sample_interval=2", f"logging.run_dir={tmp_path}",
                                                      f"data.tokenizer={demo.root / 'tokenizer'}", *overrides])
        return types.SimpleNamespace(cfg=cfg, iteration=iteration, model=[None])

    lines = []
    assert samples.write_samples(state(3), lines.append) is None and lines == []
    for iteration in (2, 4):
        assert samples.write_samples(state(iteration, "parallel.pipeline=2"), lines.append) is None

    def refuse(*args):
        raise GenerationError("no size token <|reserved_token_99|>")

    monkeypatch.setattr(samples, "sample_records", refuse)
    for iteration in (2, 4):
        assert samples.write_samples(state(iteration), lines.append) is None
    assert len(lines) == 2 and "parallel.pipeline=2" in lines[0] and "reserved_token_99" in lines[1], lines
    assert not (tmp_path / "samples").exists()
