"""Every CPU platform patch is needed: its megatron-core scenario fails without it, passes with all.

The scenarios live in ``tests/platform_scenarios.py``; one subprocess imports megatron-core once
and forks a child per scenario (see that module). Expected failures are the upstream errors the
patches name in ``megatron_uni/platform/cpu.py`` (paths relative to ``megatron/core``).
"""

import json
import os
import subprocess
import sys

import pytest

from megatron_uni.platform import cpu

pytestmark = pytest.mark.timeout(300)

TESTS = os.path.dirname(os.path.abspath(__file__))
NOT_COMPILED = "Torch not compiled with CUDA enabled"

# patch -> (exception type, text in its message, upstream file:function it is raised from)
EXPECTED_FAILURES = {
    "current_device": ("AssertionError", NOT_COMPILED, "models/common/embeddings/rotary_pos_embedding.py", "get_emb"),
    "rng_tracker": ("AssertionError", NOT_COMPILED, "tensor_parallel/random.py", "add"),
    "streams": ("RuntimeError", "torch.cuda.Stream requires CUDA support",
                "transformer/moe/token_dispatcher.py", "__init__"),
    "synchronize": ("AssertionError", NOT_COMPILED, "pipeline_parallel/p2p_communication.py", "_communicate"),
    "te_general_gemm": ("NameError", "name 'te_general_gemm' is not defined",
                        "transformer/moe/moe_utils.py", "forward"),
    "alltoall_split_sizes": ("TypeError", "all_to_all_single(): incompatible function arguments",
                             "tensor_parallel/mappings.py", "forward"),
    "sequence_parallel_norm": ("AssertionError", "sequence parallel not supported by torch LayerNorm",
                               "transformer/torch_norm.py", "__new__"),
    "schedules_device": ("AssertionError", NOT_COMPILED, "pipeline_parallel/schedules.py",
                         "forward_backward_no_pipelining"),
    "checkpoint_without_output_fp8": ("NameError", "name 'FP8GlobalStateManager' is not defined",
                                      "tensor_parallel/random.py", "forward"),
    "optimizer_scope": ("AssertionError", NOT_COMPILED, "optimizer/optimizer.py", "__init__"),
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    if cpu.cuda_available():
        pytest.skip("the CPU patches are not applied where CUDA exists")
    out = str(tmp_path_factory.mktemp("platform") / "outcomes.json")
    env = {**os.environ, "TORCHDYNAMO_DISABLE": "1"}
    env.pop(cpu.SKIP_ENV, None)
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "platform_scenarios.py"), "--json", out],
                          capture_output=True, text=True, env=env, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)


def test_every_patch_has_a_scenario_and_an_expectation():
    import platform_scenarios

    assert set(platform_scenarios.SCENARIOS) == set(cpu.PATCHES)
    assert set(EXPECTED_FAILURES) | {"checkpoint_writer_manager"} == set(cpu.PATCHES)


@pytest.mark.parametrize("name", sorted(EXPECTED_FAILURES))
def test_scenario_fails_with_the_upstream_error_without_its_patch(outcomes, name):
    error, text, path, function = EXPECTED_FAILURES[name]
    got = outcomes["skipped_one"][name]
    assert not got["ok"], f"{name}: the scenario passed without its patch"
    assert got["error"] == error and text in got["message"], got
    where_path, where_function = got["where"].split(":")[0], got["where"].split(" ")[1]
    assert (where_path, where_function) == (path, function), got


def test_unguarded_main_script_reruns_and_prints_a_stray_traceback_without_fork_manager(outcomes):
    got = outcomes["skipped_one"]["checkpoint_writer_manager"]
    assert not got["ok"]
    assert "unguarded __main__ ran 2 times" in got["message"], got
    assert "bootstrapping phase" in got["message"], got


def test_all_scenarios_pass_with_all_patches(outcomes):
    failed = {name: got for name, got in outcomes["all_patches"].items() if not got["ok"]}
    assert set(outcomes["all_patches"]) == set(cpu.PATCHES)
    assert not failed, failed


@pytest.mark.skipif(cpu.cuda_available(), reason="the CPU patches are not applied where CUDA exists")
def test_skip_list_rejects_unknown_patch_names(monkeypatch):
    monkeypatch.setenv(cpu.SKIP_ENV, "current_device,no_such_patch")
    with pytest.raises(ValueError, match="no_such_patch"):
        cpu.apply_cpu_patches()
