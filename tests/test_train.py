"""Training: crops and augmentation, repeatable seeded runs, resume, and the train workflow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.card import load_model, weights_checksum
from pipeline.model.overshoot import Overshoot
from pipeline.model.preprocess import normalize_volume
from pipeline.model.registry import ModelRegistry
from train.augment import AugmentSettings, augment_intensity, crop_pair
from train.dataset import prepare_study, sample_batch
from train.evaluate import Evaluation, StudyResult
from train.metrics import LesionFidelity, SpuriousFoci
from train.pairs import StudyGroup, find_pairs, load_pair
from train.trainer import Precision, TrainSettings, _loss, train_network
from train.workflow import TrainRequest, activation_decision, run_training

TINY = {
    "in_channels": 3,
    "out_channels": 1,
    "base_width": 4,
    "depth": 2,
    "dropout": 0.1,
    "skip_connections": True,
    "norm": "batch",
}
# 2-D and without the lesion and slab augmentations unless a test asks for them.
SETTINGS = TrainSettings(
    direction="t1-to-t2",
    arguments=TINY,
    neighbour_distance_mm=None,
    lesion_painting=0.0,
    thick_slices=0.0,
    lesion_oversampling=0.0,
    epochs=2,
    steps_per_epoch=2,
    batch_size=2,
    crop=32,
)


@pytest.fixture(scope="module")
def native_pair(mr_brain: Path):
    search = find_pairs([mr_brain / "tcga-fg-6692-native"])
    return load_pair(search.pairs[0], "t1-to-t2", register=False)


@pytest.fixture(scope="module")
def native(native_pair):
    return prepare_study(
        native_pair, replace(SETTINGS, normalization="minmax-slice", target_normalization=None)
    )


def test_geometry_moves_source_and_target_alike_and_intensity_only_the_source() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((80, 90)).astype(np.float32)
    weight = np.ones((80, 90), dtype=bool)
    geometry_only = AugmentSettings(probability=0.0)
    crop = crop_pair(
        image[None], image, weight, weight, (40, 45), 32, geometry_only, np.random.default_rng(1)
    )
    np.testing.assert_array_equal(crop.source[0], crop.target)
    plain = crop_pair(image[None], image, weight, weight, (40, 45), 32, None, rng)
    assert not np.allclose(crop.source, plain.source)  # rotated, scaled or flipped
    assert crop.weight.shape == (32, 32) and crop.weight.min() == 1.0 and crop.head.all()

    source = augment_intensity(crop.source, AugmentSettings(probability=1.0), rng)
    assert not np.allclose(source, crop.source)
    assert source.min() >= 0 and source.max() <= 1


def test_intensity_augmentation_treats_neighbouring_slices_as_one_series() -> None:
    # The same gamma, coil field and blur for the slice and its neighbours: identical
    # channels stay identical but for their own noise.
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    channels = np.stack([image, image, image])
    no_noise = AugmentSettings(probability=1.0, noise=0.0)
    augmented = augment_intensity(channels, no_noise, np.random.default_rng(3))
    np.testing.assert_allclose(augmented[0], augmented[1], atol=1e-6)
    np.testing.assert_allclose(augmented[0], augmented[2], atol=1e-6)
    noisy = augment_intensity(channels, AugmentSettings(probability=1.0), np.random.default_rng(3))
    assert not np.allclose(noisy[0], noisy[1])


def test_crops_leave_the_slice_as_zero_weight() -> None:
    image = np.ones((40, 40), dtype=np.float32)
    crop = crop_pair(
        image[None],
        image,
        np.ones((40, 40), bool),
        image > 0,
        (0, 0),
        32,
        None,
        np.random.default_rng(0),
    )
    assert crop.weight[:15, :15].sum() == 0 and crop.weight[20:, 20:].min() == 1
    assert crop.source[0, :15, :15].max() == 0 and not crop.head[:15, :15].any()


def test_source_and_target_can_be_normalised_apart(native_pair) -> None:
    split = prepare_study(native_pair, SETTINGS)
    same = prepare_study(native_pair, replace(SETTINGS, target_normalization=None))
    np.testing.assert_array_equal(split.source, same.source)
    # percentile-volume tops out at 1; the median-scaled T2's fluid lies above it.
    assert split.target.max() == 1.0 < same.target.max()


def test_a_25d_study_carries_each_slices_neighbours(native_pair) -> None:
    spacing = native_pair.source.slice_spacing  # 5.5 mm: the neighbours are the next slices
    settings = replace(
        SETTINGS, neighbour_distance_mm=spacing, arguments={**TINY, "in_channels": 5}
    )
    study = prepare_study(native_pair, settings)
    assert study.source.shape[1:] == (3, *native_pair.source.pixels.shape[1:])
    whole = normalize_volume(np.asarray(native_pair.source.pixels), settings.normalization)
    for row, index in enumerate(native_pair.slices):
        np.testing.assert_allclose(study.source[row, 0], whole[index])
        np.testing.assert_allclose(study.source[row, 1], whole[max(index - 1, 0)], atol=1e-5)
        np.testing.assert_allclose(
            study.source[row, 2], whole[min(index + 1, len(whole) - 1)], atol=1e-5
        )
    batch = replace(settings, batch_size=4)
    inputs, targets, _ = sample_batch([study], batch, None, np.random.default_rng(0))
    assert inputs.shape == (4, 5, 32, 32) and targets.shape == (4, 1, 32, 32)


def test_batches_are_centred_on_the_head(native) -> None:
    inputs, targets, weights = sample_batch(
        [native], replace(SETTINGS, batch_size=6), AugmentSettings(), np.random.default_rng(0)
    )
    assert inputs.shape == (6, 3, 32, 32) and targets.shape == weights.shape == (6, 1, 32, 32)
    assert inputs.dtype == targets.dtype == np.float32
    # The centre pixel of every crop lies inside the head, where the loss counts.
    assert (weights[:, 0, 16, 16] == 1).all()
    assert (targets[:, 0, 12:20, 12:20].mean(axis=(1, 2)) > 0.05).all()


def test_loss_ignores_pixels_without_a_target() -> None:
    output = torch.zeros(1, 1, 4, 4)
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2] = 1.0
    weight = torch.ones(1, 1, 4, 4)
    assert _loss(output, target, weight, "mse").item() == pytest.approx(0.5)
    weight[..., :2] = 0
    for kind in ("mse", "l1"):
        assert _loss(output, target, weight, kind).item() == 0.0


def test_edge_term_scores_sharpness_where_the_target_is_defined() -> None:
    target = torch.zeros(1, 1, 8, 8)
    target[..., 4:] = 1.0
    blurred = target.clone()
    blurred[..., 3:5] = torch.tensor([1 / 3, 2 / 3])
    weight = torch.ones(1, 1, 8, 8)

    def edge_term(output: torch.Tensor, weight: torch.Tensor) -> float:
        return (
            _loss(output, target, weight, "mse", 1.0) - _loss(output, target, weight, "mse")
        ).item()

    # A sharp edge at the wrong level costs nothing extra; the blurred one does, though its
    # squared error is smaller.
    assert edge_term(target + 0.3, weight) == pytest.approx(0.0, abs=1e-6)
    assert _loss(blurred, target, weight, "mse") < _loss(target + 0.3, target, weight, "mse")
    assert edge_term(blurred, weight) > 0.05
    weight[..., 2:6] = 0
    assert edge_term(blurred, weight) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="edge_weight"):
        replace(SETTINGS, edge_weight=-1.0)


def test_seeded_runs_repeat_and_resume_matches_an_uninterrupted_run(native, tmp_path) -> None:
    first = train_network([native], [], SETTINGS)
    again = train_network([native], [], SETTINGS)
    other = train_network([native], [], replace(SETTINGS, seed=1))
    assert weights_checksum(first.network.state_dict()) == weights_checksum(
        again.network.state_dict()
    )
    assert weights_checksum(first.network.state_dict()) != weights_checksum(
        other.network.state_dict()
    )
    assert [h["epoch"] for h in first.history] == [1, 2]

    checkpoint = tmp_path / "run.ckpt"

    def stop_in_second_epoch(text: str, final: bool) -> None:
        if text.startswith("epoch 2/2") and not final:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_network([native], [], SETTINGS, checkpoint, progress=stop_in_second_epoch)
    resumed = train_network([native], [], SETTINGS, checkpoint, resume=True)
    assert resumed.history == first.history
    assert weights_checksum(resumed.network.state_dict()) == weights_checksum(
        first.network.state_dict()
    )
    with pytest.raises(ValueError, match="other settings"):
        train_network([native], [], replace(SETTINGS, seed=5), checkpoint, resume=True)


@pytest.mark.parametrize("precision", list(Precision))
def test_training_reduces_the_loss(native, precision: Precision) -> None:
    settings = replace(
        SETTINGS,
        epochs=3,
        steps_per_epoch=5,
        augment=False,
        learning_rate=3e-3,
        precision=precision,
    )
    result = train_network([native], [native], settings)
    assert result.history[-1]["loss"] < 0.85 * result.history[0]["loss"]
    assert {"val_psnr_head", "val_ssim_head"} <= result.history[-1].keys()
    assert result.samples == 3 * 5 * 2 and result.samples_per_second > 0
    # Whatever the convolutions ran in, the model is float32, as inference expects.
    assert {tensor.dtype for tensor in result.network.state_dict().values()} <= {
        torch.float32,
        torch.int64,  # batch norm's counter
    }


def test_bfloat16_training_runs_the_convolutions_in_bfloat16(native) -> None:
    # The same seed and crops: only the precision can make the weights differ.
    float32 = train_network([native], [], SETTINGS)
    bfloat16 = train_network([native], [], replace(SETTINGS, precision="bfloat16"))
    assert weights_checksum(float32.network.state_dict()) != weights_checksum(
        bfloat16.network.state_dict()
    )
    with pytest.raises(ValueError, match="precision must be one of float32, bfloat16"):
        replace(SETTINGS, precision="float16")


def test_train_workflow_writes_a_card_and_applies_the_activation_rule(mr_brain, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    data = [mr_brain / "tcga-fg-6692-native", mr_brain / "brats-met-00110"]
    # Enough training not to be collapsed, or the run would (rightly) not register it.
    settings = replace(SETTINGS, steps_per_epoch=4, batch_size=4, crop=48)
    request = TrainRequest(
        data=data,
        settings=settings,
        name="t1-to-t2",
        holdout=["TCGA-FG-6692"],
        out=tmp_path / "out.pt",
        registry=registry,
        command="dicomnode train ...",
        register=False,
    )
    lines: list[str] = []
    outcome = run_training(request, say=lines.append)
    assert any("held out: tcga-fg-6692-native" in line for line in lines)
    card = load_model(tmp_path / "out.pt").card
    assert card.checksum == outcome.card.checksum != ""
    assert card.training["command"] == "dicomnode train ..."
    assert card.training["held_out"][0]["study"] == "tcga-fg-6692-native"
    assert card.training["data"][0]["study"] == "brats-met-00110"
    assert "TCGA-FG-6692'" not in str(card.training)  # pseudonyms only
    held_out = card.metrics["held_out"]
    assert set(held_out["overall"]) == {"model", "input", "inverted"}
    assert held_out["collapsed"] is False
    # First version: nothing active yet, so it becomes active.
    assert outcome.activated and registry.active_version("t1-to-t2") == "v1"

    # The same run again gives the same weights: equal is not worse, so it is activated.
    second = run_training(replace(request, out=None), say=lines.append)
    assert registry.versions("t1-to-t2") == ["v1", "v2"]
    assert second.card.checksum == outcome.card.checksum
    assert second.card.metrics["active_version_on_same_data"]["model"].startswith("t1-to-t2")
    assert second.activated and registry.active_version("t1-to-t2") == "v2"


def _evaluation(
    psnr_head: float,
    ssim_head: float,
    corr_head: float = 0.8,
    lesion: float | None = None,
    overshoot_ml: float = 0.0,
) -> Evaluation:
    values = {"psnr_head": [psnr_head], "ssim_head": [ssim_head], "corr_head": [corr_head]}
    visibility = None
    if lesion is not None:
        # real 0.9: fidelity = (synthetic - 0.5) / 0.4
        seen = LesionFidelity(real=0.9, synthetic=0.5 + 0.4 * lesion, voxels=10)
        visibility = {"model": seen, "input": seen, "inverted": seen}
    study = StudyResult(
        label="study",
        patient="patient-1",
        group=StudyGroup.SKULL_STRIPPED,
        slices=1,
        dropped={},
        metrics={},
        collapse={"collapsed": False},
        lesions=visibility,
        spurious=dict.fromkeys(("model", "input", "inverted"), SpuriousFoci(0, 0.0, 1.0)),
        spurious_sites=[],
        overshoot=Overshoot(volume_ml=overshoot_ml, peak=0.9 + overshoot_ml, peak_slice=0),
        per_slice={"model": values, "input": values, "inverted": values},
        images=(np.zeros((1, 2, 2)),) * 3,
    )
    return Evaluation("m", "t1-to-t2", [study])


def test_activation_rule() -> None:
    active = _evaluation(20.0, 0.50)
    assert activation_decision(_evaluation(20.0, 0.50), active, True, False)[0]
    assert activation_decision(_evaluation(21.0, 0.55), active, True, False)[0]
    activate, why = activation_decision(_evaluation(21.0, 0.49), active, True, False)
    assert not activate and "ssim_head 0.4900 < 0.5000" in why
    assert not activation_decision(_evaluation(19.0, 0.60), active, True, False)[0]
    assert activation_decision(_evaluation(19.0, 0.40), active, True, True)[0]  # --force
    assert activation_decision(None, None, False, False)[0]  # nothing active yet
    activate, why = activation_decision(None, None, True, False)
    assert not activate and "no held-out patient" in why
    activate, why = activation_decision(_evaluation(20.0, 0.50, 0.7), active, True, False)
    assert not activate and "corr_head 0.7000 < 0.8000" in why
    # Where the held-out studies have lesion masks, a model that hides lesions more is
    # not activated however well it scores otherwise.
    with_lesions = _evaluation(20.0, 0.50, lesion=0.9)
    activate, why = activation_decision(_evaluation(22.0, 0.6, 0.9, 0.5), with_lesions, True, False)
    assert not activate and "lesion_fidelity 0.5000 < 0.9000" in why
    assert activation_decision(_evaluation(20.0, 0.50, lesion=0.95), with_lesions, True, False)[0]
    # Nor one whose synthesis of a held-out study a node would hold as an artefact.
    activate, why = activation_decision(
        _evaluation(22.0, 0.6, overshoot_ml=0.7), active, True, False
    )
    assert not activate and "a node would hold its synthesis of study for output beyond" in why
    assert why.endswith("the active version's of none")
    assert activation_decision(_evaluation(22.0, 0.6, overshoot_ml=0.05), active, True, False)[0]
