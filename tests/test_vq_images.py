"""Resolution rules and pixel preprocessing of megatron_uni/vq/images.py."""

import numpy as np
import pytest
from PIL import Image

from megatron_uni.vq import images as rules


@pytest.mark.parametrize("size, expected", [
    ((1080, 1920), (576, 1056)),   # over budget: scaled down, floored to 32
    ((100, 100), (128, 128)),      # under budget: scaled up, ceiled to 32
    ((2000, 1000), (1120, 544)),
    ((800, 800), (800, 800)),      # exactly the budget
    ((500, 300), (512, 288)),      # in budget: rounded to 32
])
def test_understanding_smart_resize_known_values(size, expected):
    assert rules.understanding_size(*size) == expected


@pytest.mark.parametrize("height, width", [(37, 1999), (4000, 3000), (129, 130), (33, 33), (700, 20)])
def test_understanding_sizes_are_multiples_of_32_inside_the_budget(height, width):
    h, w = rules.understanding_size(height, width)
    assert h % 32 == 0 and w % 32 == 0
    assert h * w <= 800 * 800
    if h * w < 128 * 128:
        pytest.fail(f"{height}x{width} -> {h}x{w} is below the 128^2 budget")


def test_multi_image_budget_is_smaller():
    assert rules.understanding_size(1080, 1920, multi_image=True) == (320, 576)
    h, w = rules.understanding_size(2000, 2000, multi_image=True)
    assert h * w <= 448 * 448


@pytest.mark.parametrize("target, grid", [(256, 8), (512, 16), (1024, 32)])
def test_generation_targets_give_half_size_grids(target, grid):
    assert rules.generation_size(target) == (target // 2, target // 2)
    assert rules.generation_grid(target) == (grid, grid)
    assert rules.target_size("generation", 333, 777, generation_target=target) == (target // 2, target // 2)


def test_generation_rejects_other_targets():
    with pytest.raises(ValueError, match="768 px is not one of"):
        rules.generation_grid(768)
    with pytest.raises(ValueError, match="needs a target size"):
        rules.target_size("generation", 100, 100)


def test_editing_crops_have_area_512_squared_sides_32_aspect_4():
    sizes = rules.editing_crop_sizes()
    assert (512, 512) in sizes
    for w, h in sizes:
        assert w % 32 == 0 and h % 32 == 0
        assert w * h <= 512 * 512
        assert max(w, h) / min(w, h) <= 4
    assert rules.editing_size(512, 512) == (512, 512)
    assert rules.editing_size(600, 1200) == (352, 704)    # 2:1 kept exactly
    assert rules.editing_size(1000, 100) == (1024, 256)   # aspect 10 clipped to 4


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="unknown resolution mode 'thumbnail'"):
        rules.target_size("thumbnail", 10, 10)


def test_normalize_maps_0_255_to_minus1_plus1_channel_first():
    pixels = np.zeros((2, 3, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[0, 0, 2] = 51
    out = rules.normalize(pixels)
    assert out.shape == (3, 2, 3)
    assert out[0].eq(1.0).all() and out[1].eq(-1.0).all()
    assert abs(float(out[2, 0, 0]) - (51 / 255 - 0.5) / 0.5) < 1e-6
    with pytest.raises(ValueError, match="expected uint8 pixels"):
        rules.normalize(np.zeros((4, 4), dtype=np.uint8))


def test_resize_and_crop_covers_then_crops_the_centre():
    # 100x400 image: left quarter red, middle half green, right quarter blue. Target 64x128 (aspect 2)
    # covers at 64x256, so the centre crop keeps only the green half.
    array = np.zeros((100, 400, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:300, 1] = 255
    array[:, 300:, 2] = 255
    out = np.asarray(rules.resize_and_crop(Image.fromarray(array), 64, 128))
    assert out.shape == (64, 128, 3)
    assert out[:, 4:-4, 1].min() > 240 and out[:, 4:-4, 0].max() < 15 and out[:, 4:-4, 2].max() < 15
    assert rules.cover_size(100, 400, 64, 128) == (64, 256)
    assert rules.code_grid(64, 128) == (4, 8)
