"""The ablation runner's configurations, summaries and tables, and attaching a summary."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.modelfile import ModelCard, load_model, save_model
from pipeline.registry import ModelRegistry
from pipeline.unet import UNet
from train.ablation import CONFIGURATIONS, attach_summary, settings_for, summary, tables
from train.trainer import TrainSettings


def test_configurations_change_one_thing_each() -> None:
    base = TrainSettings(direction="t1-to-t2")
    assert settings_for("median-input-ssim", base) == base  # the defaults are the shipped recipe
    assert settings_for("scale-ssim", base).normalization == "scale-volume"
    median_input = settings_for("median-input-ssim", base)
    assert (median_input.normalization, median_input.output_normalization) == (
        "median-volume",
        "percentile-volume",
    )
    v3 = settings_for("percentile-ssim", base)
    assert v3.output_normalization == v3.normalization == "percentile-volume"
    paper = settings_for("paper", base)
    assert (paper.normalization, paper.loss, paper.arguments) == (
        "minmax-slice",
        "mse",
        base.arguments,
    )
    assert settings_for("plain-unet", base).arguments["in_channels"] == 1
    assert not settings_for("plain-unet", base).gradient_channels
    assert settings_for("encoder-decoder", base).arguments["skip_connections"] is False
    percentile = settings_for("percentile", base)
    assert (percentile.normalization, percentile.loss) == ("percentile-volume", "mse")
    assert base.arguments["in_channels"] == 3  # the base is not changed in place
    assert set(CONFIGURATIONS) >= {"paper", "plain-unet", "encoder-decoder"}


def _metrics(value: float) -> dict[str, float]:
    keys = ("mse_slice", "mae_slice", "psnr_slice", "ssim_slice", "psnr_head", "ssim_head")
    return dict.fromkeys(keys, value)


RESULTS = {
    "protocol": {"base_settings": {"epochs": 1}},
    "runs": {
        f"t1-to-t2/{patient}/{config}": {
            "patient": patient,
            "overall": {
                "model": _metrics(score),
                "input": _metrics(1.0),
                "inverted": _metrics(2.0),
            },
        }
        for patient, config, score in (
            ("patient-a", "paper", 10.0),
            ("patient-b", "paper", 20.0),
            ("patient-a", "percentile", 30.0),
        )
    },
}


def test_summary_is_the_mean_over_held_out_patients() -> None:
    found = summary(RESULTS, "t1-to-t2", "paper")
    assert found["overall"]["model"]["psnr_head"] == 15.0
    assert found["overall"]["inverted"]["psnr_head"] == 2.0
    assert set(found["patients"]) == {"patient-a", "patient-b"}
    assert summary(RESULTS, "t2-to-t1", "paper") == {}
    table = tables(RESULTS, ["paper", "percentile"], ["t1-to-t2"])
    assert "mean of 2" in table
    assert "| floor: inverted | 2.0000 |" in table
    assert "| paper | 15.0000 |" in table and "| percentile | 30.0000 |" in table


def test_attach_summary_keeps_the_weights(tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    torch.manual_seed(0)
    arguments = {"in_channels": 3, "base_width": 2, "depth": 1}
    card = ModelCard("t1-to-t2", "v1", "t1-to-t2", arguments, "minmax-slice", True)
    card = save_model(registry.path("t1-to-t2", "v1"), UNet(**arguments), card)
    registry.write_card("t1-to-t2", card)
    summary_path = tmp_path / "paper-t1-to-t2.json"
    summary_path.write_text(json.dumps(summary(RESULTS, "t1-to-t2", "paper")))
    attached = attach_summary(registry.path("t1-to-t2", "v1"), summary_path)
    assert attached.checksum == card.checksum
    reloaded = load_model(registry.path("t1-to-t2", "v1")).card
    assert reloaded.metrics["reference"]["overall"]["model"]["psnr_head"] == pytest.approx(15.0)
    assert reloaded.metrics["reference"]["source"] == str(summary_path)
    readable = json.loads((registry.root / "t1-to-t2" / "v1.json").read_text())
    assert readable["metrics"]["reference"]["protocol"].startswith("leave-one-patient-out")
