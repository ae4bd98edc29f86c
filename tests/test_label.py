"""The SYNTHETIC label burnt into the pixels: in the air, readable, on every slice."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from pipeline.dicom.label import burn_label, label_fits, text_mask


def find_label(image: np.ndarray, text: str, value: int, scale: int = 1) -> list[tuple[int, int]]:
    """Top-left corners where ``image`` holds ``text`` as burn_label writes it."""
    bitmap = text_mask(text, scale)
    expected = np.zeros((bitmap.shape[0] + 2 * scale, bitmap.shape[1] + 2 * scale), image.dtype)
    expected[scale:-scale, scale:-scale][bitmap] = value
    windows = sliding_window_view(image, expected.shape)
    return [tuple(map(int, p)) for p in np.argwhere((windows == expected).all(axis=(2, 3)))]


def disk_volume(slices: int = 3, size: int = 128, radius: int = 50):
    rows, columns = np.indices((size, size))
    head = (rows - size / 2) ** 2 + (columns - size / 2) ** 2 < radius**2
    pixels = np.where(head, 1000, 0).astype(np.uint16)
    return np.stack([pixels] * slices), np.stack([head] * slices)


def test_glyphs_spell_the_text():
    bitmap = text_mask("SYNTHETIC")
    assert bitmap.shape == (7, 9 * 6 - 1)
    assert bitmap[:, 5].sum() == 0  # a blank column between letters
    assert text_mask("T", 2).shape == (14, 10)
    with pytest.raises(ValueError, match="no glyph for 'Q'"):
        text_mask("Q")


def test_the_label_goes_into_the_air_of_every_slice_and_leaves_the_head_alone():
    pixels, head = disk_volume()
    labelled = burn_label(pixels, head, "SYNTHETIC", 4095)
    assert np.array_equal(labelled[head], pixels[head])  # not one head pixel changed
    for image in labelled:
        (corner,) = find_label(image, "SYNTHETIC", 4095)
        assert corner == (0, 0)  # the top-left corner is air
    assert not np.shares_memory(labelled, pixels)


def test_a_head_reaching_the_top_left_moves_the_label_to_another_corner():
    pixels, head = disk_volume(slices=1)
    head[0, :40, :70] = True
    (corner,) = find_label(burn_label(pixels, head, "SYNTHETIC", 7)[0], "SYNTHETIC", 7)
    assert corner[0] > 100 or corner[1] > 60


def test_a_head_filling_the_image_still_gets_its_label():
    pixels = np.full((1, 64, 64), 500, np.uint16)
    labelled = burn_label(pixels, np.ones_like(pixels, bool), "SYNTHETIC", 9)
    assert len(find_label(labelled[0], "SYNTHETIC", 9)) == 1


def test_an_image_too_small_for_the_label_is_an_error():
    with pytest.raises(ValueError, match="too small"):
        burn_label(np.zeros((1, 8, 8), np.uint16), np.zeros((1, 8, 8), bool), "SYNTHETIC", 1)


def test_only_images_of_a_few_pixels_have_no_room():
    assert label_fits((256, 256), "SYNTHETIC") and label_fits((64, 64), "SYNTHETIC")
    assert not label_fits((32, 32), "SYNTHETIC")
