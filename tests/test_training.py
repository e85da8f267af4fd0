"""The training loop end to end through the CLI, on the generated demo data (subprocesses, CPU).

- a run interrupted at step 2 and resumed gives the same losses and the same final weights as an
  uninterrupted run (model, optimizer, scheduler and data position all restored);
- SIGUSR1 (Slurm's pre-emption warning) makes the run save at the end of the step and exit 0;
  during set-up it ends the run before its first step with exit code 75 and saves nothing;
- ``info`` prints the published parameter counts; a bad override is a one-line error.
"""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch


pytestmark = pytest.mark.timeout(600)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITER_LINE = re.compile(r"^iter\s+(\d+)/\d+ \| loss (\S+)", re.M)


def _data_args(demo):
    return f"data.path={demo.dataset}", f"data.tokenizer={demo.root / 'tokenizer'}"


def _cli(*args, **kwargs):
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "megatron_uni.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _train(demo, save, iters, *extra):
    proc = _cli("train", "recipes/demo/tiny_cpu.yaml", *_data_args(demo), f"checkpoint.save={save}",
                f"schedule.train_iters={iters}",
                "schedule.warmup_iters=1", "checkpoint.save_interval=0", "data.seq_length=128", *extra)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return {int(i): float(loss) for i, loss in ITER_LINE.findall(out)}, out


def _weights(iter_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = str(tmp_path / (os.path.basename(iter_dir) + os.path.basename(os.path.dirname(iter_dir)) + ".pt"))
    dcp_to_torch_save(os.path.join(iter_dir, "model"), out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


def test_resumed_run_equals_uninterrupted_run(demo, tmp_path):
    straight, _ = _train(demo, str(tmp_path / "straight"), 4)
    first, out = _train(demo, str(tmp_path / "resumed"), 4, "schedule.exit_interval=2")
    assert "exit interval reached" in out
    # the run's own checkpoint wins over checkpoint.load (here another run's final weights)
    second, out = _train(demo, str(tmp_path / "resumed"), 4,
                         f"checkpoint.load={tmp_path / 'straight' / 'iter_0000004'}")
    assert f"resumed from {tmp_path / 'resumed' / 'iter_0000002'}" in out and sorted(first) == [1, 2] and sorted(second) == [3, 4]
    assert {**first, **second} == straight, (first, second, straight)
    a = _weights(str(tmp_path / "straight" / "iter_0000004"), tmp_path)
    b = _weights(str(tmp_path / "resumed" / "iter_0000004"), tmp_path)
    assert a.keys() == b.keys() and any(k.startswith("optimizer") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the run trained: the weights moved away from iteration 2's
    c = _weights(str(tmp_path / "resumed" / "iter_0000002"), tmp_path)
    assert not torch.equal(a["decoder.final_layernorm.weight"], c["decoder.final_layernorm.weight"])


def test_preemption_signal_saves_and_exits(demo, tmp_path):
    save = tmp_path / "ckpt"
    proc = _cli("train", "recipes/demo/tiny_cpu.yaml", *_data_args(demo), f"checkpoint.save={save}",
                "schedule.train_iters=200",
                "checkpoint.save_interval=0", "data.seq_length=128")
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if ITER_LINE.match(line):
            proc.send_signal(signal.SIGUSR1)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "signal received: saved" in out
    latest = (save / "latest").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert 1 <= stopped_at < 200
    assert max(int(i) for i, _ in ITER_LINE.findall(out)) == stopped_at


def _signal_during_setup(demo, save, *extra):
    """A run sent SIGUSR1 as soon as it logs that set-up began (model build, checkpoint load follow)."""
    proc = _cli("train", "recipes/demo/tiny_cpu.yaml", *_data_args(demo), f"checkpoint.save={save}",
                "schedule.train_iters=4", "checkpoint.save_interval=0", "data.seq_length=128", *extra)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "setting up" in line:
            proc.send_signal(signal.SIGUSR1)
            break
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    return proc.returncode, out


def test_signal_during_setup_exits_cleanly_without_saving(demo, tmp_path):
    from megatron_uni.training.stop import EXIT_STOPPED_IN_SETUP

    save = tmp_path / "ckpt"
    code, out = _signal_during_setup(demo, save)   # fresh run: nothing trained, nothing saved
    assert code == EXIT_STOPPED_IN_SETUP == 75, out[-3000:]
    assert "stop signal received during set-up, before iteration 1" in out and not ITER_LINE.search(out)
    assert not (save / "latest").exists()
    _train(demo, str(save), 1)                      # a resumable state at iteration 1 ...
    code, out = _signal_during_setup(demo, save)   # ... is loaded, and the signal still stops cleanly
    assert code == EXIT_STOPPED_IN_SETUP, out[-3000:]
    assert "before iteration 2" in out and not ITER_LINE.search(out)
    assert (save / "latest").read_text().strip() == "iter_0000001"
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000001"]


def test_info_prints_counts_and_rejects_bad_override():
    proc = _cli("info", "recipes/model/llada2_uni_16b.yaml")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "16.32B total / 1.50B active" in out
    proc = _cli("info", "recipes/model/llada2_uni_16b.yaml", "parallel.pipeline=3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.strip().splitlines()[-1] == ("megatron-uni: config error: model.num_layers=20 must be divisible by "
                                            "parallel.pipeline x parallel.virtual_pipeline=3")


def test_prefix_aware_step_equals_full_step_and_every_option_trains(demo, tmp_path):
    """Through the real loop: the compacted layout gives the same loss and gradient norm as the
    full [noisy | clean] layout; all noising / weighting options together still train."""
    grad_norm = re.compile(r"^iter\s+1/\d+ \| loss (\S+) .*grad_norm (\S+)", re.M)
    _, full = _train(demo, str(tmp_path / "full"), 1)
    compact_losses, compact = _train(demo, str(tmp_path / "compact"), 1, "diffusion.prefix_aware=true")
    assert grad_norm.search(full).groups() == grad_norm.search(compact).groups()
    # the mask-embedding noise hook is registered by the loop: it alone changes the first loss
    noisy, _ = _train(demo, str(tmp_path / "noise"), 1, "diffusion.prefix_aware=true", *MASK_NOISE)
    assert noisy[1] != compact_losses[1], (noisy, compact_losses)
    losses, _ = _train(demo, str(tmp_path / "all"), 2, "diffusion.prefix_aware=true", "diffusion.shared_clean=true",
                       *(f"diffusion.{key}={value}" for key, value in DATA_OPTIONS.items()), *MASK_NOISE)
    assert sorted(losses) == [1, 2] and all(0 < v < 20 for v in losses.values())
    assert losses[1] not in (compact_losses[1], noisy[1]), (losses, compact_losses, noisy)


MASK_NOISE = ("diffusion.mask_noise_std=0.02", "diffusion.mask_noise_steps=1")
# option -> a non-default value; each must change the micro-batches the loop trains on
DATA_OPTIONS = {"weighting": "sqrt_masked", "complementary": "true", "per_block": "true", "antithetic": "true"}


def _first_microbatch(demo, *overrides):
    from megatron_uni.config import load_config
    from megatron_uni.training.batches import MicrobatchSource

    cfg = load_config("recipes/demo/tiny_cpu.yaml", [*_data_args(demo), "data.seq_length=128", *overrides])
    return MicrobatchSource(cfg)(0, 0, 0, 1)


def _same_inputs(a, b) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in
               ((a.input_ids, b.input_ids), (a.labels, b.labels), (a.loss_weights, b.loss_weights),
                (a.attention_mask, b.attention_mask)))


@pytest.mark.parametrize("option", sorted(DATA_OPTIONS))
def test_every_diffusion_option_changes_the_loop_microbatches(demo, option):
    """The loop's own micro-batch source honours each option (an ignored one would pass the run above)."""
    baseline = _first_microbatch(demo)
    assert _same_inputs(baseline, _first_microbatch(demo))  # deterministic, so a difference is the option's
    assert not _same_inputs(baseline, _first_microbatch(demo, f"diffusion.{option}={DATA_OPTIONS[option]}"))


def test_prefix_aware_option_compacts_the_loop_microbatches(demo):
    """Without this the equal losses of the full and the prefix-aware run above could be one layout twice."""
    from megatron_uni.attention.layout import FILLER_DOC

    full, compact = _first_microbatch(demo), _first_microbatch(demo, "diffusion.prefix_aware=true")
    assert full.input_ids.shape[1] == 2 * 128 and (full.layout.doc != FILLER_DOC).all()
    # rows are padded to the pad multiple with filler: count the positions that are kept
    assert (compact.layout.doc != FILLER_DOC).sum() < full.layout.doc.numel()


def test_two_row_complementary_pairs_run_under_pipeline_parallelism(demo, tmp_path):
    """Two-row complementary pairs double the rows of a micro-batch; the PP schedule must be told
    (its p2p buffers are sized from micro_batch_size): it crashed with a gloo read error before."""
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
         "megatron_uni.cli", "train", "recipes/demo/tiny_cpu.yaml", *_data_args(demo), "parallel.pipeline=2",
         "diffusion.complementary=true", "schedule.train_iters=2", "schedule.warmup_iters=1", "data.seq_length=128",
         f"checkpoint.save={tmp_path / 'ckpt'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    losses = {int(i): float(loss) for i, loss in ITER_LINE.findall(done.stdout)}
    assert sorted(losses) == [1, 2] and all(loss == loss for loss in losses.values())
