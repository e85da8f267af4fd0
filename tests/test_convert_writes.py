"""The export write path is all-or-nothing, and damaged HF shards are named (issue 11, section 2)."""

from __future__ import annotations

import os

import pytest
import torch

from convert_helpers import run_tool
from megatron_uni.convert import exporter
from megatron_uni.convert.hf_io import ConversionError, HFCheckpoint, plan_shards, write_index, write_shard


@pytest.fixture
def lone_rank(monkeypatch):
    """write_export without a process group: this process is rank 0 of 1."""
    monkeypatch.setattr(exporter, "ensure_process_group", lambda: None)
    monkeypatch.setattr(exporter.torch.distributed, "get_rank", lambda: 0)


def _old_export(folder):
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (folder / "config.json").write_text('{"old": true}')


def test_failure_mid_way_leaves_the_target_as_it_was(tmp_path, lone_rank, monkeypatch):
    out = tmp_path / "hf"
    _old_export(out)

    def one_shard_then_fail(plan, folder, link, progress, writer):
        (tmp_path / "seen").write_text(folder)
        plan_one = plan_shards([("w", 4)], 10)[0]
        write_shard(folder, plan_one, {"w": torch.ones(1)})
        write_shard(os.path.join(folder, "missing_dir"), plan_one, {"w": torch.ones(1)})

    monkeypatch.setattr(exporter, "_write_files", one_shard_then_fail)
    with pytest.raises(ConversionError, match=r"missing_dir/model-00001-of-00001\.safetensors: writing the shard"):
        exporter.write_export(None, str(out))
    assert sorted(os.listdir(out)) == ["config.json", "model-00001-of-00002.safetensors"]
    assert (tmp_path / "seen").read_text() != str(out)  # it wrote beside the target, not into it
    assert sorted(os.listdir(tmp_path)) == ["hf", "seen"]  # no partial folder left


def test_overwrite_replaces_the_folder_whole(tmp_path, lone_rank, monkeypatch):
    out = tmp_path / "hf"
    _old_export(out)
    (tmp_path / ("hf" + exporter.PARTIAL_SUFFIX + "999999")).mkdir()  # left by a killed export
    exporter.check_target(str(out), overwrite=True, sources=[])

    def one_shard(plan, folder, link, progress, writer):
        write_shard(folder, plan_shards([("w", 4)], 10)[0], {"w": torch.ones(1)})

    monkeypatch.setattr(exporter, "_write_files", one_shard)
    exporter.write_export(None, str(out))
    assert os.listdir(out) == ["model-00001-of-00001.safetensors"]  # no stale shard or config beside it
    assert os.listdir(tmp_path) == ["hf"]


def test_target_checks(tmp_path):
    out = tmp_path / "hf"
    _old_export(out)
    with pytest.raises(ConversionError, match=r"hf is not empty \(2 entries\); pass --overwrite"):
        exporter.check_target(str(out), overwrite=False, sources=[])
    with pytest.raises(ConversionError, match=r"is or holds the source"):
        exporter.check_target(str(out), overwrite=True, sources=[str(out)])
    with pytest.raises(ConversionError, match=r"is or holds the source"):
        exporter.check_target(str(tmp_path), overwrite=True, sources=[str(out)])
    exporter.check_target(str(tmp_path / "new"), overwrite=False, sources=[str(out)])


def test_export_cli_refuses_non_empty_target_before_reading_anything(tmp_path):
    out = tmp_path / "hf"
    _old_export(out)
    done = run_tool("export_hf.py", [str(tmp_path / "no_checkpoint"), str(out), "--no-progress"])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"export_hf: error: output folder {out} is not empty (2 entries); "
                                                "pass --overwrite to replace it whole, or choose an empty folder"]


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_shard_is_named(tmp_path, damage):
    folder = tmp_path / "hf"
    folder.mkdir()
    plans = plan_shards([("a", 4000), ("b", 4000)], 4000)
    write_shard(str(folder), plans[0], {"a": torch.zeros(1000)})
    write_shard(str(folder), plans[1], {"b": torch.zeros(1000)})
    write_index(str(folder), plans)
    path = folder / plans[1].file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"garbage" * 50)
    with pytest.raises(ConversionError, match=rf"{plans[1].file}: not a readable safetensors file"):
        HFCheckpoint(str(folder))
