"""The lesion ceiling: what a source carries of a lesion, on images where that is known."""

from __future__ import annotations

import numpy as np
import pytest

from train.ceiling import FEATURE_SETS, lesion_ceiling, main, mirrored

SPACING = (1.0, 1.0, 1.0)


def _pair(lesion_in_source: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A textured source and target (16, 64, 64) with a 6 mm ball that is bright in the
    target and ``lesion_in_source`` darker than the tissue in the source."""
    rng = np.random.default_rng(0)
    grid = np.indices((16, 64, 64))
    lesion = ((grid - np.array([8, 32, 32])[:, None, None, None]) ** 2).sum(axis=0) <= 36
    source = 0.6 + 0.05 * rng.standard_normal(lesion.shape) - lesion_in_source * lesion
    target = 0.4 + 0.05 * rng.standard_normal(lesion.shape) + 0.5 * lesion
    return source, target, lesion, np.ones_like(lesion)


def test_a_lesion_the_source_shows_can_be_carried_through() -> None:
    ceilings = lesion_ceiling(*_pair(lesion_in_source=0.3), SPACING)
    assert set(ceilings) == set(FEATURE_SETS)
    for ceiling in ceilings.values():
        assert ceiling.regression is not None and ceiling.regression > 0.8
        assert ceiling.separability is not None and ceiling.separability > 0.8


def test_a_lesion_the_source_does_not_show_cannot() -> None:
    for ceiling in lesion_ceiling(*_pair(lesion_in_source=0.0), SPACING).values():
        assert ceiling.regression is not None and abs(ceiling.regression) < 0.25
        assert ceiling.separability is not None and abs(ceiling.separability) < 0.25


def test_a_dark_target_lesion_keeps_its_sign() -> None:
    source, target, lesion, region = _pair(lesion_in_source=0.3)
    # t2-to-t1: the source shows the lesion bright, the target dark.
    ceilings = lesion_ceiling(target, source, lesion, region, SPACING)
    assert all(c.separability is not None and c.separability > 0.8 for c in ceilings.values())


def test_a_missing_mask_folder_is_named_without_a_traceback(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path), "--lesions", str(tmp_path / "absent")])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "absent" in error and "Traceback" not in error


def test_the_other_side_is_the_mirror_image_across_the_head_midline() -> None:
    region = np.zeros((2, 8, 20), dtype=bool)
    region[:, :, 4:14] = True  # a head centred on column 8.5, off the image's centre
    volume = np.zeros(region.shape, dtype=np.float32)
    volume[:, 3, 5] = 1.0  # 3.5 columns left of the midline
    other = mirrored(volume, region)
    assert other[0, 3, 12] == pytest.approx(1.0) and other[1, 3, 12] == pytest.approx(1.0)
    assert other.sum() == pytest.approx(volume.sum())
