"""The ablation runner: configurations, k-fold summaries with spreads, tables, attaching,
scoring finished runs again."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from pipeline.model.card import ModelCard, load_model, save_model
from pipeline.model.registry import ModelRegistry
from pipeline.model.unet import UNet
from tests.test_evaluate import tiny_model
from train.ablation import (
    CONFIGURATIONS,
    attach_summary,
    run_ablation,
    settings_for,
    summary,
    tables,
)
from train.trainer import TrainSettings


def test_configurations_change_one_thing_each() -> None:
    base = TrainSettings(direction="t1-to-t2")
    v4 = settings_for("v4", base)
    assert (v4.normalization, v4.output_normalization, v4.loss) == (
        "median-volume",
        "percentile-volume",
        "mse+ssim",
    )
    paper = settings_for("paper", base)
    assert (paper.normalization, paper.loss, paper.arguments) == (
        "minmax-slice",
        "mse",
        {**base.arguments, "in_channels": 3},  # the paper's model is 2-D
    )
    plain = settings_for("plain-unet", base)
    assert plain.arguments["in_channels"] == 1 and not plain.gradient_channels
    assert settings_for("encoder-decoder", base).arguments["skip_connections"] is False
    neighbours = settings_for("v4-neighbours", base)
    assert neighbours.neighbour_distance_mm == 3.0 and neighbours.arguments["in_channels"] == 5
    assert settings_for("v4-paint", base).lesion_painting > 0
    everything = settings_for("all", base)
    assert (
        everything.lesion_painting and everything.thick_slices and everything.neighbour_distance_mm
    )
    assert settings_for("all-b16", base).arguments["base_width"] == 16
    plaques = settings_for("v5-b16-paint-plaques", base)
    longer = settings_for("v5-b16-paint-plaques-long", base)
    assert longer.epochs == 2 * plaques.epochs
    assert longer == replace(plaques, epochs=longer.epochs)  # the budget is all that differs
    context = settings_for("v5-b16-context", base)
    assert context.crop == 2 * base.crop  # twice the context, at the same pixels a step
    assert context.batch_size * context.crop**2 == base.batch_size * base.crop**2
    # v4 turns off every lever the shipped (v5) defaults have.
    assert (v4.neighbour_distance_mm, v4.arguments["in_channels"], v4.epochs) == (None, 3, 12)
    assert v4.lesion_painting == v4.thick_slices == v4.lesion_oversampling == 0.0
    v5 = settings_for("v5", base)
    assert v5 == base  # the defaults are the shipped recipe
    assert base.arguments["in_channels"] == 5  # the base is not changed in place
    assert set(CONFIGURATIONS) >= {"paper", "plain-unet", "encoder-decoder", "v4"}


def _metrics(value: float) -> dict[str, float]:
    keys = ("mae_slice", "psnr_slice", "ssim_slice", "psnr_head", "ssim_head", "corr_head")
    return dict.fromkeys(keys, value)


def _run(
    fold: int,
    seed: int,
    scores: dict[str, float],
    fidelity: float | None = None,
    foci: int | None = None,
    overshoot_ml: float | None = None,
):
    """A run record as train.ablation writes it: patient -> model score; ``foci``: the
    model's spurious foci per study (None: a record from before they were scored), and
    ``overshoot_ml`` its output beyond the learnt range likewise."""
    studies = [
        {
            "study": f"study-{patient}",
            "group": "skull-stripped",
            "metrics": {
                "model": _metrics(score),
                "input": _metrics(1.0),
                "inverted": _metrics(2.0),
            },
            "lesions": None
            if fidelity is None
            else {
                p: {"real": 0.9, "synthetic": 0.5, "voxels": 3, "fidelity": fidelity}
                for p in ("model", "input", "inverted")
            },
            **(
                {}
                if foci is None
                else {
                    "spurious": {
                        p: {"count": n, "volume_ml": n / 10, "region_ml": 1000.0}
                        for p, n in (("model", foci), ("input", 50), ("inverted", 80))
                    }
                }
            ),
            **(
                {}
                if overshoot_ml is None
                else {
                    "overshoot": {
                        "volume_ml": overshoot_ml,
                        "peak": 1.0 + overshoot_ml,
                        "peak_slice": 0,
                    }
                }
            ),
        }
        for patient, score in scores.items()
    ]
    return {
        "direction": "t1-to-t2",
        "configuration": "v4",
        "seed": seed,
        "fold": fold,
        "held_out": sorted(scores),
        "settings": {"epochs": 1},
        "train_seconds": 10.0,
        "evaluation": {
            "studies": studies,
            "patients": {
                patient: {
                    "model": _metrics(score),
                    "input": _metrics(1.0),
                    "inverted": _metrics(2.0),
                }
                for patient, score in scores.items()
            },
        },
    }


RUNS = [
    _run(1, 0, {"a": 10.0, "b": 20.0}, fidelity=0.8, foci=4, overshoot_ml=0.0),
    _run(2, 0, {"c": 30.0}, foci=10, overshoot_ml=0.5),
    _run(1, 1, {"a": 12.0, "b": 22.0}, fidelity=0.6, foci=8),
    _run(2, 1, {"c": 32.0}),
]


def test_summary_is_the_mean_over_patients_with_spreads_over_seeds_and_folds() -> None:
    found = summary(RUNS, "t1-to-t2", "v4")
    # seed 0: mean of 10, 20, 30 = 20; seed 1: 22. Overall 21, spread over seeds 1.
    assert found["overall"]["model"]["psnr_head"] == pytest.approx(21.0)
    assert found["spread"]["seeds"]["psnr_head"] == pytest.approx(1.0)
    # fold 1: (10 + 20 + 12 + 22) / 4 = 16; fold 2: 31; their spread 7.5.
    assert found["spread"]["folds"]["psnr_head"] == pytest.approx(7.5)
    assert found["overall"]["inverted"]["psnr_head"] == 2.0
    assert found["complete"] and found["seeds"] == [0, 1]
    assert found["lesion_fidelity"]["mean"]["model"] == pytest.approx(0.7)
    assert found["lesion_fidelity"]["studies"]["study-a"]["model"] == pytest.approx(0.7)
    assert found["patients"]["c"]["model"]["psnr_head"] == pytest.approx(31.0)
    # Spurious foci: study a and b 4 and 8 over the seeds (6), c 10 where it was scored.
    foci = found["spurious_foci"]
    assert foci["studies"]["study-a"]["count"] == pytest.approx(6.0)
    assert foci["studies"]["study-c"]["count"] == pytest.approx(10.0)
    assert foci["mean"]["model"]["count"] == pytest.approx((6 + 6 + 10) / 3)
    assert foci["mean"]["inverted"]["volume_ml"] == pytest.approx(8.0)
    assert summary(RUNS, "t2-to-t1", "v4") == {}
    table = tables(RUNS, ["v4"], ["t1-to-t2"])
    assert "| floor: inverted | | 2.000 |" in table
    assert "| v4 | 2 | 21.000 ±7.500 ±1.000 |" in table
    assert "0.70 (min 0.70) | 7 (0.7) |" in table
    # A node would hold study c of seed 0 (0.5 mL beyond the range); seed 1 was not measured.
    assert found["overshoot"] == {"held": 1, "studies": 3, "peak": 1.5}
    assert "| 7 (0.7) | 1 of 3 (1.50) |" in table


def test_attach_summary_keeps_the_weights(tmp_path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    torch.manual_seed(0)
    arguments = {"in_channels": 3, "base_width": 2, "depth": 1}
    card = ModelCard("t1-to-t2", "v1", "t1-to-t2", arguments, "minmax-slice", True)
    card = save_model(registry.path("t1-to-t2", "v1"), UNet(**arguments), card)
    registry.write_card("t1-to-t2", card)
    summary_path = tmp_path / "v4-t1-to-t2.json"
    summary_path.write_text(json.dumps(summary(RUNS, "t1-to-t2", "v4")))
    attached = attach_summary(registry.path("t1-to-t2", "v1"), summary_path)
    assert attached.checksum == card.checksum
    reloaded = load_model(registry.path("t1-to-t2", "v1")).card
    assert reloaded.metrics["reference"]["overall"]["model"]["psnr_head"] == pytest.approx(21.0)
    assert reloaded.metrics["reference"]["source"] == str(summary_path)
    readable = json.loads((registry.root / "t1-to-t2" / "v1.json").read_text())
    assert readable["metrics"]["reference"]["protocol"].startswith("2-fold cross-validation")


def test_rescore_adds_a_new_metric_to_finished_runs_without_training(
    mr_brain, tmp_path, capsys
) -> None:
    out = tmp_path / "kfold"
    data = [mr_brain / "brats-gli-00001", mr_brain / "brats-met-00110"]
    record_path = out / "runs" / "t1-to-t2" / "v4" / "seed-0" / "fold-1.json"
    record_path.parent.mkdir(parents=True)
    stale = _run(1, 0, {"someone": 10.0})
    record_path.write_text(json.dumps(stale))
    model = out / "models" / "t1-to-t2" / "v4" / "seed-0" / "fold-1.pt"
    model.parent.mkdir(parents=True)
    tiny_model(model)
    base = TrainSettings(direction="t1-to-t2", epochs=1, steps_per_epoch=1)
    run_ablation(data, out, base, ["v4"], ["t1-to-t2"], [0], 2, [1], rescore=True)
    record = json.loads(record_path.read_text())
    held_out = json.loads((out / "folds.json").read_text())["fold-1"]
    studies = record["evaluation"]["studies"]
    assert [s["patient"] for s in studies] == list(held_out)
    assert {"model", "input", "inverted"} == set(studies[0]["spurious"])
    assert studies[0]["overshoot"]["volume_ml"] >= 0
    assert record["settings"] == stale["settings"]  # the run itself is kept
    # Scored once: a record that has every metric is left alone. Nothing is trained, not
    # even the fold that has no record. A record whose model was not kept says so.
    before = record_path.stat().st_mtime_ns
    orphan = out / "runs" / "t1-to-t2" / "v4" / "seed-1" / "fold-1.json"
    orphan.parent.mkdir(parents=True)
    orphan.write_text(json.dumps(stale))
    run_ablation(data, out, base, ["v4"], ["t1-to-t2"], [0, 1], 2, rescore=True)
    assert record_path.stat().st_mtime_ns == before
    assert json.loads(orphan.read_text()) == stale
    assert f"{orphan}: not scored again: its model" in capsys.readouterr().err
    assert sorted(p.name for p in model.parent.iterdir()) == ["fold-1.pt"]
    assert not record_path.with_name("fold-2.json").exists()
