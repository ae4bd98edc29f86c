"""The U-Net: any slice size, the paper's baselines as arguments, deterministic inference."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.unet import UNet, default_arguments


@pytest.fixture(scope="module")
def shipped() -> UNet:
    torch.manual_seed(0)
    return UNet(**default_arguments()).eval()


@pytest.mark.parametrize("size", [(240, 240), (256, 224), (255, 129), (7, 3)])
def test_any_slice_size_comes_back_at_its_own_size(shipped: UNet, size: tuple[int, int]) -> None:
    with torch.inference_mode():
        output = shipped(torch.rand(2, 3, *size))
    assert output.shape == (2, 1, *size)
    assert torch.isfinite(output).all()


def test_padding_does_not_shift_the_image(shipped: UNet) -> None:
    # A 255-row slice is padded to 256: the content must stay where it was, so the output
    # of the 255 rows matches the output of the same rows inside a 256-row slice whose last
    # row is the zero padding.
    image = torch.rand(1, 3, 255, 129)
    padded = torch.nn.functional.pad(image, (0, 15, 0, 1))
    with torch.inference_mode():
        small = shipped(image)
        large = shipped(padded)[..., :255, :129]
    torch.testing.assert_close(small, large)


def test_the_shipped_model_fits_the_size_budget(shipped: UNet) -> None:
    size = sum(tensor.numel() * tensor.element_size() for tensor in shipped.state_dict().values())
    assert size <= 10 * 10**6


def test_baselines_are_the_same_class_with_other_arguments() -> None:
    unet = UNet(base_width=4, depth=2)
    encoder_decoder = UNet(base_width=4, depth=2, skip_connections=False)
    plain = UNet(in_channels=1, base_width=4, depth=2)
    assert type(encoder_decoder) is type(plain) is UNet
    # Without concatenation each decoder block reads only the upsampled map.
    assert [block[0].in_channels for block in unet.up] == [16, 8]
    assert [block[0].in_channels for block in encoder_decoder.up] == [8, 4]
    assert plain(torch.rand(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(RuntimeError):
        plain(torch.rand(1, 3, 32, 32))


def test_dropout_acts_in_training_only() -> None:
    torch.manual_seed(1)
    network = UNet(base_width=4, depth=2, dropout=0.5)
    image = torch.rand(2, 3, 32, 32)
    network.train()
    assert not torch.equal(network(image), network(image))
    network.eval()
    with torch.inference_mode():
        assert torch.equal(network(image), network(image))


def test_output_is_linear_and_initialisation_is_he() -> None:
    torch.manual_seed(2)
    network = UNet(base_width=8, depth=2).eval()
    with torch.inference_mode():
        output = network(torch.rand(4, 3, 64, 64))
    # A sigmoid would keep every value inside (0, 1).
    assert output.min() < 0
    conv = network.down[1][0]
    fan_in = conv.in_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.1)


@pytest.mark.parametrize(
    ("upsampling", "patterned"),
    [("transpose", True), ("transpose-icnr", False), ("bilinear", False), ("nearest-conv", False)],
)
def test_transposed_convolutions_paint_a_pattern_on_flat_input(
    upsampling: str, patterned: bool
) -> None:
    # Far from the borders a flat input gives every position the same features, so any
    # variation of the output there comes from the upsampling's own period: the checkerboard
    # seen on orbits and scalp. Interpolation must have none, nor an untrained ICNR layer.
    torch.manual_seed(4)
    network = UNet(base_width=4, depth=2, upsampling=upsampling).eval()
    with torch.inference_mode():
        output = network(torch.full((1, 3, 96, 96), 0.5))[0, 0, 40:56, 40:56]
    spread = (output.max() - output.min()).item()
    assert (spread > 1e-3 * output.abs().mean().item()) == patterned


def test_the_input_shortcut_adds_an_affine_map_of_the_image_channel() -> None:
    torch.manual_seed(5)
    plain = UNet(base_width=4, depth=2).eval()
    torch.manual_seed(5)
    shortcut = UNet(base_width=4, depth=2, input_shortcut=True).eval()
    inputs = torch.rand(2, 3, 37, 50)
    with torch.inference_mode():
        # Untrained, the shortcut is zero: the same network as without it.
        torch.testing.assert_close(shortcut(inputs), plain(inputs))
        shortcut.shortcut.weight.fill_(-2.0)
        shortcut.shortcut.bias.fill_(0.5)
        shortcut.head.weight.zero_()
        shortcut.head.bias.zero_()
        # Only the image channel (0), not the gradient channels, and cropped like the rest.
        torch.testing.assert_close(shortcut(inputs), 0.5 - 2.0 * inputs[:, :1])


def test_it_learns_a_contrast_inversion() -> None:
    # The failure seen in this project was a network stuck at a constant image; a few steps
    # on an inversion task must already bring the loss well below a constant's.
    torch.manual_seed(3)
    network = UNet(in_channels=1, base_width=4, depth=2, dropout=0.0)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    images = torch.rand(8, 1, 32, 32)
    target = 1 - images
    constant_loss = torch.mean((target - target.mean()) ** 2).item()
    for _ in range(100):
        optimizer.zero_grad()
        loss = torch.mean((network(images) - target) ** 2)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.4 * constant_loss


@pytest.mark.parametrize(
    "arguments",
    [{"norm": "layer"}, {"depth": 0}, {"dropout": 1.0}, {"base_width": 0}, {"upsampling": "cubic"}],
)
def test_bad_arguments_are_refused(arguments: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        UNet(**arguments)
