"""Training metrics: the FLOP formula, the token splits, the JSONL record and the plots."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_uni.config import DiffusionConfig, load_config
from megatron_uni.data.batch import MODALITY_SPECIAL
from megatron_uni.diffusion.inputs import build_inputs
from megatron_uni.diffusion.losses import loss_sums
from megatron_uni.training.metrics import (MetricsLogger, TOKEN_FIELDS, flops_per_sequence, peak_flops, run_dir_of,
                                           token_stats)

from diffusion_helpers import random_batch, tiny_vocab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flop_formula_by_hand_for_the_tiny_model():
    m = load_config("recipes/model/tiny.yaml").model
    # matmul weights per position: 4 layers of attention (64*(64+2*32) + 64*64 = 12288), 1 dense
    # FFN (3*64*128 = 24576), 3 MoE layers of router 8*64 + 2 experts + shared 3*64*32 each
    # (512 + 3*6144 = 18944), output layer 1280*64 (input embedding and norms: no matmul)
    matmul = 4 * 12288 + 24576 + 3 * 18944 + 1280 * 64
    L, B = 64, 8
    n = L // B
    want = 3 * (2 * matmul * 2 * L + 4 * 4 * 4 * 16 * n * (n + 1) * B * B)
    assert flops_per_sequence(m, L, B) == want


def test_flop_formula_worked_example_in_the_docs():
    m = load_config("recipes/model/llada2_uni_16b.yaml").model
    flops = flops_per_sequence(m, 8192, 32)
    docs = open(os.path.join(REPO, "docs", "training.md")).read()
    assert f"{flops:.4e}" == "1.4563e+14" and "1.4563e14" in docs


def test_peak_table_and_cpu_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("Some Future GPU") is None


def test_token_stats_special_split_closes_the_total():
    vocab = tiny_vocab()
    gen = torch.Generator().manual_seed(0)
    inputs = build_inputs(random_batch(gen, 2, 64, 8, vocab), vocab, DiffusionConfig(t_min=0.3, t_max=0.8), gen,
                          block_size=8)
    modality = inputs.modality.clone()
    modality[:, :16] = MODALITY_SPECIAL  # pretend some targets are block-padding <|endoftext|>
    inputs = type(inputs)(**{**inputs.__dict__, "modality": modality})
    ce = torch.rand(inputs.labels.shape, generator=gen) * 5
    stats = dict(zip(TOKEN_FIELDS, token_stats(ce, inputs).tolist()))
    sums = loss_sums(ce, inputs)
    # every weighted target is text, image or special: the three splits add up to the total
    assert stats["special_weight"] > 0
    torch.testing.assert_close(torch.tensor(stats["special_loss"]) + sums.text_loss + sums.image_loss, sums.loss)
    masked = inputs.labels >= 0
    assert stats["masked_count"] == masked.sum().item()
    torch.testing.assert_close(torch.tensor(stats["masked_ce"]), ce[masked].sum())


def test_logger_writes_jsonl_and_a_progress_line(tmp_path):
    m = load_config("recipes/model/tiny.yaml").model
    logger = MetricsLogger(str(tmp_path), m, 64, 8, global_batch_size=4, world_size=2, train_iters=10,
                           start_iteration=4)
    step = {"loss": 3.0, "masked_ce": 3.1, "text_loss": 2.9, "image_loss": 3.2, "special_loss": float("nan"),
            "grad_norm": 1.5, "lr": 1e-3, "update_ok": True, "skipped_steps": 1,
            "expert_load": {"layers": [2, 3], "max_over_mean": [1.5, 2.5], "starved_fraction": [0.0, 0.25]}}
    record = logger.record(5, step, step_seconds=0.5)
    logger.write(record)
    logger.close()
    assert record["clean_tokens_per_s"] == 4 * 64 / 0.5 and record["computed_tokens_per_s"] == 2 * 4 * 64 / 0.5
    assert record["model_tflops_per_device"] == pytest.approx(flops_per_sequence(m, 64, 8) * 4 / 0.5 / 2 / 1e12)
    assert record["mfu"] is None  # CPU: no peak
    line = logger.console_line(record)
    assert "special   -   " in line and "skipped 1" in line and "experts max/mean 2.50" in line and "ETA" in line
    written = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert written["expert_load/layer3/starved_fraction"] == 0.25 and written["iteration"] == 5
    assert run_dir_of(None, "/x/run/checkpoints") == "/x/run" and run_dir_of("/y", "/x/c") == "/y"
    assert run_dir_of(None, None) is None


def test_plot_logs_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        with open(tmp_path / run / "metrics.jsonl", "w") as f:
            for it in range(1, 4):
                f.write(json.dumps({"iteration": it, "loss": 5.0 - it, "masked_ce": 5.1 - it, "text_loss": 5.0,
                                    "image_loss": float("nan"), "special_loss": 4.0, "clean_tokens_per_s": 100.0,
                                    "mfu": None, "model_tflops_per_device": 0.01,
                                    "expert_load/layer2/max_over_mean": 1.5}) + "\n")
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "tools/plot_logs.py", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--output", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = subprocess.run([sys.executable, "tools/plot_logs.py", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr
