"""Fixtures shared by several test files.

Helper modules (``tests/*_helpers.py``, ``platform_scenarios.py``) are imported by their bare name
(``from diffusion_helpers import tiny_vocab``): pytest puts ``tests/`` on ``sys.path``, and
spawned ranks inherit it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import pytest

# appended to the demo's samples: the build must reject both (an unknown image key, a text without text)
BAD_SAMPLES = '{"task": "text_to_image", "prompt": "p", "image": "nope"}\n{"task": "text"}\n'


@dataclasses.dataclass(frozen=True)
class Demo:
    root: pathlib.Path
    make_args: dict  # make_demo_data's arguments (tests regenerate with them)
    report: object   # data.build.BuildReport
    vocab: object    # tokens.Vocabulary

    @property
    def dataset(self) -> pathlib.Path:
        """The built IndexedDataset's prefix."""
        return self.root / "dataset" / "demo"


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Demo:
    """The generated demo data plus :data:`BAD_SAMPLES`, built into a dataset once per session."""
    from megatron_uni.data.build import BuildSettings, build_dataset
    from megatron_uni.data.demo import DEMO_IMAGE_CODES, make_demo_data
    from megatron_uni.tokens import Vocabulary

    root = tmp_path_factory.mktemp("demo")
    make_args = {"num_scenes": 12, "num_paragraphs": 16, "seed": 0}
    make_demo_data(str(root), **make_args)
    with open(root / "samples.jsonl", "a") as f:
        f.write(BAD_SAMPLES)
    settings = BuildSettings(str(root / "tokenizer"), str(root / "image_codes.json"), num_image_codes=DEMO_IMAGE_CODES)
    demo = Demo(root=root, make_args=make_args, report=None, vocab=None)
    report = build_dataset([str(root / "samples.jsonl")], str(demo.dataset), settings)
    vocab = Vocabulary.from_tokenizer_dir(str(root / "tokenizer"), num_image_codes=DEMO_IMAGE_CODES)
    return dataclasses.replace(demo, report=report, vocab=vocab)


@pytest.fixture(scope="module")
def single_process():
    """World size 1 with megatron's parallel groups and RNG tracker, torn down after the module."""
    from megatron_uni.platform.distributed import destroy, init_single_process

    init_single_process()
    yield
    destroy()
