"""Training: crops and augmentation, repeatable seeded runs, resume, and the train workflow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.modelfile import load_model, weights_checksum
from pipeline.registry import ModelRegistry
from train.augment import AugmentSettings, crop_pair
from train.dataset import prepare_study, sample_batch
from train.evaluate import Evaluation, StudyResult
from train.pairs import find_pairs, load_pair
from train.trainer import TrainSettings, _loss, train_network
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
SETTINGS = TrainSettings(
    direction="t1-to-t2", arguments=TINY, epochs=2, steps_per_epoch=2, batch_size=2, crop=32
)


@pytest.fixture(scope="module")
def native(mr_brain: Path):
    search = find_pairs([mr_brain / "tcga-fg-6692-native"])
    return prepare_study(load_pair(search.pairs[0], "t1-to-t2", register=False), "minmax-slice")


def test_geometry_moves_source_and_target_alike_and_intensity_only_the_source() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((80, 90)).astype(np.float32)
    weight = np.ones((80, 90), dtype=bool)
    geometry_only = AugmentSettings(probability=0.0)
    source, target, crop_weight = crop_pair(
        image, image, weight, (40, 45), 32, geometry_only, np.random.default_rng(1)
    )
    np.testing.assert_array_equal(source, target)
    plain_source, _, _ = crop_pair(image, image, weight, (40, 45), 32, None, rng)
    assert not np.allclose(source, plain_source)  # rotated, scaled or flipped
    assert crop_weight.shape == (32, 32) and crop_weight.min() == 1.0

    # Same generator state: the same geometry, then the intensity draws on the source only.
    every_time = AugmentSettings(probability=1.0)
    source_2, target_2, _ = crop_pair(
        image, image, weight, (40, 45), 32, every_time, np.random.default_rng(1)
    )
    np.testing.assert_array_equal(target_2, target)
    assert not np.allclose(source_2, target_2)
    assert source_2.min() >= 0 and source_2.max() <= 1


def test_crops_leave_the_slice_as_zero_weight() -> None:
    image = np.ones((40, 40), dtype=np.float32)
    source, _, weight = crop_pair(
        image, image, np.ones((40, 40), bool), (0, 0), 32, None, np.random.default_rng(0)
    )
    assert weight[:15, :15].sum() == 0 and weight[20:, 20:].min() == 1
    assert source[:15, :15].max() == 0


def test_source_and_target_can_be_normalised_apart(mr_brain: Path) -> None:
    search = find_pairs([mr_brain / "tcga-fg-6692-native"])
    paired = load_pair(search.pairs[0], "t1-to-t2", register=False)
    split = prepare_study(paired, "median-volume", "percentile-volume")
    same = prepare_study(paired, "median-volume")
    np.testing.assert_array_equal(split.source, same.source)
    # percentile-volume tops out at 1; the median-scaled T2's fluid lies above it.
    assert split.target.max() == 1.0 < same.target.max()


def test_batches_are_centred_on_the_head(native) -> None:
    inputs, targets, weights = sample_batch(
        [native], 6, 32, True, AugmentSettings(), np.random.default_rng(0)
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


def test_training_reduces_the_loss(native) -> None:
    settings = replace(SETTINGS, epochs=3, steps_per_epoch=5, augment=False, learning_rate=3e-3)
    result = train_network([native], [native], settings)
    assert result.history[-1]["loss"] < 0.85 * result.history[0]["loss"]
    assert {"val_psnr_head", "val_ssim_head"} <= result.history[-1].keys()
    assert result.samples == 3 * 5 * 2 and result.samples_per_second > 0


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


def _evaluation(psnr_head: float, ssim_head: float) -> Evaluation:
    values = {"psnr_head": [psnr_head], "ssim_head": [ssim_head]}
    study = StudyResult(
        label="study",
        patient="patient-1",
        slices=1,
        dropped={},
        metrics={},
        collapse={"collapsed": False},
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
