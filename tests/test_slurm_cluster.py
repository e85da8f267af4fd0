"""The real sbatch files on a real two-node Slurm cluster (tests/slurm_cluster.py), tiny recipes, CPU/gloo.

- the journey: tiny HF folder -> import -> the 4 stages -> export, chained by slurm/submit_stages.sh;
  the exported folder's logits (the conversion's reference model) equal the last checkpoint's;
- pre-emption: ``scancel --signal=USR1 --batch`` mid-stage -> save -> requeue -> resume (after the
  requeue hold, shortened on this cluster); the final
  checkpoint is bitwise equal to an uninterrupted run's;
- a stage that fails leaves the next stage never started;
- ``kill -9`` of one rank fails the job promptly; resubmitting resumes to the same final weights.

Skipped only when the Slurm binaries are absent (.ci/run installs them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from slurm_cluster import LocalSlurmCluster, slurm_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "recipes", "stages", "tiny")
STAGES = ("stage1_align", "stage2_pretrain", "stage3_sft_8k", "stage3_sft_16k")
ON_CPU = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]

_missing = slurm_available()
pytestmark = [
    pytest.mark.skipif(_missing is not None, reason=f"Slurm binaries absent ({_missing} not on PATH); "
                                                    f".ci/run installs slurmctld slurmd slurm-client"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Slurm daemons run as root (SlurmUser=root)"),
    pytest.mark.timeout(900),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cluster = LocalSlurmCluster(str(root)).start()
    cluster.env_extra = {"MU_PYTHON": sys.executable, "TORCHDYNAMO_DISABLE": "1", "OMP_NUM_THREADS": "1",
                         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo dataset + tokenizer, a blend file with the 4 stages, a tiny HF LLaDA2.0-mini folder."""
    from megatron_uni.config import load_config
    from megatron_uni.convert.tiny_hf import write_tiny_hf
    from megatron_uni.data.build import BuildSettings, build_dataset
    from megatron_uni.data.demo import make_demo_data

    root = str(tmp_path_factory.mktemp("demo"))
    make_demo_data(root, num_scenes=12, num_paragraphs=16, seed=0)
    settings = BuildSettings(tokenizer_dir=os.path.join(root, "tokenizer"),
                             image_codes=os.path.join(root, "image_codes.json"), num_image_codes=256)
    build_dataset([os.path.join(root, "samples.jsonl")], os.path.join(root, "dataset", "demo"), settings)
    with open(os.path.join(root, "blend.yaml"), "w") as f:
        f.write("stages:\n" + "".join(f"  {stage}: [{{path: dataset/demo, weight: 1.0}}]\n"
                                      for stage in ("align", "pretrain", "sft", "sft_long")))
    model_cfg = load_config(os.path.join(TINY, "model.yaml")).model
    weights = write_tiny_hf(os.path.join(root, "hf"), model_cfg, text_only=True, seed=3)
    return {"root": root, "blend": os.path.join(root, "blend.yaml"), "tokenizer": os.path.join(root, "tokenizer"),
            "hf": os.path.join(root, "hf"), "weights": weights}


@pytest.fixture(scope="module")
def reference(cluster, demo, tmp_path_factory):
    """An uninterrupted 8-step tiny stage-1 run, submitted (not awaited) so it runs alongside the
    first test that needs it: what the interrupted runs must end with."""
    root = tmp_path_factory.mktemp("reference")
    log = str(root / "reference.log")
    job = _sbatch(cluster, log, "stage1_align.sbatch", *_train_args(demo, root / "ckpt"))
    return {"job": job, "log": log, "final": str(root / "ckpt" / "iter_0000008"), "root": str(root)}


def _reference_weights(cluster, reference):
    info = cluster.wait(reference["job"], timeout=400)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), open(reference["log"]).read()[-3000:]
    return _weights(reference["final"], reference["root"])


def _env(cluster):
    return {**cluster.env, **cluster.env_extra}


def _sbatch(cluster, log, sbatch_file, *args):
    done = cluster.run(["sbatch", "--parsable", f"--output={log}", f"--error={log}", *ON_CPU,
                        os.path.join("slurm", sbatch_file), *args], env=_env(cluster), cwd=REPO)
    return done.stdout.strip().split(";")[0]


def _wait_for_line(path, pattern, timeout=300.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isfile(path) and re.search(pattern, open(path).read(), re.M):
            return
        time.sleep(0.3)
    raise TimeoutError(f"{pattern!r} not in {path} after {timeout} s:\n" +
                       (open(path).read()[-3000:] if os.path.isfile(path) else "(no log)"))


def _weights(iter_dir, scratch):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(scratch, re.sub(r"\W", "_", iter_dir) + ".pt")
    dcp_to_torch_save(os.path.join(iter_dir, "model"), out)
    return {k: v for k, v in torch.load(out, weights_only=False).items() if torch.is_tensor(v)}


def _assert_same_weights(a, b):
    """Every model tensor bitwise equal. The distributed optimizer's buffers (also saved) hold
    uninitialised bucket padding, so they are left out; equal weights after the resumed updates
    need its moments and step count anyway."""
    optimizer = re.compile(r"^(chained_\d+\.)?optimizer\.")
    assert a.keys() == b.keys() and any(optimizer.match(k) for k in a)
    weights = [k for k in a if not optimizer.match(k)]
    assert len(weights) > 20
    for key in weights:
        assert torch.equal(a[key], b[key]), key


def _train_args(demo, save, *extra):
    return [os.path.join(TINY, "stage1_align.yaml"), "checkpoint.load=null", f"checkpoint.save={save}",
            f"data.path={demo['blend']}", f"data.tokenizer={demo['tokenizer']}", "schedule.train_iters=8", *extra]


# --------------------------------------------------------------------------------------------
def _logits_of_checkpoint(_index, root, results):
    """Rank-0-of-1 process: the tiny stage model loading ``root``; logits on a fixed batch."""
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    from convert_helpers import batch
    from megatron_uni.checkpoint import load_checkpoint
    from megatron_uni.config import ParallelConfig, load_config
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import destroy, init_single_process

    model_cfg = load_config(os.path.join(TINY, "stage3_sft_16k.yaml")).model
    init_single_process(ParallelConfig())
    model = build_model(model_cfg, ParallelConfig())
    load_checkpoint(root, [model], model_config=model_cfg)
    model.eval()
    ids, positions, mask = batch()
    with torch.no_grad():
        torch.save(model(ids, positions, mask), results)
    destroy()


def test_journey_import_four_stages_export(cluster, demo, tmp_path):
    run = str(tmp_path / "run")
    started = time.time()
    done = cluster.run([os.path.join(REPO, "slurm", "submit_stages.sh"), "--scale", "tiny", "--hf", demo["hf"],
                        "--tokenizer", demo["tokenizer"], "--run-dir", run, "--export-args", "--dtype float32",
                        "--", f"data.path={demo['blend']}"], env=_env(cluster))
    jobs = dict(line.split() for line in done.stdout.strip().splitlines())
    assert list(jobs) == ["import", *STAGES, "export"]
    final = cluster.wait(jobs["export"], timeout=800)
    logs = {step: open(os.path.join(run, "logs", f"mu-{step}-{job}.out")).read() for step, job in jobs.items()}
    assert final["JobState"] == "COMPLETED", (final, logs["export"][-2000:])
    print(f"journey: {time.time() - started:.0f} s")
    previous = "import"
    for step in STAGES:
        info = cluster.job(jobs[step])
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), step
        # each stage started after its predecessor and fine-tuned from its checkpoint
        assert f"checkpoint.load={run}/{previous}" in logs[step] and "from iteration 0" in logs[step], step
        assert f"final checkpoint: {run}/{step}/iter_0000003" in logs[step], step
        assert "preflight:" in logs[step] and "world size 2 -> data parallel" in logs[step], step
        previous = step
    # every stage moved the weights
    scratch = str(tmp_path)
    first = _weights(os.path.join(run, "import", "iter_0000000"), scratch)
    last = _weights(os.path.join(run, "stage3_sft_16k", "iter_0000003"), scratch)
    norm = "decoder.final_layernorm.weight"
    assert not torch.equal(first[norm], last[norm])
    # the exported folder computes what the last checkpoint computes
    import torch.multiprocessing as mp

    from convert_helpers import batch, read_hf_folder
    from megatron_uni.convert.hf_io import read_json
    from megatron_uni.convert.hf_reference import LLaDA2Reference

    results = str(tmp_path / "logits.pt")
    mp.start_processes(_logits_of_checkpoint, args=(os.path.join(run, "stage3_sft_16k"), results), nprocs=1,
                       start_method="spawn", join=True)
    folder = os.path.join(run, "hf_export")
    reference = LLaDA2Reference(read_hf_folder(folder), read_json(os.path.join(folder, "config.json")))
    ids, positions, mask = batch()
    expected = reference(ids, positions, ~mask)
    megatron = torch.load(results)
    assert megatron.shape == expected.shape
    assert (megatron - expected).abs().max().item() <= 1e-5
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))


def test_preemption_saves_requeues_and_resumes_bitwise(cluster, demo, reference, tmp_path):
    resumed_log = str(tmp_path / "resumed.log")
    resumed = _sbatch(cluster, resumed_log, "stage1_align.sbatch", *_train_args(demo, tmp_path / "resumed"))
    _wait_for_line(resumed_log, r"^0: iter\s+2/8")
    cluster.run(["scancel", "--signal=USR1", "--batch", resumed])
    # the job saves, requeues itself (Restarts=1) and starts again after its BeginTime: the
    # credential lifetime, 10 s on this cluster (tests/slurm_cluster.py), 120 s by default
    deadline = time.time() + 300
    while cluster.job(resumed).get("Restarts") != "1":
        info = cluster.job(resumed)
        assert info["JobState"] not in ("COMPLETED", "FAILED", "CANCELLED"), (info, open(resumed_log).read()[-3000:])
        assert time.time() < deadline, info
        time.sleep(0.3)
    info = cluster.wait(resumed, timeout=400)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), open(resumed_log).read()[-3000:]
    out = open(resumed_log).read()
    saved = re.search(r"signal received: saved \S+/iter_(\d{7}), exiting", out)
    assert "USR1 received" in out and saved and "requeueing job" in out, out[-3000:]
    stopped_at = int(saved.group(1))
    assert 2 <= stopped_at < 8
    # --open-mode=append: the first segment's lines survive the requeue
    assert out.index("restart 0") < out.index("iter      1/8") < out.index("restart 1")
    assert f"resumed from {tmp_path / 'resumed'}/iter_{stopped_at:07d}" in out
    a = _reference_weights(cluster, reference)
    b = _weights(str(tmp_path / "resumed" / "iter_0000008"), str(tmp_path))
    _assert_same_weights(a, b)


def test_failing_stage_never_starts_the_next(cluster, demo, tmp_path):
    """Stage 1 fails its preflight (EP 3 does not divide 16 experts): non-zero exit in seconds,
    no srun step; stage 2 (afterok) is cancelled without ever starting."""
    run = str(tmp_path / "run")
    done = cluster.run([os.path.join(REPO, "slurm", "submit_stages.sh"), "--scale", "tiny", "--run-dir", run,
                        "--from", "stage1_align", "--to", "stage2_pretrain", "--",
                        f"data.path={demo['blend']}", f"data.tokenizer={demo['tokenizer']}", "parallel.expert=3"],
                       env=_env(cluster))
    jobs = dict(line.split() for line in done.stdout.strip().splitlines())
    first = cluster.wait(jobs["stage1_align"], timeout=300)
    assert first["JobState"] == "FAILED" and first["ExitCode"] == "2:0", first
    log = open(os.path.join(run, "logs", f"mu-stage1_align-{jobs['stage1_align']}.out")).read()
    assert "preflight failed" in log and "step:" not in log
    assert "model.num_experts=16 must be divisible by parallel.expert=3" in \
        open(os.path.join(run, "logs", f"mu-stage1_align-{jobs['stage1_align']}.err")).read()
    second = cluster.wait(jobs["stage2_pretrain"], timeout=120)
    assert (second["JobState"], second["RunTime"]) == ("CANCELLED", "00:00:00"), second
    assert not os.path.exists(os.path.join(run, "logs", f"mu-stage2_pretrain-{jobs['stage2_pretrain']}.out"))


def _rank_pid(job, rank):
    """pid of the trainer process of ``rank`` in ``job`` (read from /proc: this host runs both nodes);
    the rank's own forked helpers share its environment and command line, so take the one that
    slurmstepd started."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            parent = int(re.search(r"^PPid:\s+(\d+)", open(f"/proc/{pid}/status").read(), re.M).group(1))
        except (OSError, AttributeError):
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ \
                and b"megatron_uni.cli\0train" in cmdline:
            found[int(pid)] = parent
    roots = [pid for pid, parent in found.items() if _comm(parent) == "slurmstepd"]
    return roots[0] if len(roots) == 1 else None


def _comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return None


def test_kill9_of_one_rank_fails_promptly_and_resubmission_resumes(cluster, demo, reference, tmp_path):
    log = str(tmp_path / "killed.log")
    args = _train_args(demo, tmp_path / "ckpt", "checkpoint.save_interval=2")
    job = _sbatch(cluster, log, "stage1_align.sbatch", *args)
    _wait_for_line(log, r"^0: iter\s+3/8")
    pid = _rank_pid(job, 1)
    assert pid is not None, subprocess.run(["ps", "-ef", "--forest"], capture_output=True, text=True).stdout[-4000:]
    os.kill(pid, 9)
    killed_at = time.time()
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", info
    print(f"kill -9 of rank 1 -> job FAILED after {time.time() - killed_at:.1f} s")
    assert time.time() - killed_at < 60
    assert "requeueing" not in open(log).read()
    latest = open(tmp_path / "ckpt" / "latest").read().strip()
    assert latest in ("iter_0000002", "iter_0000004", "iter_0000006")
    again = _sbatch(cluster, str(tmp_path / "again.log"), "stage1_align.sbatch", *args)
    info = cluster.wait(again, timeout=400)
    out = open(tmp_path / "again.log").read()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-3000:]
    assert f"resumed from {tmp_path / 'ckpt'}/{latest}" in out
    a = _reference_weights(cluster, reference)
    b = _weights(str(tmp_path / "ckpt" / "iter_0000008"), str(tmp_path))
    _assert_same_weights(a, b)


def test_tool_jobs_tokenize_on_two_mpi_ranks_then_build_the_dataset(cluster, demo, tmp_path):
    """tokenize_images.sbatch fans out over 2 nodes (mpi4py through srun --mpi=pmi2);
    build_dataset.sbatch, chained with afterok, builds the dataset from that store."""
    import json

    codes, prefix = str(tmp_path / "codes"), str(tmp_path / "dataset" / "demo")
    tokenize_log, build_log = str(tmp_path / "tokenize.log"), str(tmp_path / "build.log")
    tokenize = _sbatch(cluster, tokenize_log, "tokenize_images.sbatch", "--input",
                       os.path.join(demo["root"], "images"), "--key-style", "stem", "--output", codes, "--tiny",
                       "--no-progress", "--shard-size", "8")
    build = cluster.run(["sbatch", "--parsable", f"--output={build_log}", f"--error={build_log}", "--ntasks=1",
                         "--cpus-per-task=1", f"--dependency=afterok:{tokenize}", "slurm/build_dataset.sbatch",
                         "--input", os.path.join(demo["root"], "samples.jsonl"), "--tokenizer", demo["tokenizer"],
                         "--image-codes", codes, "--num-image-codes", "256", "--output", prefix],
                        env=_env(cluster), cwd=REPO).stdout.strip()
    for job, log in ((tokenize, tokenize_log), (build, build_log)):
        info = cluster.wait(job, timeout=300)
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), open(log).read()[-3000:]
    summary = json.loads(next(line[3:] for line in open(tokenize_log) if line.startswith("0: {")))
    assert len(summary["ranks"]) == 2 and summary["num_images"] > 0 and summary["num_bad"] == 0
    assert {r["rank"] for r in summary["ranks"]} == {0, 1}
    assert os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")
