"""tools/bench_throughput.py (one tiny run, every section of the card) and tools/collect_bench_cards.py."""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = runpy.run_path(os.path.join(REPO, "tools", "bench_throughput.py"), run_name="bench_throughput")
COLLECT = runpy.run_path(os.path.join(REPO, "tools", "collect_bench_cards.py"), run_name="collect")


def test_synthetic_documents_pack_into_rows_and_pad_one_per_row():
    gen = torch.Generator().manual_seed(0)
    lengths = BENCH["document_lengths"](gen, 200, 256, 32, 64)
    assert all(64 <= n <= 256 and n % 32 == 0 for n in lengths)
    rows = BENCH["pack"](lengths, 256)
    assert [n for r in rows for n in r] == lengths and all(sum(r) <= 256 for r in rows)
    vocab = BENCH["Vocabulary"].synthetic(1024, 256)
    batch = BENCH["make_batch"](gen, [[64, 96], [256]], 256, 32, vocab)
    assert batch.doc_ids[0, :160].tolist() == [0] * 64 + [1] * 96 and (batch.doc_ids[0, 160:] == -1).all()
    assert batch.position_ids[0, 64].item() == 0 and BENCH["sample_tokens"](batch) == 64 + 96 + 256
    assert not batch.maskable[0, :32].any() and batch.maskable[0, 32:64].all()   # a clean prompt block


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "card.json")
    env = {**os.environ, "PYTHONPATH": REPO, "TORCHDYNAMO_DISABLE": "1"}
    subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_throughput.py"),
                    os.path.join(REPO, "recipes", "bench", "tiny_cpu.yaml"), "data.seq_length=64",
                    "data.global_batch_size=2", "diffusion.complementary=true", "diffusion.shared_clean=true",
                    "--warmup", "1", "--steps", "1", "--baseline", "--megatron-gpt", "--repeats", "1",
                    "--threads", "1", "--out", out], check=True, env=env, cwd=REPO, capture_output=True)
    with open(out) as f:
        return json.load(f)


def test_card_holds_every_number(card):
    ours = card["ours"]
    assert card["layout"]["rows"] == "shared_clean 3L" and card["device"]["type"] == "cpu"
    assert ours["mfu"] is None and ours["mfu_note"] == "n/a: CPU"
    tokens = ours["tokens_per_s_per_gpu"]
    assert 0 < tokens["loss_tokens"] < tokens["sample_tokens"] < tokens["positions"]
    # the FLOPs are the formula's for the positions counted (3L rows of 64 tokens, global batch 2)
    assert ours["model_flops_per_step_per_gpu"] > 0 and 0 < ours["attention_share_of_flops"] < 1
    layers = ours["routing"]["layers"]
    assert ours["routing"]["natural"] and [layer["layer"] for layer in layers] == [2, 3, 4]
    for layer in layers:
        assert abs(sum(layer["fraction"]) - 1) < 1e-4 and len(layer["fraction"]) == 8
    assert card["baseline_dfactory"]["tokens_per_s_per_gpu"]["loss_tokens"] > 0
    assert card["speedup_loss_tokens_vs_dfactory"] > 0
    assert card["megatron_gpt"]["ratio"] > 0 and card["commit"]


def test_collector_table(card, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps(card))
    lines = COLLECT["table"](COLLECT["read_cards"]([str(tmp_path)])).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| recipes/bench/tiny_cpu.yaml |") and "shared_clean 3L" in lines[2]
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(SystemExit, match="b.json: not a benchmark card"):
        COLLECT["read_cards"]([str(tmp_path)])
