"""The scheduled refresh: its settings, the recipe it repeats, and that it reports instead
of raising."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from pydantic import ValidationError

from pipeline.model.registry import ModelRegistry
from tests.support.models import activate_recipe
from train.refresh import refresh_models, refresh_recipe
from train.settings import RefreshSettings
from train.trainer import TrainSettings

# A recipe unlike the library's defaults in width, painting and length, small enough to
# train in seconds, not collapsed.
RECIPE = TrainSettings(
    direction="t1-to-t2",
    arguments={"in_channels": 5, "base_width": 4, "depth": 2},
    lesion_painting=1.0,
    painted_tumour_share=0.0,
    epochs=2,
    steps_per_epoch=4,
    batch_size=4,
    crop=48,
    seed=7,
)
# The recipe's held-out k-fold figures, as `train.ablation --attach` puts them on a card.
REFERENCE = {
    "protocol": "5-fold by patient",
    "lesion_fidelity": {"studies": {"ms": {"model": 0.7}}},
}


def test_settings_defaults_and_validation() -> None:
    settings = RefreshSettings()
    assert settings.enabled is False and settings.directions == ["t1-to-t2", "t2-to-t1"]
    assert (settings.hour, settings.minute) == (2, 0)
    assert RefreshSettings(time="3:05").time == "03:05"
    for bad in ({"time": "25:00"}, {"time": "2am"}, {"directions": ["t1-to-flair"]}):
        with pytest.raises(ValidationError):
            RefreshSettings(**bad)
    with pytest.raises(ValidationError):
        RefreshSettings(validation_fraction=0)  # nothing held out: nothing to compare on
    with pytest.raises(ValidationError):
        RefreshSettings(unknown_key=1)


def test_disabled_refresh_does_nothing(tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    assert refresh_models(RefreshSettings(data=[tmp_path]), registry) == [
        "refresh is disabled ([refresh] enabled = false)"
    ]
    assert registry.names() == []


def test_a_direction_without_pairs_is_reported(mr_brain, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    settings = RefreshSettings(enabled=True, data=[mr_brain / "healthy-t1-only"])
    lines = refresh_models(settings, registry)
    assert lines == [
        f"{direction}: not refreshed: no T1/T2 pairs found under {mr_brain / 'healthy-t1-only'}"
        for direction in ("t1-to-t2", "t2-to-t1")
    ]
    assert registry.names() == []


def test_a_refresh_repeats_the_active_models_recipe_with_its_own_seed(tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    activate_recipe(registry, RECIPE, REFERENCE)

    recipe = refresh_recipe(RefreshSettings(enabled=True), registry, "t1-to-t2")
    assert recipe.settings == replace(RECIPE, seed=0)
    assert recipe.origin == "the recipe of t1-to-t2 v1"
    assert recipe.reference == REFERENCE  # the same recipe: its k-fold figures hold

    longer = refresh_recipe(RefreshSettings(enabled=True, epochs=5), registry, "t1-to-t2")
    assert longer.settings == replace(RECIPE, seed=0, epochs=5)
    assert longer.reference is None  # another recipe: its figures are not the k-fold's

    # No version active yet: the library's defaults, and the line says so.
    first = refresh_recipe(RefreshSettings(enabled=True), registry, "t2-to-t1")
    assert first.settings == TrainSettings(direction="t2-to-t1")
    assert first.origin == "the default recipe: no version is active yet"


def test_an_active_model_whose_recipe_cannot_be_repeated_is_not_refreshed(tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    version = activate_recipe(registry, RECIPE, REFERENCE)
    readable = registry.path("t1-to-t2", version).with_suffix(".json")
    card = json.loads(readable.read_text())
    unknown = {**card, "training": {"settings": {**card["training"]["settings"], "warp_factor": 9}}}
    untold = {key: value for key, value in card.items() if key != "training"}
    for damaged, reason in (
        (
            unknown,
            "t1-to-t2 v1: the recipe names settings this version of dicomnode does "
            "not know: warp_factor",
        ),
        (untold, "the card of t1-to-t2 v1 does not record its training settings"),
    ):
        readable.write_text(json.dumps(damaged))
        settings = RefreshSettings(enabled=True, data=[tmp_path], directions=["t1-to-t2"])
        assert refresh_models(settings, registry) == [
            f"t1-to-t2: not refreshed: its active model's recipe: {reason}"
        ]
    assert registry.versions("t1-to-t2") == ["v1"]


def test_a_refreshed_model_carries_its_recipe_and_the_recipes_figures(mr_brain, tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    activate_recipe(registry, RECIPE, REFERENCE)
    settings = RefreshSettings(
        enabled=True,
        data=[mr_brain / "tcga-fg-6692-native", mr_brain / "brats-met-00110"],
        directions=["t1-to-t2"],
        validation_fraction=0.5,
    )

    [line] = refresh_models(settings, registry)

    assert line.startswith("t1-to-t2: t1-to-t2 v2 ") and "(the recipe of t1-to-t2 v1)" in line
    card = registry.read_card("t1-to-t2", "v2")
    trained = TrainSettings.from_record(card["training"]["settings"])
    assert trained == replace(RECIPE, seed=0)
    assert card["arguments"]["base_width"] == 4 and card["training"]["epochs"] == 2
    assert card["metrics"]["reference"] == REFERENCE
    assert "the recipe of t1-to-t2 v1" in card["training"]["command"]
