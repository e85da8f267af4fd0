"""One kind of error: every refusal derives from MegatronUniError, and every CLI prints it as one
line with exit status 2 while a bug keeps its traceback (issue 11, section 4)."""

import pytest

from megatron_uni.errors import DataError, MegatronUniError, one_line_errors


def test_every_error_class_derives_from_the_base_and_keeps_its_old_base():
    from megatron_uni.checkpoint import CheckpointError
    from megatron_uni.config import ConfigError
    from megatron_uni.convert.hf_io import ConversionError
    from megatron_uni.data.schema import SampleError
    from megatron_uni.tokens import VocabularyError
    from megatron_uni.vq.weights import WeightMismatchError
    for error in (CheckpointError, ConfigError, ConversionError, SampleError, VocabularyError, WeightMismatchError,
                  DataError):
        assert issubclass(error, MegatronUniError), error
    assert issubclass(ConfigError, ValueError) and issubclass(CheckpointError, RuntimeError)  # old catches hold


def test_decorated_main_prints_one_line_and_exits_2(capsys):
    @one_line_errors("tool")
    def main(kind):
        if kind == "refused":
            raise DataError("in.jsonl: bad\n  second line")
        if kind == "missing":
            raise FileNotFoundError("input JSONL 'x' not found")
        raise KeyError("a bug")

    assert main("refused") == 2 and capsys.readouterr().err == "tool: error: in.jsonl: bad second line\n"
    assert main("missing") == 2 and "tool: error: input JSONL 'x' not found" in capsys.readouterr().err
    with pytest.raises(KeyError):  # a bug is not turned into a message
        main("bug")


def test_megatron_uni_cli_turns_any_refusal_into_one_line(monkeypatch, capsys):
    from megatron_uni import cli

    def refuse(args):
        raise DataError("dataset 'd': its build was killed while publishing")

    monkeypatch.setattr(cli, "cmd_info", refuse)
    assert cli.main(["info", "recipe.yaml"]) == 2
    assert capsys.readouterr().err == "megatron-uni: error: dataset 'd': its build was killed while publishing\n"
