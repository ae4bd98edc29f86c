"""Pre/post-processing on real MR series, and the Synthesizer on CPU (and CUDA where present)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from pipeline.model.card import LoadedModel, ModelCard, load_model, save_model
from pipeline.model.inference import Synthesizer, pick_device, slices_per_batch
from pipeline.model.preprocess import (
    OUTPUT_CEILING,
    STORED_MAX,
    Normalization,
    head_mask,
    model_input,
    neighbour_slices,
    normalize_volume,
    to_stored_pixels,
)
from pipeline.model.uncertainty import confidence, series_uncertainty
from pipeline.model.unet import UNet


def read_series(folder: Path) -> np.ndarray:
    slices = [pydicom.dcmread(path) for path in sorted(folder.glob("*.dcm"))]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack(
        [
            ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
            for ds in slices
        ]
    ).astype(np.float32)


NATIVE_SPACING = (0.898438, 0.898438)  # tcga-fg-6692-native's PixelSpacing


@pytest.fixture(scope="module")
def native_t1(mr_brain: Path) -> np.ndarray:
    # As acquired: skull, noisy background, 26 thick slices of 224x256.
    return read_series(mr_brain / "tcga-fg-6692-native" / "03_t1")


@pytest.fixture(scope="module")
def stripped_t2(mr_brain: Path) -> np.ndarray:
    # Skull-stripped, background exactly 0; a slab of it keeps the test short.
    return read_series(mr_brain / "brats-met-00110" / "04_t2")[60:80]


def make_model(norm: str = "batch", **arguments: object) -> LoadedModel:
    torch.manual_seed(0)
    arguments = {"base_width": 4, "depth": 3, "norm": norm, **arguments}
    network = UNet(**arguments)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        if network.shortcut is not None:
            network.shortcut.weight.fill_(-0.7)
            network.shortcut.bias.fill_(0.4)
    card = ModelCard(
        name="test",
        version="1",
        direction="t1-to-t2",
        arguments=arguments,
        normalization="percentile-volume",
        gradient_channels=arguments.get("in_channels", 3) == 3,
    )
    return LoadedModel(network=network.eval(), card=card, path=Path("test.pt"))


@pytest.mark.parametrize("series", ["native_t1", "stripped_t2"])
def test_percentile_normalisation_of_a_real_series(
    series: str, request: pytest.FixtureRequest
) -> None:
    volume = request.getfixturevalue(series)
    normalized = normalize_volume(volume, "percentile-volume")
    assert normalized.shape == volume.shape and normalized.dtype == np.float32
    assert normalized.min() == 0.0 and normalized.max() == 1.0
    # The background (the volume's corners) is black, and only the brightest 0.5% or so of
    # the head saturates: the scale is set by tissue, not by a few hot voxels.
    assert np.all(normalized[:, :8, :8] == 0.0)
    head = normalized[normalized > 0.1]
    assert 0.001 < np.mean(head == 1.0) < 0.02
    assert 0.2 < np.median(head) < 0.8


@pytest.mark.parametrize("method", list(Normalization))
def test_normalisation_ignores_the_scanner_gain(native_t1: np.ndarray, method: str) -> None:
    normalized = normalize_volume(native_t1, method)
    np.testing.assert_allclose(normalize_volume(native_t1 * 3.7, method), normalized, atol=1e-5)


def test_median_normalisation_puts_a_brain_at_the_same_level_with_or_without_its_skull(
    mr_brain: Path, native_t1: np.ndarray
) -> None:
    # tcga-fg-6692 is the native study's T1 skull-stripped and resampled, intensities kept:
    # the brain's own quartiles, in raw units, must land alike in both normalised volumes.
    stripped = read_series(mr_brain / "tcga-fg-6692" / "03_t1")
    brain = np.percentile(stripped[stripped > 0], [25, 50, 75])

    def levels(volume: np.ndarray, method: str) -> np.ndarray:
        # The normalisation is a monotone map: look up where the brain's quartiles went.
        order = np.argsort(volume, axis=None)
        values, normalized = volume.ravel()[order], normalize_volume(volume, method).ravel()[order]
        return np.interp(brain, values, normalized)

    np.testing.assert_allclose(
        levels(native_t1, "median-volume"), levels(stripped, "median-volume"), atol=0.05
    )
    # What it replaces: percentile-volume's scale is set by the scalp's fat.
    assert np.all(
        levels(native_t1, "percentile-volume") < 0.5 * levels(stripped, "percentile-volume")
    )


def test_minmax_slice_spans_each_slice_and_zeroes_an_empty_one(native_t1: np.ndarray) -> None:
    volume = np.concatenate([native_t1, np.zeros_like(native_t1[:1])])
    normalized = normalize_volume(volume, "minmax-slice")
    assert np.all(normalized[:-1].min(axis=(1, 2)) == 0.0)
    np.testing.assert_allclose(normalized[:-1].max(axis=(1, 2)), 1.0)
    assert np.all(normalized[-1] == 0.0)


def test_normalisation_refuses_what_it_cannot_scale() -> None:
    with pytest.raises(ValueError, match="no contrast"):
        normalize_volume(np.full((4, 8, 8), 7.0, np.float32), "percentile-volume")
    with pytest.raises(ValueError, match="unknown normalization 'zscore'"):
        normalize_volume(np.random.rand(4, 8, 8).astype(np.float32), "zscore")
    with pytest.raises(ValueError, match="slices, rows, columns"):
        normalize_volume(np.random.rand(8, 8).astype(np.float32), "minmax-slice")
    # Contrast, but no signal above zero (a wrong rescale intercept): nothing to scale by.
    negative = -np.random.default_rng(2).uniform(10, 100, (4, 8, 8)).astype(np.float32)
    for method in ("scale-volume", "median-volume"):
        with pytest.raises(ValueError, match="no positive signal"):
            normalize_volume(negative, method)


def test_model_input_gradients_are_per_slice_and_per_pixel() -> None:
    volume = np.zeros((2, 6, 8), np.float32)
    volume[0, :, 4:] = 1.0  # slice 0: a vertical edge
    volume[1] = 1.0  # slice 1: flat, and must not bleed into slice 0
    channels = model_input(volume, gradient_channels=True)
    assert channels.shape == (2, 3, 6, 8) and channels.dtype == np.float32
    np.testing.assert_array_equal(channels[:, 0], volume)
    # A unit step is a change of 1 over the two pixels around it: 0.5 per pixel.
    np.testing.assert_allclose(channels[0, 1, :, 3:5], 0.5)
    assert np.all(channels[0, 1, :, :3] == 0) and np.all(channels[0, 2] == 0)
    assert np.all(channels[1, 1:] == 0)
    assert model_input(volume, gradient_channels=False).shape == (2, 1, 6, 8)


def test_stored_pixels_range_and_window(stripped_t2: np.ndarray) -> None:
    normalized = normalize_volume(stripped_t2, "percentile-volume")
    # Tissue in [0.2, 0.7], background 0, and a few values a linear output can reach.
    output = np.where(normalized > 0, 0.2 + 0.5 * normalized, 0.0).astype(np.float32)
    output[0, 0, 0], output[0, 0, 1], output[0, 0, 2] = -0.3, OUTPUT_CEILING + 0.4, 1.0
    stored = to_stored_pixels(output)
    assert stored.pixels.dtype == np.uint16 and stored.pixels.shape == output.shape
    assert stored.bits_stored == 12
    assert stored.pixels[0, 0, 0] == 0 and stored.pixels[0, 0, 1] == STORED_MAX
    assert stored.pixels.max() == STORED_MAX
    # Linear: a value of 1 is stored as 1 / OUTPUT_CEILING of the range.
    assert stored.pixels[0, 0, 2] == round(STORED_MAX / OUTPUT_CEILING)
    low = stored.window_center - stored.window_width / 2
    high = stored.window_center + stored.window_width / 2
    # The window opens on the tissue, not on the stored range: it spans nearly all of it.
    tissue = stored.pixels[(output > 0) & (output <= 1)]
    scale = STORED_MAX / OUTPUT_CEILING
    assert 0.2 * scale - 1 <= low < high <= 0.7 * scale + 1
    assert np.mean((tissue >= low) & (tissue <= high)) > 0.95


def test_scale_normalisation_keeps_air_at_zero_and_bright_fluid_distinct(
    stripped_t2: np.ndarray,
) -> None:
    normalized = normalize_volume(stripped_t2, "scale-volume")
    assert normalized.dtype == np.float32
    # No offset: what had no signal still has none, and scaling is one factor for all.
    np.testing.assert_array_equal(normalized[stripped_t2 == 0], 0.0)
    inside = stripped_t2 > 0
    ratio = normalized[inside] / stripped_t2[inside]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)
    # Fluid brighter than the 99.5th percentile stays brighter, not flattened at 1.
    assert 0.001 < np.mean(normalized[inside] > 1.0) < 0.02
    assert 1.05 < normalized.max() <= OUTPUT_CEILING


def test_stored_pixels_of_an_empty_or_broken_output() -> None:
    empty = to_stored_pixels(np.zeros((2, 4, 4), np.float32))
    assert empty.window_width > 0 and np.all(empty.pixels == 0)
    with pytest.raises(ValueError, match="NaN"):
        to_stored_pixels(np.full((2, 4, 4), np.nan, np.float32))


@pytest.mark.parametrize(
    "arguments",
    [
        {"upsampling": "transpose"},
        {"upsampling": "bilinear"},
        {"upsampling": "nearest-conv"},
        {"input_shortcut": True},
    ],
)
def test_synthesize_matches_the_network_as_loaded(
    native_t1: np.ndarray, arguments: dict[str, object]
) -> None:
    # The Synthesizer folds batch norms and changes memory layout; the numbers must not move.
    model = make_model(**arguments)
    output = Synthesizer(model).synthesize(native_t1, NATIVE_SPACING)
    inputs = model_input(normalize_volume(native_t1, "percentile-volume"), True)
    with torch.inference_mode():
        expected = model.network(torch.from_numpy(inputs))[:, 0].numpy()
    assert output.shape == native_t1.shape and output.dtype == np.float32
    head = head_mask(native_t1)
    np.testing.assert_allclose(output[head], expected[head], atol=1e-4 * np.abs(expected).max())


def test_synthesize_leaves_the_air_around_the_head_black(native_t1: np.ndarray) -> None:
    # An untrained network paints the background with its biases; the node must not send that.
    model = make_model()
    output = Synthesizer(model).synthesize(native_t1, NATIVE_SPACING)
    head = head_mask(native_t1)
    assert 0.05 < head.mean() < 0.95
    assert np.all(output[~head] == 0.0)
    assert np.count_nonzero(output[head]) > 0.9 * head.sum()


def test_monte_carlo_dropout_spread_is_seeded_inside_the_head_and_leaves_the_output(
    native_t1: np.ndarray,
) -> None:
    synthesizer = Synthesizer(make_model(dropout=0.2))
    plain = synthesizer.synthesize(native_t1, NATIVE_SPACING)
    output, spread = synthesizer.synthesize_with_spread(native_t1, NATIVE_SPACING, None, passes=2)
    head = head_mask(native_t1)
    assert np.array_equal(output, plain)  # what is sent is the plain synthesis
    assert np.all(spread[~head] == 0.0) and spread[head].mean() > 0
    again = synthesizer.synthesize_with_spread(native_t1, NATIVE_SPACING, None, passes=2)[1]
    assert np.array_equal(spread, again)
    assert np.array_equal(synthesizer.synthesize(native_t1, NATIVE_SPACING), plain)  # eval again
    assert synthesizer.synthesize_with_spread(native_t1, NATIVE_SPACING, None, passes=0)[1] is None
    uncertainty = series_uncertainty(output, spread, head)
    assert uncertainty > 0 and confidence(uncertainty) == pytest.approx(max(0.0, 1 - uncertainty))
    # Without dropout the passes agree: nothing to be unsure about.
    steady = Synthesizer(make_model(dropout=0.0))
    out, none = steady.synthesize_with_spread(native_t1, NATIVE_SPACING, None, passes=2)
    assert series_uncertainty(out, none, head) < 1e-6  # float rounding only


@pytest.mark.parametrize("size", [(240, 240), (255, 129)])
@pytest.mark.parametrize("norm", ["batch", "instance", "none"])
@pytest.mark.parametrize("upsampling", ["transpose", "bilinear", "nearest-conv"])
def test_synthesize_any_size_and_norm(size: tuple[int, int], norm: str, upsampling: str) -> None:
    volume = np.random.default_rng(1).uniform(0, 900, (3, *size)).astype(np.float32)
    synthesizer = Synthesizer(make_model(norm, in_channels=1, upsampling=upsampling))
    output = synthesizer.synthesize(volume, (1.0, 1.0))
    assert output.shape == volume.shape and np.isfinite(output).all()
    np.testing.assert_array_equal(synthesizer.synthesize(volume, (1.0, 1.0)), output)


def test_saved_and_loaded_model_synthesizes_the_same(native_t1: np.ndarray, tmp_path: Path) -> None:
    model = make_model()
    before = Synthesizer(model).synthesize(native_t1[:4], NATIVE_SPACING)
    save_model(tmp_path / "model.pt", model.network, model.card)
    loaded = Synthesizer(load_model(tmp_path / "model.pt"))
    after = loaded.synthesize(native_t1[:4], NATIVE_SPACING)
    np.testing.assert_array_equal(after, before)


def test_device_and_batch_choice() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = torch.device("cpu")
    assert slices_per_batch(cpu, 256, 256, 16) >= 1
    assert slices_per_batch(cpu, 64, 64, 16) > slices_per_batch(cpu, 256, 256, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_synthesizes_what_the_cpu_does(native_t1: np.ndarray, tmp_path: Path) -> None:
    model = make_model()
    save_model(tmp_path / "model.pt", model.network, model.card)
    on_cpu = Synthesizer(load_model(tmp_path / "model.pt", "cpu")).synthesize(
        native_t1, NATIVE_SPACING
    )
    on_cuda = Synthesizer(load_model(tmp_path / "model.pt", pick_device())).synthesize(
        native_t1, NATIVE_SPACING
    )
    # cuDNN may run float32 convolutions as TF32 (10-bit mantissa): close, not equal.
    scale = on_cpu.max() - on_cpu.min()
    np.testing.assert_allclose(on_cuda, on_cpu, atol=1e-2 * scale)


def test_neighbours_are_taken_at_a_distance_in_millimetres() -> None:
    # The same head as a 1 mm volume and as 5 mm slabs: a slab's neighbours at 5 mm are the
    # next slabs, and the 1 mm volume's are the slices 5 mm away, not the next ones.
    depth = np.arange(41, dtype=np.float32)
    thin = np.broadcast_to(depth[:, None, None], (41, 4, 4)).copy()
    neighbours = neighbour_slices(thin, depth, 5.0)
    np.testing.assert_array_equal(neighbours[20, 0], 15.0)
    np.testing.assert_array_equal(neighbours[20, 1], 25.0)
    slab_depth = depth[::5]
    slabs = np.ascontiguousarray(thin[::5])
    slab_neighbours = neighbour_slices(slabs, slab_depth, 5.0)
    np.testing.assert_array_equal(slab_neighbours[4, 0], 15.0)
    np.testing.assert_array_equal(slab_neighbours[4, 1], 25.0)
    # Between slices: linear; beyond the ends: the end slice.
    np.testing.assert_allclose(neighbour_slices(slabs, slab_depth, 2.0)[4, 1], 22.0)
    np.testing.assert_array_equal(neighbours[0, 0], 0.0)
    np.testing.assert_array_equal(neighbours[40, 1], 40.0)
    with pytest.raises(ValueError, match="ascend"):
        neighbour_slices(thin, depth[::-1], 5.0)
    channels = model_input(thin, True, neighbours)
    assert channels.shape == (41, 5, 4, 4)
    np.testing.assert_array_equal(channels[:, 0], thin)
    np.testing.assert_array_equal(channels[:, 3:], neighbours)


def test_a_model_that_sees_neighbours_synthesizes_from_the_slice_positions(
    native_t1: np.ndarray,
) -> None:
    model = make_model(in_channels=5)
    model.card.gradient_channels, model.card.neighbour_distance_mm = True, 5.5
    offsets = np.arange(native_t1.shape[0]) * 5.5
    synthesizer = Synthesizer(model)
    output = synthesizer.synthesize(native_t1, NATIVE_SPACING, offsets)
    normalized = normalize_volume(native_t1, "percentile-volume")
    inputs = model_input(normalized, True, neighbour_slices(normalized, offsets, 5.5))
    with torch.inference_mode():
        expected = model.network(torch.from_numpy(inputs))[:, 0].numpy()
    head = head_mask(native_t1)
    np.testing.assert_allclose(output[head], expected[head], atol=1e-4 * np.abs(expected).max())
    # The neighbours matter: shuffled slice positions give another image.
    shuffled = synthesizer.synthesize(native_t1, NATIVE_SPACING, offsets * 0.1)
    assert not np.allclose(shuffled[head], output[head])
    with pytest.raises(ValueError, match="needs the slices' positions"):
        synthesizer.synthesize(native_t1, NATIVE_SPACING)
