"""Evaluation: the paper's metrics, the floors, the collapse check, reports and figures."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy import ndimage

from node.cli import main
from pipeline.dicom.derived import instance_numbers
from pipeline.model.card import LoadedModel, ModelCard, save_model
from pipeline.model.preprocess import head_mask
from pipeline.model.scores import minmax_slices, slice_metrics, ssim_map
from pipeline.model.unet import UNet
from train.evaluate import Evaluation, _spurious, evaluate, format_table
from train.figures import save_comparison
from train.metrics import collapse_check, floors
from train.pairs import find_pairs, load_pair


def tiny_model(
    path: Path, direction: str = "t1-to-t2", training: dict | None = None
) -> LoadedModel:
    torch.manual_seed(0)
    arguments = {"in_channels": 3, "base_width": 4, "depth": 2}
    network = UNet(**arguments).eval()
    card = ModelCard(
        name=direction,
        version="v1",
        direction=direction,
        arguments=arguments,
        normalization="minmax-slice",
        gradient_channels=True,
        training=training or {},
    )
    card = save_model(path, network, card)
    return LoadedModel(network, card, path)


@pytest.fixture(scope="module")
def native(mr_brain: Path):
    return load_pair(
        find_pairs([mr_brain / "tcga-fg-6692-native"]).pairs[0], "t1-to-t2", register=False
    )


def test_metrics_follow_the_papers_equations() -> None:
    real = np.random.default_rng(0).random((2, 32, 32))
    everywhere = np.ones_like(real, dtype=bool)
    head = np.zeros_like(everywhere)
    head[:, 8:24, 8:24] = True
    shifted = np.clip(real + 0.1, None, None)
    values = slice_metrics(shifted, real, everywhere, head)
    assert values["mse_slice"] == pytest.approx([0.01, 0.01])
    assert values["mae_slice"] == pytest.approx([0.1, 0.1])
    assert values["psnr_slice"] == pytest.approx([20.0, 20.0])  # 10 log10(1 / 0.01)
    same = slice_metrics(real, real, everywhere, head)
    assert same["ssim_head"] == pytest.approx([1.0, 1.0])
    assert same["psnr_slice"][0] == pytest.approx(100.0)  # capped, not infinite
    assert ssim_map(real[0], 1 - real[0]).mean() < 0
    # The head region counts only the head's pixels.
    wrong_outside = real.copy()
    wrong_outside[~head] = 1 - wrong_outside[~head]
    split = slice_metrics(wrong_outside, real, everywhere, head)
    assert split["mse_head"] == pytest.approx([0.0, 0.0])
    assert split["mse_slice"][0] > 0.05


def test_minmax_and_floors() -> None:
    volume = np.stack([np.full((4, 4), 7.0), np.arange(16.0).reshape(4, 4)])
    normalized = minmax_slices(volume)
    assert (normalized[0] == 0).all() and normalized[1].min() == 0 and normalized[1].max() == 1
    head = np.zeros((2, 4, 4), dtype=bool)
    head[:, 1:3, 1:3] = True
    trivial = floors(normalized, head)
    assert trivial["input"] is normalized
    assert (trivial["inverted"][~head] == 0).all()
    np.testing.assert_allclose(trivial["inverted"][head], 1 - normalized[head])


def test_collapse_check() -> None:
    rng = np.random.default_rng(0)
    real = rng.random((3, 16, 16))
    head = np.ones_like(real, dtype=bool)
    assert collapse_check(real * 0.8, head, real)["collapsed"] is False
    flat = np.full_like(real, 0.4) + rng.normal(0, 0.005, real.shape)
    result = collapse_check(flat, head, real)
    assert result["collapsed"] is True and result["ratio"] < 0.1
    assert collapse_check(flat, head)["collapsed"] is True
    assert collapse_check(real, head)["collapsed"] is False


def test_evaluation_runs_the_inference_path_and_reports_floors(native, tmp_path) -> None:
    model = tiny_model(tmp_path / "m.pt")
    result = evaluate(model, [native])
    report = result.report()
    assert set(report["overall"]) == {"model", "input", "inverted"}
    study = report["studies"][0]
    assert study["study"] == "tcga-fg-6692-native" and study["slices"] == len(native.slices)
    # The input floor recomputed by hand on the usable slices.
    keep = native.slices
    source = minmax_slices(native.source.pixels[keep])
    real = minmax_slices(native.target[keep])
    valid = native.covered[keep]
    expected = np.mean(
        [np.mean((s[v] - r[v]) ** 2) for s, r, v in zip(source, real, valid, strict=True)]
    )
    assert report["overall"]["input"]["mse_slice"] == pytest.approx(expected)
    assert math.isfinite(report["overall"]["model"]["psnr_head"])
    assert report["patients"].keys() == {native.pair.patient}
    assert isinstance(report["collapsed"], bool) and isinstance(report["beats_floors"], bool)
    json.dumps(report)  # JSON-ready
    reverse = load_pair(native.pair, "t2-to-t1", register=False)
    with pytest.raises(ValueError, match="paired for t2-to-t1"):
        evaluate(model, [reverse])


def test_a_spurious_focus_is_reported_where_a_reader_finds_it(native) -> None:
    # Usable slices that do not start at the series' first, so their indices differ.
    native = replace(native, slices=native.slices[3:])
    # The real T2 as the synthetic one, with a 6 mm bright ball invented in the white matter.
    middle = int(native.slices[len(native.slices) // 2])
    row, column = ndimage.center_of_mass(native.head[middle])
    spacing = np.array([native.source.slice_spacing, *native.source.pixel_spacing])
    centre = np.array([middle, row, column + 25 / spacing[2]])
    distance = np.linalg.norm((np.indices(native.target.shape).T - centre) * spacing, axis=-1).T
    invented = np.where(distance <= 6.0, native.target.max(), native.target)

    summary, (site, *others) = _spurious(native, invented)
    assert summary["model"].count == 1 + len(others) == 1
    assert site.volume_ml == pytest.approx(summary["model"].volume_ml)
    # The reported position lies in the ball, on the plane of one of its slices, and the
    # image named is the synthetic series' image of that slice.
    source = native.source
    centre_mm = (source.affine() @ [*centre, 1.0])[:3]
    assert np.linalg.norm(np.array(site.position_mm) - centre_mm) <= 6.0
    offset = np.array(site.position_mm) @ source.slice_normal
    (on_plane,) = np.flatnonzero(np.abs(source.slice_offsets - offset) < 0.1)
    assert abs(on_plane - middle) <= 1
    assert site.image == instance_numbers(source.headers)[on_plane]


def test_output_beyond_the_learnt_range_is_reported(native, tmp_path) -> None:
    model = tiny_model(tmp_path / "m.pt")
    with torch.no_grad():
        model.network.head.weight.zero_()
        model.network.head.bias.fill_(1.6)  # beyond 1.5 times minmax-slice's top, everywhere
    (study,) = evaluate(model, [native]).studies
    # The synthesizer draws nothing outside the head.
    volume = head_mask(native.source.pixels).sum() * native.source.voxel_mm3 / 1000
    assert study.overshoot.volume_ml == pytest.approx(volume)
    assert study.overshoot.peak == pytest.approx(1.6)
    assert "beyond the learnt range: " in format_table(Evaluation("m", "t1-to-t2", [study]))


def test_figure_has_input_synthetic_real_and_difference(tmp_path) -> None:
    stack = np.random.default_rng(0).random((10, 40, 30))
    path = save_comparison(tmp_path / "f.png", "title", stack, stack, stack)
    image = matplotlib.image.imread(path)
    only_two = matplotlib.image.imread(save_comparison(tmp_path / "g.png", "t", stack, stack))
    # Four columns against two, four rows each.
    assert image.shape[1] > 1.8 * only_two.shape[1]
    assert image.shape[0] == only_two.shape[0]


def test_evaluate_command_writes_report_and_figures(mr_brain, tmp_path, capsys) -> None:
    # The model's card says it learnt from the native study's patient.
    trained_on = {"data": [{"study": "tcga-fg-6692", "patient": "patient-f8fdf7ca"}]}
    tiny_model(tmp_path / "m.pt", training=trained_on)
    # The native study (paired) and the T1-only volunteer (figure and collapse check only).
    data = [mr_brain / "tcga-fg-6692-native", mr_brain / "healthy-t1-only"]
    config = tmp_path / "config.toml"  # no such file: the report goes under var/ beside it
    code = main(
        [
            "evaluate",
            str(tmp_path / "m.pt"),
            *map(str, data),
            "--no-register",
            "--config",
            str(config),
        ]
    )
    assert (
        "warning: tcga-fg-6692-native (patient-f8fdf7ca): this patient is in t1-to-t2-v1's "
        "training data" in capsys.readouterr().out
    )
    report = json.loads((tmp_path / "var" / "evaluation" / "t1-to-t2-v1.json").read_text())
    assert code == (
        1 if report["pairs"]["collapsed"] or report["unpaired"][0]["collapse"]["collapsed"] else 0
    )
    assert report["pairs"]["studies"][0]["study"] == "tcga-fg-6692-native"
    assert report["unpaired"][0]["series"].endswith("03_t1")
    figures = sorted(p.name for p in (tmp_path / "var" / "evaluation").glob("*.png"))
    assert len(figures) == 2 and any("healthy-t1-only" in name for name in figures)
