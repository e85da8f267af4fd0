"""Stage recipes, the submit helper's dry run and the launcher's pre-emption logic, without a cluster.

- every 16B stage recipe passes ``megatron-uni info RECIPE parallel.world_size=N`` (and the batch
  divisibility of a launch) for the N its comment names; tiny recipes the same at 2 ranks; tiny and
  16B set the same keys; each stage loads the previous stage's save; ``data.stage`` reaches the loader;
- ``slurm/submit_stages.sh --dry-run`` prints the 6 chained sbatch lines and creates nothing;
- ``slurm/launch.sh`` run by bash with fake ``srun``/``scontrol``: a USR1 during the step is forwarded
  and the job requeues exactly when the run is unfinished (under ``set -e``), a USR1 on a finished run
  or no signal does not requeue, a failing step's status is the job's.
The real cluster runs are in tests/test_slurm_cluster.py.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import yaml

from megatron_uni.cli import main as cli_main
from megatron_uni.config import load_config, validate_world_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("stage1_align", "stage2_pretrain", "stage3_sft_8k", "stage3_sft_16k")
WORLD = re.compile(r"parallel\.world_size=(\d+)")


def _recipe(scale, stage):
    return os.path.join(REPO, "recipes", "stages", scale, f"{stage}.yaml")


@pytest.mark.parametrize("scale", ["16b", "tiny"])
@pytest.mark.parametrize("stage", STAGES)
def test_stage_recipe_passes_info_at_its_world_size(scale, stage, capsys):
    path = _recipe(scale, stage)
    world = int(WORLD.search(open(path).read()).group(1))
    assert world == (2 if scale == "tiny" else {"stage2_pretrain": 128}.get(stage, 64))
    assert cli_main(["info", path, f"parallel.world_size={world}"]) == 0
    assert f"world size {world} -> data parallel" in capsys.readouterr().out
    cfg = load_config(path)
    validate_world_size(cfg, world)  # global batch divisible by micro batch x DP
    assert cfg.checkpoint.finetune and cfg.checkpoint.load and cfg.checkpoint.save and cfg.data.stage


def _keys(path):
    raw = yaml.safe_load(open(path))
    return {(section, key) for section, values in raw.items() if section != "include" for key in values}


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_and_16b_recipes_set_the_same_keys(stage):
    assert _keys(_recipe("tiny", stage)) == _keys(_recipe("16b", stage))


@pytest.mark.parametrize("scale", ["16b", "tiny"])
def test_each_stage_loads_the_previous_stage(scale):
    configs = [load_config(_recipe(scale, stage)) for stage in STAGES]
    assert configs[0].checkpoint.load.endswith("/import")
    for before, after in zip(configs, configs[1:]):
        assert after.checkpoint.load == before.checkpoint.save
    assert configs[0].model.hidden_size == (2048 if scale == "16b" else 64)
    if scale == "16b":
        assert all(c.model.fp8 == "e4m3" and c.parallel.expert == 8 and c.parallel.distributed_optimizer
                   for c in configs)


def test_tiny_blend_names_every_stage():
    from megatron_uni.data.blend import load_blend

    blend = os.path.join(REPO, "recipes", "stages", "tiny", "blend.yaml")
    for stage in STAGES:
        entries = load_blend(blend, load_config(_recipe("tiny", stage)).data.stage)
        assert entries[0].path.endswith(os.path.join("runs", "demo", "dataset", "demo"))


def test_data_stage_reaches_the_loader(monkeypatch):
    from megatron_uni.training import batches

    seen = {}

    def fake_open(data_cfg, model_cfg, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(batches, "open_training_data", fake_open)
    cfg = load_config(_recipe("tiny", "stage3_sft_16k"), ["data.path=blend.yaml"])
    with pytest.raises(RuntimeError, match="stop here"):
        batches.MicrobatchSource(cfg)
    assert seen["stage"] == "sft_long"


def test_submit_dry_run_prints_the_chain_and_creates_nothing(tmp_path):
    run = tmp_path / "run"
    out = subprocess.run([os.path.join(REPO, "slurm", "submit_stages.sh"), "--scale", "tiny", "--hf", "hf_in",
                          "--tokenizer", "tok", "--run-dir", str(run), "--dry-run", "--", "data.path=b.yaml"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("sbatch ")]
    assert len(lines) == 6 and not run.exists()
    files = [next(a for a in line if a.endswith(".sbatch")) for line in lines]
    assert files == ["slurm/convert.sbatch", "slurm/stage1_align.sbatch", "slurm/stage2_pretrain.sbatch",
                     "slurm/stage3_sft.sbatch", "slurm/stage3_sft.sbatch", "slurm/convert.sbatch"]
    steps = ["import", *STAGES, "export"]
    for i, line in enumerate(lines):
        assert f"--output={run}/logs/%x-%j.out" in line and "--open-mode=append" in line
        assert ("--dependency=afterok:<%s>" % steps[i - 1] in line) == (i > 0)
    assert lines[0][lines[0].index("slurm/convert.sbatch") + 1:] == [
        "import", "hf_in", f"{run}/import", "--recipe", "recipes/stages/tiny/stage1_align.yaml", "--ep", "2",
        "--no-progress", "--tokenizer", "tok"]
    for i, stage in enumerate(STAGES, start=1):
        assert f"checkpoint.load={run}/{steps[i - 1]}" in lines[i] and f"checkpoint.save={run}/{stage}" in lines[i]
        assert lines[i][-2:] == ["data.tokenizer=tok", "data.path=b.yaml"]
    assert lines[3][lines[3].index("slurm/stage3_sft.sbatch") + 1] == "8k"
    assert lines[4][lines[4].index("slurm/stage3_sft.sbatch") + 1] == "16k"
    assert f"{run}/stage3_sft_16k" in lines[5] and f"{run}/hf_export" in lines[5]
    assert out.stdout.count("#   runs: ") == 6


# ---------------------------------------------------------------------------------------------
# the launcher's signal handling, with fake srun / scontrol
# ---------------------------------------------------------------------------------------------
FAKE_SRUN = """#!/bin/bash
# fake srun: drop the options, run the test's step (exec: the launcher signals this very process)
exec bash -c "$FAKE_STEP"
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") echo n1 ;;
  "show node") echo "NodeName=n1 Arch=x86_64 NodeAddr=127.0.0.1 NodeHostName=vm" ;;
  requeue*) echo "$2" >> "$FAKE_REQUEUED" ;;
esac
"""
# the step saves iteration SAVED_AT on USR1 and exits 0, like the trainer
SAVING_STEP = ("trap 'echo iter_000000$SAVED_AT > $SAVE/latest; exit 0' USR1; touch $STARTED; "
               "for i in $(seq 600); do sleep 0.1; done")


def _launch(tmp_path, step, signal_step=True, iters=8, saved_at=3, sbatch_file="stage1_align.sbatch", args=None,
            **env_extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    save = tmp_path / "ckpt"
    save.mkdir(exist_ok=True)
    started, requeued = tmp_path / "started", tmp_path / "requeued"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STEP": step, "SAVE": str(save),
           "STARTED": str(started), "SAVED_AT": str(saved_at), "FAKE_REQUEUED": str(requeued),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "2", "SLURM_SUBMIT_DIR": REPO,
           "SLURM_JOB_NUM_NODES": "1", "MU_PYTHON": sys.executable, "MU_PREFLIGHT": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p), **env_extra}
    args = args or [os.path.join(REPO, "recipes", "stages", "tiny", "stage1_align.yaml"),
                    f"checkpoint.save={save}", f"schedule.train_iters={iters}"]
    proc = subprocess.Popen(["bash", os.path.join(REPO, "slurm", sbatch_file), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if signal_step:
        deadline = time.time() + 30
        while not started.exists():
            assert time.time() < deadline and proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    return proc.returncode, out, requeued.read_text().split() if requeued.exists() else []


def test_usr1_mid_step_saves_then_requeues(tmp_path):
    rc, out, requeued = _launch(tmp_path, SAVING_STEP)
    assert (rc, requeued) == (0, ["4242"]), out
    assert "USR1 received" in out and "step exited with status 0" in out and "latest iteration 3 of 8" in out
    assert "master 127.0.0.1:24242" in out  # NodeAddr, port from the job id


def test_usr1_on_a_run_that_reached_its_end_does_not_requeue(tmp_path):
    rc, out, requeued = _launch(tmp_path, SAVING_STEP, saved_at=8)
    assert (rc, requeued) == (0, []), out
    assert "-> finished" in out


def test_usr1_that_kills_the_step_in_setup_requeues(tmp_path):
    rc, out, requeued = _launch(tmp_path, "touch $STARTED; for i in $(seq 600); do sleep 0.1; done")
    assert (rc, requeued) == (0, ["4242"]), out
    assert "step exited with status 138" in out


def test_failing_step_fails_the_job_without_requeue(tmp_path):
    rc, out, requeued = _launch(tmp_path, "exit 3", signal_step=False)
    assert (rc, requeued) == (3, []), out
    assert "stage failed (step status 3" in out


def test_stage_file_defaults_to_the_16b_recipe_and_passes_overrides(tmp_path):
    rc, out, requeued = _launch(tmp_path, "exit 3", signal_step=False, sbatch_file="stage3_sft.sbatch",
                                args=["16k", "data.path=site/blend.yaml", "optimizer.lr=1e-6"])
    assert (rc, requeued) == (3, []), out
    assert "megatron_uni.cli train recipes/stages/16b/stage3_sft_16k.yaml data.path=site/blend.yaml " \
           "optimizer.lr=1e-6" in out
    rc, out, _ = _launch(tmp_path, "exit 0", signal_step=False, sbatch_file="stage3_sft.sbatch", args=["4k"])
    assert rc == 2 and "phase must be 8k or 16k" in out


def test_torchrun_mode_runs_one_torchrun_per_node(tmp_path):
    rc, out, _ = _launch(tmp_path, "exit 3", signal_step=False, MU_LAUNCHER="torchrun", MU_GPUS_PER_NODE="4")
    assert rc == 3, out
    step = next(line for line in out.splitlines() if "step: srun" in line)
    assert "--ntasks-per-node=1 --ntasks=1" in step and "torch.distributed.run" in step
    assert "--nnodes=1 --nproc-per-node=4 --master-addr=127.0.0.1 --master-port=24242 -m megatron_uni.cli train" in step
