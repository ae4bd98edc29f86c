"""Finding T1/T2 pairs by header and aligning them by DICOM geometry, on the real studies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from pipeline.dicom.contrast import Contrast, classify
from pipeline.dicom.volume import load_series
from pipeline.model.preprocess import head_mask
from tests.support.dicomgen import as_sagittal_files, enhanced_mr
from train.pairs import find_pairs, load_pair, patient_label, split_by_patient


@pytest.fixture(scope="module")
def search(mr_brain: Path):
    return find_pairs([mr_brain])


def by_label(search, label: str):
    return next(pair for pair in search.pairs if pair.label == label)


def test_pairs_are_found_by_header_classification(search) -> None:
    labels = [pair.label for pair in search.pairs]
    assert labels == ["brats-gli-00001", "brats-met-00110", "tcga-fg-6692", "tcga-fg-6692-native"]
    assert len({pair.patient_id for pair in search.pairs}) == 3
    for pair in search.pairs:
        # brats-gli and the native study also hold FLAIR and T1 post-contrast series:
        # neither may stand in for the T1 or the T2.
        assert classify(pair.t1.header).contrast is Contrast.T1
        assert classify(pair.t2.header).contrast is Contrast.T2
        assert pair.t1.study_uid == pair.t2.study_uid
    # The T1-only study has no partner: reported, and listed for synthesis without metrics.
    assert any("healthy-t1-only" in note and "no T2" in note for note in search.notes)
    assert [series.folder.parent.name for _, series in search.unpaired] == ["healthy-t1-only"]


def test_patients_are_pseudonymised(search) -> None:
    native = by_label(search, "tcga-fg-6692-native")
    assert native.patient == patient_label(native.patient_id)
    assert native.patient_id not in native.patient
    assert native.patient == by_label(search, "tcga-fg-6692").patient  # one person, one name


def test_coregistered_pair_resamples_to_itself(search) -> None:
    paired = load_pair(by_label(search, "brats-met-00110"), "t1-to-t2")
    t2 = load_series(paired.pair.t2.files)
    assert paired.covered.all()
    np.testing.assert_array_equal(paired.target, t2.pixels)
    # Slices at the ends of the atlas volume hold no brain and are dropped, with the reason.
    assert 100 < len(paired.slices) < 155
    assert sum(paired.dropped.values()) == 155 - len(paired.slices)
    assert list(paired.dropped) == ["with (almost) no head in the source"]


def test_native_pair_is_placed_by_geometry(search) -> None:
    # The native T1 and T2 are two slabs with their own obliquity (the T2 is tilted about
    # 17 degrees against the T1) and even their own matrix (224x256 against 256x224).
    # (Their headers alone leave them misaligned; test_registration covers the fix.)
    pair = by_label(search, "tcga-fg-6692-native")
    paired = load_pair(pair, "t1-to-t2", register=False)
    assert paired.target.shape == paired.source.pixels.shape == (26, 224, 256)
    keep = paired.slices
    t1_head = paired.head[keep]
    t2_head = head_mask(paired.target)[keep]
    dice = 2 * (t1_head & t2_head).sum() / (t1_head.sum() + t2_head.sum())
    # Index for index, as if the series were on one grid (cropped to the common matrix):
    t2 = head_mask(load_series(pair.t2.files).pixels)[keep][:, :224, :224]
    naive = 2 * (t1_head[:, :, :224] & t2).sum() / (t1_head[:, :, :224].sum() + t2.sum())
    assert dice > 0.92 > naive + 0.03
    assert paired.dropped == {"outside the target's slab (no overlap)": 26 - len(keep)}
    assert 15 <= len(keep) < 26
    reverse = load_pair(pair, "t2-to-t1", register=False)
    assert reverse.target.shape == (26, 256, 224)
    assert paired.registration is None


def test_an_enhanced_mr_export_pairs_like_its_classic_one(search, mr_brain, tmp_path) -> None:
    # Siemens XA and Philips export each series as one multi-frame file.
    native = mr_brain / "tcga-fg-6692-native"
    for name in ("03_t1", "04_t2", "05_flair", "07_t1c"):
        classic = [dcmread(path) for path in sorted((native / name).glob("*.dcm"))]
        (tmp_path / "export").mkdir(exist_ok=True)
        enhanced_mr(classic).save_as(tmp_path / "export" / f"{name}.dcm", enforce_file_format=True)

    (pair,) = find_pairs([tmp_path]).pairs
    paired = load_pair(pair, "t1-to-t2", register=False)

    expected = load_pair(by_label(search, "tcga-fg-6692-native"), "t1-to-t2", register=False)
    assert pair.patient == expected.pair.patient
    np.testing.assert_array_equal(paired.source.pixels, expected.source.pixels)
    np.testing.assert_allclose(paired.target, expected.target, atol=1e-3)
    np.testing.assert_array_equal(paired.slices, expected.slices)


def test_a_sagittal_3d_t1_trains_on_its_axial_view(search, mr_brain, tmp_path) -> None:
    # Most brain protocols acquire the T1 as a sagittal 3D series and the T2 axially.
    expected = load_pair(by_label(search, "brats-met-00110"), "t1-to-t2")
    study = tmp_path / "export"
    as_sagittal_files(load_series(expected.pair.t1.files), study / "t1")
    (study / "t2").mkdir()
    for path in expected.pair.t2.files:
        (study / "t2" / path.name).symlink_to(path)

    (pair,) = find_pairs([tmp_path]).pairs
    paired = load_pair(pair, "t1-to-t2")

    assert [path.parent.name for path in (pair.t1.files[0], pair.t2.files[0])] == ["t1", "t2"]
    np.testing.assert_array_equal(paired.source.pixels, expected.source.pixels)
    np.testing.assert_allclose(paired.source.affine(), expected.source.affine(), atol=1e-3)
    np.testing.assert_array_equal(paired.target, expected.target)  # same grid: voxel for voxel
    np.testing.assert_array_equal(paired.slices, expected.slices)
    assert paired.registration is None


def test_training_pairs_are_resampled_to_the_models_pixel_size(search) -> None:
    # A hospital's 0.45 mm T2 would be; here the native pair is taken at 2 mm pixels.
    paired = load_pair(by_label(search, "tcga-fg-6692-native"), "t1-to-t2", False, 2.0)
    assert paired.source.pixels.shape == (26, 101, 116)
    np.testing.assert_allclose(paired.source.pixel_spacing, 2.0, atol=0.01)
    keep = paired.slices
    t1_head, t2_head = paired.head[keep], head_mask(paired.target)[keep]
    assert 2 * (t1_head & t2_head).sum() / (t1_head.sum() + t2_head.sum()) > 0.92


def test_split_keeps_a_patient_on_one_side(search) -> None:
    native = by_label(search, "tcga-fg-6692-native")
    for name in (native.patient_id, native.patient):
        training, held_out = split_by_patient(search.pairs, [name], 0.0, seed=0)
        assert {p.label for p in held_out} == {"tcga-fg-6692", "tcga-fg-6692-native"}
        assert native.patient_id not in {p.patient_id for p in training}
    training, held_out = split_by_patient(search.pairs, [], 0.34, seed=3)
    assert len({p.patient_id for p in held_out}) == 1
    assert not {p.patient_id for p in held_out} & {p.patient_id for p in training}
    assert split_by_patient(search.pairs, [], 0.34, seed=3) == (training, held_out)
    assert split_by_patient(search.pairs, [], 0.0, seed=3) == (search.pairs, [])
    with pytest.raises(ValueError, match="no paired study"):
        split_by_patient(search.pairs, ["NOBODY"], 0.0, seed=0)
