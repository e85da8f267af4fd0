"""metadata.json is a CheckpointMetadata: typed round trip, files written before the dataclass
still read, and an inconsistent recorded vocabulary is refused naming the keys."""

import dataclasses
import json
import os

import pytest

from megatron_uni.checkpoint import (FORMAT, CheckpointError, CheckpointMetadata, check_model_config,
                                     read_metadata)
from megatron_uni.config import ParallelConfig, load_config
from megatron_uni.tokens import Vocabulary

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "model", "tiny.yaml")


def _metadata(**extras):
    model = load_config(TINY).model
    return CheckpointMetadata(iteration=7, model_config=model, vocabulary=Vocabulary.synthetic(1024, 256).layout(),
                              parallel=ParallelConfig(tensor=2, sequence_parallel=True), world_size=4,
                              model_keys=["model"], extra_keys=["optimizer"], **extras)


def test_json_round_trip_keeps_every_field():
    metadata = _metadata(scheduler={"num_steps": 7}, config={"model": {"num_layers": 4}})
    back = CheckpointMetadata.from_json(metadata.to_json())
    assert back == metadata
    raw = json.loads(metadata.to_json())
    assert raw["format"] == FORMAT and raw["model_config"]["vocab"] == 1280 and raw["vocabulary"]["padded_size"] == 1280


def test_metadata_written_before_the_dataclass_still_reads(tmp_path):
    """The dict layout of earlier versions: vocab as a model key, describe()-style vocabulary,
    extras at the top level."""
    model = load_config(TINY).model
    vocab = Vocabulary.synthetic(1024, 256)
    old = {"format": FORMAT, "iteration": 3, "model_config": model.to_dict(),
           "vocabulary": {k: v for k, v in vocab.layout().to_dict().items() if k != "padded_size"},
           "parallel": dataclasses.asdict(ParallelConfig()), "world_size": 1, "model_keys": ["model"],
           "extra_keys": [], "converted_from": {"hf_vocab_rows": 1024}}
    iter_dir = tmp_path / "iter_0000003"
    iter_dir.mkdir()
    (iter_dir / "metadata.json").write_text(json.dumps(old))
    (tmp_path / "latest").write_text("iter_0000003\n")
    metadata = read_metadata(str(tmp_path))
    assert metadata.iteration == 3 and metadata.iteration_dir == str(iter_dir)
    assert metadata.model_config == model and metadata.vocabulary == vocab.layout()
    assert metadata.converted_from == {"hf_vocab_rows": 1024} and metadata.scheduler is None


def test_a_recorded_vocab_that_breaks_the_padding_rule_is_refused():
    raw = json.loads(_metadata().to_json())
    raw["model_config"]["vocab"] = 1536
    with pytest.raises(CheckpointError, match="model.vocab=1536 does not equal"):
        CheckpointMetadata.from_json(json.dumps(raw), "ckpt/metadata.json")
    raw["format"] = "other/1"
    with pytest.raises(CheckpointError, match="ckpt/metadata.json: format 'other/1'"):
        CheckpointMetadata.from_json(json.dumps(raw), "ckpt/metadata.json")


def test_loading_into_another_shape_names_every_differing_key():
    metadata = _metadata()
    other = dataclasses.replace(metadata.model_config, num_layers=6, num_image_codes=512)
    with pytest.raises(CheckpointError) as err:
        check_model_config(metadata, other)
    assert "model.num_layers: checkpoint 4 vs config 6" in str(err.value)
    assert "model.vocab: checkpoint 1280 vs config 1536" in str(err.value)
