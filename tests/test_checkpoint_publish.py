"""A save killed after metadata.json but before `latest` moved must not block every later save
(issue 11, section 2: measured as a job failing on every Slurm requeue)."""

import os

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_uni.checkpoint import (LATEST, METADATA, CheckpointError, iteration_dir_name, latest_iteration_dir,
                                     save_checkpoint)
from megatron_uni.config import ParallelConfig, load_config

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "model", "tiny.yaml")


class NoState(torch.nn.Module):
    def sharded_state_dict(self):
        return {}


@pytest.fixture(autouse=True)
def fake_model_save(monkeypatch):
    """Only the publishing protocol is under test: the model state is one marker file."""
    monkeypatch.setattr(dist_checkpointing, "save", lambda state, d: open(os.path.join(d, "state"), "w").close())


def save(root, iteration):
    return save_checkpoint(str(root), iteration, [NoState()], load_config(TINY).model, None, ParallelConfig())


def test_unpublished_iteration_is_redone_not_refused(tmp_path):
    save(tmp_path, 1)
    killed = save(tmp_path, 2)
    (tmp_path / LATEST).write_text(iteration_dir_name(1) + "\n")  # killed before 'latest' moved to iter 2
    (tmp_path / iteration_dir_name(2) / "stale").write_text("from the killed save")
    assert latest_iteration_dir(str(tmp_path)).endswith(iteration_dir_name(1))  # the resume point
    assert save(tmp_path, 2) == killed  # the requeued job reaches iteration 2 again
    assert sorted(os.listdir(killed)) == [METADATA, "model"]
    assert latest_iteration_dir(str(tmp_path)) == killed


def test_unpublished_iteration_without_latest_is_redone(tmp_path):
    save(tmp_path, 5)
    os.remove(tmp_path / LATEST)  # killed on the very first save
    save(tmp_path, 5)
    assert latest_iteration_dir(str(tmp_path)).endswith(iteration_dir_name(5))


def test_published_iteration_is_still_refused(tmp_path):
    save(tmp_path, 1)
    save(tmp_path, 2)
    for iteration in (1, 2):
        with pytest.raises(CheckpointError, match="published checkpoint; refusing to overwrite"):
            save(tmp_path, iteration)
