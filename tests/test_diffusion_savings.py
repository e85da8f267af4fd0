"""Prefix-aware token saving on shaped samples, and the tools' command lines."""

import subprocess
import sys

import torch

from megatron_uni.config import DiffusionConfig
from megatron_uni.diffusion.savings import SHAPES, SampleShape, measure, shaped_sample
from megatron_uni.tokens import Vocabulary

VOCAB = Vocabulary.synthetic(text_size=1024, num_image_codes=4096)


def test_shaped_sample_has_a_clean_prefix_then_a_maskable_target():
    gen = torch.Generator().manual_seed(0)
    batch = shaped_sample(SampleShape("x", (40, 40), (100, 100), (30, 30)), 32, VOCAB, gen)
    assert batch.tokens.shape == (1, 192)          # 170 tokens padded to 6 blocks
    assert not batch.maskable[0, :140].any() and batch.maskable[0, 140:].all()
    assert (batch.modality[0, :100] == 1).all() and (batch.tokens[0, 170:] == VOCAB.pad_id).all()


def test_saving_is_between_nothing_and_half():
    cfg = DiffusionConfig()
    understanding = measure(SHAPES["understanding"], 5, cfg, 32, VOCAB)
    sft = measure(SHAPES["sft"], 5, cfg, 32, VOCAB)
    assert 0.3 < understanding["saving"] < 0.5    # the image prefix is most of the sample
    assert 0.0 < sft["saving"] < understanding["saving"]
    # a target-only sample saves only the last block's clean copy
    target_only = measure(SampleShape("t", (0, 0), (0, 0), (320, 320)), 2, cfg, 32, VOCAB)
    assert abs(target_only["saving"] - 32 / 640) < 1e-9


def test_prefix_savings_cli_prints_a_row_per_format():
    out = subprocess.run([sys.executable, "tools/prefix_savings.py", "--samples", "3", "--formats", "sft"],
                         capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("sft"))
    assert row.split()[1] == "3" and row.split()[-1].endswith("%")


def test_bench_attention_cpu_runs_every_method():
    out = subprocess.run([sys.executable, "tools/bench_attention.py", "--lengths", "64", "--heads", "2",
                          "--kv-heads", "1", "--head-dim", "16", "--repeats", "1"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.strip().startswith("64")]
    assert len(rows) == 3 and all("failed" not in row for row in rows)
