"""Host-side geometry: torchvision's size and offset arithmetic."""
import numpy as np
import pytest

from us3l_jax.data import host_transforms as ht


def test_resize_shorter_truncates_the_long_side_like_torchvision():
    img = np.zeros((375, 500, 3), np.uint8)
    assert ht.resize_shorter(img, 256).shape == (256, 341, 3)  # int(256 * 500 / 375) = 341
    assert ht.resize_shorter(img.transpose(1, 0, 2), 256).shape == (341, 256, 3)


def test_center_crop_offsets_round_half_to_even():
    img = np.arange(7 * 9).reshape(7, 9, 1).repeat(3, axis=2).astype(np.uint8)
    out = ht.center_crop(img, 4)
    # top = round(1.5) = 2, left = round(2.5) = 2 (Python rounds half to even)
    np.testing.assert_array_equal(out[..., 0], img[2:6, 2:6, 0])
    with pytest.raises(ValueError, match="larger than the image"):
        ht.center_crop(img, 8)


def test_rrc_box_is_inside_and_in_range():
    rng = np.random.default_rng(0)
    boxes = np.array([ht.rrc_box(rng, 60, 80, (0.2, 1.0), (3 / 4, 4 / 3)) for _ in range(500)])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 60).all() and (left + w <= 80).all()
    frac = h * w / (60 * 80)
    assert frac.min() > 0.18 and frac.max() <= 1.0
    # U(0.2, 1) areas, minus the large tries that do not fit and are redrawn
    assert 0.4 < frac.mean() < 0.6


def test_rrc_fallback_is_the_central_crop():
    # ratio 2..3 cannot fit a full-area crop in a square image: all 10 tries fail
    box = ht.rrc_box(np.random.default_rng(0), 40, 40, (1.0, 1.0), (2.0, 3.0))
    assert box == ht.center_box(40, 40, (2.0, 3.0)) == (10, 0, 20, 40)


def test_grey_input_becomes_rgb_and_bad_shapes_are_rejected():
    out = ht.resized_crop(np.full((10, 12), 7, np.uint8), (0, 0, 10, 12), 5)
    assert out.shape == (5, 5, 3) and (out == 7).all()
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        ht.resized_crop(np.zeros((10, 12, 4), np.uint8), (0, 0, 10, 12), 5)
    with pytest.raises(ValueError, match="unknown interpolation 'nearest'"):
        ht.resize_shorter(np.zeros((10, 12, 3), np.uint8), 5, "nearest")
