"""The paper's U-Net for T1 <-> T2 synthesis, as a network whose constructor is its description.

Anklesaria et al.: two 3x3 convolutions with dropout between them per level, 2x2 max
pooling down, channels doubled per level, 2x2 transposed convolutions up, the encoder's
feature map concatenated onto the decoder's, a final 1x1 convolution. With
``skip_connections=False`` the same class is the paper's encoder-decoder baseline; with
``in_channels=1`` (no Sobel gradient channels) it is the plain U-Net baseline.

No training or I/O code lives here: the pre/post-processing is ``pipeline.model.preprocess``,
model files are ``pipeline.model.card``. The constructor's defaults are the shipped models'
architecture, and ``default_arguments`` reads them from there: there is no second copy.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.choices import Choice

# The widest level a UNet may have: sixteen times that of any network trained here
# (16 x 2**4); a typo in depth (40 for 4) must not start building a network of 2**40.
MAX_WIDTH = 4096


class Norm(Choice):
    """The normalisation after each convolution (see UNet)."""

    BATCH = "batch"
    INSTANCE = "instance"
    NONE = "none"


class Upsampling(Choice):
    """How the decoder doubles its maps (see UNet)."""

    TRANSPOSE = "transpose"
    TRANSPOSE_ICNR = "transpose-icnr"
    BILINEAR = "bilinear"
    NEAREST_CONV = "nearest-conv"


def _norm_layer(norm: Norm, channels: int) -> nn.Module:
    if norm is Norm.BATCH:
        return nn.BatchNorm2d(channels)
    if norm is Norm.INSTANCE:
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class _DoubleConv(nn.Sequential):
    """conv3x3 -> norm -> ReLU -> dropout -> conv3x3 -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm: Norm) -> None:
        # A bias before a normalisation is cancelled by its mean subtraction.
        bias = norm is Norm.NONE
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


def _upsampling_layer(upsampling: Upsampling, in_channels: int, out_channels: int) -> nn.Module:
    if upsampling in (Upsampling.TRANSPOSE, Upsampling.TRANSPOSE_ICNR):
        return nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
    if upsampling is Upsampling.NEAREST_CONV:
        return nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )
    # A 1x1 convolution commutes with bilinear interpolation (both are linear, one across
    # channels, one across pixels), so running it first gives the same layer at a quarter
    # of the cost.
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1),
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
    )


class UNet(nn.Module):
    """U-Net (or encoder-decoder) mapping (N, in_channels, H, W) to (N, out_channels, H, W).

    Args:
        in_channels: 3 for the paper's model (image, Sobel x, Sobel y), 1 for the plain U-Net.
        out_channels: channels of the synthesized image, 1.
        base_width: channels of the first level; doubled at each level down.
        depth: number of 2x2 poolings; inputs are zero-padded to a multiple of 2**depth.
        dropout: probability of the dropout between the two convolutions of every block; it
            is active in training mode only, so inference is deterministic.
        skip_connections: False gives the paper's encoder-decoder baseline (no concatenation).
        norm: "batch" (default), "instance" or "none" (the paper's Keras model has none).
            Batch normalisation is the default: it lets the deep, linear-output network train
            at useful learning rates from He initialisation, and at inference it is a fixed
            affine map, so it folds into the convolution before it at no cost and a slice's
            output does not depend on the other slices of its batch or on its own statistics
            (instance normalisation re-scales every slice by its own content, which makes the
            intensity of the synthetic series flicker from slice to slice, and costs a pass
            over every feature map). "instance" stays available for cross-site experiments.
        upsampling: "transpose" (the paper's 2x2 stride-2 transposed convolution),
            "transpose-icnr" (the same layer initialised with its four taps equal, i.e. as
            nearest-neighbour upsampling; Aitken et al. 2017), "bilinear" (a 1x1
            convolution, then bilinear interpolation) or "nearest-conv" (nearest-neighbour
            upsampling, then a 3x3 convolution: the resize-convolution of Odena et al.
            2016). A 2x2 stride-2 transposed convolution gives each of the four pixels it
            makes from one input pixel its own weights; where the input is unlike the
            training data (orbits, scalp, another scanner), what those weights disagree on
            shows as a 2-pixel checkerboard. Interpolation has no such period; ICNR starts
            without one and keeps the paper's layer; a resize-convolution has none and,
            unlike the bilinear kind, sees a 3x3 neighbourhood where it upsamples.
        input_shortcut: add a learnt affine map of the input image (channel 0) to the
            output, so that the network learns a correction of ``a * image + b`` rather than
            the whole target. The intensity-inverted input keeps every fine structure of the
            source and is a hard floor to beat on SSIM; with the shortcut the network gets
            that structure without rebuilding it through four levels. It starts at zero, so
            an untrained network is the same with or without it.

    The defaults are the v5 models'; the shipped models (t1-to-t2 v7, t2-to-t1 v6) have base
    width 16. Depth 4 gives a receptive field of about 140 pixels, enough to see most of a
    brain slice, which a contrast mapping needs. Base 16 (7.8 MB) trains 1.6 times slower
    per step than base 8 (2 MB) and synthesizes half as fast on 2 cores; at the same steps
    its held-out images are sharper in both directions and score higher (docs/ablation.md).
    Base 32 at depth 4 would be 31 MB, over the 10 MB budget. A model card records every
    argument, so a change of default changes no model.

    The output is linear (no sigmoid): with a sigmoid the model collapsed to a constant image
    in this project's trials. Weights use He initialisation, which trained where PyTorch's
    default did not.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        base_width: int = 8,
        depth: int = 4,
        dropout: float = 0.1,
        skip_connections: bool = True,
        norm: Norm = Norm.BATCH,
        upsampling: Upsampling = Upsampling.TRANSPOSE,
        input_shortcut: bool = False,
    ) -> None:
        super().__init__()
        norm = Norm.parse(norm, "norm")
        upsampling = Upsampling.parse(upsampling, "upsampling")
        if depth < 1 or base_width < 1 or in_channels < 1 or out_channels < 1:
            raise ValueError("depth, base_width, in_channels and out_channels must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {dropout}")
        if base_width * 2**depth > MAX_WIDTH:
            raise ValueError(
                f"base_width {base_width} at depth {depth} gives {base_width * 2**depth} channels "
                f"at the deepest level; at most {MAX_WIDTH} (a larger network would not fit "
                "in memory)"
            )
        self.in_channels = in_channels
        self.base_width = base_width
        self.depth = depth
        self.skip_connections = skip_connections
        widths = [base_width * 2**level for level in range(depth + 1)]

        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths[:-1]:
            self.down.append(_DoubleConv(previous, width, dropout, norm))
            previous = width
        self.bottom = _DoubleConv(widths[-2], widths[-1], dropout, norm)

        self.upsample = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in reversed(range(depth)):
            width = widths[level]
            self.upsample.append(_upsampling_layer(upsampling, widths[level + 1], width))
            joined = 2 * width if skip_connections else width
            self.up.append(_DoubleConv(joined, width, dropout, norm))
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self._initialise(upsampling)
        # Created after the initialisation, so that the other layers draw the same random
        # weights as without it.
        self.shortcut = nn.Conv2d(1, out_channels, 1) if input_shortcut else None
        if self.shortcut is not None:
            nn.init.zeros_(self.shortcut.weight)
            nn.init.zeros_(self.shortcut.bias)

    def _initialise(self, upsampling_kind: Upsampling) -> None:
        upsampling = set(self.upsample.modules())
        for module in self.modules():
            if not isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
                continue
            if module in upsampling and module.kernel_size == (3, 3):
                # A resize-convolution's 3x3 convolution: an ordinary fan-in; no ReLU follows.
                nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            elif module in upsampling:
                # Each output pixel of an upsampling (a stride-2 2x2 transposed convolution,
                # or a 1x1 convolution) sees one tap of every input channel, so its fan-in is
                # in_channels; torch's fan calculation reads a transposed weight as a plain
                # convolution's and gets it wrong. No ReLU follows, hence gain 1.
                nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_channels))
                if upsampling_kind is Upsampling.TRANSPOSE_ICNR:
                    with torch.no_grad():
                        module.weight.copy_(module.weight[..., :1, :1].expand_as(module.weight))
            else:
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        # The output is linear: He initialisation with gain 1.
        nn.init.kaiming_normal_(self.head.weight, nonlinearity="linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        # Zero padding: zero is the background of a normalised MR slice, and it is what the
        # convolutions already pad with, so the border looks like any other border.
        x = F.pad(x, (0, -width % multiple, 0, -height % multiple))
        image = x[:, :1]

        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bottom(x)
        for upsample, block, skip in zip(self.upsample, self.up, reversed(skips), strict=True):
            x = upsample(x)
            if self.skip_connections:
                x = torch.cat((x, skip), dim=1)
            x = block(x)
        output = self.head(x)
        if self.shortcut is not None:
            output = output + self.shortcut(image)
        return output[..., :height, :width]


def default_arguments() -> dict[str, Any]:
    """UNet's constructor arguments with their defaults: the shipped architecture, as a
    model card records it."""
    parameters = inspect.signature(UNet.__init__).parameters.values()
    return {
        parameter.name: parameter.default for parameter in parameters if parameter.name != "self"
    }
