"""The scheduled refresh: its settings, and that it reports instead of raising."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.model.registry import ModelRegistry
from train.refresh import refresh_models
from train.settings import RefreshSettings


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
