"""Lesion fidelity: the metric on images where the answer is known, masks placed on a pair's
grid, painted lesions, and `dicomnode evaluate` printing fidelity for a real MS patient."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from node.cli import _parser
from pipeline.model.scores import correlation
from tests.test_evaluate import tiny_model
from train.flairmasks import write_masks
from train.folds import patient_folds
from train.lesionpaint import FluidLevels, PaintSettings, fluid_levels, paint_lesions
from train.lesions import LesionMaskError, LesionMasks
from train.metrics import SpuriousFociScorer, brighter_probability, lesion_fidelity
from train.pairs import StudyGroup, find_pairs, load_pair
from train.trainer import TrainSettings

SPACING = (1.0, 1.0, 1.0)


def _brain_with_lesion(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A textured 'real T2' (16, 64, 64), a bright 6 mm ball in it, and the head."""
    rng = np.random.default_rng(seed)
    grid = np.indices((16, 64, 64))
    head = np.ones((16, 64, 64), dtype=bool)
    lesion = ((grid - np.array([8, 32, 32])[:, None, None, None]) ** 2).sum(axis=0) <= 36
    tissue = 0.4 + 0.05 * rng.standard_normal((16, 64, 64))
    real = np.where(lesion, 0.9, tissue) + 0.02 * rng.standard_normal((16, 64, 64))
    return real, lesion, head


def test_fidelity_of_a_copied_a_removed_and_an_inverted_lesion() -> None:
    real, lesion, head = _brain_with_lesion()
    copied = lesion_fidelity(real.copy(), real, lesion, head, SPACING)
    assert copied.real > 0.99 and copied.fidelity == pytest.approx(1.0)
    # Any increasing map of the intensities sees the lesion alike (another site's scale).
    rescaled = lesion_fidelity(np.sqrt(real.clip(0)) * 900 + 12, real, lesion, head, SPACING)
    assert rescaled.fidelity == pytest.approx(1.0, abs=0.01)
    # Normal tissue painted over the lesion: as visible as chance.
    tissue = np.where(
        lesion, 0.4 + 0.05 * np.random.default_rng(1).standard_normal(real.shape), real
    )
    removed = lesion_fidelity(tissue, real, lesion, head, SPACING)
    assert abs(removed.fidelity) < 0.1
    inverted = lesion_fidelity(np.where(lesion, 0.1, real), real, lesion, head, SPACING)
    assert inverted.fidelity < -0.9
    half = lesion_fidelity(np.where(lesion, real - 0.45, real), real, lesion, head, SPACING)
    assert 0.0 < half.fidelity < 1.0
    # A lesion the real image does not show has no fidelity to measure.
    faint = lesion_fidelity(real, np.where(lesion, 0.4, real), lesion, head, SPACING)
    assert faint.fidelity is None
    assert copied.voxels == int(lesion.sum())


def test_spurious_foci_are_those_the_real_image_does_not_show() -> None:
    real, lesion, head = _brain_with_lesion()
    against_real = SpuriousFociScorer(real, head, SPACING)
    assert against_real(real.copy()).count == 0
    # The real lesion drawn a second time, 20 mm away: one focus.
    elsewhere = np.roll(lesion, 20, axis=2)
    invented = np.where(elsewhere, 0.9, real)
    found = against_real(invented)
    assert found.count == 1
    # Its core: the rim of a 12 mm ball hardly stands out from surroundings half ball.
    assert 0.4 < found.volume_ml / (lesion.sum() / 1000) <= 1.0
    assert found.region_ml == pytest.approx(head.sum() / 1000)
    # Where it is: its peak inside the invented lesion.
    (focus,) = against_real.foci(invented)
    assert elsewhere[focus.peak] and focus.contrast > 0.3
    assert focus.volume_mm3 == pytest.approx(found.volume_ml * 1000)
    # Where the real image has it too, or where an expert's mask says a lesion is, none.
    both = np.where(elsewhere, 0.9, real)
    assert SpuriousFociScorer(both, head, SPACING)(invented).count == 0
    assert SpuriousFociScorer(real, head, SPACING, known=elsewhere)(invented).count == 0
    # Any increasing map of the intensities finds the same focus.
    assert against_real(np.exp(invented) * 300).count == 1
    # Smaller than a reader would count (a 1 mm dot): not a focus.
    dot = np.zeros_like(lesion)
    dot[8, 32, 12] = True
    assert against_real(np.where(dot, 0.9, real)).count == 0
    # A T1 shows its lesions dark: an invented dark focus counts there, a bright one not.
    t1 = 1.0 - real
    assert SpuriousFociScorer(t1, head, SPACING, bright=False)(1.0 - invented).count == 1
    assert SpuriousFociScorer(t1, head, SPACING)(1.0 - invented).count == 0


def test_a_dark_lesion_is_scored_the_same_way_for_t1() -> None:
    real, lesion, head = _brain_with_lesion()
    t1 = 1.0 - real  # the lesion is dark
    assert lesion_fidelity(t1, t1, lesion, head, SPACING).fidelity == pytest.approx(1.0)
    assert lesion_fidelity(real, t1, lesion, head, SPACING).fidelity < -0.9


def test_brighter_probability_counts_ties_half_and_correlation_is_scale_free() -> None:
    image = np.array([1.0, 1.0, 2.0, 0.0])
    lesion = np.array([True, False, False, False])
    assert brighter_probability(image, lesion, ~lesion) == pytest.approx((0.5 + 0 + 1) / 3)
    with pytest.raises(ValueError, match="inside and outside"):
        brighter_probability(image, np.zeros(4, bool), ~lesion)
    x = np.random.default_rng(0).random(100)
    assert correlation(3 * x + 7, x) == pytest.approx(1.0)
    assert correlation(-x, x) == pytest.approx(-1.0)
    assert correlation(np.ones(100), x) == 0.0


@pytest.fixture(scope="module")
def ms_pairs(mr_brain: Path):
    data = mr_brain.parent
    masks = LesionMasks.load(data / "lesions")
    search = find_pairs([data / "mr-brain-more" / "ms-c26-mni"])
    return {
        direction: load_pair(search.pairs[0], direction, lesions=masks)
        for direction in ("t1-to-t2", "t2-to-t1")
    }


def test_a_mask_lands_on_its_series_in_both_directions(mr_brain: Path, ms_pairs) -> None:
    with np.load(mr_brain.parent / "lesions" / "ms-c26-mni.npz") as content:
        expert = content["mask"] > 0
    t1_source = ms_pairs["t1-to-t2"]
    # Drawn on the T1: as the T1 is the source, the mask is the expert's voxel for voxel.
    assert t1_source.lesions is not None
    np.testing.assert_array_equal(t1_source.lesions, expert)
    # As the target, the T1 is placed on the T2's grid (the same grid here) with it.
    np.testing.assert_array_equal(ms_pairs["t2-to-t1"].lesions, expert)
    assert t1_source.group is StudyGroup.SKULL_STRIPPED
    # The lesions are bright on the real T2 and dark on the real T1, against what is around.
    region = t1_source.head & t1_source.covered
    t2 = lesion_fidelity(t1_source.target, t1_source.target, expert, region, SPACING)
    t1 = lesion_fidelity(
        ms_pairs["t2-to-t1"].target, ms_pairs["t2-to-t1"].target, expert, region, SPACING
    )
    assert t2.real > 0.75 and t1.real < 0.3


def test_mask_files_that_do_not_fit_are_refused_by_name(tmp_path: Path, mr_brain: Path) -> None:
    with pytest.raises(LesionMaskError, match="does not exist"):
        LesionMasks.load(tmp_path / "missing")
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(LesionMaskError, match=r"bad\.npz"):
        LesionMasks.load(tmp_path)
    (tmp_path / "bad.npz").unlink()
    with np.load(mr_brain.parent / "lesions" / "ms-c26-mni.npz") as content:
        np.savez(
            tmp_path / "short.npz",
            mask=content["mask"][:10],
            series_uid=content["series_uid"],
            sop_uids=content["sop_uids"][:10],
        )
    masks = LesionMasks.load(tmp_path)
    search = find_pairs([mr_brain.parent / "mr-brain-more" / "ms-c26-mni"])
    with pytest.raises(LesionMaskError, match=r"short\.npz: its 10 slices"):
        load_pair(search.pairs[0], "t1-to-t2", lesions=masks)


def test_folds_hold_every_patient_out_once_and_spread_the_kinds(ms_pairs, mr_brain) -> None:
    search = find_pairs([mr_brain])
    paired = [load_pair(pair, "t1-to-t2", register=False) for pair in search.pairs]
    paired.append(ms_pairs["t1-to-t2"])
    folds = patient_folds(paired, 3)
    held = [patient for fold in folds for patient in fold.held_out]
    assert sorted(held) == sorted({item.pair.patient for item in paired})
    assert len(held) == len(set(held))
    # The patient with a study as acquired and the one with a mask are in different folds.
    acquired = next(i.pair.patient for i in paired if i.group is StudyGroup.AS_ACQUIRED)
    masked = ms_pairs["t1-to-t2"].pair.patient
    assert next(f for f in folds if acquired in f.held_out) != next(
        f for f in folds if masked in f.held_out
    )
    assert patient_folds(paired, 3) == folds  # fixed
    with pytest.raises(ValueError, match="at least 9 patients"):
        patient_folds(paired, 9)


def test_painted_lesions_darken_t1_brighten_t2_at_every_depth() -> None:
    rng = np.random.default_rng(0)
    head = np.zeros((64, 64), dtype=bool)
    head[4:60, 4:60] = True
    t1 = np.where(head, 0.6, 0.0).astype(np.float32)
    t2 = np.where(head, 0.3, 0.0).astype(np.float32)
    source = np.stack([t1, t1, t1])  # the slice, 3 mm below, 3 mm above
    levels = FluidLevels(source=0.1, target=0.95)
    for seed in range(5):
        painted_source, painted_target, fraction = paint_lesions(
            source, t2, head, levels, True, (0.0, -3.0, 3.0), 1.0, np.random.default_rng(seed)
        )
        where = fraction > 0.05
        assert where.any() and not (where & ~head).any()
        assert (painted_target[where] > t2[where]).all()
        assert (painted_source[0][where] < t1[where]).all()
        # Between the tissue and the fluid: never darker or brighter than fluid.
        assert painted_source[:, head].min() >= 0.1 - 1e-6
        assert painted_target.max() <= 0.95 + 1e-6
        # A lesion is 3-D: its neighbours show it too, unless it is thinner than 3 mm.
        assert (painted_source[1:] < t1).any()
    # The other direction paints the T2 source bright and the T1 target dark.
    back_source, back_target, fraction = paint_lesions(
        np.stack([t2]), t1, head, FluidLevels(0.95, 0.1), False, (0.0,), 1.0, rng
    )
    where = fraction > 0.05
    assert (back_source[0][where] > t2[where]).all() and (back_target[where] < t1[where]).all()


def test_the_tumour_share_chooses_one_large_lesion_or_several_small() -> None:
    head = np.zeros((96, 96), dtype=bool)
    head[4:92, 4:92] = True
    t1 = np.where(head, 0.6, 0.0).astype(np.float32)
    t2 = np.where(head, 0.3, 0.0).astype(np.float32)

    def painted(tumour_share: float, seed: int) -> tuple[int, int]:
        """The painted pixels and their pieces (a lesion's slice may be in several)."""
        _, _, fraction = paint_lesions(
            t1[None],
            t2,
            head,
            FluidLevels(source=0.1, target=0.95),
            True,
            (0.0,),
            1.0,
            np.random.default_rng(seed),
            PaintSettings(single_probability=tumour_share),
        )
        where = fraction > 0.05
        return int(where.sum()), ndimage.label(where)[1]

    tumours = np.array([painted(1.0, seed) for seed in range(16)]).mean(axis=0)
    plaques = np.array([painted(0.0, seed) for seed in range(16)]).mean(axis=0)
    # One large lesion against two to five small ones: larger, in fewer pieces.
    assert tumours[0] > 1.5 * plaques[0] and tumours[1] < plaques[1] / 2
    with pytest.raises(ValueError, match="painted_tumour_share is a probability"):
        TrainSettings(direction="t1-to-t2", painted_tumour_share=1.5)


def test_fluid_levels_are_csf(ms_pairs) -> None:
    paired = ms_pairs["t1-to-t2"]
    levels = fluid_levels(paired.source.pixels, paired.target, paired.head, True)
    head_t1 = paired.source.pixels[paired.head]
    head_t2 = paired.target[paired.head]
    # CSF: darker than most of the T1 head, brighter than most of the T2 head.
    assert levels.source < np.percentile(head_t1, 20)
    assert levels.target > np.percentile(head_t2, 95)


def test_evaluate_prints_lesion_fidelity_where_a_mask_exists(mr_brain, tmp_path, capsys) -> None:
    tiny_model(tmp_path / "m.pt")
    args = _parser(training=True).parse_args(
        [
            "evaluate",
            str(tmp_path / "m.pt"),
            str(mr_brain.parent / "mr-brain-more" / "ms-c26-mni"),
            "--lesions",
            str(mr_brain.parent / "lesions"),
            "--report",
            str(tmp_path / "r"),
            "--config",
            str(tmp_path / "config.toml"),
        ]
    )
    args.run(args)
    printed = capsys.readouterr().out
    assert "lesions (8227 voxels): visible in the real image with probability 0." in printed
    assert "fidelity" in printed
    report = json.loads((tmp_path / "r" / "t1-to-t2-v1.json").read_text())
    lesions = report["pairs"]["studies"][0]["lesions"]
    assert lesions["model"]["voxels"] == 8227 and lesions["model"]["real"] > 0.75
    # The inverted T1 keeps an MS lesion visible: a floor the model is compared with.
    assert lesions["inverted"]["fidelity"] > 0.3
    assert set(report["pairs"]["lesion_fidelity"]) == {"model", "input", "inverted"}


def test_a_gliomas_flair_hyperintensity_becomes_a_mask_evaluation_takes(mr_brain, tmp_path) -> None:
    lines = write_masks([mr_brain / "brats-gli-00001", mr_brain / "tcga-fg-6692-native"], tmp_path)
    assert any(line.startswith("brats-gli-00001: ") and "voxels" in line for line in lines)
    assert any("tcga-fg-6692-native: FLAIR with the skull; no mask" in line for line in lines)
    masks = LesionMasks.load(tmp_path)
    paired = load_pair(
        find_pairs([mr_brain / "brats-gli-00001"]).pairs[0], "t1-to-t2", lesions=masks
    )
    assert paired.lesions is not None
    volume_ml = paired.lesions.sum() / 1000  # 1 mm voxels
    assert 10 < volume_ml < 200
    # Where FLAIR is bright, so is the real T2: the tumour and its oedema.
    region = paired.head & paired.covered
    seen = lesion_fidelity(paired.target, paired.target, paired.lesions, region, SPACING)
    assert seen.real > 0.8
