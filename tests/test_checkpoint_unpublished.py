"""A save killed after an iteration's metadata.json but before ``latest`` moved leaves an unpublished
iteration directory: the next save of that iteration replaces it (a requeued or resubmitted run
must not get stuck), while a published iteration is still never overwritten."""

import json
import os
import shutil

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    from megatron_uni.config import ParallelConfig, load_config
    from megatron_uni.model.builder import build_model
    from megatron_uni.platform.distributed import destroy, init_single_process

    init_single_process()
    cfg = load_config(os.path.join(REPO, "recipes", "model", "tiny.yaml")).model
    yield build_model(cfg, ParallelConfig()), cfg
    destroy()


def test_unpublished_iteration_is_replaced_and_published_one_refused(model, tmp_path):
    from megatron_uni.checkpoint import CheckpointError, latest_iteration_dir, read_metadata, save_checkpoint

    net, cfg = model
    root = str(tmp_path / "ckpt")
    save_checkpoint(root, 1, [net], cfg, None, {})
    # a crashed save of iteration 2: complete-looking directory, `latest` still names iteration 1
    shutil.copytree(os.path.join(root, "iter_0000001"), os.path.join(root, "iter_0000002"))
    stale = os.path.join(root, "iter_0000002", "stale_marker")
    open(stale, "w").close()
    assert latest_iteration_dir(root).endswith("iter_0000001")
    with torch.no_grad():
        net.decoder.final_layernorm.weight.add_(1.0)
    save_checkpoint(root, 2, [net], cfg, None, {})
    assert latest_iteration_dir(root).endswith("iter_0000002") and not os.path.exists(stale)
    assert read_metadata(root)["iteration"] == 2
    with open(os.path.join(root, "iter_0000002", "metadata.json")) as f:
        assert json.load(f)["iteration"] == 2
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(root, 2, [net], cfg, None, {})
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(root, 1, [net], cfg, None, {})
