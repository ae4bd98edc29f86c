"""Model files: weights and card round-trip, and every bad file is refused with a reason."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from pipeline.dicom.contrast import Direction
from pipeline.model.card import (
    FORMAT,
    ModelCard,
    ModelFileError,
    describe,
    load_model,
    save_model,
    weights_checksum,
)
from pipeline.model.lesionfidelity import FidelityRange, held_out_lesion_fidelity
from pipeline.model.preprocess import Normalization
from pipeline.model.registry import ModelRegistry
from pipeline.model.unet import Norm, UNet
from pipeline.synthesis import lesion_caution
from tests.support.paths import REPO

ARGUMENTS = {"in_channels": 3, "base_width": 4, "depth": 2}


def make_card(**changes: object) -> ModelCard:
    card = ModelCard(
        name="t1-to-t2",
        version="v3",
        direction="t1-to-t2",
        arguments=dict(ARGUMENTS),
        normalization="percentile-volume",
        gradient_channels=True,
        training={"data": ["brats-gli-00001"], "epochs": 2, "seed": 7},
        metrics={"psnr": 24.5},
    )
    return replace(card, **changes)


def trained_network() -> UNet:
    torch.manual_seed(0)
    network = UNet(**ARGUMENTS)
    # Batch-norm statistics as after training, so the round trip covers buffers too.
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return network.eval()


def write_payload(path: Path, payload: object) -> Path:
    torch.save(payload, path)
    return path


def rewrite_card(saved: tuple[Path, UNet, ModelCard], drop: str = "", **values: object) -> Path:
    """The saved model's file again, its card without ``drop`` and with ``values`` set, as
    an older writer or an edit by hand would leave it."""
    path, network, card = saved
    fields = {**asdict(card), **values}
    fields.pop(drop, None)
    return write_payload(
        path, {"format": FORMAT, "card": fields, "state_dict": network.state_dict()}
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, UNet, ModelCard]:
    network = trained_network()
    path = tmp_path / "t1-to-t2.pt"
    card = save_model(path, network, make_card())
    return path, network, card


def test_round_trip_gives_the_same_outputs_and_card(saved: tuple[Path, UNet, ModelCard]) -> None:
    path, network, card = saved
    loaded = load_model(path, "cpu")
    assert loaded.card == card
    assert loaded.card.training["seed"] == 7
    assert loaded.path == path
    assert not loaded.network.training
    image = torch.rand(2, 3, 40, 36)
    with torch.inference_mode():
        assert torch.equal(loaded.network(image), network(image))


def test_save_fills_the_checksum_and_describe_names_it(saved: tuple[Path, UNet, ModelCard]) -> None:
    _, network, card = saved
    assert card.checksum == weights_checksum(network.state_dict())
    assert len(card.checksum) == 64
    assert describe(card) == f"t1-to-t2 v3 (sha256:{card.checksum[:8]})"


def test_checksum_depends_on_every_weight() -> None:
    network = trained_network()
    before = weights_checksum(network.state_dict())
    assert weights_checksum(trained_network().state_dict()) == before
    with torch.no_grad():
        network.head.bias[0] += 1e-6
    assert weights_checksum(network.state_dict()) != before


def test_a_flipped_byte_in_the_weights_is_caught(saved: tuple[Path, UNet, ModelCard]) -> None:
    path, network, _ = saved
    data = bytearray(path.read_bytes())
    where = data.find(network.head.weight.detach().numpy().tobytes())
    assert where > 0
    data[where + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"checksum.*altered"):
        load_model(path)


def test_weights_replaced_under_an_old_card_are_caught(
    saved: tuple[Path, UNet, ModelCard],
) -> None:
    path, _, card = saved
    other = UNet(**ARGUMENTS).state_dict()
    write_payload(path, {"format": FORMAT, "card": asdict(card), "state_dict": other})
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"nowhere\.pt does not exist"):
        load_model(tmp_path / "nowhere.pt")


def test_a_dicom_file_is_not_a_model(mr_brain: Path, tmp_path: Path) -> None:
    dicom = next((mr_brain / "tcga-fg-6692-native" / "03_t1").glob("*.dcm"))
    with pytest.raises(ModelFileError, match="not a readable dicomnode model file"):
        load_model(dicom)


def test_another_torch_file_is_not_a_model(tmp_path: Path) -> None:
    path = write_payload(tmp_path / "other.pt", UNet(**ARGUMENTS).state_dict())
    with pytest.raises(ModelFileError, match="not a dicomnode model file"):
        load_model(path)


def test_a_newer_format_is_refused_by_name(saved: tuple[Path, UNet, ModelCard]) -> None:
    path, _, card = saved
    payload = {"format": "dicomnode-model/2", "card": asdict(card), "state_dict": {}}
    write_payload(path, payload)
    with pytest.raises(ModelFileError, match=r"dicomnode-model/2.*reads 'dicomnode-model/1' only"):
        load_model(path)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("architecture", "resnet"),
        ("normalization", "zscore"),
        ("target_normalization", "zscore"),
        ("direction", "t1-to-flair"),
    ],
)
def test_unknown_card_values_are_refused_by_name(
    saved: tuple[Path, UNet, ModelCard], field: str, value: str
) -> None:
    path = rewrite_card(saved, **{field: value})
    with pytest.raises(ModelFileError, match=f"unknown {field} '{value}'"):
        load_model(path)


def test_a_file_holds_the_card_as_plain_text_not_classes_of_ours(tmp_path: Path) -> None:
    # A file that named a class of this project would not load with weights_only, nor
    # after that class moved; the enums go in as the text they stand for.
    card = make_card(
        direction=Direction.T1_TO_T2,
        normalization=Normalization.MEDIAN_VOLUME,
        target_normalization=Normalization.PERCENTILE_VOLUME,
        arguments={**ARGUMENTS, "norm": Norm.BATCH},
    )
    save_model(tmp_path / "model.pt", trained_network(), card)
    stored = torch.load(tmp_path / "model.pt", weights_only=True)["card"]
    plain = (stored["direction"], stored["target_normalization"], stored["arguments"]["norm"])
    assert plain == ("t1-to-t2", "percentile-volume", "batch")
    assert {type(value) for value in plain} == {str}
    loaded = load_model(tmp_path / "model.pt").card
    assert loaded.direction is Direction.T1_TO_T2
    assert loaded.output_normalization is Normalization.PERCENTILE_VOLUME


def test_the_output_space_is_the_input_normalisation_unless_the_card_names_its_own(
    saved: tuple[Path, UNet, ModelCard], tmp_path: Path
) -> None:
    # Cards written before target_normalization existed have no such key.
    path = rewrite_card(saved, drop="target_normalization")
    assert load_model(path).card.output_normalization == "percentile-volume"
    split = make_card(normalization="median-volume", target_normalization="percentile-volume")
    other = save_model(tmp_path / "split.pt", trained_network(), split)
    loaded = load_model(tmp_path / "split.pt").card
    assert loaded == other
    assert (loaded.normalization, loaded.output_normalization) == (
        "median-volume",
        "percentile-volume",
    )


@pytest.mark.parametrize("value", [0, -1.0, "1 mm"])
def test_a_pixel_size_that_is_not_a_positive_number_is_refused(
    saved: tuple[Path, UNet, ModelCard], value: object
) -> None:
    path = rewrite_card(saved, pixel_spacing_mm=value)
    with pytest.raises(ModelFileError, match=r"pixel_spacing_mm .* is not a positive number"):
        load_model(path)


def test_cards_without_a_pixel_size_learnt_at_one_millimetre(
    saved: tuple[Path, UNet, ModelCard],
) -> None:
    # Every model before the field existed, the shipped v3 and v4 included, learnt from
    # 0.88-1 mm slices.
    path = rewrite_card(saved, drop="pixel_spacing_mm")
    assert load_model(path).card.pixel_spacing_mm == 1.0


def test_a_card_with_missing_fields_is_refused(saved: tuple[Path, UNet, ModelCard]) -> None:
    path = rewrite_card(saved, drop="direction")
    with pytest.raises(ModelFileError, match="lacks \\['direction'\\]"):
        load_model(path)


def test_weights_that_do_not_fit_the_arguments_are_refused(
    saved: tuple[Path, UNet, ModelCard],
) -> None:
    # The checksum covers the weights only, so a card edited to other arguments passes it
    # and must be caught when the weights are put into the network it describes.
    path, network, card = saved
    wider = replace(card, arguments={**ARGUMENTS, "base_width": 8})
    payload = {"format": FORMAT, "card": asdict(wider), "state_dict": network.state_dict()}
    write_payload(path, payload)
    with pytest.raises(ModelFileError, match="do not fit a U-Net"):
        load_model(path)


def test_save_refuses_a_card_that_does_not_describe_the_network(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with pytest.raises(ModelFileError, match="in_channels=1"):
        save_model(path, trained_network(), make_card(gradient_channels=False))
    with pytest.raises(ModelFileError, match="do not fit"):
        save_model(path, trained_network(), make_card(arguments={**ARGUMENTS, "depth": 3}))
    assert not path.exists()


def test_a_card_that_sees_neighbouring_slices_needs_their_channels(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    with pytest.raises(
        ModelFileError, match=r"neighbour_distance_mm=3\.0, which need in_channels=5"
    ):
        save_model(path, trained_network(), make_card(neighbour_distance_mm=3.0))
    torch.manual_seed(0)
    network = UNet(**{**ARGUMENTS, "in_channels": 5})
    card = make_card(neighbour_distance_mm=3.0, arguments={**ARGUMENTS, "in_channels": 5})
    save_model(tmp_path / "ok.pt", network, card)
    assert load_model(tmp_path / "ok.pt").card.neighbour_distance_mm == 3.0


@pytest.mark.parametrize("value", [0, -2.0, "3 mm"])
def test_a_neighbour_distance_that_is_not_positive_is_refused(
    saved: tuple[Path, UNet, ModelCard], value: object
) -> None:
    path = rewrite_card(saved, neighbour_distance_mm=value)
    with pytest.raises(ModelFileError, match=r"neighbour_distance_mm .* is not a positive number"):
        load_model(path)


def test_cards_without_a_neighbour_distance_see_each_slice_alone(
    saved: tuple[Path, UNet, ModelCard],
) -> None:
    path = rewrite_card(saved, drop="neighbour_distance_mm")
    assert load_model(path).card.neighbour_distance_mm is None


def test_held_out_lesion_fidelity_comes_from_unseen_patients_only() -> None:
    def study(fidelity: float | None) -> dict:
        return {"lesions": None if fidelity is None else {"model": {"fidelity": fidelity}}}

    own = {"studies": [study(0.4), study(None), study(0.9), study(float("nan"))]}
    recipe = {"lesion_fidelity": {"studies": {"a": {"model": 0.6}, "b": {"model": 1.3}}}}
    trained_on = {"studies": [study(2.0)]}

    assert held_out_lesion_fidelity({"held_out": own, "reference": recipe}) == (
        FidelityRange(0.4, 0.9, 2)
    )
    # Held-out patients without masks leave the recipe's k-fold as the measure.
    assert held_out_lesion_fidelity(
        {"held_out": {"studies": [study(None)]}, "reference": recipe}
    ) == FidelityRange(0.6, 1.3, 2)
    assert held_out_lesion_fidelity({"training_data_only": trained_on}) is None
    # What cannot be read is not measured, and never an error that stops a synthesis.
    for damaged in (
        {"held_out": {"studies": [{"lesions": {"model": {}}}, "x"]}},
        {"held_out": [], "reference": {"lesion_fidelity": {"studies": ["a"]}}},
        {"reference": {"lesion_fidelity": {"studies": {"a": {"model": "0.5"}}}}},
    ):
        assert held_out_lesion_fidelity(damaged) is None


@pytest.mark.parametrize("direction", list(Direction))
def test_every_image_of_a_shipped_model_says_how_visible_lesions_stayed(direction) -> None:
    card = load_model(ModelRegistry(REPO / "models").active_path(direction)).card
    measured = held_out_lesion_fidelity(card.metrics)
    assert measured is not None and measured.studies >= 3  # the k-fold's masked studies
    caution = lesion_caution(card, direction.target)
    assert f"kept {measured.lowest:.0%} to {measured.highest:.0%}" in caution
    assert f"in a real {direction.target} image" in caution
    assert caution.endswith("a synthetic image does not rule out a lesion.")
