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


FAKE_SRUN = """#!/bin/bash
# fake srun: drop the options, run the step here
while [[ "$1" == --* ]]; do shift; done
exec "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") echo "NodeName=n1 NodeAddr=127.0.0.1" ;;
esac
"""


def test_sweep_sbatch_writes_a_card_per_valid_layout_and_the_table(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "cards"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n1",
           "SLURM_NTASKS": "1", "SLURM_SUBMIT_DIR": REPO, "SLURM_JOB_NUM_NODES": "1", "MU_PYTHON": sys.executable,
           "MU_BENCH_LAYOUTS": "1,1,1,1 2,1,1,1", "MU_BENCH_MICROBATCHES": "1", "MU_BENCH_OUT": str(out),
           "MU_BENCH_ARGS": "--warmup 0 --steps 1 --threads 1", "MU_BENCH_DYNAMO_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run(["bash", os.path.join(REPO, "slurm", "bench.sbatch"),
                          os.path.join(REPO, "recipes", "bench", "tiny_cpu.yaml"), "data.seq_length=64"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(os.listdir(out)) == ["table.md", "tp1-pp1-ep1-mbs1.json"]
    assert "layout TP2 PP1 EP1 mbs1: skipped" in run.stdout
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 3 and "| 1 | 1 | 1 | 1 | 1 |" in table[2]


def test_proxy_recipe_is_the_16b_width_with_four_layers():
    from megatron_uni.config import load_config
    from megatron_uni.model.params import count_parameters

    proxy = load_config(os.path.join(REPO, "recipes", "bench", "proxy_1gpu.yaml"))
    full = load_config(os.path.join(REPO, "recipes", "model", "llada2_uni_16b.yaml")).model
    m = proxy.model
    assert (m.num_layers, m.first_k_dense, m.num_experts, m.params_dtype) == (4, 1, 256, "bfloat16")
    assert (m.hidden_size, m.moe_ffn_hidden_size, m.vocab) == (full.hidden_size, full.moe_ffn_hidden_size, full.vocab)
    assert (proxy.data.seq_length, proxy.data.micro_batch_size) == (8192, 1)
    assert count_parameters(m).total == 3_211_283_456   # the figure in the recipe's memory comment


def test_cli_bench_runs_the_tool(capsys):
    from megatron_uni.cli import main as cli_main

    assert cli_main(["bench", os.path.join(REPO, "recipes", "bench", "tiny_cpu.yaml"), "model.nope=1"]) == 2
    assert "config error: unknown key model.nope" in capsys.readouterr().err
